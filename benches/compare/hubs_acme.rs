//! The ACME part of a hub run (issue 16, target 4): a local Pebble that validates
//! every order, the writer edge of region 0 as the only node with `[acme]` (so it
//! is the renewer and holds the lease), and the CA's DNS pointing the name at an
//! edge of region 3, three hops away (edge → hub → hub → edge), which answers
//! http-01 with the built-in responder, behind a [`tap`] that notes whether the
//! token was on that edge when the validator asked (the responder would answer
//! without it). After the daemon's own first issuance is
//! live on every node, `certmesh issue` is asked `--acme-runs` times; one request
//! runs exactly one order attempt, so a success is an issuance on the first
//! attempt. Each success is timed until the new certificate is live (key and cert
//! the renewer's new pair) on every node. A failed attempt prints Pebble's lines
//! for it and keeps the temp dir.

use super::*;
use certmesh::demo_pebble::{self, Pebble};

#[path = "tap.rs"]
mod tap;

/// What the ACME part of a hub run found.
pub enum AcmeSection {
    /// `--acme-runs 0`.
    Off,
    /// pebble / pebble-challtestsrv not installed.
    Skipped,
    /// It could not run (the error).
    Broken(String),
    Ran(Box<AcmeRuns>),
}

impl AcmeSection {
    /// Something went wrong: an order failed, or the part could not run.
    pub fn failed(&self) -> bool {
        match self {
            AcmeSection::Off | AcmeSection::Skipped => false,
            AcmeSection::Broken(_) => true,
            AcmeSection::Ran(a) => !a.failures.is_empty() || a.first.is_err(),
        }
    }
}

pub struct AcmeRuns {
    pub renewer: String,
    pub target: String,
    /// From starting the processes until the daemon's own first issuance was live
    /// on every node; the error if that order failed.
    pub first: Result<Duration, String>,
    pub asked: usize,
    /// `issue` answered Ok: issued on the first attempt.
    pub issued: usize,
    /// Request until the reply, successes only.
    pub reply: Option<Stats>,
    /// Request until the new pair is live on every node, successes only.
    pub live: Option<Stats>,
    /// The barrier's part of each order, from the renewer's log (when its level
    /// lets `certmesh::acme` info through).
    pub barrier: Option<Stats>,
    /// The failed attempts' errors.
    pub failures: Vec<String>,
    /// Challenges Pebble's validator took up, by its log: one per order when no
    /// authorization was reused.
    pub validated: usize,
    /// The validator's requests at the target edge during the runs, and how many
    /// came before the token had reached it.
    pub requests: usize,
    pub before_token: usize,
}

/// The CA and who orders, who is asked.
pub struct Setup {
    ca: Pebble,
    tap: tap::Tap,
    renewer: usize,
    target: usize,
}

/// Starts the CA and adds the sections to the renewer's and the target's configs
/// (before any daemon starts); `Err(section)` when the ACME part does not run.
pub fn prepare(
    dir: &Path,
    l: &Layout,
    configs: &[(String, PathBuf, PathBuf)],
    o: &Opts,
) -> Result<Result<Setup, AcmeSection>> {
    if o.acme_runs == 0 {
        return Ok(Err(AcmeSection::Off));
    }
    if !demo_pebble::available() {
        eprintln!("[hubs] ACME skipped: pebble / pebble-challtestsrv not installed");
        return Ok(Err(AcmeSection::Skipped));
    }
    let ca = Pebble::start(
        &dir.join("pebble"),
        // Every order validated: with reuse, about half reach no validator at all.
        &demo_pebble::Options {
            authz_reuse: Some(0),
            ..demo_pebble::Options::default()
        },
    )?;
    // The writer edge of region 0 orders; an edge of region 3 is asked.
    let renewer = HUBS;
    let target = (REGIONS - 1) * l.per + HUBS;
    let append = |i: usize, text: &str| -> Result<()> {
        let path = &configs[i].1;
        let mut cfg =
            std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        cfg.push_str(text);
        std::fs::write(path, cfg).with_context(|| format!("{}", path.display()))
    };
    // The validator asks the tap on the CA's port; the tap asks the responder.
    let responder = free_tcp_port(&ip(target))?;
    let asked = SocketAddr::new(ip(target).parse()?, ca.http_port);
    append(renewer, &ca.acme_config())?;
    append(target, &demo_pebble::http_config_at(&responder.to_string()))?;
    ca.set_a(demo_pebble::DOMAIN, &ip(target))?;
    let tap = tap::Tap::start(asked, responder, configs[target].2.clone())?;
    eprintln!(
        "[hubs] ACME: Pebble at {}; {} orders, {} resolves to {} ({asked}, its responder behind a tap), three hops away",
        ca.directory,
        l.name(renewer),
        demo_pebble::DOMAIN,
        l.name(target),
    );
    Ok(Ok(Setup {
        ca,
        tap,
        renewer,
        target,
    }))
}

/// `live/www`'s two files, as bytes.
fn pair(tree: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
    let cert = std::fs::read(tree.join("live/www/fullchain.pem")).ok()?;
    let key = std::fs::read(tree.join("live/www/privkey.pem")).ok()?;
    Some((cert, key))
}

/// The ACME runtime of the renewer's one certificate, from `status`.
fn renewer_cert(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
) -> Option<certmesh::ops::status::CertStatus> {
    let v = rt
        .block_on(certmesh::ops::control::request(socket, "status"))
        .ok()?;
    let s: certmesh::ops::status::Status = serde_json::from_value(v).ok()?;
    s.certificates.into_iter().find(|c| c.name == "www")
}

/// A log file's text from byte `from` on (empty if unreadable).
fn read_from(path: &Path, from: u64) -> String {
    let Ok(b) = std::fs::read(path) else {
        return String::new();
    };
    String::from_utf8_lossy(b.get(from as usize..).unwrap_or_default()).into_owned()
}

/// The last `lines` lines of a file from byte `from` on.
fn tail(path: &Path, from: u64, lines: usize) -> String {
    let text = read_from(path, from);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The cluster-wide barrier's time in each order (ms), from the renewer's log
/// since byte `from`: only there with `RUST_LOG=warn,certmesh::acme=info`.
fn order_barriers(log: &Path, from: u64) -> Vec<Duration> {
    read_from(log, from)
        .lines()
        .filter(|l| l.contains("challenges in place on"))
        .filter_map(|l| {
            let v = l.split("barrier_ms=").nth(1)?.split_whitespace().next()?;
            let ms: f64 = v.trim_matches('"').parse().ok()?;
            Some(Duration::from_secs_f64(ms / 1000.0))
        })
        .collect()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

impl Setup {
    fn socket(&self, c: &CmCluster) -> Result<PathBuf> {
        let cfg = certmesh::config::Config::load(&c.nodes[self.renewer].config)?;
        Ok(cfg.control_socket())
    }

    /// Until every node has the renewer's live pair, which must be complete (key
    /// matching cert); the time from `since`. A node whose `live/www` does not
    /// point at the renewer's version yet costs one `readlink` per poll: reading
    /// 2 × 247 files each millisecond would take a core from the nodes measured.
    fn live_everywhere(
        &self,
        c: &CmCluster,
        since: Instant,
        timeout: Duration,
    ) -> Result<(Duration, String)> {
        let renewer = &c.nodes[self.renewer].tree;
        let (serial, ok) = demo_pebble::live_bundle(renewer)
            .ok_or_else(|| anyhow!("no complete live/www on the renewer"))?;
        if !ok {
            bail!("live/www on the renewer: the key does not match the certificate");
        }
        let link = std::fs::read_link(renewer.join("live/www")).ok();
        let want = pair(renewer).ok_or_else(|| anyhow!("live/www gone on the renewer"))?;
        let mut pending: Vec<usize> = (0..c.nodes.len()).filter(|&i| i != self.renewer).collect();
        loop {
            pending.retain(|&i| {
                let tree = &c.nodes[i].tree;
                std::fs::read_link(tree.join("live/www")).ok() != link
                    || pair(tree).as_ref() != Some(&want)
            });
            if pending.is_empty() {
                return Ok((since.elapsed(), serial));
            }
            if since.elapsed() > timeout {
                let some: Vec<&str> = pending
                    .iter()
                    .take(5)
                    .map(|&i| c.nodes[i].name.as_str())
                    .collect();
                bail!(
                    "serial {serial} not live on {} nodes after {timeout:?} ({}…)",
                    pending.len(),
                    some.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the daemon's own first issuance to be live on every node; the
    /// time from `t0`, or the order's error.
    pub fn first(
        &self,
        rt: &tokio::runtime::Runtime,
        c: &CmCluster,
        t0: Instant,
    ) -> Result<Result<Duration, String>> {
        let socket = self.socket(c)?;
        let renewer = &c.nodes[self.renewer].tree;
        let deadline = Instant::now() + Duration::from_secs(120);
        while demo_pebble::live_bundle(renewer).is_none_or(|(_, ok)| !ok) {
            if let Some(cs) = renewer_cert(rt, &socket).filter(|cs| cs.failures > 0) {
                let e = cs.last_error.unwrap_or_default();
                eprintln!("[hubs] ACME: the daemon's first order failed: {e}");
                self.diagnose(c, 0, 0, 0);
                return Ok(Err(e));
            }
            if Instant::now() > deadline {
                bail!("no certificate on the renewer 120 s after start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (took, serial) = self.live_everywhere(c, t0, Duration::from_secs(120))?;
        let asked = self.tap.asked();
        eprintln!(
            "[hubs] ACME: first issuance (the daemon's own) live on all {} nodes {:.2} s after start (serial {serial}); the validator asked {} {} times, {} before the token was there",
            c.nodes.len(),
            took.as_secs_f64(),
            c.nodes[self.target].name,
            asked.len(),
            asked.iter().filter(|a| !a.had_token).count()
        );
        Ok(Ok(took))
    }

    /// The validator's requests since the `from`th, what the tap saw, Pebble's
    /// lines since `pebble_from` and the renewer's log since `node_from`.
    fn diagnose(&self, c: &CmCluster, from: usize, pebble_from: u64, node_from: u64) {
        for a in self.tap.asked().iter().skip(from) {
            eprintln!(
                "[hubs] ACME: the validator asked {} for {}: token {} there; the responder said {:?}",
                c.nodes[self.target].name,
                a.token,
                if a.had_token { "already" } else { "NOT yet" },
                a.answer
            );
        }
        let node_log = c.nodes[self.renewer].config.with_file_name("node.log");
        eprintln!(
            "[hubs] ACME: Pebble's log {} (this attempt, last lines):\n{}\n[hubs] ACME: renewer's log {} (this attempt, last lines):\n{}",
            self.ca.log.display(),
            tail(&self.ca.log, pebble_from, 30),
            node_log.display(),
            tail(&node_log, node_from, 15)
        );
    }

    /// `runs` times `certmesh issue` on the renewer, each timed until the reply and
    /// until the new pair is live on every node.
    pub fn runs(
        &self,
        rt: &tokio::runtime::Runtime,
        c: &CmCluster,
        l: &Layout,
        first: Result<Duration, String>,
        runs: usize,
    ) -> Result<AcmeRuns> {
        let socket = self.socket(c)?;
        let n = c.nodes.len();
        let node_log = c.nodes[self.renewer].config.with_file_name("node.log");
        let (mut reply, mut live, mut failures) = (Vec::new(), Vec::new(), Vec::new());
        let asked0 = self.tap.asked().len();
        let log0 = file_len(&node_log);
        for k in 1..=runs {
            let marks = (
                self.tap.asked().len(),
                file_len(&self.ca.log),
                file_len(&node_log),
            );
            let t = Instant::now();
            match rt.block_on(certmesh::ops::control::issue(&socket, "www")) {
                Ok(r) => {
                    let answered = t.elapsed();
                    let (all, serial) = self.live_everywhere(c, t, Duration::from_secs(60))?;
                    let asked = self.tap.asked();
                    let asked = asked.get(marks.0..).unwrap_or_default();
                    eprintln!(
                        "[hubs] ACME {k}/{runs}: issued on the first attempt in {} (version {}), serial {serial} live on all {n} after {}; validator asked {} times, {} before the token",
                        fmt_secs(answered.as_secs_f64()),
                        r.version,
                        fmt_secs(all.as_secs_f64()),
                        asked.len(),
                        asked.iter().filter(|a| !a.had_token).count()
                    );
                    reply.push(answered);
                    live.push(all);
                }
                Err(e) => {
                    eprintln!(
                        "[hubs] ACME {k}/{runs}: the attempt failed after {}: {e:#}",
                        fmt_secs(t.elapsed().as_secs_f64())
                    );
                    self.diagnose(c, marks.0, marks.1, marks.2);
                    failures.push(format!("{e:#}"));
                }
            }
        }
        let asked = self.tap.asked();
        let asked = asked.get(asked0..).unwrap_or_default();
        let barriers = order_barriers(&node_log, log0);
        let r = AcmeRuns {
            renewer: l.name(self.renewer),
            target: l.name(self.target),
            first,
            asked: runs,
            issued: reply.len(),
            reply: (!reply.is_empty()).then(|| stats(reply)),
            live: (!live.is_empty()).then(|| stats(live)),
            barrier: (!barriers.is_empty()).then(|| stats(barriers)),
            failures,
            validated: std::fs::read_to_string(&self.ca.log).map_or(0, |t| {
                t.matches("Pulled a task from the Tasks queue").count()
            }),
            requests: asked.len(),
            before_token: asked.iter().filter(|a| !a.had_token).count(),
        };
        eprintln!("[hubs] ACME {n}: {}", r.summary());
        Ok(r)
    }
}

impl AcmeRuns {
    /// One line: k of N, the timings, the failures.
    pub fn summary(&self) -> String {
        let p = |s: &Option<Stats>| {
            s.as_ref().map_or("-".into(), |s| {
                format!("p50 {} p99 {}", fmt_secs(s.p50), fmt_secs(s.p99))
            })
        };
        let mut out = format!(
            "issued on the first attempt {} of {}; issue reply {} (the barrier in it {}); live on \
             all {}; challenges validated by Pebble (first issuance included): {}; validator requests \
             at the far edge: {}, {} of them before the token had reached it",
            self.issued,
            self.asked,
            p(&self.reply),
            p(&self.barrier),
            p(&self.live),
            self.validated,
            self.requests,
            self.before_token
        );
        if !self.failures.is_empty() {
            let _ = write!(out, "; failures: {}", self.failures.join(" | "));
        }
        out
    }
}

/// The ACME paragraph of the hubs report.
pub fn render(results: &[HubsResult]) -> String {
    let mut s = String::new();
    for r in results {
        let line = match &r.acme {
            AcmeSection::Off => continue,
            AcmeSection::Skipped => {
                "skipped: pebble / pebble-challtestsrv not installed".to_string()
            }
            AcmeSection::Broken(e) => format!("could not run: {e}"),
            AcmeSection::Ran(a) => {
                let first = match &a.first {
                    Ok(d) => format!("live on all {:.2} s after start", d.as_secs_f64()),
                    Err(e) => format!("failed: {e}"),
                };
                format!(
                    "{} orders, {} answers the validator; first issuance (the daemon's own) {first}; then {}",
                    a.renewer,
                    a.target,
                    a.summary()
                )
            }
        };
        let _ = writeln!(s, "- ACME, {} nodes: {line}.", r.n);
    }
    let ran = results
        .iter()
        .any(|r| matches!(r.acme, AcmeSection::Ran(_) | AcmeSection::Broken(_)));
    if !s.is_empty() {
        s.insert_str(
            0,
            "\n#### ACME in the hub topology (issue 16, target 4)\n\n",
        );
    }
    if ran {
        s.push_str(
            "\nAgainst a local Pebble (validation sleep off, no authorization reuse: every order \
             is validated), the writer edge of region 0 orders, the only node with `[acme]`; \
             the CA's DNS points the name at an edge of region 3 (edge → hub → hub → edge), whose \
             built-in http-01 responder (`[http] listen`) answers through a tap that notes \
             whether the token file was on that edge when each request came (the responder \
             answers a token it does not have from the shared account, so success alone does \
             not show that the barrier held). `certmesh issue` runs exactly \
             one order attempt: Ok is an issuance on the first attempt. Issue reply: request \
             until the answer; the barrier in it: from the renewer's log (`barrier_ms`, with \
             `RUST_LOG=warn,certmesh::acme=info`; `-` otherwise); live on all: request until \
             every node reads the renewer's new key and certificate through `live/www`.\n",
        );
    }
    s
}

//! `--only certs-scale` (issue 29 item 3): what N certificates cost the machinery
//! once they exist, without ordering them. N good bundles are planted in one node's
//! tree as the renewer publishes them (`archive/<name>/1/` with the five files,
//! `live/<name>` → `../archive/<name>/1`), one test CA signing N leaves (a key each), plus the N
//! entries `certmesh cert add` writes (`.certmesh/certificates/<name>.toml`). The
//! node has no `[acme]`, so nothing is ordered. Measured: start-up until the control
//! socket answers (it opens after the first scan), `status` and `status --json`
//! latency and size (the real binary, [`SAMPLES`] each), `/metrics` latency and size,
//! RSS; then the node restarts with `[metrics] per_certificate = false` and the
//! restart and the aggregate scrape are measured the same way. Last, a new node joins
//! and Syncthing syncs a copy of the same tree between two instances (`certs_join`).

use super::*;
use crate::certs_join::{Join, Planted, StJoin};

/// Samples of each `status` / `/metrics` measure.
const SAMPLES: usize = 5;

/// (p50, max) seconds and the size in bytes of the last answer.
pub(crate) struct Timed {
    pub(crate) p50: f64,
    pub(crate) max: f64,
    pub(crate) bytes: usize,
}

/// What `--only certs-scale` measured.
pub(crate) struct ScaleResult {
    pub(crate) n: usize,
    pub(crate) plant_s: f64,
    /// Start with an empty index (every file hashed), until the control socket answers.
    pub(crate) start_s: f64,
    /// Restart over the stored index.
    pub(crate) restart_s: f64,
    /// The first `status --json` and scrape, asked as soon as the socket answers
    /// (the cache still cold or warming).
    pub(crate) first_status_s: f64,
    pub(crate) first_scrape_s: f64,
    pub(crate) status: Timed,
    pub(crate) status_json: Timed,
    pub(crate) metrics: Timed,
    pub(crate) metrics_aggregate: Timed,
    pub(crate) rss_mib: f64,
    pub(crate) rss_aggregate_mib: f64,
    /// The node's CPU while idle (after settling, or after giving up), % of a core.
    pub(crate) idle_cpu_pct: f64,
    /// Whether it settled (< 5 % of a core) within the limit.
    pub(crate) settled: bool,
    /// What was planted, for the join.
    pub(crate) planted: Planted,
    /// A new node's join (`certs_join`); Syncthing's when it was run.
    pub(crate) join: Result<Join, String>,
    pub(crate) st_join: Option<Result<StJoin, String>>,
}

/// Writes `n` good bundles and their tree entries into `tree`; what was written.
fn plant(tree: &Path, n: usize) -> Result<Planted> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let now = time::OffsetDateTime::now_utc();
    let entries = tree.join(".certmesh/certificates");
    std::fs::create_dir_all(&entries)?;
    std::fs::create_dir_all(tree.join("live"))?;
    let mut planted = Planted::default();
    for i in 0..n {
        let name = format!("c{i}");
        let domain = format!("{name}.bench.test");
        let mut p = CertificateParams::new(vec![domain.clone()])?;
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(89);
        // A key each, as real bundles have (a P-256 key costs microseconds): with one
        // key for all, a system that reuses content it holds would gain at the join.
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let cert = p.signed_by(&key, &issuer)?.pem();
        let fullchain = format!("{cert}{ca_pem}");
        let dir = tree.join(format!("archive/{name}/1"));
        std::fs::create_dir_all(&dir)?;
        for (file, data, mode) in [
            ("cert.pem", cert.as_str(), 0o644),
            ("chain.pem", ca_pem.as_str(), 0o644),
            ("fullchain.pem", fullchain.as_str(), 0o644),
            ("privkey.pem", key_pem.as_str(), 0o640),
            ("combined.pem", &format!("{fullchain}{key_pem}"), 0o640),
        ] {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(dir.join(file))?
                .write_all(data.as_bytes())?;
            planted.file(format!("archive/{name}/1/{file}"), data.len());
        }
        let target = format!("../archive/{name}/1");
        std::os::unix::fs::symlink(&target, tree.join("live").join(&name))?;
        planted.link(format!("live/{name}"), target);
        let entry = format!("name = \"{name}\"\ndomains = [\"{domain}\"]\nkey = \"ecdsa-p256\"\n");
        std::fs::write(entries.join(format!("{name}.toml")), &entry)?;
        planted.file(format!(".certmesh/certificates/{name}.toml"), entry.len());
    }
    Ok(planted)
}

/// Seconds from `t0` until the node's control socket accepts a connection.
fn until_control(node: &LocalNode, t0: Instant) -> Result<f64> {
    let sock = node.config.with_file_name("state").join("control.sock");
    loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("the control socket {} never answered", sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `certmesh status` with `args`: how long and bytes of output.
fn status_once(exe: &Path, node: &LocalNode, args: &[&str]) -> Result<(Duration, usize)> {
    let (s, bytes) = crate::certs::status(exe, node, args)?;
    Ok((Duration::from_secs_f64(s), bytes))
}

/// `GET /metrics`: how long and bytes of the body.
fn scrape_once(addr: &str) -> Result<(Duration, usize)> {
    let (s, body) = crate::certs::scrape(addr)?;
    Ok((Duration::from_secs_f64(s), body.len()))
}

fn timed(mut one: impl FnMut() -> Result<(Duration, usize)>) -> Result<Timed> {
    let mut v = Vec::with_capacity(SAMPLES);
    let mut bytes = 0;
    for _ in 0..SAMPLES {
        let (d, b) = one()?;
        v.push(d);
        bytes = b;
    }
    let s = stats(v);
    Ok(Timed {
        p50: s.p50,
        max: s.max,
        bytes,
    })
}

pub(crate) fn run_certs_scale(exe: &Path, st: Option<&Path>, o: &Opts) -> Result<ScaleResult> {
    let n = o.certs;
    eprintln!("[certmesh] certs-scale: planting {n} certificates on one node");
    let metrics = format!(
        "127.0.0.2:{}",
        TcpListener::bind("127.0.0.2:0")?.local_addr()?.port()
    );
    // Two nodes' configs, peered both ways; node 2 starts only at the join, and node
    // 1 learns of it then (so the measures before are those of a node alone).
    let dir = tempfile::Builder::new()
        .prefix("certmesh-bench-")
        .tempdir()?;
    let configs = demo::write_mesh(dir.path(), 2)?;
    let (name, cfg, tree) = configs[0].clone();
    let t = Instant::now();
    let planted = plant(&tree, n)?;
    let plant_s = t.elapsed().as_secs_f64();
    let full = std::fs::read_to_string(&cfg)?;
    let peer = crate::certs_join::peer_block(&full, "node2")?;
    let mut text = crate::certs::without_peer(&full, "node2");
    text.push_str(&format!("\n[metrics]\nlisten = \"{metrics}\"\n"));
    std::fs::write(&cfg, text)?;
    let t0 = Instant::now();
    let mut c = CmCluster {
        nodes: vec![demo::spawn(exe, &name, &cfg, &tree)?],
        _dir: dir,
    };
    let start_s = until_control(&c.nodes[0], t0)?;
    eprintln!("[certmesh] certs-scale: planted in {plant_s:.1} s, started in {start_s:.1} s");
    let first_status_s = status_once(exe, &c.nodes[0], &["--json"])?.0.as_secs_f64();
    let idle = idle_cpu(&c, Duration::from_secs(120));
    let node = &c.nodes[0];
    let status = timed(|| status_once(exe, node, &[]))?;
    let status_json = timed(|| status_once(exe, node, &["--json"]))?;
    let metrics_full = timed(|| scrape_once(&metrics))?;
    let pid = |c: &CmCluster| c.pids().first().copied().unwrap_or(0);
    let rss_full = rss_mib(pid(&c)).unwrap_or(0.0);
    // Again with the aggregates only: a restart over the stored index.
    c.stop_all();
    let text = std::fs::read_to_string(&cfg)?;
    std::fs::write(
        &cfg,
        text.replace("\n[metrics]\n", "\n[metrics]\nper_certificate = false\n"),
    )?;
    let t = Instant::now();
    c.nodes[0] = demo::spawn(exe, &name, &cfg, &tree)?;
    let restart_s = until_control(&c.nodes[0], t)?;
    let first_scrape_s = scrape_once(&metrics)?.0.as_secs_f64();
    c.settle(Duration::from_secs(120));
    let metrics_aggregate = timed(|| scrape_once(&metrics))?;
    let rss_aggregate_mib = rss_mib(pid(&c)).unwrap_or(0.0);
    // A new node joins; failures become the row's text.
    let timeout =
        crate::certs_join::join_timeout(&planted).min(Duration::from_secs(o.certs_timeout_s));
    let joiner = &configs[1];
    // The new node's `/metrics` too, for whoever watches the join (not scraped here).
    let joiner_metrics = format!(
        "127.0.0.3:{}",
        TcpListener::bind("127.0.0.3:0")?.local_addr()?.port()
    );
    let text = std::fs::read_to_string(&joiner.1)?;
    std::fs::write(
        &joiner.1,
        text + &format!("\n[metrics]\nlisten = \"{joiner_metrics}\"\nper_certificate = false\n"),
    )?;
    let join =
        crate::certs_join::certmesh_join(exe, &mut c, &metrics, &peer, joiner, &planted, timeout)
            .map_err(|e| {
                eprintln!("certmesh join failed: {e:#}");
                format!("{e:#}")
            });
    c.stop_all();
    let st_join = st.map(|st| {
        crate::certs_join::syncthing_join(st, &tree, &planted, timeout).map_err(|e| {
            eprintln!("syncthing join failed: {e:#}");
            format!("{e:#}")
        })
    });
    Ok(ScaleResult {
        n,
        plant_s,
        start_s,
        restart_s,
        first_status_s,
        first_scrape_s,
        status,
        status_json,
        metrics: metrics_full,
        metrics_aggregate,
        rss_mib: rss_full,
        rss_aggregate_mib,
        idle_cpu_pct: idle.1,
        settled: idle.0,
        planted,
        join,
        st_join,
    })
}

/// Waits for the node to settle (at most `limit`; says so on stderr if it does not),
/// then measures its CPU over 5 s: whether it settled, and % of one core. Before
/// `6f96c3c1` a node of 5,000 certificates rescanned its tree without end and never
/// settled, which this harness used to pass over in silence.
fn idle_cpu(c: &CmCluster, limit: Duration) -> (bool, f64) {
    let settled = c.settle(limit) < limit.as_secs_f64();
    if !settled {
        eprintln!("[certmesh] certs-scale: the node did not settle within {limit:?}: its samples are taken while busy");
    }
    let window = Duration::from_secs(5);
    let a = c.cpu_seconds();
    std::thread::sleep(window);
    (
        settled,
        (c.cpu_seconds() - a) / window.as_secs_f64() * 100.0,
    )
}

/// The report's section.
pub(crate) fn render(r: &ScaleResult) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n## Many certificates, planted ({} on one node, {SAMPLES} samples each)\n",
        r.n
    );
    let _ = writeln!(o, "| measure | value |\n|---|---|");
    let t = |x: &Timed| {
        format!(
            "p50 {:.0} ms, max {:.0} ms, {}",
            x.p50 * 1e3,
            x.max * 1e3,
            size(x.bytes)
        )
    };
    let rows = [
        (
            "planting the tree (bench side)",
            format!("{:.1} s", r.plant_s),
        ),
        (
            "start, empty index, until the control socket answers",
            format!("{:.1} s", r.start_s),
        ),
        (
            "restart over the stored index",
            format!("{:.1} s", r.restart_s),
        ),
        (
            "first `status --json` once the socket answers",
            format!("{:.1} s", r.first_status_s),
        ),
        (
            "first `/metrics` after the restart (aggregates)",
            format!("{:.1} s", r.first_scrape_s),
        ),
        ("`status` (text summary)", t(&r.status)),
        ("`status --json`", t(&r.status_json)),
        ("`/metrics`, per-certificate series", t(&r.metrics)),
        (
            "`/metrics`, `per_certificate = false`",
            t(&r.metrics_aggregate),
        ),
        (
            "the node's CPU while idle, over 5 s after settling",
            format!(
                "{:.1} % of a core{}",
                r.idle_cpu_pct,
                if r.settled {
                    ""
                } else {
                    " (**did not settle** below 5 % within 120 s)"
                }
            ),
        ),
        (
            "RSS (per-certificate / aggregates after the restart)",
            format!("{:.0} / {:.0} MiB", r.rss_mib, r.rss_aggregate_mib),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    o + &crate::certs_join::render(r.n, &r.planted, r.start_s, &r.join, &r.st_join)
}

fn size(b: usize) -> String {
    if b >= 1_000_000 {
        format!("{:.2} MB", b as f64 / 1e6)
    } else {
        format!("{:.1} KB", b as f64 / 1e3)
    }
}

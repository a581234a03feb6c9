//! Serving probes: what this node's frontends actually hand out. For each
//! `[[frontend]]` and each certificate it serves, a TLS handshake with SNI reads the
//! presented leaf ([`tls`]); the result (leaf SHA-256, notAfter, whether it is the
//! leaf of `live/<name>/fullchain.pem`, the error, when) goes to the engine, which
//! sends it to the peers ([`crate::core::served`]).
//!
//! When: after every hook run that follows a change of the certificate, on the
//! schedule of [`rollout`] (reloads are asynchronous), every 5 minutes with jitter,
//! and once at start. Bounded: one round at a time, in which each frontend is
//! probed one certificate after the other (frontends in parallel), each probe at
//! most [`tls::TIMEOUT`]; certificates changing together share one round.
//!
//! Repair: a frontend still on another leaf after the schedule gets the hook re-run
//! (the hook runner is asked through [`crate::telemetry::Probes::rerun_requested`]), at most
//! [`rollout::MAX_RERUNS`] times with backoff; failures are logged and shown in
//! `status` with the hook's output.

pub mod rollout;
pub mod tls;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::frontend::FrontendConfig;
use crate::config::Config;
use crate::core::served::ServedRecord;
use crate::handles::served::ServedReports;
use crate::handles::{Reports, Settings};
use rollout::{Outcome, Rollouts, Verdict};

/// Time between periodic rounds (each ±10 %): the period receivers judge a report's
/// freshness by (`core::served::STALE_AFTER_MS` is 3 of them).
pub const PERIOD: Duration = Duration::from_millis(crate::core::served::REPORT_PERIOD_MS as u64);
/// Delay of the first round after start.
const FIRST_ROUND: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the probe task uses of the daemon.
#[derive(Clone)]
pub struct ProbeHandles {
    pub settings: Settings,
    pub reports: Reports,
    pub served: ServedReports,
    /// The ACME driver's handle: a rolled-back version counts as a failed order.
    pub acme: crate::acme::handle::AcmeSlot,
}

/// Starts the probes. Always: the hook runner reports to them, and `[[frontend]]`
/// is read again at every round (a SIGHUP may add one); without any, a round every
/// 5 minutes finds nothing to do.
pub fn start(h: ProbeHandles) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(h))
}

/// The leaves a certificate has in the tree: the one `live/<name>` exposes, and
/// each kept archive version's.
#[derive(Debug, Default)]
pub struct Leaves {
    pub live: Option<[u8; 32]>,
    pub live_version: Option<u32>,
    pub versions: Vec<(u32, [u8; 32])>,
}

impl Leaves {
    /// Reads `live/<name>/fullchain.pem` and `archive/<name>/<n>/fullchain.pem`.
    pub fn read(root: &Path, name: &str) -> Leaves {
        let leaf = |rel: String| {
            let pem = crate::disk::tree::read(root, &rel)?;
            let ders = crate::acme::bundle::chain_der(&pem).ok()?;
            ders.first().map(|d| tls::presented(d).sha256)
        };
        Leaves {
            live: leaf(format!("live/{name}/fullchain.pem")),
            live_version: crate::acme::bundle::live_version(root, name),
            versions: crate::acme::bundle::archive_versions(root, name)
                .into_iter()
                .filter_map(|v| Some((v, leaf(format!("archive/{name}/{v}/fullchain.pem"))?)))
                .collect(),
        }
    }

    /// Whether `sha` is the live leaf.
    pub fn is_current(&self, sha: &[u8; 32]) -> bool {
        self.live.as_ref() == Some(sha)
    }

    /// The archive version whose leaf is `sha`, if kept.
    pub fn version_of(&self, sha: &[u8; 32]) -> Option<u32> {
        self.versions
            .iter()
            .find(|(_, s)| s == sha)
            .map(|(v, _)| *v)
    }
}

/// The (frontend, certificate, SNI) pairs the config asks to probe, among `certs`
/// (`None`: all).
fn targets(c: &Config, certs: Option<&[String]>) -> Vec<(FrontendConfig, String, String)> {
    let mut out = Vec::new();
    for f in &c.frontends {
        for cert in &c.certificates {
            let wanted = certs.is_none_or(|l| l.contains(&cert.name));
            if wanted && f.probes(&cert.name) {
                out.push((f.clone(), cert.name.clone(), f.sni_for(cert)));
            }
        }
    }
    out
}

/// One probe result before it becomes a record.
struct Seen {
    frontend: String,
    cert: String,
    result: Result<tls::Presented, String>,
}

/// Probes `targets`: frontends in parallel, each one certificate at a time.
async fn round(targets: Vec<(FrontendConfig, String, String)>) -> Vec<Seen> {
    let mut by_frontend: BTreeMap<String, Vec<(FrontendConfig, String, String)>> = BTreeMap::new();
    for t in targets {
        by_frontend.entry(t.0.name.clone()).or_default().push(t);
    }
    let mut set = tokio::task::JoinSet::new();
    for (_, list) in by_frontend {
        set.spawn(async move {
            let mut out = Vec::with_capacity(list.len());
            // A frontend that refuses or ignores connections does so for every
            // certificate: the rest of the round is not spent on it (500
            // certificates x 5 s).
            let mut down: Option<String> = None;
            for (f, cert, sni) in list {
                let result = match &down {
                    Some(e) => Err(e.clone()),
                    None => tls::probe(f.address, &sni).await,
                };
                if let Err(e) = &result {
                    if tls::unreachable(e) {
                        down = Some(e.clone());
                    }
                }
                out.push(Seen {
                    frontend: f.name,
                    cert,
                    result,
                });
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(v) = r {
            all.extend(v);
        }
    }
    all
}

/// The probe task's own state.
struct Driver {
    h: ProbeHandles,
    rollouts: Rollouts,
    /// Latest record per (certificate, frontend).
    last: BTreeMap<(String, String), ServedRecord>,
    /// Signs this node's reports (`None`: the key cannot sign; nothing is sent).
    signer: Option<crate::core::device::NodeSigner>,
    /// This node's last report generation (unix milliseconds, always growing).
    generation: u64,
    /// Per certificate, the last failed handshake of a frontend that took the
    /// connection ("nginx: received fatal alert: HandshakeFailure").
    broken: BTreeMap<String, String>,
}

impl Driver {
    /// Probes `certs` (`None`: all) and publishes every latest record; returns the
    /// verdict per probed certificate.
    async fn probe(&mut self, certs: Option<&[String]>) -> BTreeMap<String, Verdict> {
        let Some((targets, root)) = self
            .h
            .settings
            .read(|c| (targets(c, certs), c.tree.clone()))
        else {
            return BTreeMap::new();
        };
        let keep: BTreeSet<(String, String)> = self
            .h
            .settings
            .read(|c| {
                targets_all(c)
                    .into_iter()
                    .map(|(f, c, _)| (c, f.name))
                    .collect()
            })
            .unwrap_or_default();
        let seen = round(targets).await;
        let now_ms = crate::clock::now_ns() / 1_000_000;
        let now = now_ms.div_euclid(1000);
        let mut leaves: HashMap<String, Leaves> = HashMap::new();
        let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
        for s in seen {
            let l = leaves
                .entry(s.cert.clone())
                .or_insert_with(|| Leaves::read(&root, &s.cert));
            let v = match &s.result {
                Ok(p) if l.live.is_none() || l.is_current(&p.sha256) => Verdict::Current,
                Ok(_) => Verdict::Stale,
                Err(e) if tls::unreachable(e) => Verdict::Unreachable,
                Err(e) => {
                    self.broken
                        .insert(s.cert.clone(), format!("{}: {e}", s.frontend));
                    Verdict::Broken
                }
            };
            let e = verdicts.entry(s.cert.clone()).or_insert(Verdict::Current);
            *e = e.worst(v);
            if let Err(why) = &s.result {
                *lock(&self.h.served.probes().0.failures)
                    .entry(s.frontend.clone())
                    .or_default() += 1;
                tracing::warn!(frontend = %s.frontend, cert = %s.cert, error = %why, "serving probe failed");
            }
            let mut rec = ServedRecord {
                cert: s.cert.clone(),
                frontend: s.frontend.clone(),
                leaf_sha256: s.result.as_ref().ok().map(|p| p.sha256),
                not_after_unix: s.result.as_ref().ok().and_then(|p| p.not_after_unix),
                error: s.result.err(),
                seen_unix: now,
                since_unix: now,
                since_ms: now_ms,
            };
            if let Some(old) = self.last.get(&(s.cert.clone(), s.frontend.clone())) {
                if old.same_outcome(&rec) {
                    rec.since_unix = old.since_unix;
                    rec.since_ms = old.since_ms;
                }
            }
            self.last.insert((s.cert, s.frontend), rec);
        }
        self.last.retain(|k, _| keep.contains(k));
        self.publish();
        verdicts
    }

    /// Signs this node's latest records as a new generation and hands them to the
    /// engine (which sends them to the peers).
    fn publish(&mut self) {
        let records = crate::core::served::normalize(self.last.values().cloned().collect());
        let now_ms = u64::try_from(crate::clock::unix_now()).unwrap_or(0) * 1000;
        self.generation = self.generation.saturating_add(1).max(now_ms);
        let name = self.h.served.name();
        let report = self.signer.as_ref().and_then(|s| {
            crate::net::wire::served::sign_report(s, &name, self.generation, &records)
        });
        self.h.served.set_mine(records, report);
    }

    /// Takes the hook runs reported since the last call.
    fn take_hook_runs(&mut self) {
        let runs = std::mem::take(&mut *lock(&self.h.served.probes().0.hook_runs));
        let now = Instant::now();
        for ev in runs {
            for c in &ev.certs {
                if !ev.ok {
                    lock(&self.h.served.probes().0.hook_output)
                        .insert(c.clone(), ev.output.clone());
                }
                self.rollouts.hook_ran(c, ev.ok, ev.rerun, now);
            }
        }
    }

    /// What a frontend does wrong for `cert`, after a round that found `v`.
    fn wrong(&self, cert: &str, v: Verdict) -> String {
        match (v, self.broken.get(cert)) {
            (Verdict::Broken, Some(e)) => format!("fails the handshake ({e})"),
            _ => "serves another leaf".into(),
        }
    }

    /// Tells people what a rollout round decided (`wrong`: what the frontend does).
    fn report(&self, cert: &str, outcome: Outcome, wrong: &str) {
        let output = lock(&self.h.served.probes().0.hook_output)
            .get(cert)
            .cloned()
            .unwrap_or_default();
        let output = if output.is_empty() {
            String::new()
        } else {
            format!("; hook: {output}")
        };
        match outcome {
            Outcome::Rerun(n) => self.h.reports.error(format!(
                "certificate {cert}: a frontend still {wrong} instead of live/{cert}; \
                 re-running its hook ({n} of {}){output}",
                rollout::MAX_RERUNS
            )),
            Outcome::GaveUp(n) => self.h.reports.error(format!(
                "certificate {cert}: a frontend still {wrong} instead of live/{cert} \
                 after {n} hook re-runs; giving up until the next change{output}"
            )),
        }
    }
}

fn targets_all(c: &Config) -> Vec<(FrontendConfig, String, String)> {
    targets(c, None)
}

/// Jittered period: [`PERIOD`] ±10 %.
fn next_period() -> Duration {
    let jitter = rand::random_range(0.9..1.1);
    PERIOD.mul_f64(jitter)
}

async fn run(h: ProbeHandles) {
    let probes = h.served.probes().clone();
    // Every frontend's failure counter from 0, so rate() sees the first failure.
    for f in h.settings.read(|c| c.frontends.clone()).unwrap_or_default() {
        lock(&probes.0.failures).entry(f.name).or_default();
    }
    let signer = h.served.signer();
    if signer.is_none() {
        tracing::error!("the node key cannot sign: serving-probe results are not sent to peers");
    }
    let mut d = Driver {
        h,
        rollouts: Rollouts::default(),
        last: BTreeMap::new(),
        signer,
        generation: 0,
        broken: BTreeMap::new(),
    };
    let mut periodic = tokio::time::Instant::now() + FIRST_ROUND;
    loop {
        let wake_at = d
            .rollouts
            .next_wakeup()
            .map(tokio::time::Instant::from_std)
            .map_or(periodic, |t| t.min(periodic));
        tokio::select! {
            _ = probes.0.wake.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
        d.take_hook_runs();
        let now = tokio::time::Instant::now();
        if now >= periodic {
            periodic = now + next_period();
            let verdicts = d.probe(None).await;
            feed(&mut d, verdicts).await;
        }
        let due = d.rollouts.probes_due(Instant::now());
        if !due.is_empty() {
            let mut verdicts = d.probe(Some(&due)).await;
            // A certificate no frontend serves has nothing to wait for (and must not
            // stay due, which would spin this loop).
            for c in due {
                verdicts.entry(c).or_insert(Verdict::Current);
            }
            feed(&mut d, verdicts).await;
        }
        for cert in d.rollouts.reruns_due(Instant::now()) {
            tracing::info!(cert = %cert, "re-running the hook: a frontend serves another leaf");
            probes.ask_rerun(cert);
        }
    }
}

/// Hands a round's verdicts to the rollouts; reports what they decide. A change
/// still not served after the window (or after the hook re-runs, when the hook
/// failed) goes to [`verify`], which rolls it back under `rollout = "verify"`.
async fn feed(d: &mut Driver, verdicts: BTreeMap<String, Verdict>) {
    let now = Instant::now();
    for (cert, v) in verdicts {
        let started = d.rollouts.started(&cert);
        let wrong = d.wrong(&cert, v);
        let Some(o) = d.rollouts.probed(&cert, v, now) else {
            continue;
        };
        let late = started.is_some_and(|s| now.duration_since(s) >= rollout::WINDOW);
        let why = match o {
            Outcome::GaveUp(n) => Some(format!("it {wrong} after {n} hook re-runs")),
            Outcome::Rerun(_) if late => {
                Some(format!("it {wrong} after {} s", rollout::WINDOW.as_secs()))
            }
            Outcome::Rerun(_) => None,
        };
        d.report(&cert, o, &wrong);
        if let Some(why) = why {
            let output = lock(&d.h.served.probes().0.hook_output)
                .get(&cert)
                .cloned()
                .unwrap_or_default();
            let why = match output.trim() {
                "" => why,
                out => format!("{why}; hook: {out}"),
            };
            verify::after_failed_rollout(&d.h, &cert, why).await;
        }
    }
}

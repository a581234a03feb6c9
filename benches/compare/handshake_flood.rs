//! Small files during a flood of QUIC handshakes (issue 25 item 7, `--only
//! handshake-flood`): 2 nodes; small files a → b calm, then again while 64 devices no
//! node has configured dial b over and over with the crate's own transport (every
//! attempt a real QUIC Initial and, if admitted, a TLS handshake that b's device-ID pin
//! refuses). Past `net::admission::RETRY_ABOVE` handshakes in flight b answers with a
//! stateless Retry, at `MAX_IN_FLIGHT` it turns new ones away; the target is that the
//! flood does not push the small-file p99 above twice the calm one. The flood of
//! `tests/unauth_load.rs`, measured instead of asserted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use certmesh::core::device::DeviceId;
use certmesh::identity::Identity;
use certmesh::net::transport::{allow_only, Transport};

use super::*;

/// Devices dialling b at once.
pub(crate) const STRANGERS: usize = 64;
/// Attempts made before the flooded samples start.
pub(crate) const WARM_ATTEMPTS: usize = 200;
/// Where the strangers' endpoints are bound (the nodes are on 127.0.0.2 and .3).
pub(crate) const FLOOD_IP: &str = "127.0.0.50";
/// b's log lines of `net::admission` (debug), counted after the flood.
const RETRY_LINE: &str = "handshake: Retry";
const REFUSED_LINE: &str = "handshake refused: too many in flight";

pub(crate) struct FloodResult {
    pub(crate) calm: Stats,
    pub(crate) flooded: Stats,
    /// Handshake attempts from the flood's start to its stop.
    pub(crate) attempts: usize,
    /// Attempts per second while the flooded samples were taken.
    pub(crate) rate: f64,
    /// Retries b sent, and handshakes it refused at the cap (from its log).
    pub(crate) retries: usize,
    pub(crate) refused: usize,
    /// Share of one core node b took while the calm and the flooded samples ran.
    pub(crate) b_cpu: (f64, f64),
    /// The same for the harness itself: the poller, and during the flood the
    /// strangers' side of every handshake too.
    pub(crate) harness_cpu: (f64, f64),
}

/// CPU seconds of `pids` (summed) and the instant they were read.
fn cpu_now(pids: &[u32]) -> (Instant, f64) {
    let cpu = pids.iter().filter_map(|&p| cpu_seconds(p).ok()).sum();
    (Instant::now(), cpu)
}

/// Share of one core since `then`.
fn cpu_share(pids: &[u32], then: (Instant, f64)) -> f64 {
    let (now, cpu) = cpu_now(pids);
    (cpu - then.1) / (now - then.0).as_secs_f64().max(1e-3)
}

/// Strangers (devices no node has configured, each on its own endpoint) dialling
/// `victim` at `addr` over and over, `concurrent` at a time.
struct Flood {
    runtime: Option<tokio::runtime::Runtime>,
    attempts: Arc<AtomicUsize>,
}

impl Flood {
    fn start(
        dir: &Path,
        ip: &str,
        victim: DeviceId,
        addr: SocketAddr,
        concurrent: usize,
    ) -> Result<Flood> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let attempts = Arc::new(AtomicUsize::new(0));
        let bind: SocketAddr = format!("{ip}:0").parse()?;
        // Every endpoint first, then the dialling: identities are not made while the
        // first strangers already run.
        let mut endpoints = Vec::with_capacity(concurrent);
        for i in 0..concurrent {
            let me = Arc::new(Identity::init(&dir.join(format!("stranger{i}")))?);
            let _enter = runtime.enter();
            endpoints.push(Transport::bind(me, bind, allow_only([victim]))?);
        }
        for t in endpoints {
            let attempts = attempts.clone();
            runtime.spawn(async move {
                loop {
                    let dial = t.connect(victim, addr);
                    let _ = tokio::time::timeout(Duration::from_secs(1), dial).await;
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        Ok(Flood {
            runtime: Some(runtime),
            attempts,
        })
    }

    fn attempts(&self) -> usize {
        self.attempts.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) fn run_handshake_flood(
    exe: &Path,
    rt: &tokio::runtime::Runtime,
    o: &Opts,
) -> Result<FloodResult> {
    eprintln!(
        "[certmesh] handshake flood: {} small files a → b calm, then {} while {STRANGERS} strangers dial b (2 nodes)",
        o.samples, o.samples
    );
    // b logs what admission does (one debug line per Retry or refusal), nothing else
    // beyond warnings.
    let (c, _) = cm_start_env(
        exe,
        2,
        &[("RUST_LOG", "warn,certmesh::net::admission=debug")],
    )?;
    cm_wait_connected(rt, &c, Duration::from_secs(30))?;
    c.settle(Duration::from_secs(10));
    let b = &c.nodes[1];
    let cfg = certmesh::config::Config::load(&b.config)?;
    let victim = Identity::load(&cfg.state_dir)?.id;
    let b_pid = [b.child.as_ref().context("node b is running")?.id()];
    let me = [std::process::id()];
    let t = Trees {
        label: "certmesh a → b",
        writer: &c.nodes[0].tree,
        peers: vec![&b.tree],
        jitter: Duration::from_millis(50),
        timeout: Duration::from_secs(10),
    };
    let (b0, h0) = (cpu_now(&b_pid), cpu_now(&me));
    let calm = stats(small_file_samples(&t, o.samples, true, false)?);
    let calm_cpu = (cpu_share(&b_pid, b0), cpu_share(&me, h0));

    let strangers = tempfile::Builder::new()
        .prefix("certmesh-bench-strangers-")
        .tempdir()?;
    let flood_start = Instant::now();
    let flood = Flood::start(strangers.path(), FLOOD_IP, victim, cfg.listen, STRANGERS)
        .context("starting the flood")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while flood.attempts() < WARM_ATTEMPTS {
        if Instant::now() > deadline {
            bail!(
                "the flood made {} of {WARM_ATTEMPTS} handshake attempts in 60 s",
                flood.attempts()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "[certmesh] flood under way: {} attempts after {}",
        flood.attempts(),
        fmt_secs(flood_start.elapsed().as_secs_f64())
    );
    let (t1, a1) = (Instant::now(), flood.attempts());
    let (b0, h0) = (cpu_now(&b_pid), cpu_now(&me));
    let flooded = small_file_samples(&t, o.samples, false, false);
    let (window, a2) = (t1.elapsed(), flood.attempts());
    let flood_cpu = (cpu_share(&b_pid, b0), cpu_share(&me, h0));
    drop(flood);
    let flooded = stats(flooded?);
    let rate = (a2 - a1) as f64 / window.as_secs_f64().max(1e-3);
    // The a–b session must have lived through it.
    cm_wait_connected(rt, &c, Duration::from_secs(10)).context("a and b after the flood")?;
    let log = std::fs::read_to_string(b.config.with_file_name("node.log")).unwrap_or_default();
    let count = |line: &str| log.lines().filter(|l| l.contains(line)).count();
    let r = FloodResult {
        calm,
        flooded,
        attempts: a2,
        rate,
        retries: count(RETRY_LINE),
        refused: count(REFUSED_LINE),
        b_cpu: (calm_cpu.0, flood_cpu.0),
        harness_cpu: (calm_cpu.1, flood_cpu.1),
    };
    eprintln!(
        "[certmesh] small file a → b: p99 {} calm, {} during the flood ({:.2}×); {} attempts, {:.0}/s; b sent {} Retries, refused {} at the cap; CPU (share of a core) calm → flood: b {:.0} → {:.0} %, harness {:.0} → {:.0} %",
        fmt_secs(r.calm.p99),
        fmt_secs(r.flooded.p99),
        r.flooded.p99 / r.calm.p99,
        r.attempts,
        r.rate,
        r.retries,
        r.refused,
        r.b_cpu.0 * 100.0,
        r.b_cpu.1 * 100.0,
        r.harness_cpu.0 * 100.0,
        r.harness_cpu.1 * 100.0,
    );
    Ok(r)
}

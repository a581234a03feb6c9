//! certmesh vs Syncthing, side by side on one machine, everything on 127.0.0.x.
//!
//! `cargo build --release && cargo bench --bench compare -- [--quick] [--samples N]
//! [--defaults-samples N] [--bulk-files N --bulk-mib M] [--scale 16,32] [--skip-syncthing]`
//!
//! Measures (see BENCHMARKS.md and DESIGN.md §6):
//! 1. small-file propagation, 3 nodes (100-byte file written atomically on node 1, time until
//!    the right content is on both other nodes);
//! 2. a cert + key bundle (3 KB + 1.7 KB) published as a new `archive/<name>/<i>/` version
//!    with `live/<name>` flipped to it, time until `live/<name>/*` reads the new pair on all
//!    peers, and whether a peer was ever seen with a mismatched or dangling pair;
//! 3. idle RSS, CPU seconds and context switches per node;
//! 4. bulk initial sync between 2 nodes (N files / M MiB created on node 1 before start);
//! 5. certmesh only: 16 and 32 node full meshes (formation time, propagation p50/p99);
//! 6. certmesh only, with `--only hubs`: hub topologies of 128 (`--hubs 128,248`) real
//!    processes on 127.1.0.0/16 (see `compare/hubs.rs`); with pebble installed, also real
//!    ACME orders from an edge, validated at an edge three hops away (`--acme-runs`,
//!    `compare/hubs_acme.rs`).
//! 7. with pebble, `--only acme`: issuance on 1 vs 3 nodes and, with nginx installed,
//!    issued → served by every node's nginx next to issued → live everywhere
//!    (`compare/served.rs`).
//! 8. only when named: `--only certs` (N certificates issued by a local Pebble on 3
//!    nodes, `compare/certs.rs`) and `--only certs-scale` (N bundles planted in one
//!    node's tree, no ACME: start-up, `status` and `/metrics` latency and size, RSS,
//!    then a new node's join against Syncthing's initial sync of the same tree;
//!    `compare/certs_scale.rs`, `compare/certs_join.rs`).
//! 9. certmesh only, `--only handshake-flood` (also in a full run): small files a → b on
//!    2 nodes, calm and while 64 unconfigured devices flood b with QUIC handshakes
//!    (issue 25 item 7, `compare/handshake_flood.rs`).
//!
//! Syncthing (1.19, `/usr/bin/syncthing` or `$SYNCTHING`) runs fully offline: discovery,
//! relays, NAT, STUN, usage and crash reporting and upgrades off; listen and GUI addresses on
//! 127.0.0.x only. It runs in two settings: defaults (rescan 3600 s, watcher delay 10 s) and
//! tuned (rescan 5 s, watcher delay 1 s).
//!
//! The table goes to stdout and to `target/bench-report.md`; progress goes to stderr.
//! Every process started here is killed and every temp dir removed on exit (Drop guards),
//! also when a step fails.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use certmesh::demo::{self, LocalNode};
use rand::{Rng, RngExt, SeedableRng};

#[path = "compare/certs.rs"]
mod certs;
#[path = "compare/certs_join.rs"]
mod certs_join;
#[path = "compare/certs_scale.rs"]
mod certs_scale;
#[path = "compare/cluster.rs"]
mod cluster;
#[path = "compare/handshake_flood.rs"]
mod handshake_flood;
#[path = "compare/hubs.rs"]
mod hubs;
#[path = "compare/opts.rs"]
mod opts;
#[path = "compare/procs.rs"]
mod procs;
#[path = "compare/report.rs"]
mod report;
#[path = "compare/served.rs"]
mod served;
#[path = "compare/stages.rs"]
mod stages;
#[path = "compare/stop.rs"]
mod stop;
#[path = "compare/syncthing.rs"]
mod syncthing;
#[path = "compare/workload.rs"]
mod workload;

use cluster::*;
use opts::*;
use procs::*;
use report::*;
use syncthing::*;
use workload::*;

const FOLDER_ID: &str = "certmesh-bench";
const SMALL_SIZE: usize = 100;
const CERT_SIZE: usize = 3000;
const KEY_SIZE: usize = 1700;

// ---------------------------------------------------------------------------------------
// Small helpers

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(d)
            }
        }
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// The release binary; warns when a source file is newer than it.
fn certmesh_exe() -> Result<PathBuf> {
    // Another build (a debug one, say, while the release build is not there yet);
    // the report's header names the binary.
    if let Some(exe) = std::env::var_os("CERTMESH_BENCH_EXE") {
        return Ok(PathBuf::from(exe));
    }
    let exe = target_dir().join("release").join("certmesh");
    let meta = std::fs::metadata(&exe).map_err(|_| {
        anyhow!(
            "{} not found: build it first with `cargo build --release` (then `cargo bench --bench compare`)",
            exe.display()
        )
    })?;
    let built = meta.modified()?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    if let Ok(rd) = std::fs::read_dir(&src) {
        let newer = rd
            .flatten()
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .any(|m| m > built);
        if newer {
            eprintln!(
                "warning: {} is older than a file in src/; run `cargo build --release` for current figures",
                exe.display()
            );
        }
    }
    Ok(exe)
}

fn syncthing_exe() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SYNCTHING") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("syncthing"))
        .find(|p| p.is_file())
}

fn cmd_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn free_tcp_port(ip: &str) -> Result<SocketAddr> {
    let l = TcpListener::bind(format!("{ip}:0")).with_context(|| format!("binding {ip}:0"))?;
    Ok(l.local_addr()?)
}

fn random_text(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len)
        .map(|_| ALPHA[rng.random_range(0..ALPHA.len())])
        .collect()
}

/// A PEM-looking blob of exactly `len` bytes.
fn fake_pem(rng: &mut impl Rng, label: &str, len: usize) -> Vec<u8> {
    let head = format!("-----BEGIN {label}-----\n");
    let tail = format!("-----END {label}-----\n");
    let body_len = len - head.len() - tail.len();
    let mut body = random_text(rng, body_len);
    for i in (64..body_len).step_by(65) {
        body[i] = b'\n';
    }
    if body_len > 0 {
        body[body_len - 1] = b'\n';
    }
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    out.extend_from_slice(tail.as_bytes());
    out
}

fn jitter(max: Duration) {
    if !max.is_zero() {
        let us = rand::rng().random_range(0..max.as_micros() as u64);
        std::thread::sleep(Duration::from_micros(us));
    }
}

// ---------------------------------------------------------------------------------------
// The runs

#[derive(Default)]
struct SysResult {
    connect: Option<f64>,
    small: Option<Stats>,
    bundle: Option<Stats>,
    torn: Option<usize>,
    idle: Option<Idle>,
    /// Wall time per small-file sample, random pause included.
    wall_per_sample: Option<f64>,
    error: Option<String>,
}

struct ScaleResult {
    n: usize,
    formation: f64,
    small: Stats,
}

fn run_certmesh_3(
    exe: &Path,
    rt: &tokio::runtime::Runtime,
    o: &Opts,
    r: &mut SysResult,
) -> Result<()> {
    eprintln!("[certmesh] 3 nodes");
    let (c, t0) = cm_start(exe, 3, |_| Ok(()))?;
    cm_wait_connected(rt, &c, Duration::from_secs(30))?;
    r.connect = Some(t0.elapsed().as_secs_f64());
    let t = c.trees(
        "certmesh",
        Duration::from_millis(50),
        Duration::from_secs(10),
    );
    r.small = Some(stats(small_file_samples(&t, o.samples, true, false)?));
    let (b, torn) = bundle_samples(&t, o.samples)?;
    r.bundle = Some(stats(b));
    r.torn = Some(torn);
    std::thread::sleep(Duration::from_millis(500));
    r.idle = Some(measure_idle(
        "certmesh",
        &c.pids(),
        Duration::from_secs(o.rss_after_secs),
        Duration::from_secs(o.idle_secs),
    )?);
    Ok(())
}

fn run_syncthing_3(
    st: &Path,
    setting: StSetting,
    ip_base: u8,
    samples: usize,
    o: &Opts,
    r: &mut SysResult,
) -> Result<()> {
    let label = setting.label;
    eprintln!(
        "[{label}] 3 instances (rescan {} s, watcher delay {} s), {samples} samples",
        setting.rescan_s, setting.delay_s
    );
    let mut c = st_prepare(st, 3, ip_base, setting)?;
    st_spawn(st, &mut c)?;
    let (connected, ready) = st_wait_ready(&c, label, Duration::from_secs(180))?;
    eprintln!(
        "[{label}] connected after {:.1} s, folder idle after {:.1} s",
        connected.as_secs_f64(),
        ready.as_secs_f64()
    );
    r.connect = Some(connected.as_secs_f64());
    let delay = Duration::from_secs(setting.delay_s.into());
    let timeout = Duration::from_secs(60) + delay * 6;
    let t = c.trees(label, delay, timeout);
    // No warm-up sample with the 10 s watcher delay: it would cost another ~15 s.
    let warmup = setting.delay_s < 5;
    let t1 = Instant::now();
    r.small = Some(stats(small_file_samples(&t, samples, warmup, false)?));
    r.wall_per_sample = Some(t1.elapsed().as_secs_f64() / samples as f64);
    let (b, torn) = bundle_samples(&t, samples)?;
    r.bundle = Some(stats(b));
    r.torn = Some(torn);
    std::thread::sleep(Duration::from_millis(500));
    r.idle = Some(measure_idle(
        label,
        &c.pids(),
        Duration::from_secs(o.rss_after_secs),
        Duration::from_secs(o.idle_secs),
    )?);
    Ok(())
}

/// Raises each node's `[tree] max_size` (default 256 MiB) above the bulk, which
/// would otherwise stop at the budget, refused and named (as a fleet's would).
fn room_for_bulk(cfgs: &[(String, PathBuf, PathBuf)], mib: u64) -> Result<()> {
    for (_, cfg, _) in cfgs {
        let text = std::fs::read_to_string(cfg)?;
        let sized = text.replacen(
            "\n[tree]\n",
            &format!("\n[tree]\nmax_size = \"{}MiB\"\n", 2 * mib + 256),
            1,
        );
        anyhow::ensure!(sized != text, "no [tree] section in {}", cfg.display());
        std::fs::write(cfg, sized)?;
    }
    Ok(())
}

fn run_certmesh_bulk(exe: &Path, o: &Opts) -> Result<f64> {
    eprintln!(
        "[certmesh] bulk: {} files / {} MiB, 2 nodes",
        o.bulk_files, o.bulk_mib
    );
    let mut bulk = None;
    let (c, t0) = cm_start(exe, 2, |cfgs| {
        room_for_bulk(cfgs, o.bulk_mib)?;
        bulk = Some(make_bulk(&cfgs[0].2, o.bulk_files, o.bulk_mib)?);
        Ok(())
    })?;
    let bulk = bulk.expect("prepared");
    let took = wait_bulk(
        &bulk,
        &c.nodes[1].tree,
        t0,
        bulk_timeout(o.bulk_mib),
        "certmesh",
    )?;
    eprintln!("[certmesh] bulk done in {:.2} s", took.as_secs_f64());
    verify_bulk(&bulk, &c.nodes[0].tree, &c.nodes[1].tree)?;
    Ok(took.as_secs_f64())
}

/// Small-file latency while a bulk transfer runs (issue 25 item 3): node 1 holds the
/// bulk before start and pushes it to nodes 2 and 3; meanwhile node 3 writes small
/// files, each timed until it is on nodes 1 and 2. Returns the latencies and whether
/// the bulk was still running on node 2 after the last sample.
fn run_certmesh_bulk_small(
    exe: &Path,
    rt: &tokio::runtime::Runtime,
    o: &Opts,
) -> Result<(Stats, bool)> {
    eprintln!(
        "[certmesh] small files during a bulk sync: {} files / {} MiB, 3 nodes",
        o.bulk_files, o.bulk_mib
    );
    let mut bulk = None;
    let (c, _) = cm_start(exe, 3, |cfgs| {
        room_for_bulk(cfgs, o.bulk_mib)?;
        bulk = Some(make_bulk(&cfgs[0].2, o.bulk_files, o.bulk_mib)?);
        Ok(())
    })?;
    let bulk = bulk.expect("prepared");
    cm_wait_connected(rt, &c, Duration::from_secs(30))?;
    let t = Trees {
        label: "certmesh during bulk",
        writer: &c.nodes[2].tree,
        peers: vec![&c.nodes[0].tree, &c.nodes[1].tree],
        jitter: Duration::from_millis(50),
        timeout: Duration::from_secs(10),
    };
    let small = stats(small_file_samples(&t, o.samples, false, false)?);
    let still = !bulk.files.iter().all(|(rel, len)| {
        std::fs::metadata(c.nodes[1].tree.join(rel)).is_ok_and(|m| m.len() == *len)
    });
    eprintln!(
        "[certmesh] small file during bulk: p50 {:.1} ms, p99 {:.1} ms (bulk still running after the last: {still})",
        small.p50 * 1000.0,
        small.p99 * 1000.0
    );
    Ok((small, still))
}

fn run_syncthing_bulk(st: &Path, o: &Opts) -> Result<f64> {
    let label = "syncthing bulk";
    eprintln!(
        "[{label}] {} files / {} MiB, 2 instances",
        o.bulk_files, o.bulk_mib
    );
    let mut c = st_prepare(st, 2, 120, DEFAULTS)?;
    let bulk = make_bulk(&c.nodes[0].tree, o.bulk_files, o.bulk_mib)?;
    let t0 = st_spawn(st, &mut c)?;
    let took = wait_bulk(&bulk, &c.nodes[1].tree, t0, bulk_timeout(o.bulk_mib), label)
        .map_err(|e| anyhow!("{e:#}\n{}", st_log_tail(&c)))?;
    eprintln!("[{label}] done in {:.2} s", took.as_secs_f64());
    verify_bulk(&bulk, &c.nodes[0].tree, &c.nodes[1].tree)?;
    Ok(took.as_secs_f64())
}

/// Issuance times against a local Pebble on a 1-node and a 3-node cluster, both
/// running, asked in alternation so that drift in load (or in Pebble) hits both alike.
fn run_acme(exe: &Path, rt: &tokio::runtime::Runtime, o: &Opts) -> Result<(Stats, Stats)> {
    eprintln!(
        "[certmesh] ACME: {} issuances each on 1 node and on 3 nodes, alternating",
        o.acme_samples
    );
    let (one, three) = rt.block_on(async {
        let mut c1 = demo::AcmeCluster::start(exe, 1).await?;
        let mut c3 = demo::AcmeCluster::start(exe, 3).await?;
        let (mut one, mut three) = (Vec::new(), Vec::new());
        for _ in 0..o.acme_samples {
            one.push(c1.issue().await?);
            three.push(c3.issue().await?);
        }
        anyhow::Ok((one, three))
    })?;
    let (one, three) = (stats(one), stats(three));
    eprintln!(
        "[certmesh] ACME p50: 1 node {:.0} ms, 3 nodes {:.0} ms",
        one.p50 * 1000.0,
        three.p50 * 1000.0
    );
    Ok((one, three))
}

fn run_scale(exe: &Path, rt: &tokio::runtime::Runtime, n: usize, o: &Opts) -> Result<ScaleResult> {
    eprintln!("[certmesh] scale: {n} nodes, full mesh, started together");
    let (c, t0) = cm_start(exe, n, |_| Ok(()))?;
    cm_wait_connected(rt, &c, Duration::from_secs(120))?;
    let formation = t0.elapsed().as_secs_f64();
    eprintln!("[certmesh] {n} nodes fully connected after {formation:.2} s");
    let settled = c.settle(Duration::from_secs(20));
    eprintln!("[certmesh] {n} nodes idle {settled:.2} s after connecting");
    let label = format!("certmesh {n} nodes");
    let t = c.trees(&label, Duration::from_millis(50), Duration::from_secs(20));
    let small = stats(small_file_samples(&t, o.samples, true, true)?);
    Ok(ScaleResult {
        n,
        formation,
        small,
    })
}

// ---------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let started = Instant::now();
    let o = parse_opts()?;
    let exe = certmesh_exe()?;
    let st = if o.skip_syncthing {
        None
    } else {
        syncthing_exe()
    };
    let mut notes = Vec::new();
    if st.is_none() && !o.skip_syncthing {
        eprintln!("warning: syncthing not found (set $SYNCTHING); measuring certmesh only");
        notes.push("Syncthing was not found; only certmesh was measured.".to_string());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let header = machine_header(&o, &exe, st.as_deref());

    let mut cm = SysResult::default();
    if o.runs("latency") {
        run_certmesh_3(&exe, &rt, &o, &mut cm).context("certmesh, 3 nodes")?;
    }
    let cm_bulk = if o.runs("bulk") {
        Some(run_certmesh_bulk(&exe, &o).context("certmesh, bulk")?)
    } else {
        None
    };
    let mut scale = Vec::new();
    for &n in o.scale.iter().filter(|_| o.runs("scale")) {
        scale.push(run_scale(&exe, &rt, n, &o).with_context(|| format!("certmesh, {n} nodes"))?);
    }

    let bulk_small = if o.runs("bulk-small") {
        Some(run_certmesh_bulk_small(&exe, &rt, &o).context("certmesh, small files during bulk")?)
    } else {
        None
    };
    if let Some((_, false)) = &bulk_small {
        notes.push("Small files during bulk: the bulk finished before the last sample, so the later samples ran without it (use a larger --bulk-mib).".into());
    }

    let mut hub_results = Vec::new();
    if o.only.iter().any(|s| s == "hubs") {
        for &n in &o.hubs {
            hub_results.push(
                hubs::run_hubs(&exe, &rt, n, &o)
                    .with_context(|| format!("certmesh hubs, {n} nodes"))?,
            );
        }
    }

    let stops = if o.runs("stop") {
        Some(stop::run_stops(&exe, &rt, o.stop_samples).context("certmesh, stop")?)
    } else {
        None
    };
    let flood = if o.runs("handshake-flood") {
        Some(
            handshake_flood::run_handshake_flood(&exe, &rt, &o)
                .context("certmesh, small files during a handshake flood")?,
        )
    } else {
        None
    };
    let stage_table = if o.only.iter().any(|s| s == "stages") {
        Some(stages::run_stages(&exe, &rt, &o).context("certmesh, stage trace")?)
    } else {
        None
    };

    // Many certificates: long, so only when named (`--only certs`).
    let many = if o.only.iter().any(|s| s == "certs") {
        if !certmesh::demo_pebble::available() {
            bail!("--only certs needs pebble and pebble-challtestsrv");
        }
        Some(certs::run_certs(&exe, &o).context("certmesh, many certificates")?)
    } else {
        None
    };
    // What many existing certificates cost status, /metrics and start-up: only when
    // named (`--only certs-scale`).
    let scale_certs = if o.only.iter().any(|s| s == "certs-scale") {
        Some(
            certs_scale::run_certs_scale(&exe, st.as_deref(), &o)
                .context("certmesh, planted certificates")?,
        )
    } else {
        None
    };
    let acme = if o.runs("acme") && certmesh::demo_pebble::available() {
        Some(run_acme(&exe, &rt, &o).context("certmesh, ACME")?)
    } else {
        if o.runs("acme") {
            notes.push("ACME rows skipped: pebble / pebble-challtestsrv not installed.".into());
        }
        None
    };
    let acme_served = if acme.is_some() && served::available() {
        Some(
            served::run_acme_served(&exe, &rt, o.acme_samples)
                .context("certmesh, ACME with nginx")?,
        )
    } else {
        if acme.is_some() {
            notes.push("Issued → served rows skipped: nginx not installed.".into());
        }
        None
    };

    // Syncthing failures are reported in the table rather than aborting the run.
    let mut tuned = SysResult::default();
    let mut def = SysResult::default();
    let mut st_bulk = None;
    if let Some(st) = &st {
        if o.runs("latency") {
            if let Err(e) = run_syncthing_3(st, TUNED, 101, o.samples, &o, &mut tuned) {
                eprintln!("syncthing tuned failed: {e:#}");
                tuned.error = Some(format!("{e:#}"));
            }
            if let Err(e) = run_syncthing_3(st, DEFAULTS, 111, o.defaults_samples, &o, &mut def) {
                eprintln!("syncthing defaults failed: {e:#}");
                def.error = Some(format!("{e:#}"));
            }
        }
        match o.runs("bulk").then(|| run_syncthing_bulk(st, &o)) {
            None => {}
            Some(Ok(s)) => st_bulk = Some(s),
            Some(Err(e)) => {
                eprintln!("syncthing bulk failed: {e:#}");
                notes.push(format!(
                    "Syncthing bulk failed: {}",
                    e.to_string().lines().next().unwrap_or("")
                ));
            }
        }
    }

    for (name, r) in [("tuned", &tuned), ("defaults", &def)] {
        if let Some(e) = &r.error {
            notes.push(format!(
                "Syncthing {name} failed: {}",
                e.lines().next().unwrap_or("")
            ));
        }
    }
    notes.push(format!(
        "Latencies: file written on node 1 (temp file outside the tree, then rename) until the right content is readable on every other node, polled every 100 µs; a random pause before each sample (certmesh 0–50 ms, Syncthing 0–fsWatcherDelayS) spreads the writes over Syncthing's watcher timer; one warm-up sample is dropped. Percentiles are nearest-rank, so with {} samples p99 is the maximum.",
        o.samples
    ));
    if st.is_some() {
        notes.push(format!(
            "Syncthing defaults (fsWatcherDelayS 10, rescanIntervalS 3600) cost {} of wall time per sample (random pause included), so that column is capped at {} samples (--defaults-samples) and takes no warm-up sample; certmesh and Syncthing tuned take {}.",
            def.wall_per_sample.map_or("~15 s".into(), |s| format!("{s:.1} s")),
            o.defaults_samples,
            o.samples
        ));
        notes.push("Both Syncthing settings run without discovery, relays, NAT, STUN, usage/crash reporting or upgrades, on 127.0.0.x only, with setLowPriority off (its default would nice it). The bulk row uses the default folder settings; the initial sync does not depend on the watcher.".into());
    }
    notes.push("Cert + key bundle: each sample publishes a new version as DESIGN §2/§5 (and certbot) do: `archive/<name>/<i>/fullchain.pem` (3,000 bytes) and `privkey.pem` (1,700 bytes) written atomically, then the relative symlink `live/<name>` flipped to it with a rename; timed until `live/<name>/*` reads the new pair on every peer. 'Torn' counts samples in which a peer's `live/<name>` (unchanged across the two reads) led to anything but the old or the new pair.".into());
    notes.push(format!(
        "Idle: the 3-node clusters above, untouched after their last sample; RSS is VmRSS from /proc/PID/status after {} s, CPU is utime + stime from /proc/PID/stat over {} s (resolution one clock tick, {:.0} ms), context switches are voluntary + involuntary summed over the process's threads, per second (each QUIC keep-alive or timer firing costs a few).",
        o.rss_after_secs,
        o.idle_secs,
        1000.0 / clk_tck()
    ));
    if bulk_small.is_some() {
        notes.push(format!("Small file during a bulk sync: 3 nodes; the bulk ({} files / {} MiB) is created on node 1 before start and pushed to nodes 2 and 3; once connected, node 3 writes {} small files (as the latency rows, 0–50 ms pause before each), each timed until it is on nodes 1 and 2, while node 2 and 3 are still pulling the bulk (small changes have their own lane: issue 25 item 3).", o.bulk_files, o.bulk_mib, o.samples));
    }
    notes.push("Bulk: files created on node 1 before any process starts; timed from starting the processes until every file has its size on node 2 (contents compared afterwards); MB = 10^6 bytes.".into());
    notes.push(format!(
        "Ratios are Syncthing ÷ certmesh: above 1 means certmesh is faster/smaller, except in the MB/s and files/s rows. Whole run: {:.0} s.",
        started.elapsed().as_secs_f64()
    ));

    if stops.is_some() {
        notes.push(format!("Stop: SIGTERM to node 3 of 3, timed until the process has exited (waitpid), {} times each: idle, and mid-sync (node 1 writes 200 files of 2 KiB, SIGTERM as soon as the first is on node 3's disk; after the restart every file must arrive whole). The node is restarted and the mesh waited for after each stop.", o.stop_samples));
    }
    if let Some(f) = &flood {
        notes.push(format!("Handshake flood (issue 25 item 7; certmesh only, Syncthing has no equivalent row): 2 nodes on 127.0.0.2–3 (b's log at `certmesh::net::admission=debug`, to count its Retries), settled; {n} small files written on a and timed until on b (as the latency rows: 0–50 ms pause before each), calm, after one warm-up sample; then {s} devices no node has configured, each with its own identity (temp dir) and QUIC endpoint on {ip}, dial b over and over with certmesh's own transport (1 s timeout per attempt; every attempt a real Initial and, if admitted, a TLS handshake b's device-ID pin refuses), in one tokio worker thread of the harness on the same machine; once {w} attempts were made, {n} small files again, then the flood stops and a–b must still be connected. b answers with a stateless Retry past {ra} handshakes in flight and turns new ones away at {mx} (`net::admission`). {a} attempts in all. CPU rows: utime + stime of b and of the harness process over each set of samples, as a share of one core (of {c} cores); the harness holds the 100 µs poller and, during the flood, the strangers' side of every handshake. With {n} samples p99 is the maximum.",
            n = o.samples,
            s = handshake_flood::STRANGERS,
            ip = handshake_flood::FLOOD_IP,
            w = handshake_flood::WARM_ATTEMPTS,
            ra = certmesh::net::admission::RETRY_ABOVE,
            mx = certmesh::net::admission::MAX_IN_FLIGHT,
            a = f.attempts,
            c = std::thread::available_parallelism().map_or(0, |n| n.get()),
        ));
    }
    if acme.is_some() {
        notes.push(format!("ACME: a local Pebble (Debian package, validation sleep off) and pebble-challtestsrv as its DNS; the first issuance at start is awaited, then {} times `certmesh issue` over the control socket until the new certificate (key matching) is live on every node. With 3 nodes the CA's DNS points the name at a node that did not order, so the http-01 token must travel through the tree (and every peer acknowledge it) before the CA is told to validate, and the bundle must reach the others; with 1 node nothing is synced.", o.acme_samples));
    }
    if acme_served.is_some() {
        notes.push(format!("Issued → served: the 3-node ACME cluster again, each node with a real nginx (1 worker) serving its own live/www and a [[hook]] running `nginx -s reload` (min_interval 0s), and the node's [[frontend]] probing it. {} times `certmesh issue`; each is timed until the new certificate is live in every tree (\"live everywhere\", as the ACME rows) and until every nginx presents the new leaf in a TLS handshake made by the benchmark itself every 5 ms (the serving probe's handshake, not the probes' own schedule or timestamps). The difference is the hook, nginx's graceful reload and its new worker taking connections.", o.acme_samples));
    }
    let report = render_report(
        &o,
        &header,
        &cm,
        &tuned,
        &def,
        cm_bulk,
        st_bulk,
        bulk_small.as_ref().map(|(s, _)| s),
        &scale,
        acme.as_ref(),
        acme_served.as_ref(),
        stops.as_ref(),
        flood.as_ref(),
        &notes,
    );
    let report = match stage_table {
        Some(s) => report + "\n## Where a small file's time goes\n\n" + &s,
        None => report,
    };
    let report = if hub_results.is_empty() {
        report
    } else {
        report + &hubs::render(&hub_results, o.samples)
    };
    let report = match &many {
        Some(r) => report + &certs::render(r),
        None => report,
    };
    let report = match &scale_certs {
        Some(r) => report + &certs_scale::render(r),
        None => report,
    };
    println!("{report}");
    let path = target_dir().join("bench-report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

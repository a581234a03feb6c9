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
//!    processes on 127.1.0.0/16 (see `compare/hubs.rs`).
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

#[path = "compare/hubs.rs"]
mod hubs;

const FOLDER_ID: &str = "certmesh-bench";
const SMALL_SIZE: usize = 100;
const CERT_SIZE: usize = 3000;
const KEY_SIZE: usize = 1700;

// ---------------------------------------------------------------------------------------
// Options

struct Opts {
    quick: bool,
    samples: usize,
    defaults_samples: usize,
    bulk_files: usize,
    bulk_mib: u64,
    skip_syncthing: bool,
    idle_secs: u64,
    rss_after_secs: u64,
    scale: Vec<usize>,
    /// Hub topology sizes (`--only hubs`).
    hubs: Vec<usize>,
    /// Sections to run (`--only`); empty: all.
    only: Vec<String>,
    acme_samples: usize,
    args: Vec<String>,
}

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

const USAGE: &str = "\
usage: cargo bench --bench compare -- [flags]
  --quick               small sizes for a CI smoke run (5 samples, bulk 200 files / 2 MiB,
                        scale 16 only, idle 3 s)
  --samples N           propagation samples per system (default 20)
  --defaults-samples N  cap for Syncthing with default settings (default 10; ~15 s per sample)
  --bulk-files N        bulk initial sync: number of files (default 10000)
  --bulk-mib M          bulk initial sync: total size in MiB (default 1024)
  --scale LIST          certmesh mesh sizes, comma separated (default 16,32)
  --idle-secs S         idle window for CPU / context switches (default 30)
  --skip-syncthing      certmesh only
  --only LIST           sections to run, comma separated: latency (small file, bundle,
                        idle), bulk, scale, acme (issuance against a local Pebble on 1
                        and 3 nodes; skipped when pebble is not installed) (default: all)
  --acme-samples N      issuances per cluster size (default 20)
  --hubs LIST           hub topology sizes for `--only hubs` (default 128; multiples of 4;
                        hubs run only when named in --only; raises
                        fs.inotify.max_user_instances as root for the run)";

fn parse_opts() -> Result<Opts> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        quick,
        samples: if quick { 5 } else { 20 },
        defaults_samples: if quick { 2 } else { 10 },
        bulk_files: if quick { 200 } else { 10_000 },
        bulk_mib: if quick { 2 } else { 1024 },
        skip_syncthing: false,
        idle_secs: if quick { 3 } else { 30 },
        rss_after_secs: if quick { 3 } else { 10 },
        scale: if quick { vec![16] } else { vec![16, 32] },
        hubs: vec![128],
        only: Vec::new(),
        acme_samples: if quick { 3 } else { 20 },
        args: args.clone(),
    };
    let mut it = args.iter().flat_map(|a| match a.split_once('=') {
        Some((k, v)) if a.starts_with("--") => vec![k.to_string(), v.to_string()],
        _ => vec![a.clone()],
    });
    fn val<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T> {
        let v = v.ok_or_else(|| anyhow!("{flag} needs a value"))?;
        v.parse().map_err(|_| anyhow!("{flag}: bad value {v:?}"))
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {}
            "--skip-syncthing" => o.skip_syncthing = true,
            "--samples" => o.samples = val(&a, it.next())?,
            "--acme-samples" => o.acme_samples = val::<usize>(&a, it.next())?.max(1),
            "--defaults-samples" => o.defaults_samples = val(&a, it.next())?,
            "--bulk-files" => o.bulk_files = val(&a, it.next())?,
            "--bulk-mib" => o.bulk_mib = val(&a, it.next())?,
            "--idle-secs" => {
                o.idle_secs = val(&a, it.next())?;
                o.rss_after_secs = o.rss_after_secs.min(o.idle_secs);
            }
            "--scale" => {
                let v: String = val(&a, it.next())?;
                o.scale = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.trim()
                            .parse()
                            .map_err(|_| anyhow!("--scale: bad value {s:?}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "--hubs" => {
                let v: String = val(&a, it.next())?;
                o.hubs = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.trim()
                            .parse()
                            .map_err(|_| anyhow!("--hubs: bad value {s:?}"))
                    })
                    .collect::<Result<_>>()?;
                if o.hubs
                    .iter()
                    .any(|&n| n % 4 != 0 || !(16..=1000).contains(&n))
                {
                    bail!("--hubs sizes must be multiples of 4 between 16 and 1000");
                }
            }
            "--only" => {
                let v: String = val(&a, it.next())?;
                o.only = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = o
                    .only
                    .iter()
                    .find(|s| !["latency", "bulk", "scale", "acme", "hubs"].contains(&s.as_str()))
                {
                    bail!("--only: unknown section {bad:?} (latency, bulk, scale, acme, hubs)");
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.samples == 0 || o.bulk_files == 0 {
        bail!("--samples and --bulk-files must be at least 1");
    }
    if o.scale.iter().any(|&n| !(2..=250).contains(&n)) {
        bail!("--scale sizes must be between 2 and 250");
    }
    o.defaults_samples = o.defaults_samples.clamp(1, o.samples);
    Ok(o)
}

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
// Statistics and /proc

#[derive(Clone, Copy)]
struct Stats {
    n: usize,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

/// Nearest-rank percentiles, in seconds.
fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let s = |d: Duration| d.as_secs_f64();
    let pct = |q: f64| {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        s(v[rank - 1])
    };
    Stats {
        n: v.len(),
        min: s(v[0]),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: s(v[v.len() - 1]),
    }
}

fn clk_tck() -> f64 {
    rustix::param::clock_ticks_per_second().max(1) as f64
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat
        .rfind(')')
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?
        + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = f.get(11).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    let stime: u64 = f.get(12).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    Ok((utime + stime) as f64 / clk_tck())
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// VmRSS in MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status_field(&st, "VmRSS").ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(kb as f64 / 1024.0)
}

/// Voluntary + involuntary context switches of each live thread, by thread id.
fn ctx_switches(pid: u32) -> HashMap<String, u64> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    rd.flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = status_field(&s, "voluntary_ctxt_switches").unwrap_or(0)
                + status_field(&s, "nonvoluntary_ctxt_switches").unwrap_or(0);
            Some((t.file_name().to_string_lossy().into_owned(), n))
        })
        .collect()
}

/// Context switches between two snapshots: per thread, so that threads exiting in
/// between (tokio's idle blocking-pool threads do after 10 s) do not hide the others'.
fn ctx_delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[derive(Clone, Copy)]
struct Idle {
    rss_mean: f64,
    rss_max: f64,
    cpu_mean: f64,
    wakeups_mean: f64,
    threads_mean: f64,
}

/// CPU and context switches over `total`, RSS after `rss_after`, per node.
fn measure_idle(label: &str, pids: &[u32], rss_after: Duration, total: Duration) -> Result<Idle> {
    eprintln!(
        "[{label}] idle: RSS after {} s, CPU over {} s",
        rss_after.as_secs(),
        total.as_secs()
    );
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .collect::<Result<_>>()?;
    let ctx0: Vec<HashMap<String, u64>> = pids.iter().map(|&p| ctx_switches(p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(rss_after);
    let rss: Vec<f64> = pids.iter().map(|&p| rss_mib(p)).collect::<Result<_>>()?;
    std::thread::sleep(total.saturating_sub(t0.elapsed()));
    let secs = t0.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .collect::<Result<_>>()?;
    let ctx1: Vec<HashMap<String, u64>> = pids.iter().map(|&p| ctx_switches(p)).collect();
    let n = pids.len() as f64;
    Ok(Idle {
        rss_mean: rss.iter().sum::<f64>() / n,
        rss_max: rss.iter().cloned().fold(0.0, f64::max),
        cpu_mean: cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).sum::<f64>() / n,
        wakeups_mean: ctx1
            .iter()
            .zip(&ctx0)
            .map(|(a, b)| ctx_delta(b, a) as f64)
            .sum::<f64>()
            / n
            / secs,
        threads_mean: pids.iter().map(|&p| threads(p) as f64).sum::<f64>() / n,
    })
}

// ---------------------------------------------------------------------------------------
// Waiting for files

/// Until every `trees[i]/rel` holds `content`; checks the trees not yet seen done, stopping
/// at the first that is not, so that the poller itself costs little with 31 peers.
fn wait_all(trees: &[&Path], rel: &str, content: &[u8], timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut pending: Vec<&Path> = trees.to_vec();
    loop {
        while let Some(t) = pending.last() {
            if std::fs::read(t.join(rel)).is_ok_and(|c| c == content) {
                pending.pop();
            } else {
                break;
            }
        }
        if pending.is_empty() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// One version of a certificate: the two files, read through `live/<name>`.
struct Pair<'a> {
    cert: &'a [u8],
    key: &'a [u8],
}

/// Until `live/<name>` resolves to `new` on every peer. Also reports whether a peer was
/// seen with a torn bundle: the symlink unchanged across the two reads, yet the files
/// behind it neither the old pair nor the new one (one of them missing or from another
/// version). A peer whose link still points at the old version (`old_target`) costs
/// one `readlink` per poll, not three reads: with 127 peers the poller would otherwise
/// take most of a core from the nodes it measures.
fn wait_bundle(
    trees: &[&Path],
    live: &str,
    old_target: Option<&Path>,
    old: Option<&Pair>,
    new: &Pair,
    timeout: Duration,
) -> Option<(Duration, Option<String>)> {
    let start = Instant::now();
    let mut done = vec![false; trees.len()];
    let mut torn = None;
    loop {
        for (t, d) in trees.iter().zip(done.iter_mut()) {
            if *d {
                continue;
            }
            let link = t.join(live);
            let before = std::fs::read_link(&link).ok();
            if before.is_none() || before.as_deref() == old_target {
                continue;
            }
            let cert = std::fs::read(link.join("fullchain.pem")).ok();
            let key = std::fs::read(link.join("privkey.pem")).ok();
            let after = std::fs::read_link(&link).ok();
            if before.is_none() || before != after {
                continue;
            }
            let is = |p: &Pair| cert.as_deref() == Some(p.cert) && key.as_deref() == Some(p.key);
            if is(new) {
                *d = true;
            } else if !old.is_some_and(is) && torn.is_none() {
                let what = |got: &Option<Vec<u8>>, n: &[u8], o: Option<&[u8]>| match got.as_deref()
                {
                    None => "missing",
                    Some(g) if g == n => "new",
                    Some(g) if Some(g) == o => "old",
                    Some(_) => "other",
                };
                torn = Some(format!(
                    "peer {} after {}: {live} -> {}, fullchain.pem {}, privkey.pem {}",
                    t.display(),
                    fmt_secs(start.elapsed().as_secs_f64()),
                    before
                        .as_deref()
                        .map_or("?".into(), |b| b.display().to_string()),
                    what(&cert, new.cert, old.map(|p| p.cert)),
                    what(&key, new.key, old.map(|p| p.key)),
                ));
            }
        }
        if done.iter().all(|d| *d) {
            return Some((start.elapsed(), torn));
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Points `tree/rel` at `target` atomically (new symlink beside the tree, rename).
fn flip_symlink(tree: &Path, rel: &str, target: &str) -> std::io::Result<()> {
    let dest = tree.join(rel);
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = tree.with_file_name(format!(".bench-link-{}", rand::random::<u64>()));
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, &dest)
}

/// What a propagation run needs from a cluster: where to write and where to look.
struct Trees<'a> {
    label: &'a str,
    writer: &'a Path,
    peers: Vec<&'a Path>,
    /// Random pause before each sample: randomises the phase against periodic timers.
    jitter: Duration,
    timeout: Duration,
}

fn small_file_samples(
    t: &Trees,
    n: usize,
    warmup: bool,
    many_peers: bool,
) -> Result<Vec<Duration>> {
    let mut rng = rand::rng();
    let mut out = Vec::new();
    let total = n + usize::from(warmup);
    for i in 0..total {
        let rel = format!(
            "acme/.well-known/acme-challenge/tok-{i}-{:08x}",
            rng.random::<u32>()
        );
        let mut content = format!("{rel}.").into_bytes();
        content.resize(SMALL_SIZE, b'x');
        content[SMALL_SIZE - 16..].copy_from_slice(&random_text(&mut rng, 16));
        jitter(t.jitter);
        demo::write_atomic(t.writer, &rel, &content)?;
        let took = if many_peers {
            wait_all(&t.peers, &rel, &content, t.timeout)
        } else {
            demo::wait_present(&t.peers, &rel, &content, t.timeout)
        };
        let Some(took) = took else {
            bail!(
                "[{}] {rel} did not reach all peers within {:?}",
                t.label,
                t.timeout
            );
        };
        if warmup && i == 0 {
            eprintln!(
                "[{}] warm-up sample: {}",
                t.label,
                fmt_secs(took.as_secs_f64())
            );
            continue;
        }
        if took > Duration::from_secs(1) || i + 1 == total {
            eprintln!(
                "[{}] small file {}/{n}: {}",
                t.label,
                i + 1 - usize::from(warmup),
                fmt_secs(took.as_secs_f64())
            );
        }
        out.push(took);
    }
    Ok(out)
}

/// Publishes `n` versions of a certificate the way DESIGN.md §2/§5 (and certbot) do:
/// `archive/<name>/<i>/{fullchain,privkey}.pem` written, then `live/<name>` flipped to it.
fn bundle_samples(t: &Trees, n: usize) -> Result<(Vec<Duration>, usize)> {
    let mut rng = rand::rng();
    let name = format!("bench-{:08x}.example.com", rng.random::<u32>());
    let live = format!("live/{name}");
    let mut out = Vec::new();
    let mut torn = 0;
    let mut old: Option<(Vec<u8>, Vec<u8>)> = None;
    for i in 0..n {
        let cert = fake_pem(&mut rng, "CERTIFICATE", CERT_SIZE);
        let key = fake_pem(&mut rng, "PRIVATE KEY", KEY_SIZE);
        jitter(t.jitter);
        demo::write_atomic(
            t.writer,
            &format!("archive/{name}/{i}/fullchain.pem"),
            &cert,
        )?;
        demo::write_atomic(t.writer, &format!("archive/{name}/{i}/privkey.pem"), &key)?;
        flip_symlink(t.writer, &live, &format!("../archive/{name}/{i}"))?;
        let new = Pair {
            cert: &cert,
            key: &key,
        };
        let old_pair = old.as_ref().map(|(c, k)| Pair { cert: c, key: k });
        let old_target = (i > 0).then(|| PathBuf::from(format!("../archive/{name}/{}", i - 1)));
        let Some((took, was_torn)) = wait_bundle(
            &t.peers,
            &live,
            old_target.as_deref(),
            old_pair.as_ref(),
            &new,
            t.timeout,
        ) else {
            bail!(
                "[{}] certificate version {i} did not reach all peers within {:?}",
                t.label,
                t.timeout
            );
        };
        if let Some(how) = was_torn {
            eprintln!("[{}] bundle {i} torn: {how}", t.label);
            torn += 1;
        }
        if took > Duration::from_secs(1) || i + 1 == n {
            eprintln!(
                "[{}] bundle {}/{n}: {}",
                t.label,
                i + 1,
                fmt_secs(took.as_secs_f64())
            );
        }
        out.push(took);
        old = Some((cert, key));
    }
    Ok((out, torn))
}

// ---------------------------------------------------------------------------------------
// Bulk data set

struct Bulk {
    files: Vec<(String, u64)>,
}

/// `files` files totalling `mib` MiB of incompressible data under `tree`, 100 per directory.
fn make_bulk(tree: &Path, files: usize, mib: u64) -> Result<Bulk> {
    let bytes = mib * 1024 * 1024;
    let base = bytes / files as u64;
    let extra = bytes % files as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6365_7274_6d65_7368);
    let mut buf = Vec::new();
    let mut list = Vec::with_capacity(files);
    for i in 0..files {
        let rel = format!("bulk/d{:03}/f{i:05}.bin", i / 100);
        let len = base + u64::from((i as u64) < extra);
        let p = tree.join(&rel);
        if i % 100 == 0 {
            std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        }
        buf.resize(len as usize, 0);
        rng.fill_bytes(&mut buf);
        std::fs::write(&p, &buf)?;
        list.push((rel, len));
    }
    Ok(Bulk { files: list })
}

/// Until every bulk file has its full size under `dst` (both systems rename complete
/// files into place); checked cheaply, contents are verified afterwards.
fn wait_bulk(
    bulk: &Bulk,
    dst: &Path,
    start: Instant,
    timeout: Duration,
    label: &str,
) -> Result<Duration> {
    let mut pending: Vec<&(String, u64)> = bulk.files.iter().collect();
    let mut last_report = Instant::now();
    loop {
        while let Some((rel, len)) = pending.last() {
            if std::fs::metadata(dst.join(rel)).is_ok_and(|m| m.len() == *len) {
                pending.pop();
            } else {
                break;
            }
        }
        if pending.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "[{label}] bulk sync incomplete after {timeout:?}: {} files missing",
                pending.len()
            );
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            let have = bulk
                .files
                .iter()
                .filter(|(rel, len)| {
                    std::fs::metadata(dst.join(rel)).is_ok_and(|m| m.len() == *len)
                })
                .count();
            eprintln!(
                "[{label}] bulk: {have}/{} files after {:.0} s",
                bulk.files.len(),
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn verify_bulk(bulk: &Bulk, src: &Path, dst: &Path) -> Result<()> {
    for (rel, _) in &bulk.files {
        if std::fs::read(src.join(rel))? != std::fs::read(dst.join(rel))? {
            bail!("bulk file {rel} differs between the two nodes");
        }
    }
    Ok(())
}

fn bulk_timeout(mib: u64) -> Duration {
    Duration::from_secs(120 + mib / 2)
}

// ---------------------------------------------------------------------------------------
// certmesh clusters

/// Field order matters: the nodes are stopped before the directory is removed.
/// Field order matters: the nodes are stopped before the directory is removed.
struct CmCluster {
    nodes: Vec<LocalNode>,
    _dir: tempfile::TempDir,
}

impl Drop for CmCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl CmCluster {
    /// Stops every node at once (SIGTERM to all, then waits; SIGKILL after 10 s).
    /// One by one, a daemon's up to 2 s of connection draining adds up to minutes
    /// for a 128-node topology.
    fn stop_all(&mut self) {
        let mut children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for c in &children {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            if children.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(|c| c.id()))
            .collect()
    }

    fn trees<'a>(&'a self, label: &'a str, jitter: Duration, timeout: Duration) -> Trees<'a> {
        Trees {
            label,
            writer: &self.nodes[0].tree,
            peers: self.nodes[1..].iter().map(|n| n.tree.as_path()).collect(),
            jitter,
            timeout,
        }
    }
}

/// Writes configs for `n` nodes, lets `prepare` fill trees, starts every node at once;
/// returns the cluster and the instant the first process was started.
fn cm_start(
    exe: &Path,
    n: usize,
    prepare: impl FnOnce(&[(String, PathBuf, PathBuf)]) -> Result<()>,
) -> Result<(CmCluster, Instant)> {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-bench-")
        .tempdir()?;
    let configs = demo::write_mesh(dir.path(), n)?;
    for (_, _, tree) in &configs {
        std::fs::create_dir_all(tree)?;
    }
    prepare(&configs)?;
    let t0 = Instant::now();
    let mut nodes = Vec::with_capacity(n);
    for (name, cfg, tree) in &configs {
        nodes.push(demo::spawn(exe, name, cfg, tree)?);
    }
    Ok((CmCluster { nodes, _dir: dir }, t0))
}

fn cm_wait_connected(rt: &tokio::runtime::Runtime, c: &CmCluster, timeout: Duration) -> Result<()> {
    rt.block_on(demo::wait_connected(&c.nodes, timeout))
        .map_err(|e| {
            let logs: Vec<String> = c
                .nodes
                .iter()
                .filter_map(|n| std::fs::read_to_string(n.config.with_file_name("node.log")).ok())
                .filter(|l| !l.is_empty())
                .take(2)
                .collect();
            anyhow!("{e:#}\nnode logs:\n{}", logs.join("\n"))
        })
}

// ---------------------------------------------------------------------------------------
// Syncthing clusters

#[derive(Clone, Copy)]
struct StSetting {
    label: &'static str,
    rescan_s: u32,
    delay_s: u32,
}

const TUNED: StSetting = StSetting {
    label: "syncthing tuned",
    rescan_s: 5,
    delay_s: 1,
};
const DEFAULTS: StSetting = StSetting {
    label: "syncthing defaults",
    rescan_s: 3600,
    delay_s: 10,
};

struct StNode {
    home: PathBuf,
    tree: PathBuf,
    id: String,
    listen: SocketAddr,
    gui: SocketAddr,
    key: String,
    child: Option<Child>,
}

impl Drop for StNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Field order matters: the nodes are stopped before the directory is removed.
struct StCluster {
    nodes: Vec<StNode>,
    _dir: tempfile::TempDir,
}

impl StCluster {
    fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(|c| c.id()))
            .collect()
    }

    fn trees<'a>(&'a self, label: &'a str, jitter: Duration, timeout: Duration) -> Trees<'a> {
        Trees {
            label,
            writer: &self.nodes[0].tree,
            peers: self.nodes[1..].iter().map(|n| n.tree.as_path()).collect(),
            jitter,
            timeout,
        }
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The text from `open` through the end of `close` (first occurrence).
fn xml_block<'a>(s: &'a str, open: &str, close: &str) -> Result<&'a str> {
    let a = s
        .find(open)
        .ok_or_else(|| anyhow!("config.xml: no {open}"))?;
    let b = s[a..]
        .find(close)
        .ok_or_else(|| anyhow!("config.xml: no {close}"))?
        + a
        + close.len();
    Ok(&s[a..b])
}

/// Replaces the text of the first `<tag>…</tag>`.
fn set_elem(s: &str, tag: &str, value: &str) -> Result<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let a = s
        .find(&open)
        .ok_or_else(|| anyhow!("config.xml: no <{tag}>"))?
        + open.len();
    let b = s[a..]
        .find(&close)
        .ok_or_else(|| anyhow!("config.xml: no </{tag}>"))?
        + a;
    Ok(format!("{}{}{}", &s[..a], xml_escape(value), &s[b..]))
}

/// Replaces the value of the first ` attr="…"`.
fn set_attr(s: &str, attr: &str, value: &str) -> Result<String> {
    let pat = format!(" {attr}=\"");
    let a = s
        .find(&pat)
        .ok_or_else(|| anyhow!("config.xml: no attribute {attr}"))?
        + pat.len();
    let b = s[a..]
        .find('"')
        .ok_or_else(|| anyhow!("config.xml: unterminated {attr}"))?
        + a;
    Ok(format!("{}{}{}", &s[..a], xml_escape(value), &s[b..]))
}

/// Rewrites the `config.xml` made by `syncthing generate` for node `me`: one folder shared
/// by all nodes, every device at an explicit loopback address, GUI on loopback with our
/// API key, and everything that would reach beyond this machine switched off.
fn st_config(generated: &str, me: usize, nodes: &[StNode], setting: StSetting) -> Result<String> {
    let header = xml_block(generated, "<configuration", ">")?;
    let defaults = xml_block(generated, "<defaults>", "</defaults>")?;
    let folder_tpl = xml_block(defaults, "<folder ", "</folder>")?;
    let after_folder = &defaults[defaults.find("</folder>").expect("found above")..];
    let device_tpl = xml_block(after_folder, "<device ", "</device>")?;

    let mut folder = folder_tpl.to_string();
    folder = set_attr(&folder, "id", FOLDER_ID)?;
    folder = set_attr(&folder, "label", FOLDER_ID)?;
    folder = set_attr(&folder, "path", &nodes[me].tree.display().to_string())?;
    folder = set_attr(&folder, "type", "sendreceive")?;
    folder = set_attr(&folder, "rescanIntervalS", &setting.rescan_s.to_string())?;
    folder = set_attr(&folder, "fsWatcherEnabled", "true")?;
    folder = set_attr(&folder, "fsWatcherDelayS", &setting.delay_s.to_string())?;
    let own = xml_block(&folder, "<device ", "</device>")?.to_string();
    let shared: String = nodes
        .iter()
        .map(|n| {
            format!(
                "<device id=\"{}\" introducedBy=\"\">\n                <encryptionPassword></encryptionPassword>\n            </device>\n            ",
                n.id
            )
        })
        .collect();
    folder = folder.replacen(&own, shared.trim_end(), 1);

    let mut devices = String::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut d = device_tpl.to_string();
        // The template has an empty id and no name attribute.
        d = d.replacen(
            "<device id=\"\"",
            &format!("<device id=\"{}\" name=\"st{}\"", n.id, i + 1),
            1,
        );
        d = set_elem(&d, "address", &format!("tcp://{}", n.listen))?;
        devices.push_str("    ");
        devices.push_str(&d);
        devices.push('\n');
    }

    let mut gui = xml_block(generated, "<gui ", "</gui>")?.to_string();
    gui = set_attr(&gui, "enabled", "true")?;
    gui = set_attr(&gui, "tls", "false")?;
    gui = set_elem(&gui, "address", &nodes[me].gui.to_string())?;
    gui = set_elem(&gui, "apikey", &nodes[me].key)?;

    let mut opts = xml_block(generated, "<options>", "</options>")?.to_string();
    for (tag, value) in [
        ("listenAddress", format!("tcp://{}", nodes[me].listen)),
        ("globalAnnounceEnabled", "false".into()),
        ("localAnnounceEnabled", "false".into()),
        ("relaysEnabled", "false".into()),
        ("natEnabled", "false".into()),
        ("startBrowser", "false".into()),
        ("urAccepted", "-1".into()),
        ("autoUpgradeIntervalH", "0".into()),
        ("crashReportingEnabled", "false".into()),
        ("announceLANAddresses", "false".into()),
        // STUN is only used for QUIC/NAT traversal; 0 switches it off.
        ("stunKeepaliveStartS", "0".into()),
        // Default true (nice 9); off so both systems compete for the CPU on equal terms.
        ("setLowPriority", "false".into()),
    ] {
        opts = set_elem(&opts, tag, &value)?;
    }

    Ok(format!(
        "{header}\n    {folder}\n{devices}    {gui}\n    <ldap></ldap>\n    {opts}\n    {defaults}\n</configuration>\n"
    ))
}

/// Generates keys and configs for `n` instances on 127.0.0.`ip_base`…; does not start them.
fn st_prepare(st: &Path, n: usize, ip_base: u8, setting: StSetting) -> Result<StCluster> {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-bench-st-")
        .tempdir()?;
    let mut nodes = Vec::new();
    let mut rng = rand::rng();
    for i in 0..n {
        let ip = format!("127.0.0.{}", ip_base as usize + i);
        let home = dir.path().join(format!("st{}", i + 1)).join("home");
        let tree = dir.path().join(format!("st{}", i + 1)).join("tree");
        let out = Command::new(st)
            .arg("generate")
            .arg(format!("--home={}", home.display()))
            .args(["--no-default-folder", "--skip-port-probing"])
            .env("STNODEFAULTFOLDER", "1")
            .output()
            .with_context(|| format!("running {} generate", st.display()))?;
        if !out.status.success() {
            bail!(
                "syncthing generate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = Command::new(st)
            .arg(format!("--home={}", home.display()))
            .arg("--device-id")
            .output()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || id.len() < 56 {
            bail!(
                "syncthing --device-id failed: {id} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The folder marker, so that a pre-filled or empty tree is accepted as the folder.
        std::fs::create_dir_all(tree.join(".stfolder"))?;
        nodes.push(StNode {
            home,
            tree,
            id,
            listen: free_tcp_port(&ip)?,
            gui: free_tcp_port(&ip)?,
            key: String::from_utf8(random_text(&mut rng, 32))?.replace(['+', '/'], "x"),
            child: None,
        });
    }
    for i in 0..n {
        let path = nodes[i].home.join("config.xml");
        let generated = std::fs::read_to_string(&path)?;
        std::fs::write(&path, st_config(&generated, i, &nodes, setting)?)?;
    }
    Ok(StCluster { nodes, _dir: dir })
}

fn st_spawn(st: &Path, c: &mut StCluster) -> Result<Instant> {
    let t0 = Instant::now();
    for n in &mut c.nodes {
        let log = std::fs::File::create(n.home.join("syncthing.log"))?;
        let child = Command::new(st)
            .arg("serve")
            .arg(format!("--home={}", n.home.display()))
            .args(["--no-browser", "--no-restart", "--no-upgrade"])
            .env("STNODEFAULTFOLDER", "1")
            .env("STNOUPGRADE", "1")
            .env("STNORESTART", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", st.display()))?;
        n.child = Some(child);
    }
    Ok(t0)
}

/// GET on the REST API (HTTP/1.0 so the answer is neither chunked nor kept alive).
fn st_get(n: &StNode, path: &str) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&n.gui, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Host: localhost passes Syncthing's DNS-rebinding check for loopback GUIs.
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\nX-API-Key: {}\r\nAccept: application/json\r\n\r\n", n.key)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("GET {path}: HTTP {status}: {}", body.trim());
    }
    Ok(serde_json::from_str(body)?)
}

fn st_log_tail(c: &StCluster) -> String {
    let mut out = String::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let log = std::fs::read_to_string(n.home.join("syncthing.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let _ = writeln!(out, "--- st{} log (last lines):", i + 1);
        for l in &lines[lines.len().saturating_sub(8)..] {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}

/// Polls until every instance reports every other device connected and the folder idle
/// with nothing needed.
fn st_wait_ready(c: &StCluster, label: &str, timeout: Duration) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut connected_at = None;
    loop {
        let connected = c.nodes.iter().all(|n| {
            st_get(n, "/rest/system/connections").is_ok_and(|v| {
                c.nodes
                    .iter()
                    .filter(|o| o.id != n.id)
                    .all(|o| v["connections"][&o.id]["connected"].as_bool() == Some(true))
            })
        });
        if connected {
            let at = *connected_at.get_or_insert_with(|| start.elapsed());
            let idle = c.nodes.iter().all(|n| {
                st_get(n, &format!("/rest/db/status?folder={FOLDER_ID}")).is_ok_and(|v| {
                    v["state"].as_str() == Some("idle") && v["needTotalItems"].as_u64() == Some(0)
                })
            });
            if idle {
                return Ok((at, start.elapsed()));
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "[{label}] not {} within {timeout:?}\n{}",
                if connected { "idle" } else { "connected" },
                st_log_tail(c)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
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

fn run_certmesh_bulk(exe: &Path, o: &Opts) -> Result<f64> {
    eprintln!(
        "[certmesh] bulk: {} files / {} MiB, 2 nodes",
        o.bulk_files, o.bulk_mib
    );
    let mut bulk = None;
    let (c, t0) = cm_start(exe, 2, |cfgs| {
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
// Report

fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.1 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

fn fmt_ratio(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

#[derive(Clone, Copy)]
enum Unit {
    Secs,
    Mib,
    Cpu,
    Rate(&'static str),
    Count,
}

fn fmt_val(v: f64, u: Unit) -> String {
    match u {
        Unit::Secs => fmt_secs(v),
        Unit::Mib => format!("{v:.1} MiB"),
        Unit::Cpu => format!("{v:.2} s"),
        Unit::Rate(unit) => format!("{v:.1} {unit}"),
        Unit::Count => format!("{v:.0}"),
    }
}

struct Table {
    rows: Vec<[String; 7]>,
}

impl Table {
    /// A row: certmesh, Syncthing tuned, Syncthing defaults, with ratios Syncthing ÷ certmesh.
    fn row(
        &mut self,
        metric: &str,
        u: Unit,
        cm: Option<f64>,
        tuned: Option<f64>,
        def: Option<f64>,
        target: String,
    ) {
        if cm.is_none() && tuned.is_none() && def.is_none() {
            return; // a section that did not run (--only)
        }
        let cell = |v: Option<f64>| v.map_or("—".to_string(), |v| fmt_val(v, u));
        let ratio = |v: Option<f64>| match (v, cm) {
            // CPU time is counted in 10 ms clock ticks: no ratio of a tick or two.
            (Some(s), Some(_)) if matches!(u, Unit::Cpu) && s < 0.05 => "—".to_string(),
            (Some(_), Some(c)) if matches!(u, Unit::Cpu) && c < 0.05 => "—".to_string(),
            (Some(s), Some(c)) if c > 0.0 && !matches!(u, Unit::Count) => fmt_ratio(s / c),
            _ => "—".to_string(),
        };
        self.rows.push([
            metric.to_string(),
            cell(cm),
            cell(tuned),
            ratio(tuned),
            cell(def),
            ratio(def),
            target,
        ]);
    }

    fn render(&self) -> String {
        let mut s = String::from(
            "| metric | certmesh | Syncthing tuned | tuned ÷ certmesh | Syncthing defaults | defaults ÷ certmesh | target (DESIGN §6) |\n|---|---:|---:|---:|---:|---:|---|\n",
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

fn check(ok: bool, text: &str) -> String {
    format!("{text} {}", if ok { "✅" } else { "❌ missed" })
}

#[allow(clippy::too_many_arguments)]
fn render_report(
    o: &Opts,
    header: &str,
    cm: &SysResult,
    tuned: &SysResult,
    def: &SysResult,
    cm_bulk: Option<f64>,
    st_bulk: Option<f64>,
    scale: &[ScaleResult],
    acme: Option<&(Stats, Stats)>,
    notes: &[String],
) -> String {
    let mut t = Table { rows: Vec::new() };
    let get = |r: &SysResult, f: &dyn Fn(&SysResult) -> Option<f64>| f(r);
    let trio = |f: &dyn Fn(&SysResult) -> Option<f64>| (get(cm, f), get(tuned, f), get(def, f));

    // 1. small file
    let (a, b, c) = trio(&|r| r.small.map(|s| s.n as f64));
    t.row(
        "small file, 3 nodes: samples",
        Unit::Count,
        a,
        b,
        c,
        String::new(),
    );
    type Pick = fn(&Stats) -> f64;
    let picks: [(&str, Pick); 5] = [
        ("min", |s| s.min),
        ("p50", |s| s.p50),
        ("p90", |s| s.p90),
        ("p99", |s| s.p99),
        ("max", |s| s.max),
    ];
    for (name, pick) in picks {
        let (a, b, c) = trio(&|r| r.small.as_ref().map(pick));
        let target = match (name, a) {
            ("p50", Some(v)) => {
                let mut s = check(v <= 0.005, "≤ 5 ms");
                if let Some(tv) = b {
                    s.push_str("; ");
                    s.push_str(&check(tv / v >= 100.0, "≥ 100× vs tuned"));
                }
                s
            }
            ("p99", Some(v)) => check(v <= 0.025, "≤ 25 ms"),
            _ => String::new(),
        };
        t.row(
            &format!("small file, 3 nodes: {name}"),
            Unit::Secs,
            a,
            b,
            c,
            target,
        );
    }
    // 2. bundle
    let (a, b, c) = trio(&|r| r.bundle.map(|s| s.n as f64));
    t.row(
        "cert + key bundle, 3 nodes: samples",
        Unit::Count,
        a,
        b,
        c,
        String::new(),
    );
    for (name, pick) in [picks[1], picks[3], picks[4]] {
        let (a, b, c) = trio(&|r| r.bundle.as_ref().map(pick));
        let target = match (name, a) {
            ("p50", Some(v)) => check(v <= 0.005, "≤ 5 ms"),
            ("p99", Some(v)) => check(v <= 0.025, "≤ 25 ms"),
            _ => String::new(),
        };
        t.row(
            &format!("cert + key bundle: {name}"),
            Unit::Secs,
            a,
            b,
            c,
            target,
        );
    }
    let (a, b, c) = trio(&|r| r.torn.map(|v| v as f64));
    let target = a.map_or(String::new(), |v| check(v == 0.0, "never torn"));
    t.row(
        "cert + key bundle: samples seen torn on a peer",
        Unit::Count,
        a,
        b,
        c,
        target,
    );
    let (a, b, c) = trio(&|r| r.connect);
    t.row(
        "3 nodes: start → all connected",
        Unit::Secs,
        a,
        b,
        c,
        String::new(),
    );
    // 3. idle
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.rss_mean));
    let target = a.map_or(String::new(), |v| check(v <= 15.0, "≤ 15 MiB"));
    t.row(
        &format!("idle RSS per node after {} s (mean)", o.rss_after_secs),
        Unit::Mib,
        a,
        b,
        c,
        target,
    );
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.rss_max));
    let target = a.map_or(String::new(), |v| check(v <= 15.0, "≤ 15 MiB"));
    t.row("idle RSS per node (max)", Unit::Mib, a, b, c, target);
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.cpu_mean));
    t.row(
        &format!("idle CPU per node over {} s", o.idle_secs),
        Unit::Cpu,
        a,
        b,
        c,
        String::new(),
    );
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.wakeups_mean));
    t.row(
        "idle context switches per node",
        Unit::Rate("/s"),
        a,
        b,
        c,
        "no periodic wakeups faster than 1 s (see note)".into(),
    );
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.threads_mean));
    t.row("threads per node", Unit::Count, a, b, c, String::new());
    // 4. bulk (Syncthing: default folder settings; the watcher plays no part in it)
    let mb = (o.bulk_mib * 1024 * 1024) as f64 / 1e6;
    let files = o.bulk_files as f64;
    let name = format!("bulk {} files / {} MiB, 2 nodes", o.bulk_files, o.bulk_mib);
    t.row(
        &format!("{name}: time to full copy"),
        Unit::Secs,
        cm_bulk,
        None,
        st_bulk,
        String::new(),
    );
    let target = match (cm_bulk, st_bulk) {
        (Some(c), Some(s)) => check(s / c >= 2.0, "≥ 2× Syncthing"),
        _ => String::new(),
    };
    t.row(
        &format!("{name}: MB/s (higher is better)"),
        Unit::Rate("MB/s"),
        cm_bulk.map(|s| mb / s),
        None,
        st_bulk.map(|s| mb / s),
        target.clone(),
    );
    t.row(
        &format!("{name}: files/s (higher is better)"),
        Unit::Rate("files/s"),
        cm_bulk.map(|s| files / s),
        None,
        st_bulk.map(|s| files / s),
        target,
    );
    // 5. scale
    for s in scale {
        let f_target = if s.n == 32 {
            check(s.formation <= 5.0, "≤ 5 s")
        } else {
            String::new()
        };
        t.row(
            &format!("{} nodes: start → full mesh", s.n),
            Unit::Secs,
            Some(s.formation),
            None,
            None,
            f_target,
        );
        t.row(
            &format!("{} nodes: small file p50", s.n),
            Unit::Secs,
            Some(s.small.p50),
            None,
            None,
            String::new(),
        );
        let target = if s.n == 32 {
            check(s.small.p99 <= 0.1, "≤ 100 ms")
        } else {
            String::new()
        };
        t.row(
            &format!("{} nodes: small file p99", s.n),
            Unit::Secs,
            Some(s.small.p99),
            None,
            None,
            target,
        );
    }
    // 6. ACME issuance, 1 node vs 3
    if let Some((one, three)) = acme {
        for (label, st) in [("1 node", one), ("3 nodes", three)] {
            for (p, v) in [("p50", st.p50), ("max", st.max)] {
                t.row(
                    &format!("ACME issue → live everywhere, {label}: {p}"),
                    Unit::Secs,
                    Some(v),
                    None,
                    None,
                    String::new(),
                );
            }
        }
        let extra = three.p50 - one.p50;
        t.row(
            "ACME issue: 3 nodes − 1 node (p50)",
            Unit::Secs,
            Some(extra),
            None,
            None,
            check(extra <= 0.05, "≤ 50 ms"),
        );
    }

    let mut out = String::new();
    out.push_str(header);
    out.push('\n');
    out.push_str(&t.render());
    out.push('\n');
    for n in notes {
        let _ = writeln!(out, "- {n}");
    }
    out
}

fn machine_header(o: &Opts, exe: &Path, st: Option<&Path>) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = cmd_output("nproc", &[]).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("?".into(), |s| s.trim().to_string());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| status_field(&m, "MemTotal"))
        .map_or("?".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let date = cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").map_or("?".into(), |l| {
        l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    });
    let rev = cmd_output(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .map_or(String::new(), |r| format!(" (git {r})"));
    let st_ver = st
        .and_then(|p| cmd_output(&p.display().to_string(), &["--version"]))
        .unwrap_or_else(|| "not run".into());
    let args = if o.args.is_empty() {
        String::new()
    } else {
        format!(" -- {}", o.args.join(" "))
    };
    format!(
        "## certmesh vs Syncthing\n\n\
         Generated by `cargo build --release && cargo bench --bench compare{args}` on {date}.\n\n\
         - machine: nproc {nproc}, CPU {cpu}, kernel {kernel}, RAM {mem}, load average at start {load}\n\
         - certmesh {}{rev}: `{}`\n\
         - Syncthing: {st_ver}\n\
         - settings: {} samples per system ({} for Syncthing defaults), bulk {} files / {} MiB, scale {:?}, idle window {} s{}\n",
        env!("CARGO_PKG_VERSION"),
        exe.display(),
        o.samples,
        o.defaults_samples,
        o.bulk_files,
        o.bulk_mib,
        o.scale,
        o.idle_secs,
        if o.quick { " (--quick)" } else { "" },
    )
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

    let mut hub_results = Vec::new();
    if o.only.iter().any(|s| s == "hubs") {
        for &n in &o.hubs {
            hub_results.push(
                hubs::run_hubs(&exe, &rt, n, &o)
                    .with_context(|| format!("certmesh hubs, {n} nodes"))?,
            );
        }
    }

    let acme = if o.runs("acme") && certmesh::demo_pebble::available() {
        Some(run_acme(&exe, &rt, &o).context("certmesh, ACME")?)
    } else {
        if o.runs("acme") {
            notes.push("ACME rows skipped: pebble / pebble-challtestsrv not installed.".into());
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
    notes.push("Bulk: files created on node 1 before any process starts; timed from starting the processes until every file has its size on node 2 (contents compared afterwards); MB = 10^6 bytes.".into());
    notes.push(format!(
        "Ratios are Syncthing ÷ certmesh: above 1 means certmesh is faster/smaller, except in the MB/s and files/s rows. Whole run: {:.0} s.",
        started.elapsed().as_secs_f64()
    ));

    if acme.is_some() {
        notes.push(format!("ACME: a local Pebble (Debian package, validation sleep off) and pebble-challtestsrv as its DNS; the first issuance at start is awaited, then {} times `certmesh issue` over the control socket until the new certificate (key matching) is live on every node. With 3 nodes the CA's DNS points the name at a node that did not order, so the http-01 token must travel through the tree (and every peer acknowledge it) before the CA is told to validate, and the bundle must reach the others; with 1 node nothing is synced.", o.acme_samples));
    }
    let report = render_report(
        &o,
        &header,
        &cm,
        &tuned,
        &def,
        cm_bulk,
        st_bulk,
        &scale,
        acme.as_ref(),
        &notes,
    );
    let report = if hub_results.is_empty() {
        report
    } else {
        report + &hubs::render(&hub_results, o.samples)
    };
    println!("{report}");
    let path = target_dir().join("bench-report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

//! Command-line options of the benchmark.

use super::*;

pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) samples: usize,
    pub(crate) defaults_samples: usize,
    pub(crate) bulk_files: usize,
    pub(crate) bulk_mib: u64,
    pub(crate) skip_syncthing: bool,
    pub(crate) idle_secs: u64,
    pub(crate) rss_after_secs: u64,
    pub(crate) scale: Vec<usize>,
    /// Hub topology sizes (`--only hubs`).
    pub(crate) hubs: Vec<usize>,
    /// Where the hub nodes' trees and state live (`--hubs-trees`).
    pub(crate) hubs_trees: TreesOn,
    /// Sections to run (`--only`); empty: all.
    pub(crate) only: Vec<String>,
    pub(crate) acme_samples: usize,
    /// SIGTERM → exit measurements of each kind (`--stop-samples`).
    pub(crate) stop_samples: usize,
    /// `certmesh issue` requests in each hub run (`--acme-runs`); 0: no ACME there.
    pub(crate) acme_runs: usize,
    /// Certificates in `--only certs` (`--certs`).
    pub(crate) certs: usize,
    /// How long `--only certs` waits for every certificate to be live.
    pub(crate) certs_timeout_s: u64,
    pub(crate) args: Vec<String>,
}

/// `--hubs-trees`: a tmpfs the run mounts, or the disk under `$TMPDIR`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TreesOn {
    Tmpfs,
    Disk,
}

impl TreesOn {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TreesOn::Tmpfs => "tmpfs",
            TreesOn::Disk => "disk",
        }
    }
}

impl Opts {
    pub(crate) fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

pub(crate) const USAGE: &str = "\
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
                        idle), bulk, bulk-small (small-file latency during a bulk
                        sync, 3 nodes), scale, acme (issuance against a local Pebble on 1
                        and 3 nodes; skipped when pebble is not installed), stop
                        (SIGTERM → exit of an idle node and of one mid-sync),
                        handshake-flood (small-file p50/p99 a → b, 2 nodes, calm and
                        while 64 unconfigured devices flood b with QUIC handshakes)
                        (default: all); also `stages` (the stage trace of --samples
                        small files, run only when named)
  --acme-samples N      issuances per cluster size (default 20)
  --stop-samples N      stops of each kind for `stop` (default 20)
  --hubs LIST           hub topology sizes for `--only hubs` (default 128; multiples of 4;
                        hubs run only when named in --only; raises
                        fs.inotify.max_user_instances as root for the run)
  --hubs-trees WHERE    tmpfs (default: a tmpfs mounted for the run, as root: 248 nodes'
                        fsyncs on one machine's one disk measure that disk, not a fleet
                        where every node has its own) or disk ($TMPDIR)
  --acme-runs N         in each hub run, with pebble installed: a local Pebble, the name
                        pointed at an edge three hops from the renewer, N `certmesh issue`
                        requests after the first issuance (default 20; 0: none)
  --certs N             `--only certs` (run only when named): N certificates as tree entries
                        on 3 nodes, issued by a local Pebble (always valid, no sleep,
                        budget raised); time to issue all, orders/s, CPU per order, status
                        and /metrics latency and size, RSS, hook runs, a 4th node's join
                        (default 10000)
  --only certs-scale    (run only when named) --certs N good bundles and their tree entries
                        planted on one node (no ACME): start-up, status / --json / /metrics
                        latency and size (both metrics settings), RSS; then a new node
                        joins (until it holds every file) against two Syncthing instances'
                        initial sync of a copy of the tree
  --certs-timeout S     how long `--only certs` waits for all to be live (default 10800);
                        also the most certs-scale's join waits (else 300 s + 20 ms per file)";

pub(crate) fn parse_opts() -> Result<Opts> {
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
        hubs_trees: TreesOn::Tmpfs,
        only: Vec::new(),
        acme_samples: if quick { 3 } else { 20 },
        stop_samples: if quick { 3 } else { 20 },
        acme_runs: if quick { 3 } else { 20 },
        certs: if quick { 100 } else { 10_000 },
        certs_timeout_s: 3 * 3600,
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
            "--stop-samples" => o.stop_samples = val::<usize>(&a, it.next())?.max(1),
            "--acme-runs" => o.acme_runs = val(&a, it.next())?,
            "--certs" => o.certs = val::<usize>(&a, it.next())?.max(1),
            "--certs-timeout" => o.certs_timeout_s = val(&a, it.next())?,
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
            "--hubs-trees" => {
                let v: String = val(&a, it.next())?;
                o.hubs_trees = match v.as_str() {
                    "tmpfs" => TreesOn::Tmpfs,
                    "disk" => TreesOn::Disk,
                    _ => bail!("--hubs-trees: {v:?} is neither tmpfs nor disk"),
                };
            }
            "--only" => {
                let v: String = val(&a, it.next())?;
                o.only = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = o.only.iter().find(|s| {
                    ![
                        "latency",
                        "bulk",
                        "bulk-small",
                        "scale",
                        "acme",
                        "hubs",
                        "stop",
                        "stages",
                        "certs",
                        "certs-scale",
                        "handshake-flood",
                    ]
                    .contains(&s.as_str())
                }) {
                    bail!("--only: unknown section {bad:?} (latency, bulk, bulk-small, scale, acme, hubs, stop, stages, certs, certs-scale, handshake-flood)");
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

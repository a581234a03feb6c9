//! `--only hubs` (issue 16): hub topologies of real `certmesh` processes on
//! 127.1.0.0/16 — 4 regions × (2 hubs + edges), hubs peered with every hub and the
//! edges of their region, edges with the two hubs of their region. Measures time to
//! connected, a small file and a certificate bundle from an edge to every node
//! (p50/p99), the cluster-wide barrier from that edge (`certmesh confirm`), RSS per
//! edge and hub, hub CPU per change, and how much CPU other processes took during
//! the run (2 cores shared with other builds: figures under load are marked by
//! it). One daemon needs
//! one inotify instance: `fs.inotify.max_user_instances` (128 by default) is raised
//! for the run (as root) and put back afterwards. With pebble installed, an ACME
//! part ([`acme`]): the writer orders, an edge three hops away answers the CA.

use super::*;

#[path = "hubs_acme.rs"]
mod acme;
use acme::AcmeSection;

const REGIONS: usize = 4;
const HUBS: usize = 2;

pub struct HubsResult {
    pub n: usize,
    pub trees: TreesOn,
    pub formation: f64,
    pub small: Stats,
    pub bundle: Stats,
    pub torn: usize,
    pub confirm: Stats,
    pub rss_edge_mean: f64,
    pub rss_edge_max: f64,
    pub rss_hub_max: f64,
    pub hub_cpu_per_change_ms: f64,
    /// A region-0 hub left idle after the samples: its peer count, and its CPU (ms)
    /// and context switches per second per peer connection.
    pub hub_peers: usize,
    pub idle_hub_cpu_ms_per_peer_s: f64,
    pub idle_hub_wakeups_per_peer_s: f64,
    /// utime+stime of every node over the small-file samples, per change: with
    /// all nodes on one machine, propagation is bound by it (÷ 2 cores).
    pub all_cpu_per_change_ms: f64,
    /// Cores other processes kept busy on average from start to the last sample
    /// (the whole machine's busy time from `/proc/stat` minus the nodes' and the
    /// harness's own).
    pub others_cores: f64,
    pub acme: AcmeSection,
}

/// CPU seconds all processes took (all CPUs, `/proc/stat`), or NaN.
fn machine_busy_seconds() -> f64 {
    let busy = || -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let f: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user, nice, system: the time charged to processes (irq and softirq time,
        // much of it the nodes' own loopback traffic, is left out).
        Some(f.iter().take(3).sum())
    };
    busy().map_or(f64::NAN, |b| b as f64 / clk_tck())
}

/// Raises `fs.inotify.max_user_instances` to at least `want`, and puts the old value
/// back on drop.
struct InotifyInstances {
    restore: Option<u64>,
}

const INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";

impl InotifyInstances {
    fn raise(want: u64) -> Result<Self> {
        let now: u64 = std::fs::read_to_string(INSTANCES)
            .context(INSTANCES)?
            .trim()
            .parse()
            .context(INSTANCES)?;
        if now >= want {
            return Ok(InotifyInstances { restore: None });
        }
        std::fs::write(INSTANCES, want.to_string()).with_context(|| {
            format!(
                "raising {INSTANCES} from {now} to {want} (run as root, or \
                 `sysctl -w fs.inotify.max_user_instances={want}` first)"
            )
        })?;
        eprintln!("[hubs] fs.inotify.max_user_instances {now} → {want} for this run");
        Ok(InotifyInstances { restore: Some(now) })
    }
}

impl Drop for InotifyInstances {
    fn drop(&mut self) {
        if let Some(v) = self.restore {
            if std::fs::write(INSTANCES, v.to_string()).is_ok() {
                eprintln!("[hubs] fs.inotify.max_user_instances back to {v}");
            }
        }
    }
}

/// Node `i`'s address: 127.1.0.2 … 127.1.0.251, 127.1.1.2 …
fn ip(i: usize) -> String {
    format!("127.1.{}.{}", i / 250, i % 250 + 2)
}

struct Layout {
    per: usize,
}

impl Layout {
    fn hub(&self, i: usize) -> bool {
        i % self.per < HUBS
    }
    fn region(&self, i: usize) -> usize {
        i / self.per
    }
    fn name(&self, i: usize) -> String {
        let r = self.region(i);
        if self.hub(i) {
            format!("r{r}-hub{}", i % self.per)
        } else {
            format!("r{r}-edge{}", i % self.per - HUBS)
        }
    }
    /// Hubs: every other hub and their region's edges; edges: their region's hubs.
    fn peered(&self, a: usize, b: usize) -> bool {
        a != b
            && match (self.hub(a), self.hub(b)) {
                (true, true) => true,
                (true, false) | (false, true) => self.region(a) == self.region(b),
                (false, false) => false,
            }
    }
}

/// Writes the `n` configs (identities created) and returns the nodes' (name, config,
/// tree).
fn write_configs(dir: &Path, n: usize, l: &Layout) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let name = l.name(i);
        let state = dir.join(&name).join("state");
        let tree = dir.join(&name).join("tree");
        std::fs::create_dir_all(&tree)?;
        let id = certmesh::identity::Identity::init(&state)?.id;
        std::fs::create_dir_all(&tree)?; // `run` never creates the tree
        let addr = demo::free_port(&ip(i))?;
        nodes.push((name, state, tree, id, addr));
    }
    let mut out = Vec::with_capacity(n);
    for (i, (name, state, tree, _, addr)) in nodes.iter().enumerate() {
        let ids: Vec<(String, String, String)> = nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| l.peered(i, *j))
            .map(|(_, (pname, _, _, pid, paddr))| {
                (pname.clone(), pid.to_string(), paddr.to_string())
            })
            .collect();
        let peers: Vec<(&str, &str, &str)> = ids
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        let cfg = demo::node_config(name, state, &addr.to_string(), tree, &peers);
        let path = dir.join(name).join("certmesh.toml");
        std::fs::write(&path, cfg)?;
        out.push((name.clone(), path, tree.clone()));
    }
    Ok(out)
}

/// `certmesh confirm` over the control socket of `node` until `rel` is indexed there
/// and the barrier answers; the time from `since`.
fn confirm(
    rt: &tokio::runtime::Runtime,
    node: &LocalNode,
    rel: &str,
    n: usize,
    since: Instant,
) -> Result<Duration> {
    let cfg = certmesh::config::Config::load(&node.config)?;
    let req = certmesh::ops::control::Request::Confirm {
        path: rel.to_string(),
        timeout_ms: 30_000,
    };
    loop {
        let v = match rt.block_on(certmesh::ops::control::send(&cfg.control_socket(), &req)) {
            Ok(v) => v,
            Err(e) if format!("{e:#}").contains("not in this node's index") => {
                if since.elapsed() > Duration::from_secs(30) {
                    bail!("{rel} never indexed on {}", node.name);
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let took = since.elapsed();
        let r: certmesh::ops::control::ConfirmReply =
            serde_json::from_value(v.clone()).map_err(|e| anyhow!("confirm: {e}: {v}"))?;
        let have = r.nodes.iter().filter(|x| x.after_ms.is_some()).count();
        if !r.done || have != n - 1 {
            bail!(
                "barrier: done {}, {have} of {} nodes confirmed",
                r.done,
                n - 1
            );
        }
        return Ok(took);
    }
}

pub fn run_hubs(
    exe: &Path,
    rt: &tokio::runtime::Runtime,
    n: usize,
    o: &Opts,
) -> Result<HubsResult> {
    let l = Layout { per: n / REGIONS };
    eprintln!(
        "[hubs] {n} nodes: {REGIONS} regions × ({HUBS} hubs + {} edges), started together",
        l.per - HUBS
    );
    let _limit = InotifyInstances::raise((n as u64 + 512).max(1024))?;
    // Declared before `dir`: unmounted after the nodes' directory is gone.
    let mut tmpfs = match o.hubs_trees {
        TreesOn::Tmpfs => Some(Tmpfs::mount("4g")?),
        TreesOn::Disk => None,
    };
    let mut dir = tempfile::Builder::new();
    dir.prefix("certmesh-bench-hubs-");
    let dir = match &tmpfs {
        Some(t) => dir.tempdir_in(t.path())?,
        None => dir.tempdir()?,
    };
    let configs = write_configs(dir.path(), n, &l)?;
    let ca = acme::prepare(dir.path(), &l, &configs, o)?;
    let busy0 = (
        Instant::now(),
        machine_busy_seconds(),
        cpu_seconds(std::process::id()),
    );
    let t0 = Instant::now();
    let mut nodes = Vec::with_capacity(n);
    for (name, cfg, tree) in &configs {
        nodes.push(demo::spawn(exe, name, cfg, tree)?);
    }
    let mut c = CmCluster { nodes, _dir: dir };
    cm_wait_connected(rt, &c, Duration::from_secs(120))?;
    let formation = t0.elapsed().as_secs_f64();
    eprintln!("[hubs] {n} nodes connected after {formation:.2} s");
    // The daemon's own first order runs at start: done before the samples.
    let first = match &ca {
        Ok(setup) => Some(setup.first(rt, &c, t0)),
        Err(_) => None,
    };

    // The writer is region 0's first edge: a far edge is three hops away.
    let writer = HUBS;
    let hub_pid = c.nodes[0].child.as_ref().map(|c| c.id());
    // Start-up work (rescans, index exchanges) still running would be counted as the
    // first changes' CPU: wait until the nodes together idle.
    let settled = c.settle(Duration::from_secs(20));
    eprintln!("[hubs] {n} nodes idle {settled:.2} s after connecting");
    let cpu0 = hub_pid.and_then(|p| cpu_seconds(p).ok());
    let all0 = c.cpu_seconds();
    let label = format!("certmesh hubs {n}");
    let t = Trees {
        label: &label,
        writer: &c.nodes[writer].tree,
        peers: (0..n)
            .filter(|&i| i != writer)
            .map(|i| c.nodes[i].tree.as_path())
            .collect(),
        jitter: Duration::from_millis(50),
        timeout: Duration::from_secs(30),
    };
    let small_samples = small_file_samples(&t, o.samples, true, true)?;
    let cpu1 = hub_pid.and_then(|p| cpu_seconds(p).ok());
    let all_cpu_per_change_ms = (c.cpu_seconds() - all0) * 1000.0 / (o.samples + 1) as f64;
    let hub_cpu_per_change_ms = match (cpu0, cpu1) {
        (Some(a), Some(b)) => (b - a) * 1000.0 / (o.samples + 1) as f64,
        _ => f64::NAN,
    };
    let small = stats(small_samples);
    let (bundle, torn) = bundle_samples(&t, o.samples)?;
    let bundle = stats(bundle);

    let mut barrier = Vec::new();
    let mut rng = rand::rng();
    for k in 0..o.samples.min(10) {
        let rel = format!(
            "acme/.well-known/acme-challenge/c{k}-{:08x}",
            rng.random::<u32>()
        );
        let since = Instant::now();
        demo::write_atomic(&c.nodes[writer].tree, &rel, b"key-authorization")?;
        barrier.push(confirm(rt, &c.nodes[writer], &rel, n, since)?);
    }
    let confirm = stats(barrier);

    // Idle cost per connection: keep-alives only (issue 16 item 3).
    let hub_peers = (0..n).filter(|&j| l.peered(0, j)).count();
    let idle = match hub_pid {
        Some(p) => Some(measure_idle(
            &label,
            &[p],
            Duration::from_secs(1),
            Duration::from_secs(o.idle_secs.min(10)),
        )?),
        None => None,
    };
    let idle_window = o.idle_secs.min(10) as f64;

    let rss = |hub: bool| -> Vec<f64> {
        c.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| l.hub(*i) == hub)
            .filter_map(|(_, x)| rss_mib(x.child.as_ref()?.id()).ok())
            .collect()
    };
    let ours: f64 = c.cpu_seconds() + cpu_seconds(std::process::id()).unwrap_or(f64::NAN)
        - busy0.2.unwrap_or(f64::NAN);
    let others_cores =
        ((machine_busy_seconds() - busy0.1 - ours) / busy0.0.elapsed().as_secs_f64()).max(0.0);
    let edges = rss(false);
    let hubs = rss(true);
    let acme = match ca {
        Err(section) => section,
        Ok(setup) => match first
            .unwrap_or_else(|| Err(anyhow!("no first issuance")))
            .and_then(|first| setup.runs(rt, &c, &l, first, o.acme_runs))
        {
            Ok(a) => AcmeSection::Ran(Box::new(a)),
            Err(e) => AcmeSection::Broken(format!("{e:#}")),
        },
    };
    if acme.failed() {
        c._dir.disable_cleanup(true);
        if let Some(t) = &mut tmpfs {
            t.keep();
        }
        eprintln!(
            "[hubs] ACME: kept {} (Pebble's and the nodes' logs) for diagnosis",
            c._dir.path().display()
        );
    }
    let r = HubsResult {
        n,
        trees: o.hubs_trees,
        formation,
        small,
        bundle,
        torn,
        confirm,
        rss_edge_mean: edges.iter().sum::<f64>() / edges.len().max(1) as f64,
        rss_edge_max: edges.iter().copied().fold(0.0, f64::max),
        rss_hub_max: hubs.iter().copied().fold(0.0, f64::max),
        hub_cpu_per_change_ms,
        hub_peers,
        idle_hub_cpu_ms_per_peer_s: idle.map_or(f64::NAN, |i| {
            i.cpu_mean * 1000.0 / idle_window / hub_peers.max(1) as f64
        }),
        idle_hub_wakeups_per_peer_s: idle
            .map_or(f64::NAN, |i| i.wakeups_mean / hub_peers.max(1) as f64),
        all_cpu_per_change_ms,
        others_cores,
        acme,
    };
    eprintln!(
        "[hubs] {n}: small file p50 {} p99 {}; bundle p50 {} p99 {} ({} torn); barrier p50 {} p99 {}; RSS edge {:.1} MiB (max {:.1}), hub max {:.1} MiB; CPU per change: hub {:.1} ms, all nodes {:.0} ms; idle hub ({} peers): {:.3} ms CPU and {:.2} wake-ups per peer per second",
        fmt_secs(r.small.p50),
        fmt_secs(r.small.p99),
        fmt_secs(r.bundle.p50),
        fmt_secs(r.bundle.p99),
        r.torn,
        fmt_secs(r.confirm.p50),
        fmt_secs(r.confirm.p99),
        r.rss_edge_mean,
        r.rss_edge_max,
        r.rss_hub_max,
        r.hub_cpu_per_change_ms,
        r.all_cpu_per_change_ms,
        r.hub_peers,
        r.idle_hub_cpu_ms_per_peer_s,
        r.idle_hub_wakeups_per_peer_s
    );
    Ok(r)
}

/// The hubs table for the report.
pub fn render(results: &[HubsResult], samples: usize) -> String {
    let mut s = String::from(
        "\n### Hub topologies (`--only hubs`, issue 16)\n\n\
         | nodes | trees on | connected after | small file to all p50 | p99 | bundle to all p50 | p99 | torn | barrier from an edge p50 | p99 | RSS per edge (mean / max) | RSS hub (max) | hub CPU per change | all nodes' CPU per change | idle hub per peer connection: CPU / wake-ups per s | others' CPU |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} s | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} MiB | {:.1} MiB | {:.1} ms | {:.0} ms | {:.3} ms / {:.2} ({} peers) | {:.2} cores |",
            r.n,
            r.trees.name(),
            r.formation,
            fmt_secs(r.small.p50),
            fmt_secs(r.small.p99),
            fmt_secs(r.bundle.p50),
            fmt_secs(r.bundle.p99),
            r.torn,
            fmt_secs(r.confirm.p50),
            fmt_secs(r.confirm.p99),
            r.rss_edge_mean,
            r.rss_edge_max,
            r.rss_hub_max,
            r.hub_cpu_per_change_ms,
            r.all_cpu_per_change_ms,
            r.idle_hub_cpu_ms_per_peer_s,
            r.idle_hub_wakeups_per_peer_s,
            r.hub_peers,
            r.others_cores
        );
    }
    let _ = writeln!(
        s,
        "\n{REGIONS} regions × ({HUBS} hubs + edges) on 127.1.0.0/16, all processes started at once; \
         the writer is an edge of region 0 (three hops from the other regions' edges); the \
         samples start once the nodes together idle (under 5 % of a core over 250 ms). \
         Small file: {samples} samples (+1 warm-up), written atomically, until the content is on \
         every other node. Bundle: {samples} certificate versions (`archive/<name>/<i>/` \
         fullchain + key, then `live/<name>` flipped) until every other node reads the new pair \
         through `live/<name>`; torn: a node seen with a pair that is neither the old nor the new \
         one. Barrier: write of a token until `certmesh confirm` on the writer says \
         every node has it. RSS after the samples; hub CPU is utime+stime of a region-0 hub over \
         the small-file samples, per change; all nodes' CPU the same summed over every node (on 2 \
         cores, propagation to all can be no faster than half of it). Others' CPU: cores kept busy by other processes (other \
         builds) on average from the start to the last sample, out of the machine's total; \
         anything well above 0 means the figures were taken under load. Idle hub: the \
         region-0 hub left alone for up to 10 s after the barrier samples (QUIC keep-alives \
         every 5 s per connection), its CPU and context switches divided by its peer count. \
         Trees on: \
         tmpfs, every node's tree and state on a tmpfs mounted for the run (its fsyncs cost \
         nothing: a fleet's nodes each flush to their own disk, not all to one), or disk \
         (`$TMPDIR`: every node's three flushes per change on this machine's one disk)."
    );
    s + &acme::render(results)
}

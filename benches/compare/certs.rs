//! `--only certs` (issue 29 item 5): N certificates (`--certs`, default 10,000) as
//! tree entries (`.certmesh/certificates/<name>.toml`, what `certmesh cert add`
//! writes) on 3 nodes, issued by a local Pebble (validation always valid, no sleep)
//! under a raised `[acme] max_orders_per_hour`. Measured: the time until every
//! certificate is live on every node, orders per second, the renewer's CPU per
//! order, `status` and `/metrics` (both ways) latency and size, RSS and hook runs
//! per node; then a fourth node joins and the time until it holds the live set.

use super::*;

/// What `--only certs` measured.
pub(crate) struct CertsResult {
    pub(crate) n: usize,
    pub(crate) issue_s: f64,
    pub(crate) renewer_cpu_ms_per_order: f64,
    pub(crate) others_cpu_ms_per_order: f64,
    /// `status` as text, `--json`: (seconds, bytes).
    pub(crate) status: (f64, usize),
    pub(crate) status_json: (f64, usize),
    /// `/metrics` with per-certificate series, then without: (seconds, bytes).
    pub(crate) metrics: (f64, usize),
    pub(crate) metrics_aggregate: (f64, usize),
    pub(crate) rss_mib: Vec<f64>,
    pub(crate) hook_runs: Vec<u64>,
    /// Seconds from starting a fourth node until it holds every live certificate.
    pub(crate) join_s: Option<f64>,
}

/// Full mesh of 4 configured; node4 stays out (not in the others' peer lists)
/// until the join.
struct Fleet {
    nodes: Vec<LocalNode>,
    /// The configs with node4 as a peer, written at the join.
    joined: Vec<String>,
    metrics: Vec<String>,
    renewer: usize,
    _ca: certmesh::demo_pebble::Pebble,
    dir: tempfile::TempDir,
}

pub(crate) fn without_peer(cfg: &str, peer: &str) -> String {
    let marker = format!("\n[[peer]]\nname = \"{peer}\"\n");
    let Some(start) = cfg.find(&marker) else {
        return cfg.to_string();
    };
    let rest = &cfg[start + 1..];
    let end = rest.find("\n[").map_or(cfg.len(), |e| start + 1 + e);
    format!("{}{}", &cfg[..start], &cfg[end..])
}

fn start_fleet(exe: &Path, n: usize) -> Result<Fleet> {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-bench-certs-")
        .tempdir()?;
    let configs = demo::write_mesh(dir.path(), 4)?;
    let ca = certmesh::demo_pebble::Pebble::start(
        &dir.path().join("pebble"),
        &certmesh::demo_pebble::Options {
            always_valid: true,
            ..Default::default()
        },
    )?;
    let mut joined = Vec::new();
    let mut metrics = Vec::new();
    let mut ids = Vec::new();
    for (i, (_, cfg, _)) in configs.iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        let m = format!(
            "{ip}:{}",
            TcpListener::bind(format!("{ip}:0"))?.local_addr()?.port()
        );
        let mut text = std::fs::read_to_string(cfg)?;
        text.push_str(&format!(
            "\n[metrics]\nlisten = \"{m}\"\n\n[[hook]]\npaths = [\"live/**\"]\nrun = [\"true\"]\n"
        ));
        if i < 3 {
            text.push_str(&format!(
                "\n[acme]\ndirectory = \"{}\"\nca_roots = \"{}\"\nmax_orders_per_hour = 100000\n{}",
                ca.directory,
                ca.ca_roots.display(),
                ca.http_config(&ip)
            ));
            std::fs::write(cfg, without_peer(&text, "node4"))?;
            ids.push(certmesh::identity::Identity::load(&cfg.with_file_name("state"))?.id);
        } else {
            std::fs::write(cfg, &text)?;
        }
        joined.push(text);
        metrics.push(m);
    }
    let renewer = (0..3).min_by_key(|&i| ids[i]).unwrap_or(0);
    let entries = configs[0].2.join(".certmesh/certificates");
    std::fs::create_dir_all(&entries)?;
    for i in 0..n {
        std::fs::write(
            entries.join(format!("c{i}.toml")),
            format!("name = \"c{i}\"\ndomains = [\"c{i}.bench.test\"]\nkey = \"ecdsa-p256\"\n"),
        )?;
    }
    let nodes = configs[..3]
        .iter()
        .map(|(name, cfg, tree)| demo::spawn(exe, name, cfg, tree))
        .collect::<Result<Vec<_>>>()?;
    let mut nodes = nodes;
    // node4's process starts at the join; its config and tree are ready.
    nodes.push(LocalNode {
        name: configs[3].0.clone(),
        config: configs[3].1.clone(),
        tree: configs[3].2.clone(),
        child: None,
    });
    Ok(Fleet {
        nodes,
        joined,
        metrics,
        renewer,
        _ca: ca,
        dir,
    })
}

/// Certificates whose `live/<name>/fullchain.pem` is readable in `tree`.
fn live_count(tree: &Path) -> usize {
    std::fs::read_dir(tree.join("live"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("fullchain.pem").is_file())
        .count()
}

fn pid(n: &LocalNode) -> Option<u32> {
    n.child.as_ref().map(Child::id)
}

/// `GET /metrics` at `addr`: (seconds, body).
pub(crate) fn scrape(addr: &str) -> Result<(f64, String)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        bail!("/metrics: {}", out.lines().next().unwrap_or(""));
    }
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((t.elapsed().as_secs_f64(), body))
}

/// `certmesh status` (with `args`) against `node`: (seconds, bytes of output).
pub(crate) fn status(exe: &Path, node: &LocalNode, args: &[&str]) -> Result<(f64, usize)> {
    let t = Instant::now();
    let out = Command::new(exe)
        .arg("status")
        .arg("--config")
        .arg(&node.config)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((t.elapsed().as_secs_f64(), out.stdout.len()))
}

fn hook_runs(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("certmesh_hook_runs_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub(crate) fn run_certs(exe: &Path, o: &Opts) -> Result<CertsResult> {
    let n = o.certs;
    eprintln!("[certmesh] certs: {n} certificates on 3 nodes from a local Pebble");
    let mut f = start_fleet(exe, n)?;
    let t0 = Instant::now();
    let cpu0: Vec<f64> = f.nodes[..3]
        .iter()
        .map(|x| pid(x).and_then(|p| cpu_seconds(p).ok()).unwrap_or(0.0))
        .collect();
    let deadline = Duration::from_secs(o.certs_timeout_s);
    let mut last = 0;
    loop {
        let counts: Vec<usize> = f.nodes[..3].iter().map(|x| live_count(&x.tree)).collect();
        if counts.iter().all(|&c| c >= n) {
            break;
        }
        if t0.elapsed() > deadline {
            bail!("after {deadline:?}, live on the nodes: {counts:?} of {n}");
        }
        if counts[f.renewer] >= last + n / 10 {
            last = counts[f.renewer];
            eprintln!(
                "[certmesh] certs: {counts:?} live after {:.0} s",
                t0.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let issue_s = t0.elapsed().as_secs_f64();
    // `CERTMESH_BENCH_LOGS=DIR`: the three nodes' logs of the issuance, kept (run
    // with `RUST_LOG=warn,certmesh::acme=debug` for each order's stages).
    if let Some(dir) = std::env::var_os("CERTMESH_BENCH_LOGS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        for (i, x) in f.nodes[..3].iter().enumerate() {
            let log = x.config.with_file_name("node.log");
            std::fs::copy(&log, dir.join(format!("node{}.log", i + 1)))
                .with_context(|| format!("copying {}", log.display()))?;
        }
    }
    let cpu: Vec<f64> = f.nodes[..3]
        .iter()
        .zip(&cpu0)
        .map(|(x, c0)| pid(x).and_then(|p| cpu_seconds(p).ok()).unwrap_or(0.0) - c0)
        .collect();
    let renewer_cpu = cpu[f.renewer];
    let others_cpu = (cpu.iter().sum::<f64>() - renewer_cpu) / 2.0;
    eprintln!(
        "[certmesh] certs: all {n} live on 3 nodes after {issue_s:.1} s ({:.1} orders/s)",
        n as f64 / issue_s
    );
    let r = &f.nodes[f.renewer];
    let status_text = status(exe, r, &[])?;
    let status_json = status(exe, r, &["--json"])?;
    let metrics = scrape(&f.metrics[f.renewer])?;
    let hook_runs: Vec<u64> = f.metrics[..3]
        .iter()
        .map(|m| scrape(m).map(|(_, b)| hook_runs(&b)).unwrap_or(0))
        .collect();
    let rss_mib: Vec<f64> = f.nodes[..3]
        .iter()
        .map(|x| pid(x).and_then(|p| rss_mib(p).ok()).unwrap_or(0.0))
        .collect();
    // The aggregate-only scrape: the renewer restarted with per_certificate off.
    let metrics_aggregate = aggregate_scrape(exe, &mut f)?;
    let join_s = join(exe, &mut f, n).ok();
    Ok(CertsResult {
        n,
        issue_s,
        renewer_cpu_ms_per_order: renewer_cpu * 1000.0 / n as f64,
        others_cpu_ms_per_order: others_cpu * 1000.0 / n as f64,
        status: status_text,
        status_json,
        metrics: (metrics.0, metrics.1.len()),
        metrics_aggregate,
        rss_mib,
        hook_runs,
        join_s,
    })
}

/// Restarts the first node that is not the renewer with `[metrics] per_certificate
/// = false` and scrapes it once its certificates are all live again.
fn aggregate_scrape(exe: &Path, f: &mut Fleet) -> Result<(f64, usize)> {
    let i = (f.renewer + 1) % 3;
    let node = &mut f.nodes[i];
    if let Some(mut c) = node.child.take() {
        if let Some(p) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
        let _ = c.wait();
    }
    let text = std::fs::read_to_string(&node.config)?;
    let text = text.replace("\n[[hook]]", "per_certificate = false\n\n[[hook]]");
    std::fs::write(&node.config, text)?;
    let joined = f.joined[i].replace("\n[[hook]]", "per_certificate = false\n\n[[hook]]");
    f.joined[i] = joined;
    *node = demo::spawn(
        exe,
        &node.name.clone(),
        &node.config.clone(),
        &node.tree.clone(),
    )?;
    let t = Instant::now();
    loop {
        if let Ok((s, body)) = scrape(&f.metrics[i]) {
            if body.contains("certmesh_certificates{state=\"missing\"} 0") {
                return Ok((s, body.len()));
            }
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the restarted node's metrics never showed every certificate live");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// node4 joins: the others' configs gain it as a peer (SIGHUP), it starts; the
/// seconds until every certificate is live there.
fn join(exe: &Path, f: &mut Fleet, n: usize) -> Result<f64> {
    for i in 0..3 {
        std::fs::write(&f.nodes[i].config, &f.joined[i])?;
        if let Some(p) = pid(&f.nodes[i]).and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::HUP);
        }
    }
    let (name, cfg, tree) = {
        let j = &f.nodes[3];
        (j.name.clone(), j.config.clone(), j.tree.clone())
    };
    let t = Instant::now();
    f.nodes[3] = demo::spawn(exe, &name, &cfg, &tree)?;
    loop {
        let c = live_count(&tree);
        if c >= n {
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "[certmesh] certs: a new node holds all {n} live certificates after {s:.1} s"
            );
            return Ok(s);
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "the new node holds {c} of {n} after 600 s ({})",
                f.dir.path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The report's section.
pub(crate) fn render(r: &CertsResult) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "\n## Many certificates ({} on 3 nodes)\n", r.n);
    let _ = writeln!(o, "| measure | value |\n|---|---|");
    let rows = [
        (
            "time until all are live on 3 nodes",
            format!("{:.1} s", r.issue_s),
        ),
        (
            "orders per second",
            format!("{:.1}", r.n as f64 / r.issue_s),
        ),
        (
            "renewer CPU per order",
            format!("{:.1} ms", r.renewer_cpu_ms_per_order),
        ),
        (
            "other nodes' CPU per order (each)",
            format!("{:.1} ms", r.others_cpu_ms_per_order),
        ),
        (
            "`status` (text summary)",
            format!("{:.0} ms, {} bytes", r.status.0 * 1e3, r.status.1),
        ),
        (
            "`status --json`",
            format!(
                "{:.0} ms, {:.1} MB",
                r.status_json.0 * 1e3,
                r.status_json.1 as f64 / 1e6
            ),
        ),
        (
            "`/metrics`, per-certificate series",
            format!(
                "{:.0} ms, {:.2} MB",
                r.metrics.0 * 1e3,
                r.metrics.1 as f64 / 1e6
            ),
        ),
        (
            "`/metrics`, `per_certificate = false`",
            format!(
                "{:.0} ms, {:.1} KB",
                r.metrics_aggregate.0 * 1e3,
                r.metrics_aggregate.1 as f64 / 1e3
            ),
        ),
        (
            "RSS per node",
            r.rss_mib
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
                + " MiB",
        ),
        (
            "hook runs per node (min_interval 5 s)",
            r.hook_runs
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / "),
        ),
        (
            "a new node holds the live set",
            r.join_s.map_or("-".into(), |s| format!("{s:.1} s")),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    o
}

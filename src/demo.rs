//! `certmesh demo`: a 3-node mesh on 127.0.0.2–4 in a temp dir, as separate processes
//! of this binary. Writes challenge files on node 1, reports how long each took to
//! appear (with the right content) on the other two, then stops the nodes and removes
//! everything.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::identity::Identity;

/// One node process of a local cluster.
pub struct LocalNode {
    pub name: String,
    pub config: PathBuf,
    pub tree: PathBuf,
    pub child: Option<Child>,
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free UDP port on `ip`.
pub fn free_port(ip: &str) -> anyhow::Result<SocketAddr> {
    let s = UdpSocket::bind(format!("{ip}:0")).with_context(|| format!("binding {ip}:0"))?;
    Ok(s.local_addr()?)
}

/// The config of a local node: `[node]`, `[tree]` and one `[[peer]]` per
/// `(name, device ID, address)`. The one config text of the demo, the benchmark and
/// the integration tests.
pub fn node_config(
    name: &str,
    state: &Path,
    listen: &str,
    tree: &Path,
    peers: &[(&str, &str, &str)],
) -> String {
    let mut cfg = format!(
        "[node]\nname = \"{name}\"\nstate_dir = \"{}\"\nlisten = \"{listen}\"\n\n[tree]\npath = \"{}\"\n",
        state.display(),
        tree.display()
    );
    for (pname, pid, paddr) in peers {
        cfg.push_str(&format!(
            "\n[[peer]]\nname = \"{pname}\"\nid = \"{pid}\"\naddress = \"{paddr}\"\n"
        ));
    }
    cfg
}

/// Writes configs for a full mesh of `n` nodes on 127.0.0.2… under `dir`.
pub fn write_mesh(dir: &Path, n: usize) -> anyhow::Result<Vec<(String, PathBuf, PathBuf)>> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let name = format!("node{}", i + 1);
        let state = dir.join(&name).join("state");
        let tree = dir.join(&name).join("tree");
        let id = Identity::init(&state)?.id;
        std::fs::create_dir_all(&tree)?; // `run` never creates the tree
        let addr = free_port(&format!("127.0.0.{}", i + 2))?;
        nodes.push((name, state, tree, id, addr));
    }
    let mut out = Vec::new();
    for (name, state, tree, _, addr) in &nodes {
        let ids: Vec<(String, String, String)> = nodes
            .iter()
            .filter(|(pname, ..)| pname != name)
            .map(|(pname, _, _, pid, paddr)| (pname.clone(), pid.to_string(), paddr.to_string()))
            .collect();
        let peers: Vec<(&str, &str, &str)> = ids
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        let cfg = node_config(name, state, &addr.to_string(), tree, &peers);
        let path = dir.join(name).join("certmesh.toml");
        std::fs::write(&path, cfg)?;
        out.push((name.clone(), path, tree.clone()));
    }
    Ok(out)
}

/// Starts `certmesh run` for a config, logging to `<config dir>/node.log`.
pub fn spawn(exe: &Path, name: &str, config: &Path, tree: &Path) -> anyhow::Result<LocalNode> {
    let log = std::fs::File::create(config.with_file_name("node.log"))?;
    let child = Command::new(exe)
        .args(["run", "--config"])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    Ok(LocalNode {
        name: name.to_string(),
        config: config.to_path_buf(),
        tree: tree.to_path_buf(),
        child: Some(child),
    })
}

/// Waits until every node reports every peer connected.
/// A node once seen with all its peers is not asked again until every node has been
/// (asking hundreds of nodes for their status every few ms would slow what it
/// measures); then one more round over all confirms it.
pub async fn wait_connected(nodes: &[LocalNode], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let sockets = nodes
        .iter()
        .map(|n| Ok(crate::config::Config::load(&n.config)?.control_socket()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut waiting: Vec<usize> = (0..nodes.len()).collect();
    let mut confirmed = false;
    loop {
        let mut still = Vec::new();
        for &i in &waiting {
            let ok = match crate::ops::control::request(&sockets[i], "status").await {
                Ok(v) => v["peers"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().all(|p| p["connected"].as_bool() == Some(true))),
                Err(_) => false,
            };
            if !ok {
                still.push(i);
            }
        }
        match (still.is_empty(), confirmed) {
            (true, true) => return Ok(()),
            (true, false) => {
                confirmed = true;
                still = (0..nodes.len()).collect();
            }
            (false, _) => confirmed = false,
        }
        waiting = still;
        if Instant::now() > deadline {
            let names: Vec<&str> = waiting.iter().map(|&i| nodes[i].name.as_str()).collect();
            bail!(
                "the mesh did not connect within {timeout:?}: {} of {} nodes not connected to all their peers ({})",
                names.len(),
                nodes.len(),
                names.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `content` at `rel` under `tree` atomically (temp file beside the tree, rename).
pub fn write_atomic(tree: &Path, rel: &str, content: &[u8]) -> std::io::Result<()> {
    let dest = tree.join(rel);
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = tree.with_file_name(format!(".demo-tmp-{}", rand::random::<u64>()));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, &dest)
}

/// Polls (100 µs) until every `trees[i]/rel` holds `content`; the elapsed time.
pub fn wait_present(
    trees: &[&Path],
    rel: &str,
    content: &[u8],
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if trees
            .iter()
            .all(|t| std::fs::read(t.join(rel)).is_ok_and(|c| c == content))
        {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Runs the demo.
pub async fn run(samples: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-demo-")
        .tempdir()?;
    let exe = std::env::current_exe()?;
    println!(
        "certmesh demo: 3 nodes on 127.0.0.2-4, temp dir {}",
        dir.path().display()
    );
    let configs = write_mesh(dir.path(), 3)?;
    let ca = if crate::demo_pebble::available() {
        Some(with_local_ca(dir.path(), &configs, false)?)
    } else {
        println!(
            "(pebble not installed: `apt-get install pebble` to also see a certificate issued)"
        );
        None
    };
    let nodes: Vec<LocalNode> = configs
        .iter()
        .map(|(name, cfg, tree)| spawn(&exe, name, cfg, tree))
        .collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    wait_connected(&nodes, Duration::from_secs(20)).await?;
    println!(
        "mesh connected in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    // The first issuance runs on its own at start; let it finish before timing sync.
    let first = match &ca {
        Some(_) => Some(first_issuance(&nodes, t0)?),
        None => None,
    };
    let others: Vec<&Path> = nodes[1..].iter().map(|n| n.tree.as_path()).collect();
    let mut times = Vec::new();
    for i in 0..samples.max(1) {
        let rel = format!("acme/.well-known/acme-challenge/token-{i}");
        let content = format!(
            "token-{i}.demo-key-authorization-{:016x}",
            rand::random::<u64>()
        );
        write_atomic(&nodes[0].tree, &rel, content.as_bytes())?;
        let Some(t) = wait_present(&others, &rel, content.as_bytes(), Duration::from_secs(10))
        else {
            bail!(
                "{rel} did not reach node2 and node3 within 10 s (logs in {})",
                dir.path().display()
            );
        };
        times.push(t);
        if i < 3 {
            println!(
                "  {rel}: on node2 and node3 after {:.2} ms",
                t.as_secs_f64() * 1000.0
            );
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{} files written on node1, time until present on both other nodes: min {:.2} ms, p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        times.len(),
        ms(times[0]),
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(times[times.len() - 1])
    );
    if let Some(first) = first {
        reissue(&nodes, &first).await?;
    }
    drop(nodes);
    drop(ca);
    println!("stopped the nodes and removed {}", dir.path().display());
    Ok(())
}

/// Starts Pebble, gives every node `[acme]`, and points the demo name at a node that
/// is not the renewer (the lowest device ID), so the CA asks a node that did not order.
fn with_local_ca(
    dir: &Path,
    configs: &[(String, PathBuf, PathBuf)],
    quiet: bool,
) -> anyhow::Result<crate::demo_pebble::Pebble> {
    let ca = crate::demo_pebble::Pebble::start(
        &dir.join("pebble"),
        &crate::demo_pebble::Options::default(),
    )?;
    let mut ids = Vec::new();
    for (i, (_, cfg, _)) in configs.iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        let mut text = std::fs::read_to_string(cfg)?;
        text.push_str(&ca.node_config(&ip));
        std::fs::write(cfg, text)?;
        let state = cfg.with_file_name("state");
        ids.push(Identity::load(&state)?.id);
    }
    let renewer = (0..ids.len()).min_by_key(|&i| ids[i]).unwrap_or(0);
    let target = (renewer + 1) % ids.len();
    ca.set_a(
        crate::demo_pebble::DOMAIN,
        &format!("127.0.0.{}", target + 2),
    )?;
    if !quiet {
        println!(
            "local Pebble CA at {} (validation sleep off); {} resolves to node{} while node{} orders",
            ca.directory,
            crate::demo_pebble::DOMAIN,
            target + 1,
            renewer + 1
        );
    }
    Ok(ca)
}

/// The serial live on every node once all agree and every key matches its cert.
fn same_serial_everywhere(nodes: &[LocalNode], deadline: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let all: Vec<Option<(String, bool)>> = nodes
            .iter()
            .map(|n| crate::demo_pebble::live_bundle(&n.tree))
            .collect();
        if let Some(Some((serial, _))) = all.first() {
            if all
                .iter()
                .all(|b| b.as_ref().is_some_and(|(s, ok)| s == serial && *ok))
            {
                return Ok(serial.clone());
            }
        }
        if start.elapsed() > deadline {
            bail!("the certificate did not reach every node within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for the daemon's own first issuance to be live on every node.
fn first_issuance(nodes: &[LocalNode], started: Instant) -> anyhow::Result<String> {
    let first = same_serial_everywhere(nodes, Duration::from_secs(60))?;
    println!(
        "certificate for {} issued on its own and live on all 3 nodes {:.0} ms after start (serial {first}, key matches cert on every node)",
        crate::demo_pebble::DOMAIN,
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(first)
}

/// Times `certmesh issue` until the new certificate is live on every node.
async fn reissue(nodes: &[LocalNode], first: &str) -> anyhow::Result<()> {
    let (took, asked, second) = issue_until_live(nodes, first).await?;
    println!(
        "`certmesh issue` on {asked}: new certificate (serial {second}) live on all {} nodes after {:.0} ms",
        nodes.len(),
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Asks the nodes in turn to `issue` (the one holding the renewal lease takes it) and
/// waits until a certificate other than `previous` is live on every node; returns
/// the time taken, the node that ordered and the new serial.
async fn issue_until_live(
    nodes: &[LocalNode],
    previous: &str,
) -> anyhow::Result<(Duration, String, String)> {
    let t = Instant::now();
    let mut asked = None;
    for n in nodes {
        let cfg = crate::config::Config::load(&n.config)?;
        match crate::ops::control::issue(&cfg.control_socket(), "www").await {
            Ok(_) => {
                asked = Some(n.name.clone());
                break;
            }
            Err(e) if e.to_string().contains("lease") => continue,
            Err(e) => return Err(e),
        }
    }
    let asked = asked.ok_or_else(|| anyhow::anyhow!("no node accepted `issue`"))?;
    loop {
        let s = same_serial_everywhere(nodes, Duration::from_secs(60))?;
        if s != previous {
            return Ok((t.elapsed(), asked, s));
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the reissued certificate did not reach every node");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// For the benchmark: `n` nodes with a local Pebble (the validator pointed at a node
/// that does not order, when there are several), their first issuance done.
pub struct AcmeCluster {
    nodes: Vec<LocalNode>,
    serial: String,
    _ca: crate::demo_pebble::Pebble,
    _dir: tempfile::TempDir,
}

impl AcmeCluster {
    pub async fn start(exe: &Path, n: usize) -> anyhow::Result<AcmeCluster> {
        Self::start_with(exe, n, &|_, _| String::new()).await
    }

    /// [`AcmeCluster::start`] with `extra(i, tree)` appended to node `i`'s config
    /// (e.g. a `[[frontend]]` and a reload `[[hook]]`).
    pub async fn start_with(
        exe: &Path,
        n: usize,
        extra: &dyn Fn(usize, &Path) -> String,
    ) -> anyhow::Result<AcmeCluster> {
        let dir = tempfile::Builder::new()
            .prefix("certmesh-bench-acme-")
            .tempdir()?;
        let configs = write_mesh(dir.path(), n)?;
        let ca = with_local_ca(dir.path(), &configs, true)?;
        for (i, (_, cfg, tree)) in configs.iter().enumerate() {
            let text = std::fs::read_to_string(cfg)? + &extra(i, tree);
            std::fs::write(cfg, text)?;
        }
        let nodes: Vec<LocalNode> = configs
            .iter()
            .map(|(name, cfg, tree)| spawn(exe, name, cfg, tree))
            .collect::<anyhow::Result<_>>()?;
        wait_connected(&nodes, Duration::from_secs(20)).await?;
        let serial = same_serial_everywhere(&nodes, Duration::from_secs(60))?;
        Ok(AcmeCluster {
            nodes,
            serial,
            _ca: ca,
            _dir: dir,
        })
    }

    /// Each node's tree.
    pub fn trees(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.tree.clone()).collect()
    }

    /// `certmesh issue` until the new certificate is live on every node.
    pub async fn issue(&mut self) -> anyhow::Result<Duration> {
        let (took, _, serial) = issue_until_live(&self.nodes, &self.serial).await?;
        self.serial = serial;
        Ok(took)
    }
}

//! Helpers that start real `certmesh` processes on 127.0.0.x in temp dirs and always
//! clean up (processes are stopped on drop, temp dirs removed).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_certmesh");
/// Generous: CI machines are slow and busy; this bounds a wait, it is not a timing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` every 10 ms until it returns true or the deadline passes.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out after {DEADLINE:?} waiting for: {what}");
}

pub fn certmesh(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running certmesh")
}

/// One node: its files and, while running, its process.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tree: PathBuf,
    pub state: PathBuf,
    pub id: String,
    pub addr: String,
    pub child: Option<Child>,
    /// Network namespace the process runs in (`ip netns exec`), if any.
    pub netns: Option<String>,
    /// A command the daemon is started through (`prlimit --nofile=…`), if any.
    pub launcher: Vec<String>,
}

impl Node {
    /// Creates the identity and picks a free port on `ip`; no config yet.
    pub fn new(root: &Path, name: &str, ip: &str) -> Node {
        Self::with_addr(root, name, &format!("{ip}:{}", free_udp(ip)))
    }

    /// A node listening on `addr` (which may be taken: for bind errors).
    pub fn with_listen(root: &Path, name: &str, addr: &str) -> Node {
        Self::with_addr(root, name, addr)
    }

    /// A node that will run inside network namespace `ns`, listening on `addr`.
    pub fn in_netns(root: &Path, name: &str, ns: &str, addr: &str) -> Node {
        let mut n = Self::with_addr(root, name, addr);
        n.netns = Some(ns.to_string());
        n
    }

    fn with_addr(root: &Path, name: &str, addr: &str) -> Node {
        let dir = root.join(name);
        let state = dir.join("state");
        let out = certmesh(&["init", "--state-dir", state.to_str().unwrap()]);
        assert!(out.status.success(), "init failed: {out:?}");
        // The tree exists before the daemon runs: `run` never creates it (issue 23).
        fs::create_dir_all(dir.join("tree")).unwrap();
        let id = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_string();
        Node {
            name: name.into(),
            config: dir.join("certmesh.toml"),
            tree: dir.join("tree"),
            state,
            dir,
            id,
            addr: addr.to_string(),
            child: None,
            netns: None,
            launcher: Vec::new(),
        }
    }

    /// Writes the config listing `peers`.
    pub fn configure(&self, peers: &[&Node]) {
        let peers: Vec<(&str, &str, &str)> = peers
            .iter()
            .map(|p| (p.name.as_str(), p.id.as_str(), p.addr.as_str()))
            .collect();
        self.configure_raw(&peers);
    }

    /// Writes a config naming peers freely: (name, device ID, address).
    pub fn configure_raw(&self, peers: &[(&str, &str, &str)]) {
        let cfg =
            certmesh::demo::node_config(&self.name, &self.state, &self.addr, &self.tree, peers);
        fs::write(&self.config, cfg).unwrap();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None if !self.launcher.is_empty() => {
                let mut c = Command::new(&self.launcher[0]);
                c.args(&self.launcher[1..]).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["run", "--config", self.config.to_str().unwrap()])
            .env("RUST_LOG", "info,certmesh=debug,quinn=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.state.join("control.sock");
        let name = self.name.clone();
        wait_until(&format!("{name} control socket"), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "{} exited with {status} on SIGTERM\n{}",
                self.name,
                self.log()
            );
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("running");
        unsafe { libc::kill(c.id() as i32, sig) };
    }

    pub fn status(&self) -> serde_json::Value {
        let out = certmesh(&[
            "status",
            "--config",
            self.config.to_str().unwrap(),
            "--json",
        ]);
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Every configured peer connected.
    pub fn all_connected(&self) -> bool {
        let s = self.status();
        s["peers"]
            .as_array()
            .is_some_and(|ps| !ps.is_empty() && ps.iter().all(|p| p["connected"] == true))
    }

    /// Every configured peer connected and in sync, nothing pending here.
    pub fn all_in_sync(&self) -> bool {
        let s = self.status();
        s["tree"]["out_of_sync"] == 0
            && s["peers"].as_array().is_some_and(|ps| {
                ps.iter()
                    .all(|p| p["connected"] == true && p["in_sync"] == true)
            })
    }

    /// Adds `keys` (TOML lines) at the top of the configuration's `[tree]` table.
    pub fn add_tree_keys(&self, keys: &str) {
        let cfg = fs::read_to_string(&self.config).unwrap();
        let cfg = cfg.replacen("[tree]\n", &format!("[tree]\n{keys}"), 1);
        fs::write(&self.config, cfg).unwrap();
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.tree.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    /// Writes through a temporary file and a rename, as an editor or a deploy tool
    /// would: peers never see an empty or partial file in between.
    pub fn write_atomic(&self, rel: &str, content: &str) {
        certmesh::demo::write_atomic(&self.tree, rel, content.as_bytes()).unwrap();
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.tree.join(rel)).ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A set of nodes in one temp dir.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes on 127.0.0.2…; `links` (pairs of indices) or a full mesh.
    pub fn new(n: usize, links: Option<&[(usize, usize)]>) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("certmesh-test-")
            .tempdir()
            .unwrap();
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                Node::new(
                    dir.path(),
                    &format!("n{}", i + 1),
                    &format!("127.0.0.{}", i + 2),
                )
            })
            .collect();
        let linked = |a: usize, b: usize| match links {
            None => a != b,
            Some(l) => l.iter().any(|&(x, y)| (x, y) == (a, b) || (y, x) == (a, b)),
        };
        for (i, node) in nodes.iter().enumerate() {
            let peers: Vec<&Node> = (0..n)
                .filter(|&j| linked(i, j))
                .map(|j| &nodes[j])
                .collect();
            node.configure(&peers);
        }
        Cluster { nodes, dir }
    }

    pub fn start_all(&mut self) {
        for n in &mut self.nodes {
            n.start();
        }
        for n in &self.nodes {
            wait_until(&format!("{} connected to all peers", n.name), || {
                n.all_connected()
            });
        }
    }

    /// Waits until every tree has the same content and every node reports in sync.
    pub fn wait_converged(&self) {
        self.wait_converged_except(&[]);
    }

    /// As `wait_converged`, ignoring paths that are expected to stay local.
    pub fn wait_converged_except(&self, local: &[&str]) {
        let snap = |n: &Node| {
            let mut s = snapshot(&n.tree);
            s.retain(|k, _| !local.contains(&k.as_str()));
            s
        };
        wait_until("all trees identical and in sync", || {
            let first = snap(&self.nodes[0]);
            self.nodes.iter().all(|n| snap(n) == first)
                && self.nodes.iter().all(|n| n.all_in_sync())
        });
    }
}

/// What a tree holds: path → (kind, content or link target, mode with private-key
/// "other" bits ignored). Local-only internal dirs are excluded.
pub fn snapshot(root: &Path) -> BTreeMap<String, (char, Vec<u8>, u32)> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, Vec<u8>, u32)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
        if rel == ".certmesh/tmp" || rel == ".certmesh/conflicts" || rel == ".certmesh/kept" {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            out.insert(rel, ('d', vec![], mode));
            walk(root, &p, out);
        } else if m.file_type().is_symlink() {
            out.insert(
                rel,
                (
                    'l',
                    fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .as_bytes()
                        .to_vec(),
                    0,
                ),
            );
        } else if !m.is_file() {
            // fifo, socket, device: never read (a fifo would block).
            out.insert(rel, ('s', vec![], mode));
        } else {
            let mode = if rel.ends_with("key.pem") {
                mode & !0o007
            } else {
                mode
            };
            out.insert(rel, ('f', fs::read(&p).unwrap_or_default(), mode));
        }
    }
}

impl Node {
    /// As `start`, with extra environment for the daemon (e.g. libfaketime).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config", self.config.to_str().unwrap()])
            .env("RUST_LOG", "info,certmesh=debug,quinn=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.state.join("control.sock");
        wait_until(&format!("{} control socket", self.name), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }
}

/// Waits until `addr` accepts TCP, failing early if the server exited.
pub fn wait_listening(
    addr: &str,
    what: &str,
    child: &mut std::process::Child,
    log: &std::path::Path,
) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what} exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not listen on {addr}");
}

/// A free TCP port on `ip`, for the caller to bind (see [`next_port`]).
pub fn free_tcp(ip: &str) -> u16 {
    next_port(|p| std::net::TcpListener::bind((ip, p)).is_ok())
}

/// A free UDP port on `ip`, for the caller to bind (see [`next_port`]).
pub fn free_udp(ip: &str) -> u16 {
    next_port(|p| std::net::UdpSocket::bind((ip, p)).is_ok())
}

/// The next port that `free` says is free, from a counter below the kernel's ephemeral
/// range (32768–60999). A port asked for with `:0` and released could be handed out
/// again by the kernel, to another test's socket, before the caller binds it; a port
/// from this counter is never handed out twice in one test process and never chosen by
/// the kernel. The counter starts at a random place so that two test processes on one
/// machine rarely walk the same ports.
pub fn next_port(mut free: impl FnMut(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let seed = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
        let _ = NEXT.compare_exchange(0, LOW + seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (n - LOW) % SPAN) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// Options for the crate's Pebble launcher on `ip`: ports from [`next_port`], every
/// order validated (no authorization reuse).
pub fn pebble_options(ip: &str) -> certmesh::demo_pebble::Options<'_> {
    certmesh::demo_pebble::Options {
        ip,
        authz_reuse: Some(0),
        free_tcp: |ip| Ok(free_tcp(ip)),
        free_udp: |ip| Ok(free_udp(ip)),
        ..Default::default()
    }
}

/// Every node of `nodes` but the `i`-th: its peers in a full mesh.
pub fn others(nodes: &[Node], i: usize) -> Vec<&Node> {
    nodes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| p)
        .collect()
}

/// A copy of a shipped config whose `node.state_dir` and `[tree] path` (and every
/// other mention of them, e.g. `haproxy_crt`) point under `root`, with an identity
/// and an existing tree there: what `check` needs to pass on a machine that is not
/// the configured node.
pub fn localized_config(text: &str, root: &Path) -> String {
    let value = |key: &str, after: &str| -> String {
        let start = text.find(after).expect("section present");
        text[start..]
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split('"').nth(1))
            .expect("key present")
            .to_string()
    };
    let (state_dir, tree_path) = (value("state_dir", "[node]"), value("path", "[tree]"));
    let (state, tree) = (root.join("state"), root.join("tree"));
    let out = certmesh(&["init", "--state-dir", state.to_str().unwrap()]);
    assert!(out.status.success(), "init failed: {out:?}");
    fs::create_dir_all(&tree).unwrap();
    text.replace(&state_dir, state.to_str().unwrap())
        .replace(&tree_path, tree.to_str().unwrap())
}

/// Content that proves its own integrity: first line is the BLAKE3 of the rest.
pub fn self_checking(seed: u64, len: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..len)
        .map(|i| (seed as usize * 31 + i * 7) as u8)
        .collect();
    let mut out = format!("{}\n", blake3::hash(&body).to_hex()).into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Whether `content` made by [`self_checking`] is whole.
pub fn intact(content: &[u8]) -> bool {
    content.len() > 65
        && content[64] == b'\n'
        && blake3::hash(&content[65..]).to_hex().as_bytes() == &content[..64]
}

/// Two nodes named a and b on `ips` that list each other, running and connected.
pub fn pair(root: &Path, ips: [&str; 2]) -> (Node, Node) {
    let mut a = Node::new(root, "a", ips[0]);
    let mut b = Node::new(root, "b", ips[1]);
    a.configure(&[&b]);
    b.configure(&[&a]);
    a.start();
    b.start();
    wait_until("a and b connected", || {
        a.all_connected() && b.all_connected()
    });
    (a, b)
}

//! Faults: partitions between network namespaces (veth + bridge made and removed by
//! the test), packet loss (nftables), a damaged index file, a full disk. Tests that
//! need root or kernel features this machine lacks say so and return.

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, SystemTime};

use crate::util::{snapshot, wait_until, Cluster, Node};

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("running a setup command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge and one namespace per node, addresses 192.0.2.11… (TEST-NET-1) on links
/// this test creates. Everything is removed on drop.
///
/// Names are `cm<pid>x<k>` + a suffix: unique per lab within this process (tests of
/// one binary run in parallel) and across processes. A lab left behind by a killed
/// run (no Drop after SIGKILL) is removed by the next run, since its pid is dead.
struct Lab {
    tag: String,
    n: usize,
}

impl Lab {
    fn new(n: usize) -> Option<Lab> {
        static LABS: AtomicUsize = AtomicUsize::new(0);
        static SWEEP: Once = Once::new();
        SWEEP.call_once(remove_stale_labs);
        let k = LABS.fetch_add(1, Ordering::Relaxed);
        // "cm" + pid (≤ 7 digits) + "x" + k + "br"/"h9"…: within IFNAMSIZ (15) for k < 100.
        let tag = format!("cm{}x{k}", std::process::id());
        assert!(
            tag.len() + 3 <= 15,
            "lab name {tag} too long for an interface"
        );
        if !sh(&["ip", "netns", "add", &format!("{tag}n0")]) {
            return None;
        }
        let lab = Lab {
            tag: tag.clone(),
            n,
        };
        let br = format!("{tag}br");
        must(&["ip", "link", "add", &br, "type", "bridge"]);
        must(&["ip", "link", "set", &br, "up"]);
        for i in 0..n {
            let ns = lab.ns(i);
            if i > 0 {
                must(&["ip", "netns", "add", &ns]);
            }
            let (host, inner) = (lab.host_if(i), format!("{tag}c{i}"));
            must(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &inner,
            ]);
            must(&["ip", "link", "set", &host, "master", &br, "up"]);
            must(&["ip", "link", "set", &inner, "netns", &ns]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.ip(i)),
                "dev",
                &inner,
            ]);
            must(&["ip", "-n", &ns, "link", "set", &inner, "up"]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        Some(lab)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    fn host_if(&self, i: usize) -> String {
        format!("{}h{i}", self.tag)
    }

    fn ip(&self, i: usize) -> String {
        format!("192.0.2.{}", 11 + i)
    }

    /// Cuts node `i` off (its link goes down) or heals it.
    fn link(&self, i: usize, up: bool) {
        must(&[
            "ip",
            "link",
            "set",
            &self.host_if(i),
            if up { "up" } else { "down" },
        ]);
    }

    fn cluster(&self) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("certmesh-lab-")
            .tempdir()
            .unwrap();
        let nodes: Vec<Node> = (0..self.n)
            .map(|i| {
                Node::in_netns(
                    dir.path(),
                    &format!("n{}", i + 1),
                    &self.ns(i),
                    &format!("{}:22000", self.ip(i)),
                )
            })
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            node.configure(&crate::util::others(&nodes, i));
        }
        Cluster { nodes, dir }
    }
}

/// The pid a lab name `cm<pid>x…` was made by, if it is one.
fn lab_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("cm")?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

/// Removes the links and namespaces of labs whose process is gone.
fn remove_stale_labs() {
    let dead = |name: &str| {
        lab_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let links = Command::new("ip").args(["-o", "link", "show"]).output();
    let links = links
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in links.lines() {
        // "12: cm123x0h1@if11: <…>" → "cm123x0h1"
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        if dead(name) {
            let _ = sh(&["ip", "link", "del", name]);
        }
    }
    let spaces = fs::read_dir("/run/netns").into_iter().flatten().flatten();
    for ns in spaces {
        let name = ns.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = sh(&["ip", "netns", "del", &name]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.n {
            let _ = sh(&["ip", "link", "del", &self.host_if(i)]);
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = sh(&["ip", "link", "del", &format!("{}br", self.tag)]);
    }
}

#[test]
fn partition_heals_into_one_tree_with_nothing_lost() {
    let Some(lab) = Lab::new(3) else {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root)");
        return;
    };
    let mut c = lab.cluster();
    c.start_all();
    c.nodes[0].write("dhparam.pem", "shared before the cut");
    c.wait_converged();

    lab.link(2, false);
    let now = SystemTime::now();
    // Both sides change things while cut off from each other.
    c.nodes[0].write("from-majority", "n1 wrote this during the partition");
    c.nodes[2].write("from-minority", "n3 wrote this during the partition");
    // Each edit lands whole with its mtime already set (written beside the tree,
    // then renamed in): a scan between a write and a later set_modified would see
    // the write's own mtime, and which side won would depend on timing.
    let edit = |n: &Node, content: &str, t: SystemTime| {
        let tmp = n.dir.join("dhparam.edit");
        fs::write(&tmp, content).unwrap();
        fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(t)
            .unwrap();
        fs::rename(&tmp, n.tree.join("dhparam.pem")).unwrap();
    };
    edit(
        &c.nodes[0],
        "n1's edit (earlier)",
        now - Duration::from_secs(30),
    );
    edit(&c.nodes[2], "n3's edit (later)", now);
    wait_until("the majority side converges on its own", || {
        c.nodes[1].read("from-majority").is_some()
    });
    assert!(
        c.nodes[2].read("from-majority").is_none(),
        "the partition leaked"
    );

    lab.link(2, true);
    c.wait_converged();
    for n in &c.nodes {
        assert_eq!(
            n.read("from-majority").as_deref(),
            Some("n1 wrote this during the partition")
        );
        assert_eq!(
            n.read("from-minority").as_deref(),
            Some("n3 wrote this during the partition")
        );
        assert_eq!(
            n.read("dhparam.pem").as_deref(),
            Some("n3's edit (later)"),
            "on {}",
            n.name
        );
    }
    let kept = snapshot(&c.nodes[0].tree.join(".certmesh/conflicts"));
    assert!(
        kept.values()
            .any(|(_, content, _)| content == b"n1's edit (earlier)"),
        "lost n1's edit: {kept:?}"
    );
    for n in &mut c.nodes {
        n.stop();
    }
}

#[test]
fn lossy_link_still_converges() {
    let Some(lab) = Lab::new(3) else {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root)");
        return;
    };
    let mut c = lab.cluster();
    c.start_all();
    // 20 % of UDP packets into n2 dropped (tc netem is not available on this kernel;
    // nftables' random numgen gives the loss).
    let ns = lab.ns(1);
    if !sh(&[
        "ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "cmloss",
    ]) {
        eprintln!("SKIPPED: nft not available");
        return;
    }
    must(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "nft",
        "add",
        "chain",
        "inet",
        "cmloss",
        "input",
        "{ type filter hook input priority 0 ; }",
    ]);
    must(&[
        "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "cmloss", "input", "meta",
        "l4proto", "udp", "numgen", "random", "mod", "100", "<", "20", "drop",
    ]);
    for i in 0..30 {
        c.nodes[0].write(
            &format!("acme/.well-known/acme-challenge/t{i}"),
            &format!("token {i}"),
        );
    }
    c.nodes[2].write("big.bin", &"x".repeat(2 << 20));
    c.wait_converged();
    assert_eq!(
        c.nodes[1]
            .read("acme/.well-known/acme-challenge/t29")
            .as_deref(),
        Some("token 29")
    );
}

#[test]
fn damaged_index_is_reported_and_rebuilt_without_loss() {
    let mut c = Cluster::new(2, None);
    c.start_all();
    for i in 0..20 {
        c.nodes[0].write(&format!("certs/c{i}.pem"), &format!("cert {i}"));
    }
    c.wait_converged();
    let before = snapshot(&c.nodes[1].tree);
    c.nodes[1].stop();
    let index = c.nodes[1].state.join("index.db");
    let mut bytes = fs::read(&index).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..].iter_mut().for_each(|b| *b = 0xA5);
    fs::write(&index, bytes).unwrap();
    c.nodes[1].start();
    c.wait_converged();
    assert_eq!(
        snapshot(&c.nodes[1].tree),
        before,
        "files changed or were lost after the index rebuild"
    );
    let status = c.nodes[1].status();
    let errors = status["errors"].to_string();
    assert!(
        errors.contains("index file was damaged"),
        "status does not report the damage: {errors}"
    );
    // And the rebuilt node still syncs both ways.
    c.nodes[1].write("after-rebuild", "ok");
    wait_until("n2's new file reaches n1", || {
        c.nodes[0].read("after-rebuild").is_some()
    });
}

#[test]
fn full_disk_keeps_old_files_and_completes_when_space_returns() {
    let mut c = Cluster::new(2, None);
    // A disk that fills despite `[tree] min_disk_free` (trust_budget.rs tests that).
    c.nodes[1].add_tree_keys("min_disk_free = 0\n");
    let tree = c.nodes[1].tree.clone();
    fs::create_dir_all(&tree).unwrap();
    if !sh(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=3m",
        "certmesh-test",
        tree.to_str().unwrap(),
    ]) {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = sh(&["umount", "-l", self.0.to_str().unwrap()]);
        }
    }
    let _guard = Unmount(tree.clone());
    c.start_all();
    c.nodes[0].write("fullchain.pem", "old cert");
    c.wait_converged();
    // 4 MiB does not fit in 3 MiB.
    c.nodes[0].write("fullchain.pem", "new cert");
    // Written atomically, so any big.bin a peer shows must be complete.
    let tmp = c.dir.path().join("big.tmp");
    fs::write(&tmp, "y".repeat(4 << 20)).unwrap();
    fs::rename(&tmp, c.nodes[0].tree.join("big.bin")).unwrap();
    wait_until("n2 reports the full disk", || {
        c.nodes[1].status()["errors"]
            .to_string()
            .contains("No space left")
    });
    assert_eq!(
        c.nodes[1].read("fullchain.pem").as_deref(),
        Some("new cert"),
        "small files still apply"
    );
    assert!(
        c.nodes[1]
            .read("big.bin")
            .is_none_or(|b| b.len() == 4 << 20),
        "a partial file is visible"
    );
    assert_eq!(
        fs::read_dir(tree.join(".certmesh/tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "staging not cleaned"
    );
    must(&["mount", "-o", "remount,size=16m", tree.to_str().unwrap()]);
    c.wait_converged();
    assert_eq!(c.nodes[1].read("big.bin").map(|b| b.len()), Some(4 << 20));
    for n in &mut c.nodes {
        n.stop();
    }
}

#[test]
fn unusual_names_sync_and_special_files_are_skipped() {
    let mut c = Cluster::new(2, None);
    c.start_all();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let long = "l".repeat(255);
    let names = [
        "ünïcødé/证书.pem".to_string(),
        "with spaces/and  two.pem".to_string(),
        "Case.pem".to_string(),
        "case.pem".to_string(),
        format!("deep/{long}"),
        "-leading-dash".to_string(),
        "new\nline".to_string(),
    ];
    for (i, n) in names.iter().enumerate() {
        a.write(n, &format!("content {i}"));
    }
    // Special files: never synced, never a crash.
    let fifo = std::ffi::CString::new(a.tree.join("a.fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(a.tree.join("a.sock")).unwrap();
    // A file that appears and vanishes at once.
    for i in 0..50 {
        let p = a.tree.join(format!("flicker{i}"));
        fs::write(&p, "x").unwrap();
        fs::remove_file(&p).unwrap();
    }
    c.wait_converged_except(&["a.fifo", "a.sock"]);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(b.read(n), Some(format!("content {i}")), "{n:?}");
    }
    assert!(fs::symlink_metadata(b.tree.join("a.fifo")).is_err());
    assert!(fs::symlink_metadata(b.tree.join("a.sock")).is_err());
    assert!(!b.tree.join("flicker0").exists());
    // Idle means idle: no rescans once everything has settled (our own reads and the
    // peer's must not wake the watcher).
    let scans = |n: &crate::util::Node| n.status()["tree"]["scans"].as_u64().unwrap();
    let before = (scans(a), scans(b));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        (scans(a), scans(b)),
        before,
        "nodes keep rescanning while idle"
    );
    assert!(!a.log().contains("panicked") && !b.log().contains("panicked"));
}

//! Local services under floods and hooks under bursts (issue #11, parts 7–8): the
//! control socket caps its clients and survives running out of descriptors; a burst
//! of changes from a peer runs a hook once, with one path per line.

use std::fs;
use std::os::unix::net::UnixStream;

use crate::trust_links::get;
use crate::util::{wait_until, Node};

fn pair(
    dir: &std::path::Path,
    ips: (&str, &str),
    b_extra: &str,
    b_launcher: &[&str],
) -> (Node, Node) {
    let mut a = Node::new(dir, "a", ips.0);
    let mut b = Node::new(dir, "b", ips.1);
    b.launcher = b_launcher.iter().map(|s| s.to_string()).collect();
    a.configure(&[&b]);
    b.configure(&[&a]);
    let mut cfg = fs::read_to_string(&b.config).unwrap();
    cfg.push_str(b_extra);
    fs::write(&b.config, cfg).unwrap();
    a.start();
    b.start();
    wait_until("a and b connected", || {
        a.all_connected() && b.all_connected()
    });
    (a, b)
}

/// The runs a hook logged: each run is the `CERTMESH_PATHS` it got, split in lines.
fn hook_runs(log: &std::path::Path) -> Vec<Vec<String>> {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.split("--run--\n")
        .filter(|r| !r.is_empty())
        .map(|r| r.lines().map(str::to_string).collect())
        .collect()
}

#[test]
fn a_burst_of_changes_runs_a_hook_once_with_one_path_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hook.log");
    let hook = format!(
        "\n[[hook]]\npaths = [\"certs/**\"]\nrun = [\"sh\", \"-c\", \"printf '%s\\\\n--run--\\\\n' \\\"$CERTMESH_PATHS\\\" >> {}\"]\ntimeout = \"5s\"\n",
        log.display()
    );
    let (a, b) = pair(dir.path(), ("127.0.0.90", "127.0.0.91"), &hook, &[]);
    // One burst: 40 files with spaces in their names, moved into the tree at once (as
    // a deploy script would), so they reach b as one batch whatever the machine's load.
    let staging = dir.path().join("staging-certs");
    fs::create_dir(&staging).unwrap();
    for i in 0..40 {
        fs::write(staging.join(format!("site {i}.pem")), format!("cert {i}")).unwrap();
    }
    fs::rename(&staging, a.tree.join("certs")).unwrap();
    wait_until("the burst applied on b and the hook ran", || {
        (0..40).all(|i| b.read(&format!("certs/site {i}.pem")).is_some())
            && hook_runs(&log).iter().flatten().count() >= 40
    });
    // A later change, after the burst: its own run, which fences the burst's runs.
    a.write("certs/fence.pem", "fence");
    wait_until("the fence's run", || {
        hook_runs(&log)
            .last()
            .is_some_and(|r| r == &["certs/fence.pem".to_string()])
    });
    let runs = hook_runs(&log);
    assert_eq!(
        runs.len(),
        2,
        "the burst ran the hook more than once: {runs:?}"
    );
    let burst = &runs[0];
    assert_eq!(burst.len(), 40, "{burst:?}");
    assert!(burst.contains(&"certs/site 7.pem".to_string()), "{burst:?}");
}

#[test]
fn control_socket_and_responder_survive_a_flood_and_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.93:{}", crate::util::free_tcp("127.0.0.93"));
    // b runs with few descriptors, as under a full process table.
    let (a, b) = pair(
        dir.path(),
        ("127.0.0.92", "127.0.0.93"),
        &format!("\n[http]\nlisten = \"{http}\"\n"),
        &["prlimit", "--nofile=96:96"],
    );
    a.write("acme/.well-known/acme-challenge/tok-1", "tok-1.thumb");
    wait_until("the token reaches b", || {
        b.read("acme/.well-known/acme-challenge/tok-1").is_some()
    });
    let sock = b.state.join("control.sock");
    // Far more clients than descriptors: accept fails with EMFILE for many of them.
    let flood: Vec<UnixStream> = (0..300)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    assert!(flood.len() >= 100, "only {} clients got in", flood.len());

    // Sync goes on meanwhile.
    a.write("during-flood.txt", "x");
    wait_until("a change during the flood reaches b", || {
        b.read("during-flood.txt").is_some()
    });
    drop(flood);
    // The responder (capped at 256 clients, above this node's 96 descriptors): its
    // accepts fail with EMFILE too, and it must outlive that.
    let web_flood: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&http).ok())
        .collect();
    assert!(
        web_flood.len() >= 100,
        "only {} web clients got in",
        web_flood.len()
    );
    drop(web_flood);
    wait_until("the responder serves the token after the flood", || {
        std::net::TcpStream::connect(&http).is_ok()
            && get(&http, "/.well-known/acme-challenge/tok-1") == (200, "tok-1.thumb".into())
    });
    // The accept loop outlived the errors: status answers again.
    wait_until("status answers after the flood", || {
        b.status()["peers"][0]["connected"] == true
    });
    assert!(
        b.log().contains("control socket"),
        "the refused clients were not logged:\n{}",
        b.log()
    );
}

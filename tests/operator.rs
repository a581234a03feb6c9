//! Issue 23: what a new operator hit — a state dir two daemons shared, a typo'd
//! tree path that `run` created, orphaned http-01 tokens, orders that could not
//! succeed, and messages that left them guessing. Real `certmesh` processes on
//! 127.0.2.2–250.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;

use crate::acme::{
    enable_acme_with, live_version, nginx, tools_present, wait_version, Pebble, Proc, DOMAIN,
};
use crate::util::free_tcp;
use crate::util::{certmesh, pair, wait_until, Node};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The line of `key = ` in a config file (1-based).
fn line_of(config: &Path, key: &str) -> usize {
    let text = fs::read_to_string(config).unwrap();
    1 + text
        .lines()
        .position(|l| l.starts_with(&format!("{key} = ")))
        .expect("key in the config")
}

#[test]
fn a_second_run_on_a_live_state_dir_exits_naming_the_pid_and_touches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), ["127.0.2.2", "127.0.2.3"]);
    let index = a.state.join("index.db");
    let before = fs::metadata(&index).unwrap();
    let second = certmesh(&["run", "--config", a.config.to_str().unwrap()]);
    let pid = a.child.as_ref().unwrap().id();
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    assert!(
        text(&second).contains(&format!("is in use by pid {pid}")),
        "{}",
        text(&second)
    );
    let after = fs::metadata(&index).unwrap();
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec()),
        (before.ino(), before.mtime(), before.mtime_nsec())
    );
    // The first daemon still syncs (and saves to the same file).
    a.write("after-second-run.txt", "still here");
    wait_until("b has the file", || {
        b.read("after-second-run.txt").as_deref() == Some("still here")
    });
    assert_eq!(fs::metadata(&index).unwrap().ino(), before.ino());
}

/// A node whose config points at a tree path that does not exist.
fn node_with_missing_tree(root: &Path, ip: &str) -> Node {
    let n = Node::new(root, "typo", ip);
    fs::remove_dir(&n.tree).unwrap();
    n.configure(&[]);
    n
}

#[test]
fn check_refuses_a_tree_path_that_does_not_exist_naming_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    let n = node_with_missing_tree(d.path(), "127.0.2.4");
    let out = certmesh(&["check", "--config", n.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let want = format!(":{}: tree.path", line_of(&n.config, "path"));
    assert!(text(&out).contains(&want), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
}

#[test]
fn run_refuses_a_tree_path_that_does_not_exist_and_does_not_create_it() {
    let d = tempfile::tempdir().unwrap();
    let n = node_with_missing_tree(d.path(), "127.0.2.5");
    let out = certmesh(&["run", "--config", n.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("tree.path"), "{}", text(&out));
    assert!(!n.tree.exists());
}

#[test]
fn check_refuses_a_tree_path_that_is_a_file() {
    let d = tempfile::tempdir().unwrap();
    let n = node_with_missing_tree(d.path(), "127.0.2.6");
    fs::write(&n.tree, "not a dir").unwrap();
    let out = certmesh(&["check", "--config", n.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is not a directory"), "{}", text(&out));
}

#[test]
fn check_wants_an_identity_in_the_state_dir() {
    let d = tempfile::tempdir().unwrap();
    let n = Node::new(d.path(), "fresh", "127.0.2.7");
    n.configure(&[]);
    fs::remove_dir_all(&n.state).unwrap();
    let out = certmesh(&["check", "--config", n.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let hint = format!("certmesh init --state-dir {}", n.state.display());
    assert!(text(&out).contains(&hint), "{}", text(&out));
}

#[test]
fn own_device_id_as_a_peer_is_refused_with_its_line_by_check_and_run() {
    let d = tempfile::tempdir().unwrap();
    let n = Node::new(d.path(), "self", "127.0.2.8");
    n.configure_raw(&[("me-again", &n.id, "127.0.2.9:22000")]);
    let want = format!(":{}: peer.id", line_of(&n.config, "id"));
    for cmd in ["check", "run"] {
        let out = certmesh(&[cmd, "--config", n.config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", text(&out));
        assert!(text(&out).contains(&want), "{cmd}: {}", text(&out));
        assert!(
            text(&out).contains("own device ID"),
            "{cmd}: {}",
            text(&out)
        );
    }
}

/// Two nodes `a` (the only ACME node, so the renewer) and `b` listing each other,
/// each with an nginx serving its `<tree>/acme`, a Pebble on `ips[2]`, and the
/// certificate's name pointing at `b`: the CA validates against the node that did
/// not order. Nothing started yet.
struct AcmePair {
    a: Node,
    b: Node,
    pebble: Pebble,
    _web: Vec<Proc>,
    _dir: tempfile::TempDir,
}

fn acme_pair(ips: [&str; 3], acme_extra: &str) -> AcmePair {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::new(dir.path(), "a", ips[0]);
    let b = Node::new(dir.path(), "b", ips[1]);
    a.configure(&[&b]);
    b.configure(&[&a]);
    let http_port = free_tcp(ips[0]);
    let pebble = Pebble::start_on(&dir.path().join("pebble"), ips[2], http_port, false);
    pebble.set_a(DOMAIN, ips[1]);
    let web = [(&a, ips[0]), (&b, ips[1])]
        .iter()
        .map(|(n, ip)| {
            fs::create_dir_all(n.tree.join("acme")).unwrap();
            nginx(dir.path(), ip, http_port, &n.tree)
        })
        .collect();
    enable_acme_with(&a, &pebble, acme_extra);
    AcmePair {
        a,
        b,
        pebble,
        _web: web,
        _dir: dir,
    }
}

fn status_text(n: &Node) -> String {
    text(&certmesh(&[
        "status",
        "--config",
        n.config.to_str().unwrap(),
    ]))
}

#[test]
fn an_orphaned_http01_token_is_removed_on_every_node_by_the_next_order() {
    if !tools_present() {
        return;
    }
    let mut p = acme_pair(["127.0.2.20", "127.0.2.21", "127.0.2.22"], "");
    p.a.start();
    p.b.start();
    wait_version(&[&p.a, &p.b], 1, "the first certificate on both nodes");
    // What a renewer killed mid-order leaves: its token, synced to every node.
    let orphan = "acme/.well-known/acme-challenge/LeftByAKilledRenewer-0123456789";
    p.a.write(orphan, "LeftByAKilledRenewer-0123456789.thumbprint");
    wait_until("b has the orphaned token", || p.b.read(orphan).is_some());
    let out = certmesh(&["issue", "--config", p.a.config.to_str().unwrap(), "www"]);
    assert!(out.status.success(), "{}\n{}", text(&out), p.a.log());
    wait_until("the orphaned token gone on a and b", || {
        p.a.read(orphan).is_none() && p.b.read(orphan).is_none()
    });
    assert!(p.a.log().contains("removing an http-01 token left behind"));
    let _ = &p.pebble;
}

#[test]
fn a_renewer_started_alone_waits_for_a_peer_before_ordering() {
    if !tools_present() {
        return;
    }
    let mut p = acme_pair(
        ["127.0.2.23", "127.0.2.24", "127.0.2.25"],
        "startup_grace = \"60s\"\n",
    );
    p.a.start();
    wait_until("a says it waits for a peer", || {
        p.a.log().contains("no configured peer connected yet")
    });
    assert_eq!(live_version(&p.a), None, "ordered alone:\n{}", p.a.log());
    p.b.start();
    wait_version(&[&p.a, &p.b], 1, "the first certificate on both nodes");
    assert!(
        !status_text(&p.a).contains("acme: www"),
        "{}",
        status_text(&p.a)
    );
}

#[test]
fn a_failed_validation_names_the_peer_that_was_not_connected() {
    if !tools_present() {
        return;
    }
    let mut p = acme_pair(
        ["127.0.2.26", "127.0.2.27", "127.0.2.28"],
        "startup_grace = \"1s\"\n",
    );
    p.a.start();
    wait_until("the failed order names b", || {
        status_text(&p.a).contains("while b was not connected")
    });
    assert!(
        p.a.log()
            .contains("challenges in place on the connected nodes only"),
        "{}",
        p.a.log()
    );
    assert!(!p.a.log().contains("challenges in place on every node"));
}

#[test]
fn a_taken_listen_address_names_the_key_says_the_os_error_once_and_hints() {
    let d = tempfile::tempdir().unwrap();
    let (a, _b) = pair(d.path(), ["127.0.2.30", "127.0.2.31"]);
    // Another node's config on the same address (as after a restart too early).
    let c = Node::with_listen(d.path(), "c", &a.addr);
    c.configure(&[]);
    let out = certmesh(&["run", "--config", c.config.to_str().unwrap()]);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("node.listen {}", a.addr)), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(
        err.contains("another certmesh may still be running"),
        "{err}"
    );
}

#[test]
fn status_without_a_config_file_hints_the_flag_and_the_variable() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nowhere.toml");
    let out = certmesh(&["status", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--config FILE or $CERTMESH_CONFIG"));
}

#[test]
fn a_wrong_peer_id_shows_expected_and_presented_in_status() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Node::new(d.path(), "a", "127.0.2.32");
    let mut b = Node::new(d.path(), "b", "127.0.2.33");
    let other = Node::new(d.path(), "other", "127.0.2.34");
    // a lists b's address with another node's ID (a valid ID, the wrong one).
    a.configure_raw(&[("b", &other.id, &b.addr)]);
    b.configure(&[&a]);
    a.start();
    b.start();
    let want = format!("presented device ID {} but peer.id is {}", b.id, other.id);
    let mut last = String::new();
    let start = std::time::Instant::now();
    while !last.contains(&want) && start.elapsed() < crate::util::DEADLINE {
        last = text(&certmesh(&[
            "status",
            "--json",
            "--config",
            a.config.to_str().unwrap(),
        ]));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(last.contains(&want), "{last}");
}

#[test]
fn renew_force_exits_non_zero_naming_the_node_that_holds_the_lease() {
    let d = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(d.path(), ["127.0.2.35", "127.0.2.36"]);
    let mut cfg = fs::read_to_string(&a.config).unwrap();
    cfg.push_str(&format!(
        "\n[acme]\ndirectory = \"https://127.0.2.37:1/dir\"\nstartup_grace = \"0s\"\n\
         [[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\n"
    ));
    a.stop();
    fs::write(&a.config, cfg).unwrap();
    // b holds the lease on www, as a renewer would while it orders.
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let lease = format!(r#"{{"holder":"{}","node":"b","expires":{expires}}}"#, b.id);
    b.write(".certmesh/leases/www", &lease);
    a.start();
    wait_until("a has b's lease", || {
        a.read(".certmesh/leases/www").as_deref() == Some(lease.as_str())
    });
    let out = certmesh(&["renew", "--force", "--config", a.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("www: not ordered: b holds the renewal lease"),
        "{}",
        text(&out)
    );
}

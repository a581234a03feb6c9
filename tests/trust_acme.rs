//! ACME state in the tree is untrusted (DESIGN §8): a bad node that edits only its
//! own tree cannot stop renewals with a lease, nor redirect the renewer's ACME traffic
//! with a forged `account.json`. Real `certmesh` processes, real Pebble and nginx, on
//! 127.0.0.50–59.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::acme::{
    check_bundle, enable_acme_with, nginx, tools_present, wait_version, Pebble, Proc, DOMAIN,
};
use crate::util::free_tcp;
use crate::util::{certmesh, wait_until, Node};

/// A healthy renewer (the only ACME node) and a bad peer, with the first
/// certificate issued and on both.
struct Fleet {
    good: Node,
    bad: Node,
    pebble: Pebble,
    _web: Proc,
    dir: tempfile::TempDir,
}

fn fleet(good_ip: &str, bad_ip: &str, acme_extra: &str) -> Fleet {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-trust-acme-")
        .tempdir()
        .unwrap();
    let mut good = Node::new(dir.path(), "good", good_ip);
    let mut bad = Node::new(dir.path(), "bad", bad_ip);
    good.configure(&[&bad]);
    bad.configure(&[&good]);
    let pebble = Pebble::start(dir.path(), free_tcp(good_ip));
    pebble.set_a(DOMAIN, good_ip);
    std::fs::create_dir_all(good.tree.join("acme")).unwrap();
    let web = nginx(dir.path(), good_ip, pebble.http_port, &good.tree);
    enable_acme_with(&good, &pebble, acme_extra);
    good.start();
    bad.start();
    wait_version(&[&good, &bad], 1, "the first certificate on both nodes");
    // The renewer's own lease (taken for the first order, then released) must have
    // settled on both nodes before a test writes its hostile lease: a write racing
    // the release is a conflict between two edits, not the attack tested here.
    wait_until(
        "the first order's lease released on both nodes, in sync",
        || {
            good.read(".certmesh/leases/www").is_none()
                && bad.read(".certmesh/leases/www").is_none()
                && good.all_in_sync()
                && bad.all_in_sync()
        },
    );
    Fleet {
        good,
        bad,
        pebble,
        _web: web,
        dir,
    }
}

fn run(node: &Node, args: &[&str]) -> String {
    let mut all = vec![args[0], "--config", node.config.to_str().unwrap()];
    all.extend_from_slice(&args[1..]);
    let out = certmesh(&all);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The bad node writes `content` at `rel` in its own tree; returns once the renewer
/// has it.
fn plant(f: &Fleet, rel: &str, content: &str) {
    f.bad.write(rel, content);
    wait_until(&format!("the bad node's {rel} on the renewer"), || {
        f.good.read(rel).as_deref() == Some(content)
    });
}

/// `certmesh issue www` on the renewer until it issues `version`, then that version
/// on both nodes.
fn issue_version(f: &Fleet, version: u32) {
    until_output(
        &f.good,
        &["issue", "www"],
        &format!("version {version} issued"),
        Duration::from_secs(90),
    );
    wait_version(
        &[&f.good, &f.bad],
        version,
        &format!("certificate version {version} on both nodes"),
    );
}

/// Both nodes hold a good bundle from the real CA, and the forged CA saw no
/// connection.
fn issued_and_untouched(f: &Fleet, hits: &AtomicUsize) {
    let root = f.pebble.root();
    check_bundle(&f.good, &root);
    check_bundle(&f.bad, &root);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the forged CA was contacted"
    );
}

/// Runs `args` on `node` every 200 ms until its output contains `want`.
fn until_output(node: &Node, args: &[&str], want: &str, deadline: Duration) -> String {
    let start = Instant::now();
    loop {
        let out = run(node, args);
        if out.contains(want) {
            return out;
        }
        assert!(
            start.elapsed() < deadline,
            "no {want:?} from {args:?} within {deadline:?}; last: {out}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn trust_acme_century_lease_holds_only_lease_long() {
    if !tools_present() {
        return;
    }
    let f = fleet("127.0.0.50", "127.0.0.51", "lease = \"5s\"\n");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let century = format!(
        r#"{{"holder":"{}","node":"bad","expires":{}}}"#,
        f.bad.id,
        now + 100 * 365 * 86_400
    );
    f.bad.write(".certmesh/leases/www", &century);
    wait_until("the century lease on the renewer", || {
        f.good.read(".certmesh/leases/www").as_deref() == Some(century.as_str())
    });
    let t = Instant::now();
    // Honoured at first (a configured peer's lease)...
    let first = run(&f.good, &["renew", "--force"]);
    assert!(first.contains("holds the renewal lease"), "{first}");
    // ... but for `lease` (5 s) at most, not a century.
    until_output(
        &f.good,
        &["renew", "--force"],
        "renewed: version 2",
        Duration::from_secs(60),
    );
    eprintln!(
        "TIMING: renewal despite a century lease (lease 5s): {:?}",
        t.elapsed()
    );
    wait_version(&[&f.good, &f.bad], 2, "the renewal on both nodes");
    let root = f.pebble.root();
    check_bundle(&f.good, &root);
    check_bundle(&f.bad, &root);
}

#[test]
fn trust_acme_stranger_lease_is_ignored() {
    if !tools_present() {
        return;
    }
    let f = fleet("127.0.0.56", "127.0.0.57", "");
    // A lease naming a device that is no configured peer: ignored outright.
    let stranger = Node::new(f.dir.path(), "stranger", "127.0.0.58");
    let lease = format!(
        r#"{{"holder":"{}","node":"stranger","expires":253402300799}}"#,
        stranger.id
    );
    f.bad.write(".certmesh/leases/www", &lease);
    wait_until("the stranger's lease on the renewer", || {
        f.good.read(".certmesh/leases/www").as_deref() == Some(lease.as_str())
    });
    let out = run(&f.good, &["renew", "--force"]);
    assert!(
        out.contains("renewed: version 2"),
        "{out}\n{}",
        f.good.log()
    );
    assert!(
        f.good
            .log()
            .contains("neither this node nor a configured peer"),
        "{}",
        f.good.log()
    );
    wait_version(&[&f.good, &f.bad], 2, "the renewal on both nodes");
}

/// A TCP listener that counts connections (the forged account's "CA").
fn counting_listener(ip: &str) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            if s.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (addr, n)
}

#[test]
fn trust_acme_forged_account_is_never_used() {
    if !tools_present() {
        return;
    }
    let mut f = fleet("127.0.0.53", "127.0.0.54", "");
    let (evil, hits) = counting_listener("127.0.0.55");
    // The bad node keeps the outer directory and the key, but points the inner
    // credentials (directory and the URLs of older files) at its own server.
    let rel = ".certmesh/acme/account.json";
    let real = f.bad.read(rel).expect("the shared account");
    let mut v: serde_json::Value = serde_json::from_str(&real).unwrap();
    assert_eq!(v["directory"], f.pebble.directory.as_str());
    v["credentials"]["directory"] = format!("https://{evil}/dir").into();
    v["credentials"]["urls"] = serde_json::json!({
        "newNonce": format!("https://{evil}/nonce"),
        "newAccount": format!("https://{evil}/account"),
        "newOrder": format!("https://{evil}/order"),
    });
    plant(&f, rel, &v.to_string());
    // A restart drops the account the renewer had loaded: it reads the file again.
    f.good.stop();
    f.good.start();
    issue_version(&f, 2);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the forged CA was contacted"
    );
    let log = f.good.log();
    assert!(log.contains("is not used"), "{log}");
    assert!(log.contains("ACME account created"), "{log}");
    // The new account replaced the forged file, on the bad node too.
    wait_until("the new account on both nodes", || {
        [&f.good, &f.bad].iter().all(|n| {
            n.read(rel).is_some_and(|a| {
                let v: serde_json::Value = serde_json::from_str(&a).unwrap_or_default();
                v["credentials"]["directory"] == f.pebble.directory.as_str()
            })
        })
    });
    issued_and_untouched(&f, &hits);
}

/// `.certmesh/acme/issued/<name>` is untrusted too (issue 15): a bad node that points
/// the record of the live certificate at its own "CA" gets no traffic from the
/// renewer (it only picks among the CAs in its own config), and the next issuance
/// writes the true record back on every node. A record that does not parse is shown
/// as no CA, and orders go on.
#[test]
fn trust_acme_forged_issuer_record_sends_no_traffic() {
    if !tools_present() {
        return;
    }
    let f = fleet("127.0.0.52", "127.0.0.59", "");
    let (evil, hits) = counting_listener("127.0.0.59");
    let rel = ".certmesh/acme/issued/www";
    let real = f
        .bad
        .read(rel)
        .expect("the issuer record of the first certificate");
    let mut v: serde_json::Value = serde_json::from_str(&real).unwrap();
    assert_eq!(v["directory"], f.pebble.directory.as_str());
    // Same serial (it stays the live certificate's record), another directory.
    v["directory"] = format!("https://{evil}/dir").into();
    plant(&f, rel, &v.to_string());
    issue_version(&f, 2);
    let true_record = |n: &Node| {
        n.read(rel).is_some_and(|r| {
            let v: serde_json::Value = serde_json::from_str(&r).unwrap_or_default();
            v["directory"] == f.pebble.directory.as_str()
        })
    };
    wait_until("the true record back on both nodes", || {
        true_record(&f.good) && true_record(&f.bad)
    });

    // Garbage, larger than a record may be: no CA shown, the next order unharmed.
    plant(&f, rel, &format!("{{\"serial\":\"{}\"}}", "0".repeat(8192)));
    let st = f.good.status();
    let cert = &st["certificates"][0];
    assert_eq!(cert["name"], "www", "{st}");
    assert!(cert["ca"].is_null(), "{st}");
    issue_version(&f, 3);
    wait_until("the true record back again", || {
        true_record(&f.good) && true_record(&f.bad)
    });
    issued_and_untouched(&f, &hits);
}

//! Issue 24: renewals no single node can stop. A bad node running the real
//! `certmesh` edits only its own tree; the test checks the outcome on the others:
//! who the renewer is, whether the renewal is published everywhere, how many orders
//! Pebble saw. Real processes, Pebble and nginx, on 127.0.1.2–250.

use std::time::{SystemTime, UNIX_EPOCH};

use certmesh::core::device::DeviceId;

use crate::acme::{
    check_bundle, enable_acme_with, nginx, tools_present, wait_version, Pebble, Proc, DOMAIN,
};
use crate::util::free_tcp;
use crate::util::{certmesh, wait_until, Node};

/// The renewer (`good`, the only `[acme]` node), a bad peer and, if asked, a
/// reader `front`; the first certificate issued and on every node. `good` has the
/// highest device ID, so any advert of the others would win the renewer choice.
struct Fleet {
    good: Node,
    bad: Node,
    front: Option<Node>,
    pebble: Pebble,
    _web: Proc,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn all(&self) -> Vec<&Node> {
        let mut v = vec![&self.good, &self.bad];
        v.extend(self.front.as_ref());
        v
    }
}

/// Nodes on `ips`, highest device ID first.
fn nodes_by_id(dir: &std::path::Path, ips: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| Node::new(dir, &format!("n{i}"), ip))
        .collect();
    nodes.sort_by_key(|n| std::cmp::Reverse(n.id.parse::<DeviceId>().unwrap()));
    nodes
}

/// `ips`: good, bad and optionally front. `writers`: `[tree] writers = [good, bad]`
/// (signed records; `front` is a reader). `extra`: appended to good's config.
fn fleet(ips: &[&str], writers: bool, extra: &str, before_start: impl FnOnce(&Node)) -> Fleet {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-trust-renewal-")
        .tempdir()
        .unwrap();
    let mut nodes = nodes_by_id(dir.path(), ips);
    for (n, name) in nodes.iter_mut().zip(["good", "bad", "front"]) {
        n.name = name.into();
    }
    for i in 0..nodes.len() {
        let others: Vec<&Node> = nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n)
            .collect();
        nodes[i].configure(&others);
        if writers {
            set_writers(&nodes[i], &[&nodes[0].id, &nodes[1].id]);
        }
    }
    let mut nodes = nodes.into_iter();
    let (mut good, mut bad) = (nodes.next().unwrap(), nodes.next().unwrap());
    let mut front = nodes.next();
    let ip = ips[0];
    let pebble = Pebble::start(dir.path(), free_tcp(ip));
    pebble.set_a(DOMAIN, ip);
    std::fs::create_dir_all(good.tree.join("acme")).unwrap();
    let web = nginx(dir.path(), ip, pebble.http_port, &good.tree);
    enable_acme_with(&good, &pebble, "");
    let mut cfg = std::fs::read_to_string(&good.config).unwrap();
    cfg.push_str(extra);
    std::fs::write(&good.config, cfg).unwrap();
    before_start(&good);
    good.start();
    bad.start();
    if let Some(f) = front.as_mut() {
        f.start();
    }
    let f = Fleet {
        good,
        bad,
        front,
        pebble,
        _web: web,
        _dir: dir,
    };
    wait_version(&f.all(), 1, "the first certificate on every node");
    wait_until(
        "the first order's lease released everywhere, in sync",
        || {
            f.all()
                .iter()
                .all(|n| n.read(".certmesh/leases/www").is_none() && n.all_in_sync())
        },
    );
    f
}

/// Adds `writers = [...]` to the node's `[tree]`.
fn set_writers(node: &Node, writers: &[&str]) {
    let cfg = std::fs::read_to_string(&node.config).unwrap();
    let path_line = format!("path = \"{}\"\n", node.tree.display());
    let list: Vec<String> = writers.iter().map(|w| format!("{w:?}")).collect();
    let line = format!("{path_line}writers = [{}]\n", list.join(", "));
    std::fs::write(&node.config, cfg.replacen(&path_line, &line, 1)).unwrap();
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

/// The renewer of `www` as `node`'s status names it.
fn renewer(node: &Node) -> String {
    node.status()["certificates"][0]["renewer"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A fresh advert for the node called `name`, as certmesh writes it.
fn advert(name: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(r#"{{"node":"{name}","refreshed":{now}}}"#)
}

/// `renew --force` on the renewer publishes version 2 on every node, with one new
/// order at Pebble.
fn renewal_reaches_everyone(f: &Fleet) {
    let before = f.pebble.orders();
    let out = run(&f.good, &["renew", "--force"]);
    assert!(
        out.contains("renewed: version 2"),
        "{out}\n{}",
        f.good.log()
    );
    wait_version(&f.all(), 2, "the renewal on every node");
    let root = f.pebble.root();
    for n in f.all() {
        check_bundle(n, &root);
    }
    assert_eq!(f.pebble.orders(), before + 1);
}

#[test]
fn trust_renewal_a_node_without_acme_cannot_become_the_renewer() {
    if !tools_present() {
        return;
    }
    let f = fleet(&["127.0.1.2", "127.0.1.3"], false, "", |_| {});
    let rel = format!(".certmesh/acme/nodes/{}", f.bad.id);
    f.bad.write(&rel, &advert("bad"));
    // The bad node's own certmesh (no [acme]) takes the claim back.
    // (In sync too: otherwise the file may not have reached the good node yet, and
    // arrive, briefly, after the check.)
    wait_until("the bad node's advert removed on both nodes", || {
        f.bad.log().contains("removed this node's ACME advert")
            && f.bad.read(&rel).is_none()
            && f.good.read(&rel).is_none()
            && f.good.all_in_sync()
            && f.bad.all_in_sync()
    });
    assert_eq!(renewer(&f.good), "good", "{}", f.good.log());
    renewal_reaches_everyone(&f);
}

#[test]
fn trust_renewal_an_advert_for_another_node_is_ignored() {
    if !tools_present() {
        return;
    }
    let f = fleet(&["127.0.1.4", "127.0.1.5", "127.0.1.6"], true, "", |_| {});
    let front = f.front.as_ref().unwrap();
    let rel = format!(".certmesh/acme/nodes/{}", front.id);
    let forged = advert("front");
    f.bad.write(&rel, &forged);
    wait_until("the forged advert on the renewer", || {
        f.good.read(&rel).as_deref() == Some(forged.as_str())
    });
    assert_eq!(renewer(&f.good), "good", "{}", f.good.log());
    let log = f.good.log();
    assert!(log.contains("ignoring the ACME advert"), "{log}");
    assert!(log.contains("written by another node"), "{log}");
}

#[test]
fn trust_renewal_a_junk_archive_version_cannot_block_publishing() {
    if !tools_present() {
        return;
    }
    let f = fleet(&["127.0.1.7", "127.0.1.8"], false, "", |_| {});
    std::fs::create_dir_all(f.bad.tree.join("archive/www/1000000")).unwrap();
    wait_until("the empty version directory on the renewer", || {
        f.good.tree.join("archive/www/1000000").is_dir()
    });
    renewal_reaches_everyone(&f);
    assert!(
        f.good.log().contains("ignoring archive/www/1000000"),
        "{}",
        f.good.log()
    );
}

#[test]
fn trust_renewal_a_live_link_replaced_by_a_file_is_replaced_on_publish() {
    if !tools_present() {
        return;
    }
    let f = fleet(&["127.0.1.9", "127.0.1.10"], false, "", |_| {});
    std::fs::remove_file(f.bad.tree.join("live/www")).unwrap();
    f.bad.write("live/www", "junk");
    wait_until("the file in place of live/www on the renewer", || {
        f.good.tree.join("live/www").is_file()
    });
    renewal_reaches_everyone(&f);
}

#[test]
fn trust_renewal_no_order_for_a_certificate_that_cannot_be_published() {
    if !tools_present() {
        return;
    }
    // A second certificate whose live/ is certbot's directory of links, on the
    // renewer itself: it cannot be published over, so it must cost no order.
    let extra = "\n[[certificate]]\nname = \"legacy\"\ndomains = [\"legacy.certmesh.test\"]\n";
    let f = fleet(&["127.0.1.11", "127.0.1.12"], false, extra, |good| {
        good.write("archive/legacy/cert1.pem", "certbot's");
        std::fs::create_dir_all(good.tree.join("live/legacy")).unwrap();
        std::os::unix::fs::symlink(
            "../../archive/legacy/cert1.pem",
            good.tree.join("live/legacy/cert.pem"),
        )
        .unwrap();
    });
    let before = f.pebble.orders();
    assert!(before >= 1, "www's order is counted");
    let out = run(&f.good, &["issue", "legacy"]);
    assert!(out.contains("not ordering legacy"), "{out}");
    assert!(out.contains("certbot's layout"), "{out}");
    assert_eq!(f.pebble.orders(), before, "an order was placed:\n{out}");
}

/// Two nodes without ACME (modes need no CA): a good one and a bad one.
fn pair(good_ip: &str, bad_ip: &str) -> (Node, Node, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-trust-renewal-")
        .tempdir()
        .unwrap();
    let mut good = Node::new(dir.path(), "good", good_ip);
    let mut bad = Node::new(dir.path(), "bad", bad_ip);
    good.configure(&[&bad]);
    bad.configure(&[&good]);
    good.start();
    bad.start();
    wait_until("both nodes connected", || {
        good.all_connected() && bad.all_connected()
    });
    (good, bad, dir)
}

/// The bad node places `data` at `rel` with `mode` (as a fresh file); returns the
/// mode `good` holds it with once it has the same bytes.
fn placed_mode(good: &Node, bad: &Node, rel: &str, data: &[u8], mode: u32) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let p = bad.tree.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    let there = good.tree.join(rel);
    wait_until(&format!("{rel} on the good node"), || {
        std::fs::read(&there).is_ok_and(|d| d == data)
    });
    std::fs::metadata(&there).unwrap().permissions().mode() & 0o7777
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Key material in each format the issue names, made with openssl: (name, bytes).
fn keys_in_every_format(dir: &std::path::Path) -> Vec<(&'static str, Vec<u8>)> {
    let ssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        out.stdout
    };
    let d = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("k.pem"),
        ssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ]),
    )
    .unwrap();
    ssl(&[
        "req",
        "-x509",
        "-key",
        &d("k.pem"),
        "-subj",
        "/CN=x",
        "-days",
        "1",
        "-out",
        &d("c.pem"),
    ]);
    let der = ssl(&["pkey", "-in", &d("k.pem"), "-outform", "DER"]);
    let p12 = ssl(&[
        "pkcs12",
        "-export",
        "-inkey",
        &d("k.pem"),
        "-in",
        &d("c.pem"),
        "-passout",
        "pass:x",
    ]);
    let b64 = data_encoding::BASE64URL_NOPAD.encode(&der);
    let account = format!(r#"{{"id":"https://ca.test/acct/1","key_pkcs8":"{b64}","urls":{{}}}}"#);
    let jwk = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","d":"jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}"#;
    vec![
        ("account.json", account.into_bytes()),
        ("key.der", der),
        ("jwk.json", jwk.as_bytes().to_vec()),
        ("bundle.p12", p12),
    ]
}

#[test]
fn trust_renewal_acme_secrets_stay_private_whatever_the_format() {
    if !tools_present() {
        return;
    }
    let (good, bad, dir) = pair("127.0.1.20", "127.0.1.21");
    let internal = bad.tree.join(".certmesh");
    std::fs::set_permissions(
        &internal,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for (name, data) in keys_in_every_format(dir.path()) {
        let rel = format!(".certmesh/acme/{name}");
        assert_eq!(placed_mode(&good, &bad, &rel, &data, 0o644), 0o600, "{rel}");
    }
    assert_eq!(mode(&good.tree.join(".certmesh")), 0o700);
    assert_eq!(mode(&good.tree.join(".certmesh/acme")) & 0o077, 0);
}

#[test]
fn trust_renewal_keys_elsewhere_are_found_by_content() {
    if !tools_present() {
        return;
    }
    let (good, bad, dir) = pair("127.0.1.22", "127.0.1.23");
    for (name, data) in keys_in_every_format(dir.path()) {
        let rel = format!("custom/{name}");
        // Today's rule outside .certmesh/acme: nothing for others, group kept.
        assert_eq!(placed_mode(&good, &bad, &rel, &data, 0o644), 0o640, "{rel}");
    }
    // A certificate is no secret: its mode is left alone.
    let cert = std::fs::read(dir.path().join("c.pem")).unwrap();
    assert_eq!(
        placed_mode(&good, &bad, "custom/c.pem", &cert, 0o644),
        0o644
    );
}

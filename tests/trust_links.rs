//! One bad node changes certificates, nothing more (issue 11, parts 1 and 2), with
//! real processes: a configured node running the real `certmesh` edits only its own
//! tree — a link chain that escapes the tree, a link under `acme/` to a private key,
//! a 0777 directory and a 0666 file holding a key — and the healthy nodes must hold no
//! such link, serve neither through the http-01 responder, and clamp the modes.
//! Addresses 127.0.0.40–49 only.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::util::{wait_until, Node};

const CHALLENGES: &str = "acme/.well-known/acme-challenge";
const COMBINED: &str = "-----BEGIN CERTIFICATE-----\nMIIBcert\n-----END CERTIFICATE-----\n\
                        -----BEGIN PRIVATE KEY-----\nMIGHkey\n-----END PRIVATE KEY-----\n";

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn link_exists(n: &Node, rel: &str) -> bool {
    fs::symlink_metadata(n.tree.join(rel)).is_ok()
}

/// `GET path` against the responder: (status code, body).
pub(crate) fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// Three nodes, full mesh; the first healthy one also runs the http-01 responder.
struct Mesh {
    _dir: tempfile::TempDir,
    bad: Node,
    healthy: [Node; 2],
    http: String,
}

fn mesh() -> Mesh {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-trust-")
        .tempdir()
        .unwrap();
    let mut bad = Node::new(dir.path(), "bad", "127.0.0.40");
    let mut h1 = Node::new(dir.path(), "h1", "127.0.0.41");
    let mut h2 = Node::new(dir.path(), "h2", "127.0.0.42");
    bad.configure(&[&h1, &h2]);
    h1.configure(&[&bad, &h2]);
    h2.configure(&[&bad, &h1]);
    let http = format!("127.0.0.41:{}", crate::util::free_tcp("127.0.0.41"));
    let cfg = fs::read_to_string(&h1.config).unwrap();
    fs::write(&h1.config, format!("{cfg}\n[http]\nlisten = \"{http}\"\n")).unwrap();
    for n in [&mut bad, &mut h1, &mut h2] {
        n.start();
    }
    for n in [&bad, &h1, &h2] {
        wait_until(&format!("{} connected", n.name), || n.all_connected());
    }
    Mesh {
        _dir: dir,
        bad,
        healthy: [h1, h2],
        http,
    }
}

impl Mesh {
    /// The bad node writes `name`; waits until every healthy node has it and holds
    /// everything the bad node announced.
    fn marker(&self, name: &str) {
        self.bad.write(name, name);
        for h in &self.healthy {
            wait_until(&format!("{name} on {}", h.name), || h.read(name).is_some());
            wait_until(&format!("{} in sync", h.name), || h.all_in_sync());
        }
    }
}

#[test]
fn escaping_and_acme_links_from_a_peer_never_land() {
    let m = mesh();
    let bad = &m.bad;
    // A file outside every tree, and a certificate the bad node has legitimately.
    let secret = m._dir.path().join("outside-secret");
    fs::write(&secret, "SECRET").unwrap();
    bad.write("x/f", "in x");
    bad.write(
        "archive/x/1/privkey.pem",
        "-----BEGIN PRIVATE KEY-----\nKEY\n",
    );
    bad.write(&format!("{CHALLENGES}/realtok"), "realtok.thumb");
    fs::create_dir_all(bad.tree.join("deep/a/b/c")).unwrap();
    fs::create_dir_all(bad.tree.join("live")).unwrap();
    std::os::unix::fs::symlink("../archive/x/1", bad.tree.join("live/x")).unwrap();
    // (a) A link to a shallower directory (fine on its own)...
    std::os::unix::fs::symlink("../../../../x", bad.tree.join("deep/a/b/c/l")).unwrap();
    m.marker("marker-1");
    for h in &m.healthy {
        assert!(
            link_exists(h, "deep/a/b/c/l"),
            "a legitimate link did not sync"
        );
        assert_eq!(
            h.read("live/x/privkey.pem").as_deref(),
            Some("-----BEGIN PRIVATE KEY-----\nKEY\n")
        );
    }
    // ...then links that read as inside but, through it, land outside.
    let abs = secret.to_str().unwrap().trim_start_matches('/');
    let chain = format!("deep/a/b/c/l/../../../../../{abs}");
    std::os::unix::fs::symlink(
        format!("../../../{chain}"),
        bad.tree.join(format!("{CHALLENGES}/steal")),
    )
    .unwrap();
    std::os::unix::fs::symlink(format!("../{chain}"), bad.tree.join("pubsteal")).unwrap();
    std::os::unix::fs::symlink("deep/a/b/c/l/f", bad.tree.join("thru")).unwrap();
    // (b) A private key published where web servers serve tokens.
    std::os::unix::fs::symlink(
        "../../../live/x/privkey.pem",
        bad.tree.join(format!("{CHALLENGES}/k")),
    )
    .unwrap();
    m.marker("marker-2");

    let bad_links = [
        format!("{CHALLENGES}/steal"),
        format!("{CHALLENGES}/k"),
        "pubsteal".to_string(),
        "thru".to_string(),
    ];
    for h in &m.healthy {
        for l in &bad_links {
            assert!(!link_exists(h, l), "{l} reached {}", h.name);
        }
    }
    // The bad node's own scanner refused to announce them, naming each path.
    let log = bad.log();
    for l in &bad_links {
        assert!(
            log.contains(l.as_str()),
            "no warning naming {l} in the bad node's log"
        );
    }
    // The responder serves the real token and nothing through links.
    assert_eq!(
        get(&m.http, "/.well-known/acme-challenge/realtok"),
        (200, "realtok.thumb".into())
    );
    for t in ["steal", "k"] {
        let (code, body) = get(&m.http, &format!("/.well-known/acme-challenge/{t}"));
        assert_eq!(code, 404, "/{t} answered {body:?}");
        assert!(!body.contains("SECRET") && !body.contains("KEY"));
    }
}

#[test]
fn modes_from_a_peer_are_clamped_and_not_fought_over() {
    let m = mesh();
    let bad = &m.bad;
    // Built beside the tree and renamed in, so the first thing seen is the bad mode.
    let outside = m._dir.path().join("bad-staging");
    fs::create_dir_all(outside.join("pub")).unwrap();
    fs::write(outside.join("pub/combined.pem"), COMBINED).unwrap();
    fs::write(outside.join("pub/plain.txt"), "plain").unwrap();
    fs::set_permissions(
        outside.join("pub/combined.pem"),
        fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    fs::set_permissions(
        outside.join("pub/plain.txt"),
        fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    fs::set_permissions(outside.join("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::rename(outside.join("pub"), bad.tree.join("pub")).unwrap();
    m.marker("marker-1");
    for h in &m.healthy {
        assert_eq!(h.read("pub/combined.pem").as_deref(), Some(COMBINED));
        assert_eq!(mode(&h.tree.join("pub")), 0o755, "dir on {}", h.name);
        assert_eq!(
            mode(&h.tree.join("pub/plain.txt")),
            0o644,
            "file on {}",
            h.name
        );
        let key = mode(&h.tree.join("pub/combined.pem"));
        assert_eq!(key & 0o027, 0, "key file {key:o} on {}", h.name);
    }
    // No ping-pong: the healthy nodes do not announce their clamped modes back, so
    // after another round trip the bad node's own modes are still what it set.
    m.marker("marker-2");
    assert_eq!(mode(&bad.tree.join("pub")), 0o777);
    assert_eq!(mode(&bad.tree.join("pub/combined.pem")), 0o666);
    for h in &m.healthy {
        assert_eq!(mode(&h.tree.join("pub")), 0o755);
    }
}

//! What the fleet serves, the rest of issue 26, with real servers: a real HAProxy as
//! the frontend (the runtime-API hook of the README), a renewal after which the
//! frontend's handshake fails (rolled back under `rollout = "verify"`), and a node
//! removed from the peer list whose last report no longer counts. Nodes and servers
//! on 127.0.44.2–127.0.44.250.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use certmesh::ops::status::{CertStatus, Status};

use crate::reload::{have, Bundle, Ca, Proc, HOST, NAME};
use crate::served::{entry, fleet_with, tempdir, Hook, Member};
use crate::util::{certmesh, free_tcp, wait_listening, wait_until, Node};

fn www(n: &Node) -> Option<CertStatus> {
    let s: Status = serde_json::from_value(n.status())
        .unwrap_or_else(|e| panic!("{} status: {e}\n{}", n.name, n.log()));
    s.certificates.into_iter().find(|c| c.name == NAME)
}

fn status_text(n: &Node) -> String {
    let out = certmesh(&["status", "--config", n.config.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A publisher (`pub`, no frontend) and `hap`, whose frontend is a real HAProxy;
/// `hap`'s hook hot-swaps `live/www/combined.pem` into it through the runtime API
/// (the README's setup).
struct HaproxyPair {
    publisher: Node,
    hap: Node,
    haproxy: Proc,
    metrics: String,
}

/// Starts the pair on `ips` with version 1 live and served. The hook's
/// `haproxy_crt` is the tree's `live/www/combined.pem`; HAProxy's `crt` is that
/// same path, or with `copy_crt` a copy of version 1 made once by hand.
fn haproxy_pair(dir: &Path, ips: [&str; 2], ca: &Ca, copy_crt: bool) -> HaproxyPair {
    let mut publisher = Node::new(dir, "pub", ips[0]);
    let mut hap = Node::new(dir, "hap", ips[1]);
    publisher.configure(&[&hap]);
    hap.configure(&[&publisher]);
    let hdir = dir.join("haproxy");
    fs::create_dir_all(&hdir).unwrap();
    let socket = hdir.join("admin.sock");
    let tree_crt = hap.tree.join(format!("live/{NAME}/combined.pem"));
    // The crt HAProxy reads: the tree's file, or a copy made once by hand.
    let crt = if copy_crt {
        hdir.join("www.pem")
    } else {
        tree_crt.clone()
    };
    let frontend = format!("{}:{}", ips[1], free_tcp(ips[1]));
    let metrics = format!("{}:{}", ips[1], free_tcp(ips[1]));
    let cert = format!("\n[[certificate]]\nname = \"{NAME}\"\ndomains = [\"{HOST}\"]\n");
    fs::write(
        &publisher.config,
        fs::read_to_string(&publisher.config).unwrap() + &cert,
    )
    .unwrap();
    let extra = format!(
        "{cert}\n[[frontend]]\nname = \"haproxy\"\naddress = \"{frontend}\"\n\
         \n[[hook]]\npaths = [\"live/{NAME}/**\"]\nhaproxy_socket = \"{}\"\nhaproxy_crt = \"{}\"\n\
         timeout = \"10s\"\nmin_interval = \"0s\"\n\n[metrics]\nlisten = \"{metrics}\"\n",
        socket.display(),
        tree_crt.display()
    );
    fs::write(
        &hap.config,
        fs::read_to_string(&hap.config).unwrap() + &extra,
    )
    .unwrap();
    ca.bundle(0x4401).publish(&publisher.tree, 1);
    publisher.start();
    hap.start();
    let v1 = publisher.read(&format!("live/{NAME}/combined.pem"));
    wait_until("hap has version 1", || {
        hap.read(&format!("live/{NAME}/combined.pem")) == v1
    });
    if copy_crt {
        fs::write(&crt, v1.as_deref().unwrap_or_default()).unwrap();
    }
    let cfg = format!(
        "global\n  stats socket {} level admin\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
         frontend fe\n  bind {frontend} ssl crt {}\n  http-request return status 200 content-type text/plain string ok\n",
        socket.display(),
        crt.display()
    );
    fs::write(hdir.join("haproxy.cfg"), cfg).unwrap();
    let mut child = Command::new("haproxy")
        .args(["-f", hdir.join("haproxy.cfg").to_str().unwrap(), "-db"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(hdir.join("stderr.log")).unwrap())
        .spawn()
        .expect("starting haproxy");
    wait_listening(&frontend, "haproxy", &mut child, &hdir.join("stderr.log"));
    let haproxy = Proc { child };
    wait_until("haproxy's stats socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    HaproxyPair {
        publisher,
        hap,
        haproxy,
        metrics,
    }
}

#[test]
fn a_renewal_hot_swapped_into_haproxy_is_served_current() {
    if !have("haproxy") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let mut p = haproxy_pair(dir.path(), ["127.0.44.2", "127.0.44.3"], &ca, false);
    ca.bundle(0x4402).publish(&p.publisher.tree, 2);
    wait_until("pub sees hap's HAProxy serve version 2", || {
        www(&p.publisher)
            .is_some_and(|c| entry(&c, "hap").is_some_and(|s| s.current && s.version == Some(2)))
    });
    assert!(
        status_text(&p.publisher).contains("served www: current on 1/1 nodes\n"),
        "{}",
        status_text(&p.publisher)
    );
    // Swapped through the runtime API: the same HAProxy process throughout.
    assert!(matches!(p.haproxy.child.try_wait(), Ok(None)));
}

#[test]
fn haproxy_reading_another_crt_than_the_hooks_is_named_as_serving_the_old_version() {
    if !have("haproxy") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let p = haproxy_pair(dir.path(), ["127.0.44.4", "127.0.44.5"], &ca, true);
    ca.bundle(0x4502).publish(&p.publisher.tree, 2);
    wait_until("hap gives up re-running its hook", || {
        let s: Status = serde_json::from_value(p.hap.status()).expect("hap's status");
        s.errors.iter().any(|e| e.message.contains("giving up"))
    });
    let c = www(&p.publisher).expect("www");
    let s = entry(&c, "hap").expect("hap's report");
    assert_eq!((s.current, s.version), (false, Some(1)), "{s:?}");
    let text = status_text(&p.publisher);
    assert!(
        text.contains(
            "served www: current on 0/1 nodes; hap (haproxy) serves version 1 (current 2)"
        ),
        "{text}"
    );
    let m = crate::metrics::scrape(&p.metrics);
    let series = |n: &str| format!("{n}{{cert=\"{NAME}\",frontend=\"haproxy\"}}");
    let current = series("certmesh_served_certificate_current");
    assert_eq!(crate::metrics::sample(&m, &current), Some(0.0), "{m}");
    let version = series("certmesh_served_certificate_version");
    assert_eq!(crate::metrics::sample(&m, &version), Some(1.0), "{m}");
}

/// nginx offering only TLS 1.2 with RSA key exchange suites (an old config): a
/// certificate with an ECDSA key loads, but no handshake can succeed with it.
fn rsa_only_ciphers(m: &Member) {
    let conf = m.dir.join("nginx.conf");
    let text = fs::read_to_string(&conf).unwrap();
    let line = format!("server_name {HOST};");
    let text = text.replacen(
        &line,
        &format!(
            "{line}\n    ssl_protocols TLSv1.2;\n    ssl_ciphers ECDHE-RSA-AES128-GCM-SHA256;"
        ),
        1,
    );
    fs::write(conf, text).unwrap();
}

fn rsa_bundle(ca: &Ca, serial: u64) -> Bundle {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("an RSA key");
    ca.bundle_with_key(serial, key)
}

/// [`wait_until`] for what comes after the probes' whole window
/// (`probe::rollout::WINDOW`, 30 s) and the propagation of a rollback.
fn wait_longer(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(90) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after 90 s waiting for: {what}");
}

#[test]
fn verify_rolls_back_a_version_whose_handshake_fails() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.44.10", "127.0.44.11", "127.0.44.12"];
    let verify = ("rollout = \"verify\"\n", "");
    let fleet = fleet_with(dir.path(), ips, [Hook::Reload; 3], None, &ca, [verify; 3]);
    fleet.iter().for_each(rsa_only_ciphers);
    // Version 2 has an RSA key: every nginx reloads onto it and serves it.
    rsa_bundle(&ca, 0x4602).publish(&fleet[0].node.tree, 2);
    for m in &fleet {
        wait_until("every node serves version 2", || {
            m.www().is_some_and(|c| {
                c.served.len() == 3 && c.served.iter().all(|s| s.current && s.version == Some(2))
            })
        });
    }
    // Version 3 switches to ECDSA: nginx takes it, but no handshake succeeds.
    ca.bundle(0x4603).publish(&fleet[0].node.tree, 3);
    wait_until("lb2 sees lb1's handshake fail", || {
        fleet[1].www().is_some_and(|c| {
            entry(&c, "lb1")
                .and_then(|s| s.error.clone())
                .is_some_and(|e| e.contains("HandshakeFailure"))
        })
    });
    for m in &fleet {
        wait_longer("live/www back on version 2 on every node", || {
            m.www().is_some_and(|c| c.version == Some(2))
        });
    }
    for m in &fleet {
        wait_until("every node serves version 2 again", || {
            m.www().is_some_and(|c| {
                entry(&c, &m.node.name).is_some_and(|s| s.current && s.version == Some(2))
            })
        });
    }
    let errors = fleet[0].status().errors;
    let said = errors
        .iter()
        .find(|e| e.message.contains("rolled back to version 2"))
        .unwrap_or_else(|| panic!("no rollback reported: {errors:?}"));
    assert!(
        said.message.contains("fails the handshake"),
        "{}",
        said.message
    );
    assert!(fleet[0].node.log().contains("rolled back to version 2"));
}

/// `node`'s config without its `[[peer]]` for `gone`; then SIGHUP.
fn remove_peer(node: &Node, gone: &Node) {
    let block = format!(
        "\n[[peer]]\nname = \"{}\"\nid = \"{}\"\naddress = \"{}\"\n",
        gone.name, gone.id, gone.addr
    );
    let cfg = fs::read_to_string(&node.config).unwrap();
    assert!(cfg.contains(&block), "{cfg}");
    fs::write(&node.config, cfg.replacen(&block, "", 1)).unwrap();
    node.signal(libc::SIGHUP);
}

#[test]
fn a_node_removed_from_the_peer_list_no_longer_counts_as_serving_an_old_version() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.44.20", "127.0.44.21", "127.0.44.22"];
    let metrics = format!("{}:{}", ips[0], free_tcp(ips[0]));
    let on_lb1 = format!("\n[metrics]\nlisten = \"{metrics}\"\n");
    let extra = [("", on_lb1.as_str()), ("", ""), ("", "")];
    let mut fleet = fleet_with(dir.path(), ips, [Hook::Reload; 3], None, &ca, extra);
    for m in &fleet {
        wait_until("every node's report arrived", || {
            fleet[0]
                .www()
                .is_some_and(|c| entry(&c, &m.node.name).is_some())
        });
    }
    // lb3 is decommissioned; its last report (version 1) stays behind.
    fleet[2].node.stop();
    ca.bundle(0x4702).publish(&fleet[0].node.tree, 2);
    wait_until("lb1 counts lb3 as serving version 1", || {
        status_text(&fleet[0].node).contains("served www: current on 2/3 nodes; lb3 (nginx)")
    });
    remove_peer(&fleet[0].node, &fleet[2].node);
    remove_peer(&fleet[1].node, &fleet[2].node);
    for m in &fleet[..2] {
        wait_until("lb3's report dropped", || {
            m.www().is_some_and(|c| entry(&c, "lb3").is_none())
        });
        assert!(status_text(&m.node).contains("served www: current on 2/2 nodes\n"));
    }
    let text = crate::metrics::scrape(&metrics);
    let nodes = |state: &str| {
        let series = format!("certmesh_served_nodes{{cert=\"{NAME}\",state=\"{state}\"}}");
        crate::metrics::sample(&text, &series)
    };
    assert_eq!(
        (nodes("current"), nodes("not_current"), nodes("stale")),
        (Some(2.0), Some(0.0), Some(0.0)),
        "{text}"
    );
}

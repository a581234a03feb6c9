//! What the fleet serves (issue 26), with real servers: three `certmesh` nodes, each
//! with a real nginx on its own loopback address serving `live/www/fullchain.pem`,
//! probed by the node itself; the results seen in `status` on the OTHER nodes. A
//! bundle is published as the ACME client does (test-CA certificates: the probes do
//! not care who issued them). Nodes and servers on 127.0.4.2–127.0.4.40.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use certmesh::core::codec::pb;
use certmesh::core::device::DeviceId;
use certmesh::core::served::ServedRecord;
use certmesh::identity::Identity;
use certmesh::net::transport::Transport;
use certmesh::net::wire;
use certmesh::net::wire::served::{served_to_wire, sign_report};
use certmesh::ops::status::{CertStatus, Status};

use crate::reload::{have, Bundle, Ca, Proc, HOST, NAME};
use crate::util::{free_tcp, wait_listening, wait_until, Node};

/// How a node's `[[hook]]` reloads its nginx.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Hook {
    /// `nginx -s reload` (and a line in `hook-runs`).
    Reload,
    /// A line in `hook-runs`, then exit 1 with a message, as a failed config test.
    Broken,
}

/// One node with its nginx (not started for a frontend that is down).
pub(crate) struct Member {
    pub(crate) node: Node,
    nginx: Option<Proc>,
    /// nginx's directory (config, logs, the hook's run counter).
    pub(crate) dir: PathBuf,
    frontend: String,
}

impl Member {
    pub(crate) fn status(&self) -> Status {
        serde_json::from_value(self.node.status())
            .unwrap_or_else(|e| panic!("{} status: {e}\n{}", self.node.name, self.node.log()))
    }

    pub(crate) fn www(&self) -> Option<CertStatus> {
        self.status()
            .certificates
            .into_iter()
            .find(|c| c.name == NAME)
    }

    pub(crate) fn hook_runs(&self) -> usize {
        fs::read_to_string(self.dir.join("hook-runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn start_nginx(&mut self) {
        let err = self.dir.join("error.log");
        let mut child = Command::new("nginx")
            .args([
                "-p",
                self.dir.to_str().unwrap(),
                "-e",
                err.to_str().unwrap(),
                "-c",
            ])
            .arg(self.dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("starting nginx");
        wait_listening(
            &self.frontend,
            "nginx",
            &mut child,
            &self.dir.join("stderr.log"),
        );
        self.nginx = Some(Proc { child });
    }
}

/// nginx serving `tree`'s `live/www` on `addr`.
fn nginx_conf(d: &Path, addr: &str, tree: &Path) -> String {
    format!(
        "user root;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen {addr} ssl;\n    server_name {HOST};\n\
         ssl_certificate     {t}/live/{NAME}/fullchain.pem;\n\
         ssl_certificate_key {t}/live/{NAME}/privkey.pem;\n\
         location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        d = d.display(),
        t = tree.display(),
    )
}

/// The `[[certificate]]`, `[[frontend]]` and `[[hook]]` of a node.
fn node_extra(d: &Path, addr: &str, hook: Hook) -> String {
    node_extra_with(d, addr, hook, "")
}

/// [`node_extra`] with `cert_keys` added to the `[[certificate]]`.
fn node_extra_with(d: &Path, addr: &str, hook: Hook, cert_keys: &str) -> String {
    let runs = d.join("hook-runs");
    let run = match hook {
        Hook::Reload => format!(
            "[\"sh\", \"-c\", \"echo run >> {r} && exec nginx -p {d} -e {d}/error.log -c {d}/nginx.conf -s reload\"]",
            r = runs.display(),
            d = d.display()
        ),
        Hook::Broken => format!(
            "[\"sh\", \"-c\", \"echo run >> {r}; echo 'nginx: configuration test failed' >&2; exit 1\"]",
            r = runs.display()
        ),
    };
    format!(
        "\n[[certificate]]\nname = \"{NAME}\"\ndomains = [\"{HOST}\"]\n{cert_keys}\
         \n[[frontend]]\nname = \"nginx\"\naddress = \"{addr}\"\n\
         \n[[hook]]\npaths = [\"live/{NAME}/**\"]\nrun = {run}\ntimeout = \"10s\"\n\
         min_interval = \"0s\"\n"
    )
}

/// Three nodes on `ips` with `hooks`; `down` (an index) gets no nginx. Version 1 is
/// published on the first node before start; every node has it and every running
/// nginx serves it when this returns.
pub(crate) fn fleet(
    dir: &Path,
    ips: [&str; 3],
    hooks: [Hook; 3],
    down: Option<usize>,
    ca: &Ca,
) -> Vec<Member> {
    fleet_with(dir, ips, hooks, down, ca, [("", ""); 3])
}

/// [`fleet`] with, per node, keys added to its `[[certificate]]` and text appended
/// to its config.
pub(crate) fn fleet_with(
    dir: &Path,
    ips: [&str; 3],
    hooks: [Hook; 3],
    down: Option<usize>,
    ca: &Ca,
    extra: [(&str, &str); 3],
) -> Vec<Member> {
    let names = ["lb1", "lb2", "lb3"];
    let nodes: Vec<Node> = (0..3).map(|i| Node::new(dir, names[i], ips[i])).collect();
    let mut members = Vec::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let d = dir.join(format!("nginx-{}", names[i]));
        fs::create_dir_all(&d).unwrap();
        let frontend = format!("{}:{}", ips[i], free_tcp(ips[i]));
        fs::write(d.join("nginx.conf"), nginx_conf(&d, &frontend, &node.tree)).unwrap();
        members.push(Member {
            node,
            nginx: None,
            dir: d,
            frontend,
        });
    }
    for i in 0..3 {
        let others: Vec<&Node> = (0..3)
            .filter(|&j| j != i)
            .map(|j| &members[j].node)
            .collect();
        members[i].node.configure(&others);
        let m = &members[i];
        let mut cfg = fs::read_to_string(&m.node.config).unwrap();
        cfg.push_str(&node_extra_with(&m.dir, &m.frontend, hooks[i], extra[i].0));
        cfg.push_str(extra[i].1);
        fs::write(&m.node.config, cfg).unwrap();
    }
    ca.bundle(0x1001).publish(&members[0].node.tree, 1);
    for m in &mut members {
        m.node.start();
    }
    let v1_key = members[0].node.read(&format!("live/{NAME}/privkey.pem"));
    for m in &members {
        wait_until("every node has version 1", || {
            m.node.read(&format!("live/{NAME}/privkey.pem")) == v1_key
        });
    }
    for (i, m) in members.iter_mut().enumerate() {
        // The nodes that received version 1 ran their hook (the publisher's may not:
        // it was there before the daemon started).
        if i > 0 {
            wait_until("the hook ran for version 1", || m.hook_runs() >= 1);
        }
        if Some(i) != down {
            m.start_nginx();
        }
    }
    members
}

pub(crate) fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-served-")
        .tempdir()
        .unwrap()
}

/// `c`'s entry for `node`, if it reported.
pub(crate) fn entry<'a>(
    c: &'a CertStatus,
    node: &str,
) -> Option<&'a certmesh::ops::status::ServedStatus> {
    c.served.iter().find(|s| s.node == node)
}

#[test]
fn a_new_version_is_served_current_on_every_node() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.4.2", "127.0.4.3", "127.0.4.4"];
    let fleet = fleet(dir.path(), ips, [Hook::Reload; 3], None, &ca);
    let v2: Bundle = ca.bundle(0x1002);
    v2.publish(&fleet[0].node.tree, 2);
    for m in &fleet {
        wait_until("every node sees version 2 served by all three", || {
            m.www().is_some_and(|c| {
                c.version == Some(2)
                    && c.served.len() == 3
                    && c.served.iter().all(|s| s.current && s.version == Some(2))
            })
        });
    }
    let text =
        crate::util::certmesh(&["status", "--config", fleet[1].node.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("served www: current on 3/3 nodes\n"),
        "{text}"
    );
}

#[test]
fn a_broken_hook_is_named_on_the_other_nodes_and_rerun_at_most_three_times() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.4.5", "127.0.4.6", "127.0.4.7"];
    let fleet = fleet(
        dir.path(),
        ips,
        [Hook::Reload, Hook::Reload, Hook::Broken],
        None,
        &ca,
    );
    let before = fleet[2].hook_runs();
    ca.bundle(0x2002).publish(&fleet[0].node.tree, 2);
    wait_until("lb3 gives up re-running its hook", || {
        fleet[2]
            .status()
            .errors
            .iter()
            .any(|e| e.message.contains("giving up"))
    });
    assert_eq!(
        fleet[2].hook_runs(),
        before + 4,
        "the change's run and 3 re-runs"
    );
    for m in &fleet[..2] {
        wait_until("lb1 and lb2 see lb3 still serving version 1", || {
            m.www().is_some_and(|c| {
                entry(&c, "lb3").is_some_and(|s| !s.current && s.version == Some(1))
                    && entry(&c, m.node.name.as_str()).is_some_and(|s| s.current)
            })
        });
    }
    let gave_up = fleet[2]
        .status()
        .errors
        .into_iter()
        .find(|e| e.message.contains("giving up"));
    let msg = gave_up.expect("the give-up error").message;
    assert!(
        msg.contains("configuration test failed"),
        "the hook's output: {msg}"
    );
}

#[test]
fn a_frontend_that_is_down_is_named_and_its_hook_not_rerun() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.4.8", "127.0.4.9", "127.0.4.10"];
    let fleet = fleet(dir.path(), ips, [Hook::Reload; 3], Some(2), &ca);
    let before = fleet[2].hook_runs();
    ca.bundle(0x3002).publish(&fleet[0].node.tree, 2);
    wait_until("lb1 names lb3's refused handshake", || {
        fleet[0].www().is_some_and(|c| {
            entry(&c, "lb3").and_then(|s| s.error.clone()).as_deref() == Some("connection refused")
        })
    });
    // Several probes of the dead frontend after the change, still one hook run.
    wait_until("lb3 probed its frontend a few times", || {
        fleet[2]
            .status()
            .counters
            .probe_failures
            .get("nginx")
            .is_some_and(|&n| n >= 4)
    });
    assert_eq!(fleet[2].hook_runs(), before + 1);
    let lb3 = fleet[2].status();
    assert!(
        !lb3.errors.iter().any(|e| e.message.contains("re-running")),
        "{:?}",
        lb3.errors
    );
    let text =
        crate::util::certmesh(&["status", "--config", fleet[0].node.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("lb3 (nginx) handshake failed: connection refused"),
        "{text}"
    );
}

/// A configured peer built from the crate's wire module: hello (taking served
/// reports), then `frame`. Returns the connection.
async fn evil_peer_sends(evil: &Node, target: &Node, frame: pb::Frame) -> quinn::Connection {
    let me = std::sync::Arc::new(Identity::load(&evil.state).unwrap());
    let id: DeviceId = target.id.parse().unwrap();
    let t = Transport::bind(
        me,
        evil.addr.parse().unwrap(),
        certmesh::net::transport::allow_only([id]),
    )
    .unwrap();
    let conn = t.connect(id, target.addr.parse().unwrap()).await.unwrap();
    let mut send = conn.open_uni().await.unwrap();
    let hello = pb::Hello {
        name: "lb2".into(), // claims another node's name: ignored, the device ID counts
        instance: 1,
        version: "x".into(),
        relays_confirm: false,
        takes_served: true,
        signs_reports: false,
    };
    let hello = pb::Frame {
        body: Some(pb::frame::Body::Hello(hello)),
    };
    wire::write_msg(&mut send, &hello).await.unwrap();
    let mut recv = conn.accept_uni().await.unwrap();
    let _: Option<pb::Frame> = wire::read_msg(&mut recv, wire::MAX_FRAME).await.unwrap();
    wire::write_msg(&mut send, &frame).await.unwrap();
    // Keep the streams open with the connection.
    std::mem::forget((send, recv));
    conn
}

/// `evil`'s report of `records`, signed with its own key, as one frame; `edit`
/// changes it after signing.
fn evil_report(
    evil: &Node,
    records: &[ServedRecord],
    edit: impl FnOnce(&mut pb::Served),
) -> pb::Frame {
    let signer = Identity::load(&evil.state).unwrap().signer().unwrap();
    let r = sign_report(&signer, "evil", 1, records).unwrap();
    let mut s = served_to_wire(&r);
    edit(&mut s);
    pb::Frame {
        body: Some(pb::frame::Body::Served(s)),
    }
}

fn claim(leaf: Option<[u8; 32]>, error: Option<&str>) -> ServedRecord {
    ServedRecord {
        cert: NAME.into(),
        frontend: "nginx".into(),
        leaf_sha256: leaf,
        not_after_unix: leaf.map(|_| 4_000_000_000),
        error: error.map(Into::into),
        seen_unix: 1,
        since_unix: 1,
        since_ms: 1000,
    }
}

/// `n1` (certificate www, peers `lb2` and `evil`) running.
fn target_with_two_peers(dir: &Path) -> (Node, Node, Node) {
    let mut n1 = Node::new(dir, "n1", "127.0.4.20");
    let lb2 = Node::new(dir, "lb2", "127.0.4.21");
    let evil = Node::new(dir, "evil", "127.0.4.22");
    n1.configure(&[&lb2, &evil]);
    let mut cfg = fs::read_to_string(&n1.config).unwrap();
    cfg.push_str(&format!(
        "\n[[certificate]]\nname = \"{NAME}\"\ndomains = [\"{HOST}\"]\n"
    ));
    fs::write(&n1.config, cfg).unwrap();
    n1.start();
    (n1, lb2, evil)
}

async fn closed_with_protocol_error(conn: &quinn::Connection) -> bool {
    let closed = tokio::time::timeout(std::time::Duration::from_secs(30), conn.closed()).await;
    matches!(closed, Ok(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code.into_inner() == 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reports_for_itself_never_as_current_by_its_own_word() {
    let dir = tempdir();
    let (n1, _lb2, evil) = target_with_two_peers(dir.path());
    let frame = evil_report(&evil, &[claim(Some([7; 32]), None)], |_| {});
    let _conn = evil_peer_sends(&evil, &n1, frame).await;
    let status = || -> Status { serde_json::from_value(n1.status()).unwrap() };
    let www = |s: Status| s.certificates.into_iter().find(|c| c.name == NAME).unwrap();
    tokio::task::block_in_place(|| {
        wait_until("n1 files the report", || !www(status()).served.is_empty())
    });
    let served = www(status()).served;
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(
        served[0].node, "evil",
        "filed under its signer, not the name it claims"
    );
    assert!(
        !served[0].current,
        "the sender cannot declare its leaf current"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_report_for_another_node() {
    let dir = tempdir();
    let (n1, lb2, evil) = target_with_two_peers(dir.path());
    let lb2_id: DeviceId = lb2.id.parse().unwrap();
    let frame = evil_report(&evil, &[claim(Some([7; 32]), None)], |s| {
        s.origin = lb2_id.0.to_vec(); // lb2's ID, evil's certificate and signature
    });
    let conn = evil_peer_sends(&evil, &n1, frame).await;
    assert!(closed_with_protocol_error(&conn).await);
    let s: Status = serde_json::from_value(n1.status()).unwrap();
    let www = s.certificates.iter().find(|c| c.name == NAME).unwrap();
    assert!(www.served.is_empty(), "{:?}", www.served);
    assert!(
        n1.log().contains("the certificate is not the origin's"),
        "{}",
        n1.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_breaking_a_bound_disconnects_the_peer() {
    let dir = tempdir();
    let (n1, _lb2, evil) = target_with_two_peers(dir.path());
    let both = claim(Some([7; 32]), Some("and an error"));
    let conn = evil_peer_sends(&evil, &n1, evil_report(&evil, &[both], |_| {})).await;
    assert!(closed_with_protocol_error(&conn).await);
}

#[test]
fn a_report_travels_through_a_hub_to_a_node_that_does_not_list_its_origin() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.4.31", "127.0.4.32", "127.0.4.33"];
    let names = ["edge-a", "hub", "edge-c"];
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(dir.path(), names[i], ips[i]))
        .collect();
    nodes[0].configure(&[&nodes[1]]);
    nodes[1].configure(&[&nodes[0], &nodes[2]]);
    nodes[2].configure(&[&nodes[1]]);
    let d = dir.path().join("nginx-edge-a");
    fs::create_dir_all(&d).unwrap();
    let frontend = format!("{}:{}", ips[0], free_tcp(ips[0]));
    fs::write(
        d.join("nginx.conf"),
        nginx_conf(&d, &frontend, &nodes[0].tree),
    )
    .unwrap();
    for (i, n) in nodes.iter().enumerate() {
        let mut cfg = fs::read_to_string(&n.config).unwrap();
        match i {
            0 => cfg.push_str(&node_extra(&d, &frontend, Hook::Reload)),
            _ => cfg.push_str(&format!(
                "\n[[certificate]]\nname = \"{NAME}\"\ndomains = [\"{HOST}\"]\n"
            )),
        }
        fs::write(&n.config, cfg).unwrap();
    }
    ca.bundle(0x5001).publish(&nodes[0].tree, 1);
    let mut fleet: Vec<Member> = nodes
        .into_iter()
        .map(|node| Member {
            node,
            nginx: None,
            dir: d.clone(),
            frontend: frontend.clone(),
        })
        .collect();
    fleet[0].start_nginx();
    for m in &mut fleet {
        m.node.start();
    }
    wait_until(
        "edge-c sees edge-a serving the current leaf, through the hub",
        || {
            fleet[2]
                .www()
                .is_some_and(|c| entry(&c, "edge-a").is_some_and(|s| s.current))
        },
    );
}

#[test]
fn the_served_metrics_name_the_certificate_and_frontend() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ip = "127.0.4.30";
    let node = Node::new(dir.path(), "solo", ip);
    node.configure(&[]);
    let d = dir.path().join("nginx-solo");
    fs::create_dir_all(&d).unwrap();
    let frontend = format!("{ip}:{}", free_tcp(ip));
    let metrics = format!("{ip}:{}", free_tcp(ip));
    fs::write(d.join("nginx.conf"), nginx_conf(&d, &frontend, &node.tree)).unwrap();
    let mut cfg = fs::read_to_string(&node.config).unwrap();
    cfg.push_str(&node_extra(&d, &frontend, Hook::Reload));
    cfg.push_str(&format!("\n[metrics]\nlisten = \"{metrics}\"\n"));
    fs::write(&node.config, cfg).unwrap();
    ca.bundle(0x4001).publish(&node.tree, 1);
    let mut solo = Member {
        node,
        nginx: None,
        dir: d,
        frontend,
    };
    solo.start_nginx();
    solo.node.start();
    let series =
        format!("certmesh_served_certificate_current{{cert=\"{NAME}\",frontend=\"nginx\"}}");
    wait_until("the first probe round exported", || {
        crate::metrics::sample(&crate::metrics::scrape(&metrics), &series) == Some(1.0)
    });
    let text = crate::metrics::scrape(&metrics);
    let (ok, said) = crate::metrics::promtool(&text);
    assert!(ok && said.trim().is_empty(), "promtool: {said}\n{text}");
    let not_after = format!(
        "certmesh_served_certificate_not_after_timestamp_seconds{{cert=\"{NAME}\",frontend=\"nginx\"}}"
    );
    let live = solo
        .www()
        .and_then(|c| c.not_after_unix)
        .expect("a live certificate");
    assert_eq!(crate::metrics::sample(&text, &not_after), Some(live as f64));
    let failures = "certmesh_frontend_probe_failures_total{frontend=\"nginx\"}";
    assert_eq!(crate::metrics::sample(&text, failures), Some(0.0));
}

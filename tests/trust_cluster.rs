//! Issue 25, item 6: cluster frames are authenticated and bounded. A configured peer
//! that relays barriers (played with the crate's wire module) forges reports that
//! other nodes have a path, and floods `Confirm` frames; real barriers
//! (`certmesh confirm PATH`) still show the true state, in their normal time. Real
//! `certmesh` processes on 127.0.6.10–29.

use std::fs;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certmesh::core::cluster::{self, Neighbor, Report};
use certmesh::core::codec::pb;
use certmesh::core::device::{DeviceId, NodeSigner};
use certmesh::identity::Identity;
use certmesh::net::transport::Transport;
use certmesh::net::wire;
use certmesh::net::wire::cluster::{confirm_from_wire, confirm_to_wire, report_to_wire};
use certmesh::ops::control::ConfirmReply;

use crate::util::{certmesh, wait_until, Node};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-trust-cluster-")
        .tempdir()
        .unwrap()
}

/// Waits without holding up the runtime's other tasks.
fn wait(what: &str, f: impl FnMut() -> bool) {
    tokio::task::block_in_place(|| wait_until(what, f));
}

/// Adds `line` to the node's `[tree]`.
fn tree_option(node: &Node, line: &str) {
    let cfg = fs::read_to_string(&node.config).unwrap();
    let path_line = format!("path = \"{}\"\n", node.tree.display());
    let cfg = cfg.replacen(&path_line, &format!("{path_line}{line}\n"), 1);
    fs::write(&node.config, cfg).unwrap();
}

/// `certmesh confirm PATH` on `node`: the daemon's answer and how long it took.
fn confirm(node: &Node, path: &str, timeout: &str) -> (ConfirmReply, Duration) {
    let start = Instant::now();
    let cfg = node.config.to_str().unwrap();
    let out = certmesh(&[
        "confirm",
        "--config",
        cfg,
        path,
        "--timeout",
        timeout,
        "--json",
    ]);
    let took = start.elapsed();
    let reply = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (reply, took)
}

/// (id, reporting node) of the reports routed back to the flooder.
type Answers = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// A relaying session as `e` with `target`: what it sends goes through `send`; the
/// barrier requests `target` sends are collected.
struct Evil {
    _t: Transport,
    conn: quinn::Connection,
    send: quinn::SendStream,
    confirms: Arc<Mutex<Vec<pb::Confirm>>>,
    /// (id, reporting node) of the reports routed back to it.
    reports: Answers,
    signer: NodeSigner,
}

async fn evil(e: &Node, target: &Node) -> Evil {
    let me = Identity::load(&e.state).unwrap();
    let signer = me.signer().unwrap();
    let id: DeviceId = target.id.parse().unwrap();
    let allowed = certmesh::net::transport::allow_only([id]);
    let t = Transport::bind(Arc::new(me), e.addr.parse().unwrap(), allowed).unwrap();
    let conn = t.connect(id, target.addr.parse().unwrap()).await.unwrap();
    let mut send = conn.open_uni().await.unwrap();
    let hello = pb::Hello {
        name: "e".into(),
        instance: 1,
        version: "x".into(),
        relays_confirm: true,
        takes_served: false,
        signs_reports: true,
    };
    let frame = pb::Frame {
        body: Some(pb::frame::Body::Hello(hello)),
    };
    wire::write_msg(&mut send, &frame).await.unwrap();
    let mut recv = conn.accept_uni().await.unwrap();
    let confirms = Arc::new(Mutex::new(Vec::new()));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let (collect, answers) = (confirms.clone(), reports.clone());
    tokio::spawn(async move {
        while let Ok(Some(f)) = wire::read_msg::<_, pb::Frame>(&mut recv, wire::MAX_FRAME).await {
            match f.body {
                Some(pb::frame::Body::Confirm(c)) => collect.lock().unwrap().push(c),
                Some(pb::frame::Body::Report(r)) => answers.lock().unwrap().push((r.id, r.node)),
                _ => {}
            }
        }
    });
    Evil {
        _t: t,
        conn,
        send,
        confirms,
        reports,
        signer,
    }
}

impl Evil {
    async fn send(&mut self, body: pb::frame::Body) {
        let frame = pb::Frame { body: Some(body) };
        wire::write_msg(&mut self.send, &frame).await.unwrap();
    }

    async fn report(&mut self, r: &Report) {
        self.send(pb::frame::Body::Report(report_to_wire(r))).await;
    }

    /// The id of the barrier request for `path` the target sent, once it has.
    fn request_for(&self, path: &str) -> u64 {
        let mut id = None;
        wait(&format!("a barrier request for {path}"), || {
            id = self
                .confirms
                .lock()
                .unwrap()
                .iter()
                .find(|c| c.path == path)
                .map(|c| c.id);
            id.is_some()
        });
        id.unwrap()
    }
}

fn report(id: u64, node: DeviceId, name: &str, peers: Vec<Neighbor>) -> Report {
    Report {
        id,
        node,
        name: name.into(),
        has: true,
        peers,
        seal: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reports_that_others_have_a_path_never_complete_a_barrier() {
    // o — h — x, and `e` (played here) on o. x takes no file over 8 bytes: it is
    // live but never has the token.
    let dir = tmp();
    let mut o = Node::new(dir.path(), "o", "127.0.6.10");
    let mut h = Node::new(dir.path(), "h", "127.0.6.11");
    let mut x = Node::new(dir.path(), "x", "127.0.6.12");
    let e = Node::new(dir.path(), "e", "127.0.6.13");
    o.configure(&[&h, &e]);
    h.configure(&[&o, &x]);
    x.configure(&[&h]);
    tree_option(&x, "max_file_size = \"8\"");
    for n in [&mut o, &mut h, &mut x] {
        n.start();
    }
    wait("h connected", || h.all_connected());
    let mut ev = evil(&e, &o).await;
    o.write("acme/tok", "a key authorization\n");
    wait("the token on h", || h.read("acme/tok").is_some());
    let o2 = o.config.clone();
    let barrier = tokio::task::spawn_blocking(move || {
        let out = certmesh(&[
            "confirm",
            "--config",
            o2.to_str().unwrap(),
            "acme/tok",
            "--timeout",
            "4s",
            "--json",
        ]);
        serde_json::from_slice::<ConfirmReply>(&out.stdout).unwrap()
    });
    let id = ev.request_for("acme/tok");
    let x_id: DeviceId = x.id.parse().unwrap();
    let e_id = ev.signer.id();
    // "x has it": unsigned, then under e's own seal.
    ev.report(&report(id, x_id, "x", vec![])).await;
    let mut own = report(id, e_id, "e", vec![]);
    assert!(cluster::seal(&mut own, &ev.signer));
    let mut under_e = report(id, x_id, "x", vec![]);
    under_e.seal = own.seal.clone();
    ev.report(&under_e).await;
    // e's own signed report: it has the token, and says x has it too.
    let claim = Neighbor {
        device: x_id,
        name: "x".into(),
        connected: true,
        has: true,
        relays: false,
        in_sync: true,
    };
    let mut own = report(id, e_id, "e", vec![claim]);
    assert!(cluster::seal(&mut own, &ev.signer));
    ev.report(&own).await;
    let reply = barrier.await.unwrap();
    assert!(!reply.done, "{reply:?}");
    let by = |n: &str| reply.nodes.iter().find(|m| m.name == n).unwrap();
    assert!(by("x").live && by("x").after_ms.is_none(), "{reply:?}");
    assert!(
        by("h").after_ms.is_some() && by("e").after_ms.is_some(),
        "{reply:?}"
    );
    assert!(ev.conn.close_reason().is_none(), "e's own reports are fine");
}

/// `c` signed by `signer` (its origin, if honest).
fn sealed(c: pb::Confirm, signer: &NodeSigner) -> pb::Confirm {
    let mut c = confirm_from_wire(c).unwrap();
    cluster::seal_confirm(&mut c, signer);
    confirm_to_wire(&c)
}

/// A `Confirm` as big as the wire allows, from `origin`.
fn big_confirm(id: u64, origin: DeviceId) -> pb::Confirm {
    pb::Confirm {
        id,
        origin: origin.0.to_vec(),
        path: "acme/flood".into(),
        version: vec![pb::Counter {
            device: 1,
            value: 1,
        }],
        hops: cluster::MAX_HOPS,
        ttl_ms: cluster::MAX_TTL_MS,
        asked: (0..cluster::MAX_ASKED as u32)
            .map(|i| {
                let mut d = [0x5a; 32];
                d[..4].copy_from_slice(&i.to_le_bytes());
                d.to_vec()
            })
            .collect(),
        sync: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_confirms_does_not_delay_a_real_barrier() {
    // o — h — x, and `e` (played here) on the hub h.
    let dir = tmp();
    let mut o = Node::new(dir.path(), "o", "127.0.6.20");
    let mut h = Node::new(dir.path(), "h", "127.0.6.21");
    let mut x = Node::new(dir.path(), "x", "127.0.6.22");
    let e = Node::new(dir.path(), "e", "127.0.6.23");
    o.configure(&[&h]);
    h.configure(&[&o, &x, &e]);
    x.configure(&[&h]);
    for n in [&mut o, &mut h, &mut x] {
        n.start();
    }
    wait("o and x connected", || {
        o.all_connected() && x.all_connected()
    });
    o.write("live/one.pem", "one\n");
    wait("one on x", || x.read("live/one.pem").is_some());
    let (reply, normal) = tokio::task::block_in_place(|| confirm(&o, "live/one.pem", "10s"));
    assert!(reply.done, "{reply:?}");

    let ev = evil(&e, &h).await;
    let e_id = ev.signer.id();
    let (conn, _t) = (ev.conn, ev._t);
    // Requests with fresh ids and the longest TTL, e as origin, until the real
    // barrier is done: 32 small ones (they take every relay slot a peer may hold
    // on the nodes behind h), then the biggest the wire allows. It answers the real
    // barrier for itself (as an honest relay would; otherwise the barrier rightly
    // waits for it).
    let (mut send, confirms, signer) = (ev.send, ev.confirms, ev.signer);
    let reports = ev.reports;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let flood = tokio::spawn(async move {
        let mut id = 0u64;
        let mut answered = false;
        while stopped.try_recv().is_err() {
            let real = confirms
                .lock()
                .unwrap()
                .iter()
                .find(|c| c.path == "live/two.pem")
                .map(|c| c.id);
            if let (false, Some(real)) = (answered, real) {
                let mut own = report(real, e_id, "e", vec![]);
                assert!(cluster::seal(&mut own, &signer));
                let body = pb::frame::Body::Report(report_to_wire(&own));
                wire::write_msg(&mut send, &pb::Frame { body: Some(body) })
                    .await
                    .unwrap();
                answered = true;
            }
            let mut c = big_confirm(id, e_id);
            if id < 32 {
                c.asked.clear();
            }
            let body = pb::frame::Body::Confirm(sealed(c, &signer));
            let frame = pb::Frame { body: Some(body) };
            wire::write_msg(&mut send, &frame).await.unwrap();
            id += 1;
        }
        id
    });
    // The flood holds h's routes to x: x answers its requests (half the slots a
    // peer may hold is enough to know h took them all: they came in one burst).
    let x_id = x.id.parse::<DeviceId>().unwrap().0.to_vec();
    wait("x answers the flood", || {
        let r = reports.lock().unwrap();
        let ids: std::collections::HashSet<u64> = r
            .iter()
            .filter(|(_, n)| *n == x_id)
            .map(|(id, _)| *id)
            .collect();
        ids.len() >= cluster::MAX_RELAYS_PER_PEER / 2
    });
    o.write("live/two.pem", "two\n");
    wait("two on x", || x.read("live/two.pem").is_some());
    let (reply, during) = tokio::task::block_in_place(|| confirm(&o, "live/two.pem", "10s"));
    stop.send(()).unwrap();
    let sent = flood.await.unwrap();
    eprintln!(
        "barrier: {normal:?} normally, {during:?} during a flood ({sent} Confirms): {reply:?}"
    );
    assert!(reply.done, "{reply:?}");
    assert_eq!(reply.nodes.len(), 3, "{reply:?}");
    // x, two hops away behind the flooded hub, confirmed as fast as ever (the
    // flooder's own answer waits behind its own flood).
    let x_ms = reply.nodes.iter().find(|n| n.name == "x").unwrap().after_ms;
    let limit = normal * 2 + Duration::from_secs(2);
    assert!(
        x_ms.is_some_and(|ms| u128::from(ms) <= limit.as_millis()),
        "{reply:?}"
    );
    assert!(
        during <= normal * 2 + Duration::from_secs(2),
        "{during:?} vs {normal:?}"
    );
    assert!(
        conn.close_reason().is_none(),
        "a flood is dropped, not a violation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_another_nodes_name_are_refused_and_cut_off() {
    // o — h, and `e` (played here) on h, sending requests that name o as origin:
    // unsigned, or signed by e itself.
    let dir = tmp();
    let mut o = Node::new(dir.path(), "o", "127.0.6.25");
    let mut h = Node::new(dir.path(), "h", "127.0.6.26");
    let e = Node::new(dir.path(), "e", "127.0.6.27");
    o.configure(&[&h]);
    h.configure(&[&o, &e]);
    o.start();
    h.start();
    wait("o and h connected", || o.all_connected());
    let mut ev = evil(&e, &h).await;
    let o_id: DeviceId = o.id.parse().unwrap();
    let mut own = confirm_from_wire(big_confirm(0, ev.signer.id())).unwrap();
    assert!(cluster::seal_confirm(&mut own, &ev.signer));
    for id in 0..1_100u64 {
        let mut c = big_confirm(id, o_id);
        c.asked.clear();
        if id % 2 == 1 {
            c.signature = own.seal.as_ref().unwrap().signature.clone();
            c.origin_cert = own.seal.as_ref().unwrap().cert.to_vec();
        }
        if wire::write_msg(
            &mut ev.send,
            &pb::Frame {
                body: Some(pb::frame::Body::Confirm(c)),
            },
        )
        .await
        .is_err()
        {
            break;
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(30), ev.conn.closed()).await;
    match closed {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            let reason = String::from_utf8_lossy(&c.reason);
            assert!(reason.contains("too many refused records"), "{reason}");
        }
        other => panic!("not cut off: {other:?}"),
    }
    let st: certmesh::ops::status::Status = serde_json::from_value(h.status()).unwrap();
    let p = st.peers.iter().find(|p| p.name == "e").unwrap();
    let why = p.refused.last_reason.as_deref().unwrap_or_default();
    assert!(why.contains("not signed by its origin"), "{why}");
}

//! Hostile input from the network: unknown devices, and a configured peer (built from
//! the crate's own wire module) that sends escaping paths, oversized frames and
//! content that does not match its hash. Each is refused and logged, nothing is
//! written outside the tree, and the node keeps serving its other peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certmesh::core::codec::pb;
use certmesh::core::device::DeviceId;
use certmesh::identity::Identity;
use certmesh::net::transport::Transport;
use certmesh::net::wire;

use crate::util::{wait_until, Cluster, Node};

fn transport_for(node: &Node, trusts: &Node) -> Transport {
    let me = Arc::new(Identity::load(&node.state).unwrap());
    let id: DeviceId = trusts.id.parse().unwrap();
    let allowed = certmesh::net::transport::allow_only([id]);
    Transport::bind(me, node.addr.parse().unwrap(), allowed).unwrap()
}

async fn hello(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let mut send = conn.open_uni().await.unwrap();
    let h = pb::Frame {
        body: Some(pb::frame::Body::Hello(pb::Hello {
            name: "evil".into(),
            instance: 1,
            version: "x".into(),
            relays_confirm: false,
            takes_served: false,
            signs_reports: false,
        })),
    };
    wire::write_msg(&mut send, &h).await.unwrap();
    let mut recv = conn.accept_uni().await.unwrap();
    let first: Option<pb::Frame> = wire::read_msg(&mut recv, wire::MAX_FRAME).await.unwrap();
    assert!(matches!(
        first.and_then(|f| f.body),
        Some(pb::frame::Body::Hello(_))
    ));
    (send, recv)
}

fn file_info(path: &str, content: &[u8]) -> pb::FileInfo {
    pb::FileInfo {
        path: path.into(),
        kind: pb::Kind::File as i32,
        size: content.len() as u64,
        mode: 0o644,
        mtime_ns: 1,
        hash: blake3::hash(content).as_bytes().to_vec(),
        version: vec![pb::Counter {
            device: 42,
            value: 1,
        }],
        deleted: false,
        sequence: 1,
        symlink_target: String::new(),
        modified_by: 42,
        data: Vec::new(),
        ..Default::default()
    }
}

fn index(files: Vec<pb::FileInfo>) -> pb::Frame {
    pb::Frame {
        body: Some(pb::frame::Body::Index(pb::IndexUpdate {
            files,
            last_sequence: 1,
            full: true,
            full_done: true,
        })),
    }
}

/// Waits for the node to close the connection; returns the close code.
async fn closed_by_node(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(Duration::from_secs(30), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => c.error_code.into_inner(),
        Ok(other) => panic!("connection ended without an application close: {other}"),
        Err(_) => panic!("the node did not disconnect the hostile peer"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_configured_peer_is_cut_off_and_nothing_escapes() {
    let mut c = Cluster::new(2, None);
    let evil = Node::new(c.dir.path(), "evil", "127.0.0.9");
    c.nodes[0].configure(&[&c.nodes[1], &evil]);
    c.nodes[0].start();
    c.nodes[1].start();
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    wait_until("n2 connected", || n2.all_connected());
    let t = transport_for(&evil, n1);
    let n1_id: DeviceId = n1.id.parse().unwrap();
    let n1_addr: SocketAddr = n1.addr.parse().unwrap();
    let outside = c.dir.path().join("n1");

    // 1. Paths that escape the tree, one connection each.
    for bad in [
        file_info("../escaped", b"x"),
        file_info("/tmp/certmesh-absolute-escape", b"x"),
        file_info("a/../../escaped", b"x"),
        file_info(".certmesh/conflicts/planted", b"x"),
        pb::FileInfo {
            kind: pb::Kind::Symlink as i32,
            hash: vec![],
            size: 0,
            symlink_target: "../../../../etc".into(),
            ..file_info("link-out", b"")
        },
    ] {
        let conn = t.connect(n1_id, n1_addr).await.unwrap();
        let (mut send, _recv) = hello(&conn).await;
        wire::write_msg(&mut send, &index(vec![bad.clone()]))
            .await
            .unwrap();
        assert_eq!(closed_by_node(&conn).await, 3, "{bad:?}");
    }
    assert!(!outside.join("escaped").exists());
    assert!(!c.dir.path().join("escaped").exists());
    assert!(!std::path::Path::new("/tmp/certmesh-absolute-escape").exists());
    assert!(std::fs::symlink_metadata(n1.tree.join("link-out")).is_err());

    // 2. A frame claiming 4 GiB.
    let conn = t.connect(n1_id, n1_addr).await.unwrap();
    let (mut send, _recv) = hello(&conn).await;
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0])
        .await
        .unwrap();
    assert_eq!(closed_by_node(&conn).await, 3);

    // 3. Content that does not match the announced hash.
    let conn = t.connect(n1_id, n1_addr).await.unwrap();
    let (mut send, _recv) = hello(&conn).await;
    wire::write_msg(
        &mut send,
        &index(vec![file_info("stolen.pem", b"expected")]),
    )
    .await
    .unwrap();
    let (mut rs, mut rr) = conn.accept_bi().await.unwrap();
    let req: Option<pb::Request> = wire::read_msg(&mut rr, wire::MAX_HEADER).await.unwrap();
    assert_eq!(req.unwrap().path, "stolen.pem");
    let resp = pb::Response {
        status: pb::response::Status::Ok as i32,
        size: 8,
    };
    wire::write_msg(&mut rs, &resp).await.unwrap();
    rs.write_all(b"WRONG!!!").await.unwrap();
    let _ = rs.finish();
    assert_eq!(closed_by_node(&conn).await, 3);
    assert!(n1.read("stolen.pem").is_none());
    wait_until("no staging file left behind", || {
        std::fs::read_dir(n1.tree.join(".certmesh/tmp"))
            .unwrap()
            .count()
            == 0
    });

    // The node kept serving its honest peer throughout, and logged the attacks.
    n2.write("still-works", "yes");
    wait_until("n2's file reaches n1", || {
        n1.read("still-works").as_deref() == Some("yes")
    });
    let log = n1.log();
    assert!(log.contains("refused path"), "{log}");
    assert!(log.contains("exceeds the limit"), "{log}");
    assert!(log.contains("does not match its BLAKE3 hash"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_devices_and_wrong_ids_are_refused_in_the_handshake() {
    let mut c = Cluster::new(2, None);
    c.start_all();
    let n1 = &c.nodes[0];
    let stranger = Node::new(c.dir.path(), "stranger", "127.0.0.9");
    let t = transport_for(&stranger, n1);
    let n1_addr: SocketAddr = n1.addr.parse().unwrap();
    let n1_id: DeviceId = n1.id.parse().unwrap();

    // Not in n1's peer list: the handshake fails, no stream is ever opened.
    let r = match t.connect(n1_id, n1_addr).await {
        Ok(conn) => tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|_| ()),
        Err(_) => None,
    };
    assert!(r.is_none(), "an unknown device got a stream");
    wait_until("n1 logs the refusal", || {
        c.nodes[0].log().contains("unknown device")
    });

    // Dialling n1's address while expecting n2's ID: our side refuses n1's certificate.
    let n2_id: DeviceId = c.nodes[1].id.parse().unwrap();
    assert!(t.connect(n2_id, n1_addr).await.is_err());
    // And the stranger's tree never received anything.
    assert!(std::fs::read_dir(&stranger.tree).map_or(true, |mut d| d.next().is_none()));
}

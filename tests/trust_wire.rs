//! Issue 11, parts 3 and 4: a configured peer speaking the wire protocol (the
//! crate's own `wire` module) cannot freeze a path with huge counters, wrap acks,
//! exhaust memory with a frame of empty entries, or make nodes fetch files larger
//! than `[tree] max_file_size`. Real `certmesh` processes on 127.0.0.60–69.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use certmesh::core::codec::pb;
use certmesh::core::device::DeviceId;
use certmesh::identity::Identity;
use certmesh::net::transport::Transport;
use certmesh::net::wire;
use certmesh::ops::status::Status;

use crate::util::{wait_until, Node};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-trust-wire-")
        .tempdir()
        .unwrap()
}

fn status(node: &Node) -> Option<Status> {
    serde_json::from_value(node.status()).ok()
}

/// Waits without holding up the runtime's other tasks.
fn wait(what: &str, f: impl FnMut() -> bool) {
    tokio::task::block_in_place(|| wait_until(what, f));
}

/// A node `n1` with a healthy peer `n2` (if `with_peer`) and a hostile one, `evil`,
/// that this test plays with the wire module.
struct Setup {
    _dir: tempfile::TempDir,
    n1: Node,
    n2: Option<Node>,
    evil: Node,
}

fn setup(ips: &[&str], tree_extra: &str) -> Setup {
    let dir = tmp();
    let mut n1 = Node::new(dir.path(), "n1", ips[0]);
    let evil = Node::new(dir.path(), "evil", ips[ips.len() - 1]);
    let mut n2 = (ips.len() == 3).then(|| Node::new(dir.path(), "n2", ips[1]));
    match &n2 {
        Some(n2) => {
            n1.configure(&[n2, &evil]);
            n2.configure(&[&n1]);
        }
        None => n1.configure(&[&evil]),
    }
    for n in std::iter::once(&n1).chain(n2.as_ref()) {
        let cfg = fs::read_to_string(&n.config).unwrap();
        let path_line = format!("path = \"{}\"\n", n.tree.display());
        let cfg = cfg.replacen(&path_line, &format!("{path_line}{tree_extra}"), 1);
        fs::write(&n.config, cfg).unwrap();
    }
    n1.start();
    if let Some(n2) = &mut n2 {
        n2.start();
        wait_until("n1 and n2 connected", || n2.all_connected());
    }
    Setup {
        _dir: dir,
        n1,
        n2,
        evil,
    }
}

/// Connects as `evil` to `target` and exchanges hellos.
async fn evil_session(
    evil: &Node,
    target: &Node,
) -> (Transport, quinn::Connection, quinn::SendStream) {
    let me = Arc::new(Identity::load(&evil.state).unwrap());
    let id: DeviceId = target.id.parse().unwrap();
    let allowed = certmesh::net::transport::allow_only([id]);
    let t = Transport::bind(me, evil.addr.parse().unwrap(), allowed).unwrap();
    let conn = t.connect(id, target.addr.parse().unwrap()).await.unwrap();
    let mut send = conn.open_uni().await.unwrap();
    let hello = pb::Frame {
        body: Some(pb::frame::Body::Hello(pb::Hello {
            name: "evil".into(),
            instance: 1,
            version: "x".into(),
            relays_confirm: false,
            takes_served: false,
            signs_reports: false,
        })),
    };
    wire::write_msg(&mut send, &hello).await.unwrap();
    let mut recv = conn.accept_uni().await.unwrap();
    // Drain what the node sends (its index, acks) so its stream never blocks.
    tokio::spawn(async move {
        while let Ok(Some(_)) = wire::read_msg::<_, pb::Frame>(&mut recv, wire::MAX_FRAME).await {}
    });
    (t, conn, send)
}

/// The close code the node closed the connection with, if it did within 10 s.
async fn closed_by_node(conn: &quinn::Connection) -> Option<u64> {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

fn record(path: &str, counter: u64) -> pb::FileInfo {
    pb::FileInfo {
        path: path.into(),
        kind: pb::Kind::File as i32,
        size: 5,
        mode: 0o644,
        mtime_ns: i64::MAX,
        hash: blake3::hash(b"evil\n").as_bytes().to_vec(),
        version: vec![pb::Counter {
            device: 42,
            value: counter,
        }],
        deleted: false,
        sequence: 1,
        symlink_target: String::new(),
        modified_by: 42,
        data: Vec::new(),
        ..Default::default()
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_at_u64_max_are_refused_and_the_path_still_propagates() {
    let s = setup(&["127.0.0.60", "127.0.0.61", "127.0.0.62"], "");
    let n2 = s.n2.as_ref().unwrap();
    s.n1.write("live/x.pem", "one\n");
    wait("live/x.pem on n2", || {
        n2.read("live/x.pem").as_deref() == Some("one\n")
    });

    let (_t, conn, mut send) = evil_session(&s.evil, &s.n1).await;
    let frame = pb::Frame {
        body: Some(pb::frame::Body::Index(pb::IndexUpdate {
            files: vec![record("live/x.pem", u64::MAX)],
            last_sequence: 1,
            full: true,
            full_done: true,
        })),
    };
    wire::write_msg(&mut send, &frame).await.unwrap();
    assert_eq!(closed_by_node(&conn).await, Some(3), "not disconnected");
    let log = s.n1.log();
    assert!(
        log.contains("live/x.pem: counter 18446744073709551615 of device 000000000000002a")
            && log.contains(&s.evil.id),
        "{log}"
    );

    // The path is not frozen: edits go both ways between the healthy nodes.
    n2.write("live/x.pem", "two\n");
    wait("n2's edit on n1", || {
        s.n1.read("live/x.pem").as_deref() == Some("two\n")
    });
    s.n1.write("live/x.pem", "three\n");
    wait("n1's edit on n2", || {
        n2.read("live/x.pem").as_deref() == Some("three\n")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_beyond_our_sequence_is_refused() {
    let s = setup(&["127.0.0.63", "127.0.0.64"], "");
    let (_t, conn, mut send) = evil_session(&s.evil, &s.n1).await;
    let ack = pb::Frame {
        body: Some(pb::frame::Body::Ack(pb::Ack { sequence: u64::MAX })),
    };
    wire::write_msg(&mut send, &ack).await.unwrap();
    assert_eq!(closed_by_node(&conn).await, Some(3), "not disconnected");
    let log = s.n1.log();
    assert!(
        log.contains("acknowledges sequence 18446744073709551615"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_empty_entries_is_refused_with_memory_small() {
    let s = setup(&["127.0.0.65", "127.0.0.66"], "");
    let pid = s.n1.child.as_ref().unwrap().id();
    let (_t, conn, mut send) = evil_session(&s.evil, &s.n1).await;
    // Frame { index: IndexUpdate { files: [FileInfo {}; ~2 million] } }, 4 MiB.
    let n = (wire::MAX_FRAME - 16) / 2;
    let mut frame = vec![0x12];
    prost::encoding::encode_varint(2 * n as u64, &mut frame);
    frame.extend(std::iter::repeat_n([0x0a, 0x00], n).flatten());
    let mut framed = (frame.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&frame);
    let before = rss_kib(pid).unwrap();
    let sampler = tokio::spawn(async move {
        let mut max = 0;
        for _ in 0..300 {
            max = max.max(rss_kib(pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        max
    });
    send.write_all(&framed).await.unwrap();
    assert_eq!(closed_by_node(&conn).await, Some(3), "not disconnected");
    let max_mib = sampler.await.unwrap() / 1024;
    eprintln!("RSS before {} MiB, max {max_mib} MiB", before / 1024);
    assert!(max_mib < 64, "n1 grew to {max_mib} MiB");
    let log = s.n1.log();
    assert!(log.contains("records in one frame"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_above_max_file_size_are_not_fetched_and_hold_nothing_up() {
    let s = setup(
        &["127.0.0.67", "127.0.0.68", "127.0.0.69"],
        "max_file_size = \"1MiB\"\n",
    );
    let n2 = s.n2.as_ref().unwrap();
    // Written beside the tree and renamed in, so no smaller partial version of it is
    // ever seen (and rightly synced).
    fs::create_dir_all(s.n1.tree.join("data")).unwrap();
    let staged = s.n1.dir.join("big.bin");
    fs::write(&staged, vec![7u8; 2 << 20]).unwrap();
    fs::rename(&staged, s.n1.tree.join("data/big.bin")).unwrap();
    s.n1.write("data/marker", "after the big one\n");
    wait("the marker on n2", || n2.read("data/marker").is_some());
    wait("n2's status names the big file", || {
        status(n2).is_some_and(|st| {
            st.tree.too_large_count == 1
                && st.tree.too_large[0].path == "data/big.bin"
                && st.tree.too_large[0].size == 2 << 20
        })
    });
    assert!(!n2.tree.join("data/big.bin").exists());
    // n2 acknowledged past it: n1 sees n2 in sync.
    wait("n1 sees n2 in sync", || {
        status(&s.n1).is_some_and(|st| st.peers.iter().any(|p| p.name == "n2" && p.in_sync))
    });
    let log = n2.log();
    assert_eq!(
        log.matches("file larger than max_file_size").count(),
        1,
        "{log}"
    );
}

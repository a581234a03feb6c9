//! Issue 25, item 5: refused input is cheap and has consequences. A reader floods a
//! node with records claiming a writer's authorship under junk signatures: they are
//! verified outside the state lock, the writer's changes still arrive, `status`
//! answers, and past 1,000 refused records a minute the flooder is disconnected with
//! a named reason and backed off from. Real `certmesh` processes on 127.0.6.2–9; the
//! flooder speaks the crate's wire module.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use certmesh::core::codec::pb;
use certmesh::core::device::DeviceId;
use certmesh::handles::sync::CLOSE_REFUSING;
use certmesh::identity::Identity;
use certmesh::net::transport::Transport;
use certmesh::net::wire;
use certmesh::ops::status::Status;

use crate::util::{certmesh, wait_until, Node};

fn status(node: &Node) -> Option<Status> {
    serde_json::from_value(node.status()).ok()
}

/// Waits without holding up the runtime's other tasks.
fn wait(what: &str, f: impl FnMut() -> bool) {
    tokio::task::block_in_place(|| wait_until(what, f));
}

/// Adds `writers = [...]` to the node's `[tree]`.
fn set_writers(node: &Node, writers: &[&str]) {
    let cfg = fs::read_to_string(&node.config).unwrap();
    let path_line = format!("path = \"{}\"\n", node.tree.display());
    let list: Vec<String> = writers.iter().map(|w| format!("{w:?}")).collect();
    let line = format!("{path_line}writers = [{}]\n", list.join(", "));
    fs::write(&node.config, cfg.replacen(&path_line, &line, 1)).unwrap();
}

/// A writer `w`, a reader `t` it syncs with, and a reader `f` configured on `t`
/// (played by the test).
struct Setup {
    _dir: tempfile::TempDir,
    w: Node,
    t: Node,
    f: Node,
}

fn setup(ips: [&str; 3]) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-trust-flood-")
        .tempdir()
        .unwrap();
    let mut w = Node::new(dir.path(), "w", ips[0]);
    let mut t = Node::new(dir.path(), "t", ips[1]);
    let f = Node::new(dir.path(), "f", ips[2]);
    w.configure(&[&t, &f]);
    t.configure(&[&w, &f]);
    for n in [&w, &t] {
        set_writers(n, &["w"]);
    }
    w.write("live/a/cert.pem", "v1\n");
    w.start();
    t.start();
    wait("v1 on t", || {
        t.read("live/a/cert.pem").as_deref() == Some("v1\n")
    });
    Setup { _dir: dir, w, t, f }
}

/// How long a file written on `from` takes to reach `to`.
fn propagation(from: &Node, to: &Node, rel: &str, content: &str) -> Duration {
    let start = Instant::now();
    from.write(rel, content);
    wait(&format!("{rel} on {}", to.name), || {
        to.read(rel).as_deref() == Some(content)
    });
    start.elapsed()
}

/// A session as `f` with `target`, hello exchanged, what it sends drained.
/// (`port` 0: any free one, for a second session.)
async fn session(
    f: &Node,
    target: &Node,
    port: Option<u16>,
) -> (Transport, quinn::Connection, quinn::SendStream) {
    let me = Arc::new(Identity::load(&f.state).unwrap());
    let id: DeviceId = target.id.parse().unwrap();
    let mut addr: std::net::SocketAddr = f.addr.parse().unwrap();
    if let Some(p) = port {
        addr.set_port(p);
    }
    let t = Transport::bind(me, addr, certmesh::net::transport::allow_only([id])).unwrap();
    let conn = t.connect(id, target.addr.parse().unwrap()).await.unwrap();
    let mut send = conn.open_uni().await.unwrap();
    let hello = pb::Hello {
        name: "f".into(),
        instance: rand_instance(),
        version: "x".into(),
        relays_confirm: false,
        takes_served: false,
        signs_reports: false,
    };
    let frame = pb::Frame {
        body: Some(pb::frame::Body::Hello(hello)),
    };
    wire::write_msg(&mut send, &frame).await.unwrap();
    if let Ok(mut recv) = conn.accept_uni().await {
        tokio::spawn(async move {
            while let Ok(Some(_)) = wire::read_msg::<_, pb::Frame>(&mut recv, wire::MAX_FRAME).await
            {
            }
        });
    }
    (t, conn, send)
}

fn rand_instance() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    t.unwrap().as_nanos() as u64
}

/// `n` records in `w`'s name (its real certificate), each signed by `f` instead:
/// every one costs the receiver a full ECDSA verification, then is refused.
fn junk(w: &Node, f: &Node, from: usize, n: usize) -> Vec<pb::FileInfo> {
    let wi = Identity::load(&w.state).unwrap();
    let fs = Identity::load(&f.state).unwrap().signer().unwrap();
    let short = u64::from_be_bytes(wi.id.0[..8].try_into().unwrap());
    (from..from + n)
        .map(|i| pb::FileInfo {
            path: format!("junk/{i}"),
            kind: pb::Kind::File as i32,
            size: 5,
            mode: 0o644,
            mtime_ns: 1,
            hash: blake3::hash(b"junk\n").as_bytes().to_vec(),
            version: vec![pb::Counter {
                device: short,
                value: 1,
            }],
            sequence: i as u64 + 1,
            modified_by: short,
            author: wi.id.0.to_vec(),
            signature: fs.sign(format!("junk {i}").as_bytes()).unwrap(),
            author_cert: wi.cert.to_vec(),
            ..Default::default()
        })
        .collect()
}

/// Sends frames of 200 junk records until the node closes the connection; how many
/// were sent.
async fn flood(w: &Node, f: &Node, send: &mut quinn::SendStream) -> usize {
    let mut sent = 0;
    while sent < 100_000 {
        let files = junk(w, f, sent, 200);
        let frame = pb::Frame {
            body: Some(pb::frame::Body::Index(pb::IndexUpdate {
                files,
                last_sequence: sent as u64 + 200,
                full: sent == 0,
                full_done: sent == 0,
            })),
        };
        if wire::write_msg(send, &frame).await.is_err() {
            break;
        }
        sent += 200;
    }
    sent
}

/// The application close code and reason the node closed `conn` with.
async fn closed(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(30), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("not closed by the node: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_signature_flood_is_cut_off_and_the_writer_still_gets_through() {
    let s = setup(["127.0.6.2", "127.0.6.3", "127.0.6.4"]);
    let normal = propagation(&s.w, &s.t, "live/a/n.pem", "normal\n");
    let (_tr, conn, mut send) = session(&s.f, &s.t, None).await;
    let (w, f) = (&s.w, &s.f);
    let flooding = async { flood(w, f, &mut send).await };
    // The writer's change made as the flood starts arrives in its normal time.
    let (w_tree, t_tree) = (s.w.tree.clone(), s.t.tree.clone());
    let during = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        fs::write(w_tree.join("live/a/during.pem"), "during\n").unwrap();
        wait_until("live/a/during.pem on t", || {
            fs::read_to_string(t_tree.join("live/a/during.pem")).is_ok_and(|c| c == "during\n")
        });
        start.elapsed()
    });
    let (sent, (code, reason)) = tokio::join!(flooding, closed(&conn));
    assert_eq!(code, u64::from(CLOSE_REFUSING), "{reason}");
    assert!(reason.contains("too many refused records"), "{reason}");
    assert!(sent < 20_000, "{sent} junk records sent before the cut");
    let during = during.await.unwrap();
    let after = propagation(&s.w, &s.t, "live/a/after.pem", "after\n");
    for took in [during, after] {
        assert!(
            took <= normal * 2 + Duration::from_secs(2),
            "{took:?} vs {normal:?}"
        );
    }
    eprintln!("propagation {normal:?}; during the flood {during:?}, after {after:?}; {sent} junk records sent");
    let start = Instant::now();
    let st = status(&s.t).expect("status answers");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let p = st.peers.iter().find(|p| p.name == "f").unwrap();
    let why = p.last_error.as_deref().unwrap_or_default();
    assert!(why.contains("too many refused records"), "{why}");
    assert!(p.refused.count > 1000, "{:?}", p.refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_cut_off_is_refused_again_while_backed_off() {
    let s = setup(["127.0.6.5", "127.0.6.6", "127.0.6.7"]);
    let (_tr, conn, mut send) = session(&s.f, &s.t, None).await;
    flood(&s.w, &s.f, &mut send).await;
    assert_eq!(closed(&conn).await.0, u64::from(CLOSE_REFUSING));
    // Coming straight back: the session is refused at once, with why.
    let (_tr2, again, _send) = session(&s.f, &s.t, Some(0)).await;
    let (code, reason) = closed(&again).await;
    assert_eq!(code, u64::from(CLOSE_REFUSING), "{reason}");
    assert!(reason.contains("backing off"), "{reason}");
    let out = certmesh(&["status", "--config", s.t.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("too many refused records"), "{text}");
}

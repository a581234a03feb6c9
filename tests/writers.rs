//! Issue 13: only the nodes in `[tree] writers` change the tree, checked by every node
//! on every record, also for records relayed by other nodes. Real `certmesh`
//! processes on 127.0.5.1–60; the forger speaks the crate's wire module.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use certmesh::core::codec::pb;
use certmesh::core::device::DeviceId;
use certmesh::identity::Identity;
use certmesh::net::transport::Transport;
use certmesh::net::wire;
use certmesh::ops::status::Status;

use crate::util::{wait_until, Node};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-writers-")
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

/// Adds `writers = [...]` to the node's `[tree]`.
fn set_writers(node: &Node, writers: &[&str]) {
    let cfg = fs::read_to_string(&node.config).unwrap();
    let path_line = format!("path = \"{}\"\n", node.tree.display());
    let list: Vec<String> = writers.iter().map(|w| format!("{w:?}")).collect();
    let line = format!("{path_line}writers = [{}]\n", list.join(", "));
    fs::write(&node.config, cfg.replacen(&path_line, &line, 1)).unwrap();
}

fn mode(node: &Node, rel: &str) -> u32 {
    fs::symlink_metadata(node.tree.join(rel))
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

/// Every regular file under `dir` whose content is `content`.
fn files_holding(dir: &Path, content: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => files_holding(&p, content),
                Ok(t) if t.is_file() => {
                    usize::from(fs::read_to_string(&p).is_ok_and(|c| c == content))
                }
                _ => 0,
            }
        })
        .sum()
}

#[test]
fn a_readers_edits_deletes_and_chmods_stay_local_and_are_put_back() {
    let dir = tmp();
    let mut w = Node::new(dir.path(), "w", "127.0.5.1");
    let mut r = Node::new(dir.path(), "r", "127.0.5.2");
    let mut o = Node::new(dir.path(), "o", "127.0.5.3");
    w.configure(&[&r, &o]);
    r.configure(&[&w, &o]);
    o.configure(&[&w, &r]);
    for n in [&w, &r, &o] {
        set_writers(n, &["w"]);
    }
    w.write("live/a/cert.pem", "cert from w\n");
    w.write("live/a/chain.pem", "chain from w\n");
    w.write("live/b/cert.pem", "b from w\n");
    for n in [&mut w, &mut r, &mut o] {
        n.start();
    }
    wait("all in sync", || {
        [&w, &r, &o].iter().all(|n| n.all_in_sync())
            && r.read("live/b/cert.pem").is_some()
            && o.read("live/b/cert.pem").is_some()
    });
    let st = status(&r).unwrap();
    assert_eq!(st.node.role, "reader");
    assert_eq!(status(&w).unwrap().node.role, "writer");
    let o_sequence = status(&o).unwrap().tree.sequence;

    // The reader edits, deletes and chmods (a mode made private would be kept: a
    // file private on a node never becomes readable by others through a sync).
    r.write("live/a/cert.pem", "edited on the reader\n");
    fs::remove_file(r.tree.join("live/b/cert.pem")).unwrap();
    fs::set_permissions(
        r.tree.join("live/a/chain.pem"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    // Its tree returns to the writers' version, the edited copy kept locally.
    wait("the reader's tree put back", || {
        r.read("live/a/cert.pem").as_deref() == Some("cert from w\n")
            && r.read("live/b/cert.pem").as_deref() == Some("b from w\n")
            && mode(&r, "live/a/chain.pem") == 0o644
    });
    let kept = r.tree.join(".certmesh/kept");
    assert_eq!(files_holding(&kept, "edited on the reader\n"), 1);
    // Restoring it there would be undone at once: refused, naming where to do it;
    // listing what is kept still works.
    let cfg = r.config.to_str().unwrap();
    let out = crate::util::certmesh(&["restore", "--config", cfg, "live/a/cert.pem"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is a reader") && err.contains("(w)"), "{err}");
    assert_eq!(r.read("live/a/cert.pem").as_deref(), Some("cert from w\n"));
    let out = crate::util::certmesh(&["restore", "--config", cfg, "--list", "live/a/cert.pem"]);
    assert!(out.status.success(), "{out:?}");
    wait("the reader's status says what was not sent", || {
        status(&r).is_some_and(|st| {
            st.tree.not_sent_count >= 3
                && ["live/a/cert.pem", "live/b/cert.pem", "live/a/chain.pem"]
                    .iter()
                    .all(|p| st.tree.not_sent.iter().any(|q| q == p))
        })
    });
    let text = crate::util::certmesh(&["status", "--config", r.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("not sent: this node is not a writer"),
        "{text}"
    );

    // Nothing changed anywhere else; nothing unsigned or foreign was even offered.
    wait("all in sync again", || {
        [&w, &r, &o].iter().all(|n| n.all_in_sync())
    });
    for n in [&w, &o] {
        assert_eq!(n.read("live/a/cert.pem").as_deref(), Some("cert from w\n"));
        assert_eq!(n.read("live/b/cert.pem").as_deref(), Some("b from w\n"));
        assert_eq!(mode(n, "live/a/chain.pem"), 0o644);
        assert_eq!(
            files_holding(&n.tree.join(".certmesh"), "edited on the reader\n"),
            0
        );
        let st = status(n).unwrap();
        assert!(st.peers.iter().all(|p| p.refused.count == 0), "{st:?}");
    }
    assert_eq!(status(&o).unwrap().tree.sequence, o_sequence);

    // The writer still writes.
    w.write("live/a/cert.pem", "renewed by w\n");
    wait("the writer's change on the reader", || {
        r.read("live/a/cert.pem").as_deref() == Some("renewed by w\n")
            && o.read("live/a/cert.pem").as_deref() == Some("renewed by w\n")
    });

    // A file the writers deleted, made again on the reader, goes again (kept).
    fs::remove_file(w.tree.join("live/b/cert.pem")).unwrap();
    wait("the writer's deletion everywhere", || {
        r.read("live/b/cert.pem").is_none() && o.read("live/b/cert.pem").is_none()
    });
    r.write("live/b/cert.pem", "resurrected on the reader\n");
    wait("the reader's resurrected file removed again", || {
        r.read("live/b/cert.pem").is_none()
            && files_holding(&kept, "resurrected on the reader\n") == 1
    });
    wait("all in sync at the end", || {
        [&w, &r, &o].iter().all(|n| n.all_in_sync())
    });
    for n in [&w, &o] {
        assert_eq!(n.read("live/b/cert.pem"), None);
    }
}

/// A writer `w`, a real hub `h`, a third node `t` behind the hub, and a forger `f`
/// (a configured peer of `t`, played with the wire module).
struct Hub {
    _dir: tempfile::TempDir,
    w: Node,
    _h: Node,
    t: Node,
    f: Node,
}

fn hub(ips: [&str; 4]) -> Hub {
    let dir = tmp();
    let mut w = Node::new(dir.path(), "w", ips[0]);
    let mut h = Node::new(dir.path(), "h", ips[1]);
    let mut t = Node::new(dir.path(), "t", ips[2]);
    let f = Node::new(dir.path(), "f", ips[3]);
    w.configure(&[&h]);
    h.configure(&[&w, &t]);
    t.configure(&[&h, &f]);
    set_writers(&w, &["w"]);
    set_writers(&h, &["w"]);
    // `w` is not a peer of `t`: named by its device ID.
    set_writers(&t, &[&w.id]);
    w.write("live/x/cert.pem", "v1\n");
    for n in [&mut w, &mut h, &mut t] {
        n.start();
    }
    wait("v1 relayed to t", || {
        t.read("live/x/cert.pem").as_deref() == Some("v1\n")
    });
    Hub {
        _dir: dir,
        w,
        _h: h,
        t,
        f,
    }
}

/// The forger's session with `target`: what it sends goes through `send`; every
/// record `target` announces is collected.
struct Forger {
    _t: Transport,
    conn: quinn::Connection,
    send: quinn::SendStream,
    seen: Arc<Mutex<Vec<pb::FileInfo>>>,
}

async fn forger(f: &Node, target: &Node) -> Forger {
    let me = Arc::new(Identity::load(&f.state).unwrap());
    let id: DeviceId = target.id.parse().unwrap();
    let allowed = certmesh::net::transport::allow_only([id]);
    let t = Transport::bind(me, f.addr.parse().unwrap(), allowed).unwrap();
    let conn = t.connect(id, target.addr.parse().unwrap()).await.unwrap();
    let mut send = conn.open_uni().await.unwrap();
    let hello = pb::Frame {
        body: Some(pb::frame::Body::Hello(pb::Hello {
            name: "f".into(),
            instance: 1,
            version: "x".into(),
            relays_confirm: false,
            takes_served: false,
            signs_reports: false,
        })),
    };
    wire::write_msg(&mut send, &hello).await.unwrap();
    let mut recv = conn.accept_uni().await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let collect = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(frame)) = wire::read_msg::<_, pb::Frame>(&mut recv, wire::MAX_FRAME).await
        {
            if let Some(pb::frame::Body::Index(ix)) = frame.body {
                collect.lock().unwrap().extend(ix.files);
            }
        }
    });
    Forger {
        _t: t,
        conn,
        send,
        seen,
    }
}

impl Forger {
    /// The record `target` announced for `path` with this content, once it has.
    fn record(&self, path: &str, content: &str) -> pb::FileInfo {
        let hash = blake3::hash(content.as_bytes()).as_bytes().to_vec();
        let mut found = None;
        wait(
            &format!("{path} ({content:?}) announced to the forger"),
            || {
                found = self
                    .seen
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|f| f.path == path && f.hash == hash)
                    .cloned();
                found.is_some()
            },
        );
        found.unwrap()
    }

    async fn announce(&mut self, files: Vec<pb::FileInfo>, last_sequence: u64) {
        let frame = pb::Frame {
            body: Some(pb::frame::Body::Index(pb::IndexUpdate {
                files,
                last_sequence,
                full: last_sequence == 1,
                full_done: last_sequence == 1,
            })),
        };
        wire::write_msg(&mut self.send, &frame).await.unwrap();
    }
}

/// `r` made newer by raising every counter, with new content sent inline: what a
/// relay would send to pass its own change off as the writer's.
fn bumped(mut r: pb::FileInfo, content: &str, sequence: u64) -> pb::FileInfo {
    for c in &mut r.version {
        c.value += 1_000;
    }
    r.hash = blake3::hash(content.as_bytes()).as_bytes().to_vec();
    r.size = content.len() as u64;
    r.data = content.as_bytes().to_vec();
    r.sequence = sequence;
    r
}

/// Waits until `t` shows `n` refused records from `f`, the last at `path`
/// claiming `author`.
fn refused_from(t: &Node, f: &Node, n: u64, path: &str, author: &str) {
    wait("t's status names the forger", || {
        status(t).is_some_and(|st| {
            st.peers.iter().any(|p| {
                p.name == "f"
                    && p.id == f.id
                    && p.refused.count == n
                    && p.refused.last_path.as_deref() == Some(path)
                    && p.refused.last_author.as_deref() == Some(author)
            })
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_forged_in_a_writers_name_is_refused_and_the_writer_still_writes() {
    let s = hub(["127.0.5.11", "127.0.5.12", "127.0.5.13", "127.0.5.14"]);
    let mut f = forger(&s.f, &s.t).await;
    // The writer's genuine record (its signature and certificate, relayed by h).
    let v1 = f.record("live/x/cert.pem", "v1\n");
    assert_eq!(v1.author, s.w.id.parse::<DeviceId>().unwrap().0.to_vec());
    f.announce(vec![bumped(v1, "forged\n", 1)], 1).await;
    refused_from(&s.t, &s.f, 1, "live/x/cert.pem", &s.w.id);
    assert_eq!(s.t.read("live/x/cert.pem").as_deref(), Some("v1\n"));
    let log = s.t.log();
    assert!(
        log.contains(&format!("peer f ({})", s.f.id))
            && log.contains("not taken in for their authorship")
            && log.contains("the signature does not match the record"),
        "{log}"
    );
    // The session with the forger goes on (its honest records would still count).
    assert!(f.conn.close_reason().is_none());

    // The writer's next change goes through the hub.
    s.w.write("live/x/cert.pem", "v2\n");
    wait("v2 on t", || {
        s.t.read("live/x/cert.pem").as_deref() == Some("v2\n")
    });
    let st = status(&s.t).unwrap();
    assert_eq!(st.node.role, "reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_older_record_is_not_taken_as_newer() {
    let s = hub(["127.0.5.21", "127.0.5.22", "127.0.5.23", "127.0.5.24"]);
    let mut f = forger(&s.f, &s.t).await;
    let v1 = f.record("live/x/cert.pem", "v1\n");
    s.w.write("live/x/cert.pem", "v2\n");
    wait("v2 on t", || {
        s.t.read("live/x/cert.pem").as_deref() == Some("v2\n")
    });
    f.record("live/x/cert.pem", "v2\n");
    // The old record as it was signed: genuine, but older than what t has.
    let mut old = v1.clone();
    old.sequence = 1;
    old.data = b"v1\n".to_vec();
    f.announce(vec![old], 1).await;
    // The old record with its version raised past v2's: the signature covers it.
    f.announce(vec![bumped(v1, "v1\n", 2)], 2).await;
    refused_from(&s.t, &s.f, 1, "live/x/cert.pem", &s.w.id);
    assert_eq!(s.t.read("live/x/cert.pem").as_deref(), Some("v2\n"));
    // Nothing pending: t took neither as newer.
    wait("t in sync with nothing needed", || {
        status(&s.t).is_some_and(|st| st.tree.out_of_sync == 0)
    });
    assert_eq!(s.t.read("live/x/cert.pem").as_deref(), Some("v2\n"));
}

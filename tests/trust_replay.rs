//! No replay after tombstone collection (issue 25 item 9). A bad relay, a reader
//! running the real `certmesh`, restores its own state from before a deletion, so it
//! announces the writer's signed pre-deletion record again once every honest node has
//! collected the tombstone; a rebuilt node (fresh state dir, same key) connects to it
//! and to the writer. The deleted file must come back nowhere, while an honest file
//! written long before still reaches the rebuilt node. Real processes on
//! 127.0.45.2–127.0.45.250; `[tree] tombstone_retention` is a few seconds here.

use std::fs;
use std::path::Path;
use std::time::Instant;

use certmesh::ops::status::Status;

use crate::util::{wait_until, Node};

/// The horizon in these tests: short, so collection and renewal happen while they run.
const RETENTION: &str = "3s";
const GONE: &str = "live/gone/cert.pem";
const OLD: &str = "dhparam.pem";

fn status(node: &Node) -> Option<Status> {
    serde_json::from_value(node.status()).ok()
}

/// Writer `w`, bad relay `relay` and `fresh` (to be rebuilt), fully meshed, with
/// `writers = ["w"]` and a short retention.
fn trio(root: &Path) -> [Node; 3] {
    let nodes = [
        Node::new(root, "w", "127.0.45.2"),
        Node::new(root, "relay", "127.0.45.3"),
        Node::new(root, "fresh", "127.0.45.4"),
    ];
    for (i, n) in nodes.iter().enumerate() {
        n.configure(&crate::util::others(&nodes, i));
        n.add_tree_keys(&format!(
            "writers = [\"w\"]\ntombstone_retention = \"{RETENTION}\"\n"
        ));
    }
    nodes
}

/// Copies `from` into `to` (files and dirs; the control socket is skipped).
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if t.is_file() {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Replaces `dir` with a copy of `backup`.
fn restore(backup: &Path, dir: &Path) {
    fs::remove_dir_all(dir).unwrap();
    copy_dir(backup, dir);
}

/// The refusal `by` recorded for records from `from`, once it names `path`.
fn refused_from(by: &Node, from: &Node, path: &str) -> Option<String> {
    let s = status(by)?;
    let p = s.peers.into_iter().find(|p| p.name == from.name)?;
    (p.refused.last_path.as_deref() == Some(path)).then_some(p.refused.last_reason?)
}

/// Runs the scenario up to the replay: both files made and synced, the relay's
/// pre-deletion backup taken, the deletion (and a later change) synced, the writer's
/// tombstone collected; then `fresh` rebuilt (same key, empty state and tree) and the
/// relay restored from its backup, both started. Returns `[w, relay, fresh]`.
fn replayed_to_rebuilt_node(root: &Path) -> [Node; 3] {
    let [mut w, mut relay, mut fresh] = trio(root);
    for n in [&mut w, &mut relay, &mut fresh] {
        n.start();
    }
    w.write(OLD, "honest, written long ago\n");
    w.write(GONE, "deleted later\n");
    let written = Instant::now();
    wait_until("both files everywhere", || {
        [&relay, &fresh]
            .iter()
            .all(|n| n.read(GONE).is_some() && n.read(OLD).is_some())
    });
    relay.stop();
    let backup = root.join("relay-backup");
    copy_dir(&relay.dir, &backup);
    relay.start();
    wait_until("relay back", || relay.all_connected());

    fs::remove_file(w.tree.join(GONE)).unwrap();
    // A later change: the tombstone is not the writer's newest record (never collected).
    w.write("live/later/cert.pem", "later\n");
    wait_until("deletion and later change everywhere", || {
        [&relay, &fresh]
            .iter()
            .all(|n| n.read(GONE).is_none() && n.read("live/later/cert.pem").is_some())
    });
    wait_until("both acknowledged it", || w.all_in_sync());
    // Both peers go (they acknowledged everything): no view from which the writer
    // could take the tombstone back. `fresh` is rebuilt: the same key, nothing else.
    relay.stop();
    fresh.stop();
    wait_until("the writer collected the tombstone", || {
        w.log().contains("collected tombstones")
    });
    for sub in [&fresh.state, &fresh.tree] {
        for e in fs::read_dir(sub).unwrap().flatten() {
            if !e.file_name().to_string_lossy().starts_with("node-") {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
    }
    restore(&backup, &relay.dir);
    relay.start();
    fresh.start();
    assert!(
        written.elapsed().as_secs_f64() > 3.0,
        "the old file is past the horizon"
    );
    [w, relay, fresh]
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-replay-")
        .tempdir()
        .unwrap()
}

#[test]
fn a_relay_cannot_bring_back_a_deleted_file_after_its_tombstone_is_collected() {
    let dir = tmp();
    let [w, relay, fresh] = replayed_to_rebuilt_node(dir.path());
    assert_eq!(relay.read(GONE).as_deref(), Some("deleted later\n"));
    // Either outcome ends the wait: the relay's record refused, or the file back.
    for n in [&fresh, &w] {
        let refusal = || refused_from(n, &relay, GONE);
        wait_until(&format!("{} decides on the replay", n.name), || {
            refusal().is_some() || n.read(GONE).is_some()
        });
        assert_eq!(
            n.read(GONE),
            None,
            "the deleted file came back on {}",
            n.name
        );
        let why = refusal().unwrap();
        assert!(why.contains("replay horizon"), "{why}");
    }
}

#[test]
fn an_honest_file_older_than_the_horizon_still_reaches_a_rebuilt_node() {
    let dir = tmp();
    let [_w, _relay, fresh] = replayed_to_rebuilt_node(dir.path());
    wait_until("the old honest file reaches the rebuilt node", || {
        fresh.read(OLD).as_deref() == Some("honest, written long ago\n")
    });
}

// A departed writer (issue 25 item 9 follow-up): another writer keeps its files
// attested, a reader cannot. Real processes on 127.0.47.2–127.0.47.250.

/// `[tree] writers` (device IDs) and the short retention in `n`'s config.
fn set_writers(n: &Node, writers: &[&Node]) {
    let ids: Vec<String> = writers.iter().map(|w| format!("\"{}\"", w.id)).collect();
    n.add_tree_keys(&format!(
        "writers = [{}]\ntombstone_retention = \"{RETENTION}\"\n",
        ids.join(", ")
    ));
}

/// Author `a` and `keeper`, peers of each other; `c` (not started) knows only
/// `keeper`. `a` writes [`OLD`], `keeper` takes it, `a` stops for good; returns once
/// more than the retention has passed since then, with `c` yet to join.
/// `keeper_is_writer`: whether the others list `keeper` in `[tree] writers` (it
/// lists itself either way).
fn author_gone(root: &Path, keeper_is_writer: bool) -> [Node; 3] {
    let [mut a, mut keeper, c] = [
        Node::new(root, "a", "127.0.47.2"),
        Node::new(root, "keeper", "127.0.47.3"),
        Node::new(root, "c", "127.0.47.4"),
    ];
    a.configure(&[&keeper]);
    keeper.configure(&[&a, &c]);
    c.configure(&[&keeper]);
    // Honest writers: `a`, and `keeper` only if it is one; a reader that lists
    // itself in its own config is what an attacker would run.
    let honest: Vec<&Node> = if keeper_is_writer {
        vec![&a, &keeper]
    } else {
        vec![&a]
    };
    set_writers(&a, &honest);
    set_writers(&c, &honest);
    set_writers(&keeper, &[&a, &keeper]);
    a.start();
    keeper.start();
    a.write(OLD, "written by a departed writer\n");
    wait_until("the keeper has the file", || keeper.read(OLD).is_some());
    a.stop();
    let gone = Instant::now();
    wait_until("more than the retention since the author left", || {
        gone.elapsed().as_secs_f64() > 4.0
    });
    [a, keeper, c]
}

#[test]
fn another_writer_keeps_a_departed_writers_file_reaching_new_nodes() {
    let dir = tmp();
    let [_a, keeper, mut c] = author_gone(dir.path(), true);
    c.start();
    wait_until("the departed writer's file reaches the new node", || {
        c.read(OLD).as_deref() == Some("written by a departed writer\n")
    });
    assert!(keeper.log().contains("renewed attestations"));
}

#[test]
fn a_reader_cannot_keep_a_departed_writers_file_alive_by_attesting_it() {
    let dir = tmp();
    let [_a, keeper, mut c] = author_gone(dir.path(), false);
    c.start();
    let refusal = || refused_from(&c, &keeper, OLD);
    wait_until("the new node decides on the reader's record", || {
        refusal().is_some() || c.read(OLD).is_some()
    });
    assert_eq!(c.read(OLD), None, "a reader kept a stale record alive");
    let why = refusal().unwrap();
    assert!(why.contains("not a writer"), "{why}");
}

//! Small changes first (issue 25 item 3): while one node pushes a few hundred MiB of
//! large files, or 20,000 small ones, to the others, a small change written on a third
//! node (an ACME token, a certificate) reaches every node at once: it never queues
//! behind the bulk, not in the puller's fetch queue, not in the apply units, not on
//! the sender's streams. (Measured: ~0.1 s for both; before the small lane 3.7 s
//! behind the 250 MiB bulk and ~10 s, the whole flood, behind the 20,000 files.)

use std::fs;
use std::time::{Duration, Instant};

use crate::util::{others, wait_until, Node};

/// Files above the small-file bound (64 KiB), enough of them to fill every fetch
/// slot and apply unit: 250 MiB in all.
const BULK_FILES: usize = 2000;
const BULK_SIZE: usize = 128 << 10;
/// An ACME token (urgent, inline with its record) must be everywhere within 2 s, as
/// the issue asks. Measured: 0.03–0.3 s, up to 1.2 s with the machine's load at 6 on
/// 2 cores; before the small lane 3.7 s behind the bulk, ~10 s behind the flood.
const URGENT_DEADLINE: Duration = Duration::from_secs(2);
/// Another small file, fetched from a peer that is also serving the bulk: 0.1–0.3 s
/// measured, up to 1.9 s under that load; asserted within 5 s so the test is not
/// flaky on two busy shared cores.
const SMALL_DEADLINE: Duration = Duration::from_secs(5);

/// Directories of 100 small files in the flood: 20,000 files. The full scale,
/// 110,000, on demand: `CERTMESH_FLOOD_DIRS=1100 cargo test --test main small_first::`.
fn flood_dirs() -> usize {
    std::env::var("CERTMESH_FLOOD_DIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// The two tests here each load the disk with a bulk transfer: one at a time.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn mesh(dir: &std::path::Path) -> Vec<Node> {
    let mut nodes: Vec<Node> = ["bulk", "rx", "small"]
        .iter()
        .zip(["127.0.7.30", "127.0.7.31", "127.0.7.32"])
        .map(|(name, ip)| Node::new(dir, name, ip))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        n.configure(&others(&nodes, i));
    }
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_until("the mesh is connected", || {
        nodes.iter().all(Node::all_connected)
    });
    nodes
}

/// Writes the bulk files outside the tree, then moves them in (one scan sees them
/// whole).
fn write_bulk(dir: &std::path::Path, node: &Node) {
    let staging = dir.join("bulk-staging");
    fs::create_dir_all(&staging).unwrap();
    let data: Vec<u8> = (0..BULK_SIZE).map(|j| (j * 31) as u8).collect();
    for i in 0..BULK_FILES {
        let mut d = data.clone();
        d[..8].copy_from_slice(&(i as u64).to_le_bytes()); // distinct contents
        fs::write(staging.join(format!("{i}.bin")), d).unwrap();
    }
    fs::rename(&staging, node.tree.join("bulk")).unwrap();
}

fn bulk_done(n: &Node) -> bool {
    (0..BULK_FILES).all(|i| {
        fs::metadata(n.tree.join(format!("bulk/{i}.bin")))
            .is_ok_and(|m| m.len() == BULK_SIZE as u64)
    })
}

/// How long until `rel` is on every node of `nodes` with `len` bytes (polled each
/// millisecond), or `None` after `deadline`.
fn arrival(
    nodes: &[&Node],
    rel: &str,
    len: u64,
    started: Instant,
    deadline: Duration,
) -> Option<Duration> {
    while started.elapsed() < deadline {
        if nodes
            .iter()
            .all(|n| fs::metadata(n.tree.join(rel)).is_ok_and(|m| m.len() == len))
        {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

#[test]
fn a_small_change_overtakes_a_bulk_transfer_to_every_node() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let nodes = mesh(dir.path());
    let (bulk, rx, small) = (&nodes[0], &nodes[1], &nodes[2]);
    write_bulk(dir.path(), bulk);
    wait_until("the bulk transfer is under way", || {
        // Content being fetched sits in .certmesh/tmp until its unit is applied.
        fs::read_dir(rx.tree.join(".certmesh/tmp")).is_ok_and(|d| d.count() > 0)
    });
    // A token (travels inline with its record) and a 40 KiB certificate (fetched).
    let started = Instant::now();
    small.write("acme/.well-known/acme-challenge/tok-bulk", "tok-bulk.thumb");
    small.write("certs/big-site.pem", &"c".repeat(40 << 10));
    let token = arrival(
        &[bulk, rx],
        "acme/.well-known/acme-challenge/tok-bulk",
        14,
        started,
        URGENT_DEADLINE,
    );
    let cert = arrival(
        &[bulk, rx],
        "certs/big-site.pem",
        40 << 10,
        started,
        SMALL_DEADLINE,
    );
    let bulk_still_running = !bulk_done(rx);
    eprintln!(
        "during a {} MiB bulk sync: token on every node after {token:?}, 40 KiB file after {cert:?} (bulk still running: {bulk_still_running})",
        (BULK_FILES * BULK_SIZE) >> 20
    );
    assert!(token.is_some(), "the token queued behind the bulk");
    assert!(cert.is_some(), "the 40 KiB file queued behind the bulk");
    assert!(
        bulk_still_running,
        "the bulk finished first: the test proved nothing (make it larger)"
    );
}

#[test]
fn a_token_overtakes_a_flood_of_small_files() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let nodes = mesh(dir.path());
    let (bulk, rx, small) = (&nodes[0], &nodes[1], &nodes[2]);
    let staging = dir.path().join("flood-staging");
    fs::create_dir_all(&staging).unwrap();
    let dirs = flood_dirs();
    for d in 0..dirs {
        let sub = staging.join(format!("d{d:03}"));
        fs::create_dir(&sub).unwrap();
        for i in 0..100 {
            fs::write(sub.join(format!("{i}.pem")), format!("{d}/{i}")).unwrap();
        }
    }
    fs::rename(&staging, bulk.tree.join("flood")).unwrap();
    wait_until("the flood is under way", || {
        fs::read_dir(rx.tree.join("flood")).is_ok_and(|d| d.count() > 0)
    });
    let started = Instant::now();
    small.write(
        "acme/.well-known/acme-challenge/tok-flood",
        "tok-flood.thumb",
    );
    let token = arrival(
        &[bulk, rx],
        "acme/.well-known/acme-challenge/tok-flood",
        15,
        started,
        URGENT_DEADLINE,
    );
    let last = rx.tree.join(format!("flood/d{:03}", dirs - 1));
    let flood_left = fs::read_dir(last).map_or(100, |d| 100 - d.count());
    eprintln!("during a {}-file flood: token on every node after {token:?} ({flood_left} of the last directory's files still missing on rx)", dirs * 100);
    assert!(token.is_some(), "the token queued behind the flood");
}

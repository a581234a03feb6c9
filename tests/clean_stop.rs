//! A clean stop (issue 28 item 4): SIGTERM to a node while it takes in a batch ends
//! the process with status 0, leaves no half file and no staging file behind, and its
//! index on disk matches its tree (the restart finds no local change); after the
//! restart the whole batch arrives.

use std::fs;

use crate::util::{intact, pair, self_checking, snapshot, wait_until, Node};

/// Files in the batch: more than one apply unit takes at once on a busy machine.
const FILES: usize = 300;

/// Content that proves its own integrity: the first line is the BLAKE3 of the rest.
/// The batch, written on `a` file by file (temp file beside the tree, rename), one
/// every millisecond so that `b` takes it in over many apply units.
fn write_batch(a: &Node) -> std::thread::JoinHandle<()> {
    let tree = a.tree.clone();
    fs::create_dir_all(tree.join("batch")).unwrap();
    std::thread::spawn(move || {
        for i in 0..FILES {
            let tmp = tree.with_file_name(format!("w{i}.tmp"));
            fs::write(&tmp, self_checking(i as u64, 3000)).unwrap();
            fs::rename(&tmp, tree.join(format!("batch/f{i:03}.pem"))).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    })
}

#[test]
fn sigterm_mid_batch_leaves_whole_files_and_a_matching_index() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(dir.path(), ["127.0.46.2", "127.0.46.3"]);
    let writer = write_batch(&a);
    let first = b.tree.join("batch/f000.pem");
    wait_until("the batch reaching b", || first.exists());
    b.stop(); // SIGTERM; asserts exit status 0
    let held: Vec<String> = snapshot(&b.tree)
        .into_iter()
        .filter(|(p, (kind, content, _))| {
            assert!(
                *kind != 'f' || p.starts_with(".certmesh") || intact(content),
                "{p} is half written"
            );
            p.starts_with("batch/f")
        })
        .map(|(p, _)| p)
        .collect();
    let staging: Vec<_> = fs::read_dir(b.tree.join(".certmesh/tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        staging.is_empty(),
        "staging files left after a clean stop: {staging:?}"
    );
    writer.join().unwrap();
    let log_before = b.log().len();
    b.start();
    wait_until("the whole batch on b", || {
        (0..FILES)
            .all(|i| fs::read(b.tree.join(format!("batch/f{i:03}.pem"))).is_ok_and(|c| intact(&c)))
    });
    let restart_log = b.log()[log_before..].to_string();
    assert!(
        !restart_log.contains("local changes"),
        "b held {} files at the stop, but its index did not match them on restart:\n{restart_log}",
        held.len()
    );
}

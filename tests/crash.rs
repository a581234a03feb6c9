//! `kill -9` of a receiving node at arbitrary moments while updates stream in: after
//! each kill no file under its final name is partial, no staging file survives the
//! restart, and the node converges.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::util::{intact, self_checking, snapshot, Cluster};

#[test]
fn kill_9_during_updates_never_leaves_partial_files() {
    let iterations: u64 = std::env::var("CERTMESH_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut c = Cluster::new(2, None);
    c.start_all();
    let writer_tree = c.nodes[0].tree.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seed += 1;
                // Small cert-like files, and now and then a large one.
                let (name, len) = if seed % 10 == 0 {
                    (format!("big{}.bin", seed % 3), 4 << 20)
                } else {
                    (format!("certs/c{}.pem", seed % 20), 3000)
                };
                let p = writer_tree.join(&name);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                let tmp = writer_tree.with_file_name(format!("w{seed}.tmp"));
                fs::write(&tmp, self_checking(seed, len)).unwrap();
                fs::rename(&tmp, &p).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let check = |tree: &std::path::Path, when: &str| {
        for (path, (kind, content, _)) in snapshot(tree) {
            if kind == 'f' && !path.starts_with(".certmesh") {
                assert!(
                    intact(&content),
                    "{when}: {path} is partial ({} bytes)",
                    content.len()
                );
            }
        }
    };
    for i in 0..iterations {
        // Let some updates land, then kill at a pseudo-random moment.
        std::thread::sleep(Duration::from_millis(150 + (i * 97) % 400));
        c.nodes[1].kill9();
        check(&c.nodes[1].tree, &format!("after kill {i}"));
        // What the killed process was staging; the restarted one may already stage
        // new fetches under other names by the time its control socket answers.
        let staging = |tree: &std::path::Path| -> Vec<std::ffi::OsString> {
            fs::read_dir(tree.join(".certmesh/tmp"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default()
        };
        let before = staging(&c.nodes[1].tree);
        c.nodes[1].start();
        let survived: Vec<_> = staging(&c.nodes[1].tree)
            .into_iter()
            .filter(|n| before.contains(n))
            .collect();
        assert!(
            survived.is_empty(),
            "staging files survived restart {i}: {survived:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    c.wait_converged();
    check(&c.nodes[1].tree, "at the end");
    assert!(!c.nodes[1].log().contains("panicked"));
}

//! One node cannot flush what it destroyed nor fill the fleet (issues 24 and 25):
//! kept versions of other nodes' work survive a junk flood past the kept budget, and
//! the tree budgets refuse a bad node's new paths while the sessions stay up. Real
//! processes on 127.0.3.2–127.0.3.250.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::util::{certmesh, wait_until, Node};

/// Three nodes in a full mesh, `writer`, `good` and `bad`, with `tree_keys` added to
/// each node's `[tree]`.
fn trio(root: &Path, ips: [&str; 3], tree_keys: &str) -> Vec<Node> {
    let nodes: Vec<Node> = ["writer", "good", "bad"]
        .iter()
        .zip(ips)
        .map(|(n, ip)| Node::new(root, n, ip))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        n.configure(&crate::util::others(&nodes, i));
        n.add_tree_keys(tree_keys);
    }
    nodes
}

fn start(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in nodes.iter() {
        wait_until(&format!("{} connected", n.name), || n.all_connected());
    }
}

/// `certmesh restore --list --json`: path → versions kept.
fn kept(n: &Node) -> BTreeMap<String, u64> {
    let out = certmesh(&[
        "restore",
        "--config",
        n.config.to_str().unwrap(),
        "--list",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_string(),
                p["kept"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The bad node writes `paths` junk files of `size` bytes and replaces each of them
/// `rounds` times, each write reaching `others` before the next: every replacement
/// leaves a kept version there.
fn flood(bad: &Node, others: &[&Node], paths: usize, rounds: usize, size: usize) {
    for round in 0..=rounds {
        for i in 0..paths {
            let rel = format!("junk/{i}.bin");
            let data = format!("{round}-{i}-").repeat(size / 4)[..size].to_string();
            bad.write_atomic(&rel, &data);
            for o in others {
                wait_until(&format!("{rel} round {round} on {}", o.name), || {
                    o.read(&rel).as_deref() == Some(data.as_str())
                });
            }
        }
    }
}

#[test]
fn a_junk_flood_past_the_kept_budget_never_flushes_what_another_node_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.3.2", "127.0.3.3", "127.0.3.4"];
    let mut nodes = trio(dir.path(), ips, "kept_max_size = \"1MiB\"\n");
    start(&mut nodes);
    let (writer, good, bad) = (&nodes[0], &nodes[1], &nodes[2]);
    writer.write_atomic("custom/site.pem", "THE WRITER'S HAND-PLACED CERTIFICATE");
    writer.write_atomic("dhparam.pem", "THE WRITER'S DH PARAMETERS");
    for n in [good, bad] {
        wait_until(&format!("files on {}", n.name), || {
            n.read("dhparam.pem").is_some() && n.read("custom/site.pem").is_some()
        });
    }

    // The bad node deletes them, then floods: 4 × 4 versions of 200 KiB kept on each
    // other node, 3.2 MB against a 1 MiB budget.
    fs::remove_file(bad.tree.join("custom/site.pem")).unwrap();
    fs::remove_file(bad.tree.join("dhparam.pem")).unwrap();
    for n in [writer, good] {
        wait_until(&format!("deletion on {}", n.name), || {
            n.read("dhparam.pem").is_none() && n.read("custom/site.pem").is_none()
        });
    }
    flood(bad, &[writer, good], 4, 4, 200 << 10);

    for n in [writer, good] {
        let k = kept(n);
        let junk: u64 = k
            .iter()
            .filter(|(p, _)| p.starts_with("junk/"))
            .map(|(_, v)| v)
            .sum();
        assert!(
            junk < 16,
            "{}: the budget evicted nothing ({junk} junk versions)",
            n.name
        );
        assert_eq!(k.get("custom/site.pem"), Some(&1), "{}: {k:?}", n.name);
        assert_eq!(k.get("dhparam.pem"), Some(&1), "{}: {k:?}", n.name);
    }
    for n in &mut nodes {
        n.stop();
    }
}

#[test]
fn after_a_mass_deletion_and_a_flood_repair_brings_the_certificate_back_unchanged() {
    use crate::trust_keep::{has_bundle, place_bundle, FILES};
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.3.5", "127.0.3.6", "127.0.3.7"];
    let mut nodes = trio(dir.path(), ips, "kept_max_size = \"1MiB\"\n");
    let bundle = place_bundle(&nodes[0].tree);
    start(&mut nodes);
    // Whole, directories too: a directory record applied after the deletion below
    // would bring its (empty) directory back, and the deletion would not reach it.
    for n in &nodes[1..] {
        wait_until(&format!("bundle on {}", n.name), || {
            has_bundle(n, &bundle) && n.status()["tree"]["out_of_sync"] == 0
        });
    }

    // The bad node deletes every certificate, then floods past the kept budget.
    fs::remove_dir_all(nodes[2].tree.join("live")).unwrap();
    fs::remove_dir_all(nodes[2].tree.join("archive")).unwrap();
    for n in &nodes[..2] {
        wait_until(&format!("deletion on {}", n.name), || {
            !n.tree.join("archive").exists()
        });
    }
    flood(&nodes[2], &[&nodes[0], &nodes[1]], 4, 4, 200 << 10);
    for n in &nodes[..2] {
        let k = kept(n);
        for f in FILES {
            assert_eq!(
                k.get(&format!("archive/www/1/{f}")),
                Some(&1),
                "{}: {k:?}",
                n.name
            );
        }
    }

    // The kept versions are now the only copy: `good` lists the certificate and
    // restarts; its repair puts back the same bytes (no order: no `[acme]` at all).
    nodes[2].stop();
    nodes[1].stop();
    let mut cfg = fs::read_to_string(&nodes[1].config).unwrap();
    cfg.push_str("\n[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\n");
    fs::write(&nodes[1].config, cfg).unwrap();
    nodes[1].start();
    for n in &nodes[..2] {
        wait_until(&format!("bundle back on {}", n.name), || {
            has_bundle(n, &bundle)
        });
    }
    let repairs = nodes[1].status()["repairs"].clone();
    assert_eq!(repairs[0]["from_version"], 1, "{repairs}");
    for n in &mut nodes {
        n.stop();
    }
}

/// `status --json` `tree.refused` of `n`: (path, reason, peer).
fn refusals(n: &Node) -> Vec<(String, String, String)> {
    let s = n.status();
    s["tree"]["refused"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                    (f("path"), f("reason"), f("peer"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `n` lists a path under `junk/` refused for `reason`, sent by `bad`.
fn wait_refused(n: &Node, reason: &str) {
    wait_until(&format!("{} refuses junk for {reason}", n.name), || {
        refusals(n)
            .iter()
            .any(|(p, r, peer)| p.starts_with("junk/") && r == reason && peer == "bad")
    });
}

/// Bytes of each file under `junk/` on `n`.
fn junk(n: &Node) -> Vec<u64> {
    fs::read_dir(n.tree.join("junk"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .collect()
        })
        .unwrap_or_default()
}

/// The bad node's peer entry for `name` says in sync: everything acknowledged,
/// the refused paths too.
fn acked_by(bad: &Node, name: &str) -> bool {
    bad.status()["peers"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["in_sync"] == true))
}

#[test]
fn max_files_refuses_a_bad_nodes_new_paths_and_keeps_what_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.3.8", "127.0.3.9", "127.0.3.10"];
    let mut nodes = trio(dir.path(), ips, "max_files = 20\n");
    start(&mut nodes);
    let (writer, good, bad) = (&nodes[0], &nodes[1], &nodes[2]);
    writer.write_atomic("held.pem", "HELD");
    wait_until("held.pem on good", || good.read("held.pem").is_some());

    for i in 0..40 {
        bad.write_atomic(&format!("junk/{i}.pem"), "junk");
    }
    wait_refused(good, "max_files");
    wait_until("good acknowledged the refused paths", || {
        acked_by(bad, "good")
    });
    assert!(good.status()["tree"]["files"].as_u64().unwrap() <= 20);
    assert!(junk(good).len() < 40);
    // Nothing held is removed, and changes to held paths still arrive.
    writer.write_atomic("held.pem", "HELD v2");
    wait_until("held.pem v2 on good", || {
        good.read("held.pem").as_deref() == Some("HELD v2")
    });
    assert!(nodes[1].all_connected());
    for n in &mut nodes {
        n.stop();
    }
}

#[test]
fn max_size_refuses_what_would_grow_the_tree_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.3.11", "127.0.3.12", "127.0.3.13"];
    let mut nodes = trio(dir.path(), ips, "max_size = \"1MiB\"\n");
    start(&mut nodes);
    let (good, bad) = (&nodes[1], &nodes[2]);
    for i in 0..4 {
        bad.write_atomic(&format!("junk/{i}.bin"), &"x".repeat(300 << 10));
    }
    wait_refused(good, "max_size");
    wait_until("good acknowledged the refused paths", || {
        acked_by(bad, "good")
    });
    let held: u64 = junk(good).iter().sum();
    assert!(held <= 1 << 20, "good holds {held} bytes of junk");
    assert!(nodes[0].all_connected() && nodes[1].all_connected());
    for n in &mut nodes {
        n.stop();
    }
}

/// Mounts a tmpfs of `size` on `dir` until dropped (`None`: not root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "certmesh-budget",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn min_disk_free_refuses_a_fetch_that_would_leave_less() {
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.3.14", "127.0.3.15", "127.0.3.16"];
    let mut nodes = trio(dir.path(), ips, "");
    nodes[1].add_tree_keys("min_disk_free = \"6MiB\"\n");
    let Some(_disk) = Tmpfs::mount(&nodes[1].tree, "10m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    start(&mut nodes);
    let (good, bad) = (&nodes[1], &nodes[2]);
    for i in 0..5 {
        bad.write_atomic(&format!("junk/{i}.bin"), &"x".repeat(1 << 20));
    }
    wait_refused(good, "min_disk_free");
    wait_until("good acknowledged the refused paths", || {
        acked_by(bad, "good")
    });
    let free = certmesh::disk::safe_fs::disk_space(&good.tree)
        .unwrap()
        .free;
    assert!(free >= 6 << 20, "{free} bytes left free");
    assert!(junk(good).len() < 5);
    assert!(nodes[1].all_connected());
    for n in &mut nodes {
        n.stop();
    }
}

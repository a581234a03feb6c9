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
        add_tree_keys(n, tree_keys);
    }
    nodes
}

fn add_tree_keys(n: &Node, keys: &str) {
    let cfg = fs::read_to_string(&n.config).unwrap();
    fs::write(
        &n.config,
        cfg.replacen("[tree]\n", &format!("[tree]\n{keys}"), 1),
    )
    .unwrap();
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
    for n in &nodes[1..] {
        wait_until(&format!("bundle on {}", n.name), || has_bundle(n, &bundle));
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

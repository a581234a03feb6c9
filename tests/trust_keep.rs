//! Nothing lost for good: a peer's change that deletes or replaces files leaves kept
//! versions on every other node, configured certificates come back by themselves, and
//! `certmesh restore` brings back anything else. Real processes on 127.0.0.70–79.

use std::fs;
use std::path::Path;

use crate::util::{certmesh, wait_until, Node};

pub const FILES: [&str; 5] = [
    "cert.pem",
    "chain.pem",
    "fullchain.pem",
    "privkey.pem",
    "combined.pem",
];

/// Three nodes in a full mesh; the first two list certificate `www` in their config
/// (no `[acme]`: they never order), the third is the bad one.
fn mesh(root: &Path) -> Vec<Node> {
    mesh_on(root, ["127.0.0.70", "127.0.0.71", "127.0.0.72"])
}

/// [`mesh`] on the given addresses.
pub fn mesh_on(root: &Path, ips: [&str; 3]) -> Vec<Node> {
    let names = ["good1", "good2", "bad"];
    let nodes: Vec<Node> = names
        .iter()
        .zip(ips)
        .map(|(n, ip)| Node::new(root, n, ip))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        n.configure(&crate::util::others(&nodes, i));
        if n.name.starts_with("good") {
            let mut cfg = fs::read_to_string(&n.config).unwrap();
            cfg.push_str("\n[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\n");
            fs::write(&n.config, cfg).unwrap();
        }
    }
    nodes
}

/// A bundle in the certbot layout, as publish writes it: `archive/www/1/` + `live/www`.
pub fn place_bundle(tree: &Path) -> Vec<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["www.example.com".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (cert.pem(), key.serialize_pem());
    let contents = [
        c.clone(),
        String::new(),
        c.clone(),
        k.clone(),
        format!("{c}{k}"),
    ];
    let dir = tree.join("archive/www/1");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(tree.join("live")).unwrap();
    let mut out = Vec::new();
    for (f, data) in FILES.iter().zip(contents) {
        fs::write(dir.join(f), &data).unwrap();
        out.push((f.to_string(), data.into_bytes()));
    }
    std::os::unix::fs::symlink("../archive/www/1", tree.join("live/www")).unwrap();
    out
}

pub fn has_bundle(n: &Node, want: &[(String, Vec<u8>)]) -> bool {
    want.iter()
        .all(|(f, data)| fs::read(n.tree.join("live/www").join(f)).ok().as_ref() == Some(data))
}

fn start(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in nodes.iter() {
        wait_until(&format!("{} connected", n.name), || n.all_connected());
    }
}

#[test]
fn deleted_certificate_comes_back_from_kept_versions_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = mesh(dir.path());
    let bundle = place_bundle(&nodes[0].tree);
    start(&mut nodes);
    for n in &nodes {
        wait_until(&format!("bundle on {}", n.name), || has_bundle(n, &bundle));
    }

    // The bad node (or a mistake on it) removes every certificate.
    fs::remove_dir_all(nodes[2].tree.join("live")).unwrap();
    fs::remove_dir_all(nodes[2].tree.join("archive")).unwrap();
    wait_until(
        "the deletion reached a healthy node, or was repaired",
        || {
            nodes[..2].iter().any(|n| {
                !n.status()["repairs"]
                    .as_array()
                    .is_none_or(|r| r.is_empty())
            })
        },
    );

    // Put back, the same bytes, everywhere: the repair replicated to the bad node too.
    for n in &nodes {
        wait_until(&format!("bundle back on {}", n.name), || {
            has_bundle(n, &bundle)
        });
    }
    let repairs: Vec<serde_json::Value> = nodes[..2]
        .iter()
        .flat_map(|n| {
            n.status()["repairs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert!(!repairs.is_empty());
    for r in &repairs {
        assert_eq!(r["certificate"], "www", "{r}");
        assert_eq!(r["caused_by"], "bad", "{r}");
        assert_eq!(r["from_version"], 1, "{r}");
        assert!(r["at"].as_str().is_some_and(|a| !a.is_empty()), "{r}");
    }
    for n in &mut nodes {
        n.stop();
    }
}

#[test]
fn a_replaced_file_is_listed_and_restored_by_hand_and_replicates() {
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.0.73", "127.0.0.74"];
    let mut nodes: Vec<Node> = ["lb0", "lb1"]
        .iter()
        .zip(ips)
        .map(|(n, ip)| Node::new(dir.path(), n, ip))
        .collect();
    nodes[0].configure(&[&nodes[1]]);
    nodes[1].configure(&[&nodes[0]]);
    start(&mut nodes);
    let (a, b) = (&nodes[0], &nodes[1]);
    a.write("dhparam.pem", "GOOD DH PARAMS");
    wait_until("dhparam on lb1", || {
        b.read("dhparam.pem").as_deref() == Some("GOOD DH PARAMS")
    });
    // The peer overwrites it: lb0 keeps the old version.
    b.write("dhparam.pem", "garbage from lb1");
    wait_until("overwrite reached lb0", || {
        a.read("dhparam.pem").as_deref() == Some("garbage from lb1")
    });
    let cfg = a.config.to_str().unwrap();

    let all = certmesh(&["restore", "--config", cfg, "--list"]);
    assert!(all.status.success(), "{all:?}");
    assert!(String::from_utf8_lossy(&all.stdout).contains("dhparam.pem"));
    let list = certmesh(&["restore", "--config", cfg, "--list", "dhparam.pem"]);
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{list:?}");
    assert!(out.contains("replaced by lb1"), "{out}");
    assert!(
        out.lines().nth(1).is_some_and(|l| l.starts_with("1 ")),
        "{out}"
    );

    let none = certmesh(&["restore", "--config", cfg, "never-kept.pem"]);
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    assert!(String::from_utf8_lossy(&none.stderr).contains("no kept version"));
    let far = certmesh(&["restore", "--config", cfg, "dhparam.pem", "--version", "9"]);
    assert_eq!(far.status.code(), Some(2), "{far:?}");

    // fs::write is not atomic: lb1 may have sent the empty file first, and lb0 then
    // kept that too. Restore the version with the good content's size.
    let good = "GOOD DH PARAMS".len().to_string();
    let n = out
        .lines()
        .skip(1)
        .find(|l| l.split_whitespace().nth(2) == Some(good.as_str()))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no kept version of {good} bytes: {out}"))
        .to_string();
    let ok = certmesh(&["restore", "--config", cfg, "dhparam.pem", "--version", &n]);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(a.read("dhparam.pem").as_deref(), Some("GOOD DH PARAMS"));
    wait_until("restored version on lb1", || {
        b.read("dhparam.pem").as_deref() == Some("GOOD DH PARAMS")
    });
    for n in &mut nodes {
        n.stop();
    }
}

#[test]
fn a_key_that_does_not_match_is_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = mesh_on(dir.path(), ["127.0.0.75", "127.0.0.76", "127.0.0.77"]);
    let bundle = place_bundle(&nodes[0].tree);
    start(&mut nodes);
    for n in &nodes {
        wait_until(&format!("bundle on {}", n.name), || has_bundle(n, &bundle));
    }
    // It swaps in another key: nginx would refuse the pair everywhere.
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    nodes[2].write("archive/www/1/privkey.pem", &other);
    wait_until("a healthy node repaired the key", || {
        nodes[..2].iter().any(|n| {
            !n.status()["repairs"]
                .as_array()
                .is_none_or(|r| r.is_empty())
        })
    });
    for n in &nodes {
        wait_until(&format!("matching key back on {}", n.name), || {
            has_bundle(n, &bundle)
        });
    }
    for n in &mut nodes {
        n.stop();
    }
}

//! The truth is the served leaf (issue 24 item 1): a bad node running the real
//! `certmesh` forges files of the live bundle in its own tree; the other nodes report
//! the expiry of the leaf `fullchain.pem` serves, name the damage and its author, and
//! put the bundle back. Real processes on 127.0.5.2–9.

use std::fs;
use std::path::Path;

use crate::util::{wait_until, Node};

/// A CA and a leaf for www.example.com signed by it, valid until `year`.
struct Issued {
    leaf: String,
    chain: String,
    key: String,
}

/// A CA: the issuer and its certificate's PEM.
fn ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "certmesh served-leaf test CA");
    let pem = p.self_signed(&key).unwrap().pem();
    (rcgen::Issuer::new(p, key), pem)
}

fn issue(ca: &rcgen::Issuer<'static, rcgen::KeyPair>, ca_pem: &str, year: i32) -> Issued {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["www.example.com".to_string()]).unwrap();
    p.not_after = rcgen::date_time_ymd(year, 1, 1);
    Issued {
        leaf: p.signed_by(&key, ca).unwrap().pem(),
        chain: ca_pem.to_string(),
        key: key.serialize_pem(),
    }
}

/// A CA-signed bundle expiring on 2031-01-01, as publish lays it out.
fn place(tree: &Path) -> Issued {
    let (ca, ca_pem) = ca();
    let b = issue(&ca, &ca_pem, 2031);
    let dir = tree.join("archive/www/1");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(tree.join("live")).unwrap();
    for (f, data) in [
        ("cert.pem", b.leaf.clone()),
        ("chain.pem", b.chain.clone()),
        ("fullchain.pem", format!("{}{}", b.leaf, b.chain)),
        ("privkey.pem", b.key.clone()),
        ("combined.pem", format!("{}{}{}", b.leaf, b.chain, b.key)),
    ] {
        fs::write(dir.join(f), data).unwrap();
    }
    std::os::unix::fs::symlink("../archive/www/1", tree.join("live/www")).unwrap();
    b
}

fn started(root: &Path, ips: [&str; 3]) -> (Vec<Node>, Issued) {
    let mut nodes = crate::trust_keep::mesh_on(root, ips);
    let b = place(&nodes[0].tree);
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in &nodes {
        wait_until(&format!("bundle on {}", n.name), || {
            n.read("live/www/cert.pem").as_deref() == Some(b.leaf.as_str())
        });
    }
    (nodes, b)
}

/// 2031-01-01T00:00:00Z, the expiry of the real leaf.
const REAL_NOT_AFTER: i64 = 1_924_992_000;

fn not_after(n: &Node) -> Option<i64> {
    n.status()["certificates"][0]["not_after_unix"].as_i64()
}

#[test]
fn a_forged_cert_pem_changes_no_reported_expiry_and_is_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, real) = started(dir.path(), ["127.0.5.2", "127.0.5.3", "127.0.5.4"]);
    for n in &nodes[..2] {
        assert_eq!(not_after(n), Some(REAL_NOT_AFTER));
    }

    // The bad node puts a self-signed leaf valid until 2098 in place of cert.pem.
    let mut p = rcgen::CertificateParams::new(vec!["www.example.com".to_string()]).unwrap();
    p.not_after = rcgen::date_time_ymd(2098, 1, 1);
    let forged = p
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    nodes[2].write_atomic("archive/www/1/cert.pem", &forged);

    // Repaired from the kept version on every node, and named in the repairs.
    for n in &nodes {
        wait_until(&format!("cert.pem put back on {}", n.name), || {
            n.read("live/www/cert.pem").as_deref() == Some(real.leaf.as_str())
        });
    }
    for n in &nodes[..2] {
        assert_eq!(not_after(n), Some(REAL_NOT_AFTER), "{}", n.name);
    }
    let repaired = nodes[..2].iter().flat_map(|n| {
        n.status()["repairs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    });
    let reasons: Vec<String> = repaired.map(|r| r["reason"].to_string()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("cert.pem is not the leaf")),
        "{reasons:?}"
    );
    for n in &mut nodes {
        n.stop();
    }
}

#[test]
fn a_forged_leaf_in_front_of_the_real_chain_is_damage_and_is_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, real) = started(dir.path(), ["127.0.5.5", "127.0.5.6", "127.0.5.7"]);

    // A whole consistent forgery of the leaf (cert, key, fullchain, combined) in front
    // of the real chain: only the chain's signature tells.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["www.example.com".to_string()]).unwrap();
    p.not_after = rcgen::date_time_ymd(2098, 1, 1);
    let leaf = p.self_signed(&key).unwrap().pem();
    let k = key.serialize_pem();
    let bad = &nodes[2];
    bad.write_atomic("archive/www/1/privkey.pem", &k);
    bad.write_atomic("archive/www/1/cert.pem", &leaf);
    bad.write_atomic(
        "archive/www/1/combined.pem",
        &format!("{leaf}{}{k}", real.chain),
    );
    bad.write_atomic(
        "archive/www/1/fullchain.pem",
        &format!("{leaf}{}", real.chain),
    );

    for n in &nodes {
        wait_until(&format!("bundle put back on {}", n.name), || {
            n.read("live/www/fullchain.pem").as_deref()
                == Some(format!("{}{}", real.leaf, real.chain).as_str())
                && n.read("live/www/privkey.pem").as_deref() == Some(real.key.as_str())
        });
    }
    for n in &nodes[..2] {
        assert_eq!(not_after(n), Some(REAL_NOT_AFTER), "{}", n.name);
        let st = n.status();
        assert!(st["certificates"][0]["bundle_error"].is_null(), "{st}");
        assert!(st["certificates"][0]["runway_s"].as_i64().is_some(), "{st}");
    }
    for n in &mut nodes {
        n.stop();
    }
}

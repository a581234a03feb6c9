//! Issue 29 item 3: many certificates. `status` summarises above 20 and shows one
//! in full with `--cert`. Real processes on 127.0.43.2–127.0.43.250.

use std::fs;

use crate::util::{certmesh, wait_until, Node};

/// One node with `n` configured certificates `c0`… (no `[acme]`: none is live)
/// and `extra` appended to its config.
fn node_with_certs(dir: &std::path::Path, ip: &str, n: usize, extra: &str) -> Node {
    let mut node = Node::new(dir, "solo", ip);
    node.configure(&[]);
    let mut cfg = fs::read_to_string(&node.config).unwrap();
    cfg.push_str(extra);
    for i in 0..n {
        cfg.push_str(&format!(
            "\n[[certificate]]\nname = \"c{i}\"\ndomains = [\"c{i}.example.com\"]\n"
        ));
    }
    fs::write(&node.config, cfg).unwrap();
    node.start();
    wait_until("status answers", || {
        node.status()["certificates"].as_array().map(Vec::len) == Some(n)
    });
    node
}

/// `certmesh status` with `args`: exit success and stdout + stderr.
fn status_text(node: &Node, args: &[&str]) -> (bool, String) {
    let mut all = vec!["status", "--config", node.config.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = certmesh(&all);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn status_summarises_many_certificates_and_shows_one_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_certs(dir.path(), "127.0.43.2", 25, "");
    let (ok, summary) = status_text(&node, &[]);
    assert!(ok, "{summary}");
    assert!(
        summary.contains("CERTIFICATES 25 (0 from the tree, 25 from the config)"),
        "{summary}"
    );
    assert!(summary.contains("0 live, 25 missing"), "{summary}");
    assert!(!summary.contains("c24.example.com"), "{summary}");
    // The daemon sent them summed up, not every one.
    let sent = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(certmesh::ops::control::status(
            &node.state.join("control.sock"),
            None,
            true,
        ))
        .unwrap();
    assert!(sent.certificates.is_empty(), "{:?}", sent.certificates);
    let summed = sent.cert_summary.expect("summed up");
    assert_eq!(
        (summed.total, summed.missing, summed.soonest.len()),
        (25, 25, 5)
    );
    let (ok, one) = status_text(&node, &["--cert", "c24"]);
    assert!(ok && one.contains("domains       c24.example.com"), "{one}");
    let (ok, all) = status_text(&node, &["--all"]);
    assert!(
        ok && all.contains("c24.example.com") && all.contains("c0.example.com"),
        "{all}"
    );
    let (ok, unknown) = status_text(&node, &["--cert", "nope"]);
    assert!(
        !ok && unknown.contains("no certificate \"nope\""),
        "{unknown}"
    );
}

#[test]
fn metrics_without_per_certificate_series_keep_the_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.43.3:{}", crate::util::free_tcp("127.0.43.3"));
    let extra = format!("\n[metrics]\nlisten = \"{listen}\"\nper_certificate = false\n");
    let _node = node_with_certs(dir.path(), "127.0.43.3", 25, &extra);
    let text = crate::metrics::scrape(&listen);
    let (ok, said) = crate::metrics::promtool(&text);
    assert!(ok, "promtool: {said}\n{text}");
    assert!(!text.contains("cert=\""), "{text}");
    assert_eq!(
        crate::metrics::sample(&text, "certmesh_certificates{state=\"missing\"}"),
        Some(25.0),
        "{text}"
    );
    assert_eq!(
        crate::metrics::sample(&text, "certmesh_acme_orders_total"),
        Some(0.0),
        "{text}"
    );
}

/// Version numbers under `archive/www/` on `node`.
fn archived(node: &Node) -> Vec<u32> {
    let mut v: Vec<u32> = fs::read_dir(node.tree.join("archive/www"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

/// Issue 29 item 3: five issuances with `[acme] keep_versions = 2` leave the last
/// two versions under `archive/www/` on both nodes (the renewer prunes, the
/// deletions replicate); the live one is among them.
#[test]
fn old_archive_versions_are_pruned_on_every_node() {
    use crate::acme::{enable_acme_with, live_version, nginx, tools_present, wait_version};
    use crate::acme::{Pebble, DOMAIN};
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ip_a, ip_b) = ("127.0.43.10", "127.0.43.11");
    let mut a = Node::new(dir.path(), "renewer", ip_a);
    let mut b = Node::new(dir.path(), "peer", ip_b);
    a.configure(&[&b]);
    b.configure(&[&a]);
    let pebble = Pebble::start_on(
        &dir.path().join("pebble"),
        ip_a,
        crate::util::free_tcp(ip_a),
        false,
    );
    pebble.set_a(DOMAIN, ip_a);
    fs::create_dir_all(a.tree.join("acme")).unwrap();
    let _web = nginx(dir.path(), ip_a, pebble.http_port, &a.tree);
    enable_acme_with(&a, &pebble, "keep_versions = 2\n");
    a.start();
    b.start();
    wait_version(&[&a, &b], 1, "the first certificate");
    for v in 2..=5 {
        let out = certmesh(&["issue", "--config", a.config.to_str().unwrap(), "www"]);
        assert!(out.status.success(), "issue: {out:?}\n{}", a.log());
        wait_version(&[&a, &b], v, "a new version");
    }
    for n in [&a, &b] {
        wait_until("only the last two versions kept", || archived(n) == [4, 5]);
        assert_eq!(live_version(n), Some(5), "{}", n.name);
        assert!(n.tree.join("live/www/privkey.pem").exists(), "{}", n.name);
    }
}

#[test]
fn keep_versions_below_two_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::new(dir.path(), "solo", "127.0.43.12");
    node.configure(&[]);
    let mut cfg = fs::read_to_string(&node.config).unwrap();
    cfg.push_str("\n[acme]\ndirectory = \"https://ca.example/dir\"\nkeep_versions = 1\n");
    fs::write(&node.config, cfg).unwrap();
    let out = certmesh(&["check", "--config", node.config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("acme.keep_versions") && err.contains("1 is not between 2 and 1000"),
        "{err}"
    );
}

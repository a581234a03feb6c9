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

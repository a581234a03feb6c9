//! The Prometheus endpoint against a real daemon: `promtool check metrics` accepts it,
//! the names docs/monitoring.md lists are the names served, and the event counters move
//! with real sync traffic. Real processes on 127.0.3.1–127.0.3.60.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use crate::util::{wait_until, Node};

/// `GET /metrics` on `addr`: the body of a 200 answer.
pub(crate) fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (name and labels exactly as served).
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Family names announced with `# TYPE`.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// `promtool check metrics` on `text`: its exit status and what it said.
pub(crate) fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// Metric names in docs/monitoring.md's Prometheus table (first column).
fn readme_names() -> BTreeSet<String> {
    let readme = include_str!("../docs/monitoring.md");
    let table = readme
        .split_once("| metric | labels | meaning |")
        .expect("the metric table in docs/monitoring.md")
        .1;
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .flat_map(|l| l.split('|').nth(1).unwrap_or("").split('`'))
        .filter(|w| w.starts_with("certmesh_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// Two nodes; `a` serves metrics on 127.0.3.1 and has a configured certificate.
fn pair(dir: &std::path::Path) -> (Node, Node, String) {
    let mut a = Node::new(dir, "met-a", "127.0.3.1");
    let mut b = Node::new(dir, "met-b", "127.0.3.2");
    a.configure(&[&b]);
    b.configure(&[&a]);
    let listen = std::net::TcpListener::bind("127.0.3.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut cfg = fs::read_to_string(&a.config).unwrap();
    cfg.push_str(&format!(
        "\n[metrics]\nlisten = \"{listen}\"\n\n[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\n"
    ));
    fs::write(&a.config, cfg).unwrap();
    a.start();
    b.start();
    wait_until("both in sync", || a.all_in_sync() && b.all_in_sync());
    (a, b, listen)
}

#[test]
fn metrics_pass_promtool_and_match_the_monitoring_guide() {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-metrics-")
        .tempdir()
        .unwrap();
    let (mut a, mut b, listen) = pair(dir.path());
    let text = scrape(&listen);

    let (ok, said) = promtool(&text);
    assert!(ok && said.trim().is_empty(), "promtool: {said}\n{text}");
    let served = families(&text);
    let documented = readme_names();
    assert!(documented.len() > 20, "{documented:?}");
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/monitoring.md: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in docs/monitoring.md, not served: {missing:?}\n{text}"
    );

    assert!(!text.contains("node="), "{text}");
    let version = format!(
        "certmesh_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &version), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "certmesh_acme_orders_total{cert=\"www\"}"),
        Some(0.0),
        "{text}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = sample(&text, "process_start_time_seconds").unwrap();
    assert!((now - started).abs() < 600.0, "{started} vs {now}");
    let rss = sample(&text, "process_resident_memory_bytes").unwrap();
    assert!(rss > 1e6 && rss < 1e9, "{rss}");
    let fds = sample(&text, "process_open_fds").unwrap();
    assert!(fds > 3.0 && fds <= sample(&text, "process_max_fds").unwrap());
    assert!(sample(&text, "process_cpu_seconds_total").is_some());
    a.stop();
    b.stop();
}

#[test]
fn counters_follow_sync_traffic_and_survive_a_reconnect() {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-metrics-")
        .tempdir()
        .unwrap();
    let (mut a, mut b, listen) = pair(dir.path());
    let received = "certmesh_peer_received_bytes_total{peer=\"met-b\"}";
    let applied = |t: &str| sample(t, "certmesh_applied_files_total").unwrap_or(-1.0);
    let before = applied(&scrape(&listen));

    b.write("news.txt", "from b\n");
    wait_until("a applied b's file", || {
        a.read("news.txt").as_deref() == Some("from b\n") && applied(&scrape(&listen)) > before
    });
    let text = scrape(&listen);
    let bytes = sample(&text, received).unwrap_or(0.0);
    assert!(bytes > 0.0, "{text}");
    assert_eq!(sample(&text, "certmesh_apply_failures_total"), Some(0.0));

    // The session ends: its bytes stay counted (a counter never goes down).
    b.stop();
    wait_until("b disconnected", || {
        sample(&scrape(&listen), "certmesh_peers_connected") == Some(0.0)
    });
    let after = sample(&scrape(&listen), received).unwrap_or(0.0);
    assert!(after >= bytes, "{after} < {bytes}");
    let (ok, said) = promtool(&scrape(&listen));
    assert!(ok, "promtool: {said}");
    a.stop();
}

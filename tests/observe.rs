//! Observability: the Prometheus endpoint, the `status` tables and `[metrics]`
//! config errors, with real processes on 127.0.0.70–79.

use std::fs;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use crate::util::{certmesh, wait_until, Node, BIN};

/// 2030-01-01T00:00:00Z, the not-after of the test certificates.
const NOT_AFTER: i64 = 1_893_456_000;

/// `GET path` over plain TCP: (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample whose line starts with `series ` (name + labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A self-signed certificate for `domain` expiring at `NOT_AFTER`, as `live/<name>/`.
fn put_cert(n: &Node, name: &str, domain: &str) {
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2030, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    n.write(&format!("live/{name}/cert.pem"), &cert.pem());
    n.write(&format!("live/{name}/fullchain.pem"), &cert.pem());
    n.write(&format!("live/{name}/privkey.pem"), &key.serialize_pem());
}

fn table(n: &Node) -> String {
    let out = certmesh(&["status", "--config", n.config.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn metrics_and_status_follow_a_peer() {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-observe-")
        .tempdir()
        .unwrap();
    let mut a = Node::new(dir.path(), "obs-a", "127.0.0.70");
    let mut b = Node::new(dir.path(), "obs-b", "127.0.0.71");
    a.configure(&[&b]);
    b.configure(&[&a]);
    let metrics = format!("127.0.0.70:{}", crate::util::free_tcp("127.0.0.70"));
    let mut cfg = fs::read_to_string(&a.config).unwrap();
    cfg.push_str(&format!(
        "\n[metrics]\nlisten = \"{metrics}\"\n\n[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\", \"example.com\"]\n\n[[hook]]\npaths = [\"*.txt\"]\nrun = [\"false\"]\n"
    ));
    fs::write(&a.config, cfg).unwrap();
    put_cert(&a, "www", "www.example.com");
    put_cert(&a, "unlisted", "unlisted.example.com");

    a.start();
    b.start();
    wait_until("both connected and in sync", || {
        a.all_in_sync() && b.all_in_sync() && b.read("live/www/cert.pem").is_some()
    });

    let (status, text) = get(&metrics, "/metrics");
    assert!(status.contains("200"), "{status}\n{text}");
    assert_eq!(
        sample(&text, "certmesh_peers_connected"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "certmesh_peer_connected{peer=\"obs-b\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "certmesh_peer_items_out_of_sync{peer=\"obs-b\"}"),
        Some(0.0),
        "{text}"
    );
    let not_after = |t: &str, name: &str| {
        sample(
            t,
            &format!("certmesh_certificate_not_after_timestamp_seconds{{cert=\"{name}\"}}"),
        )
    };
    assert_eq!(not_after(&text, "www"), Some(NOT_AFTER as f64), "{text}");
    assert_eq!(
        not_after(&text, "unlisted"),
        Some(NOT_AFTER as f64),
        "{text}"
    );
    let synced = sample(
        &text,
        "certmesh_peer_last_sync_timestamp_seconds{peer=\"obs-b\"}",
    )
    .unwrap_or_else(|| panic!("no last sync for obs-b in:\n{text}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!((now - synced).abs() < 60.0, "{synced} vs {now}");
    for family in ["certmesh_hook_failures_total", "certmesh_conflicts_total"] {
        assert!(text.contains(&format!("# TYPE {family} counter")), "{text}");
        assert_eq!(sample(&text, family), Some(0.0), "{text}");
    }
    assert!(get(&metrics, "/nope").0.contains("404"));

    let t = table(&a);
    for needle in [
        "PEER",
        "CONNECTED",
        "RTT",
        "LAST SYNC",
        "TREE",
        "FILES",
        "OUT OF SYNC",
        "SCANS",
        "CERTIFICATE",
        "DOMAINS",
        "NOT AFTER",
        "DAYS LEFT",
        "RENEWER",
        "NEXT RENEWAL",
        "obs-b",
        "in sync",
        "www.example.com (+1)",
        "2030-01-01T00:00:00Z",
    ] {
        assert!(t.contains(needle), "{needle:?} missing in:\n{t}");
    }
    let s = a.status();
    assert_eq!(s["peers"][0]["name"], "obs-b", "{s}");
    assert_eq!(s["peers"][0]["out_of_sync"], 0, "{s}");
    assert!(s["peers"][0]["last_sync_unix"].is_i64(), "{s}");
    assert_eq!(s["certificates"][0]["not_after_unix"], NOT_AFTER, "{s}");
    assert_eq!(s["counters"]["hook_failures"], 0, "{s}");

    // The peer goes away, then the tree changes: it shows as behind.
    b.stop();
    wait_until("peers connected = 0", || {
        sample(&get(&metrics, "/metrics").1, "certmesh_peers_connected") == Some(0.0)
    });
    a.write("after-b-left.txt", "news\n");
    wait_until("obs-b out of sync", || {
        sample(
            &get(&metrics, "/metrics").1,
            "certmesh_peer_items_out_of_sync{peer=\"obs-b\"}",
        )
        .is_some_and(|n| n > 0.0)
    });
    let text = get(&metrics, "/metrics").1;
    assert_eq!(
        sample(&text, "certmesh_peer_connected{peer=\"obs-b\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "certmesh_peer_last_sync_timestamp_seconds{peer=\"obs-b\"}"
        )
        .is_some_and(|t| t >= synced),
        "{text}"
    );
    // The hook on *.txt failed: counted, and shown as the last error.
    wait_until("hook failure counted", || {
        sample(&get(&metrics, "/metrics").1, "certmesh_hook_failures_total") == Some(1.0)
    });
    let text = get(&metrics, "/metrics").1;
    let t = table(&a);
    assert!(t.contains("out of sync") && t.contains(" no "), "{t}");
    assert!(t.contains("ERRORS") && t.contains("1 hook failures"), "{t}");
    if std::env::var_os("CERTMESH_SHOW_STATUS").is_some() {
        eprintln!("--- status\n{t}\n--- metrics\n{text}");
    }

    // stderr is a file here: plain text for journald, no colour codes.
    let log = a.log();
    assert!(log.contains("metrics endpoint listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in the log:\n{log}");
    a.stop();
}

#[test]
fn bad_metrics_listen_is_named() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    certmesh(&["init", "--state-dir", state.to_str().unwrap()]);
    fs::create_dir_all(d.path().join("tree")).unwrap();
    let quic = std::net::UdpSocket::bind("127.0.0.72:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let base = format!(
        "[node]\nname = \"obs-c\"\nstate_dir = \"{}\"\nlisten = \"{quic}\"\n[tree]\npath = \"{}\"\n",
        state.display(),
        d.path().join("tree").display()
    );
    let f = d.path().join("c.toml");
    for (extra, needle) in [
        ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
        (
            "[metrics]\nlisten = \"127.0.0.1:99999\"\n",
            "metrics.listen",
        ),
        (
            "[metrics]\nlisten = \"127.0.0.1:9402\"\npath = \"/m\"\n",
            "path",
        ),
    ] {
        fs::write(&f, format!("{base}{extra}")).unwrap();
        let out = certmesh(&["check", "--config", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}\n{err}");
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
    // Valid but taken: the daemon refuses to start, naming the key.
    let taken = std::net::TcpListener::bind("127.0.0.72:0").unwrap();
    let addr = taken.local_addr().unwrap();
    fs::write(&f, format!("{base}[metrics]\nlisten = \"{addr}\"\n")).unwrap();
    let out = certmesh(&["check", "--config", f.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(BIN)
        .args(["run", "--config", f.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("metrics.listen {addr}")),
        "expected metrics.listen in: {err}"
    );
}

//! The optional Prometheus endpoint (`[metrics] listen`): `GET /metrics` in the text
//! exposition format (version 0.0.4), built from the same snapshot as `status`.
//! A tiny HTTP/1 responder on a tokio listener: one request per connection, bounded
//! in size and time; anything but `GET /metrics` gets a 404.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::clients::Clients;
use crate::control::{self, Status};
use crate::node::Shared;

/// Largest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once; more are turned away (a scraper needs one).
const MAX_CLIENTS: usize = 16;

/// Starts the endpoint if `[metrics] listen` is configured.
pub fn start(shared: &Arc<Shared>) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let addr = shared.config.lock().ok().and_then(|c| c.metrics_listen);
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = bind(addr)?;
    tracing::info!(%addr, "metrics endpoint listening");
    let shared = shared.clone();
    let mut clients = Clients::new("metrics", MAX_CLIENTS);
    Ok(Some(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Some(slot) = clients.admit() else {
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let r = tokio::time::timeout(CLIENT_TIMEOUT, serve(&shared, stream)).await;
                        if let Ok(Err(e)) = r {
                            tracing::debug!(error = %e, "metrics client");
                        }
                        drop(slot);
                    });
                }
                Err(e) => clients.accept_failed(&e).await,
            }
        }
    })))
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?;
    TcpListener::from_std(std).map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))
}

async fn serve(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", b"").await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(&control::status(shared), &live_only(shared));
            let body = if method == "HEAD" { "" } else { &body };
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"try /metrics\n",
            )
            .await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", b"").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// Certificates live in the tree (`live/<name>/cert.pem`) but not configured here:
/// name and not-after.
fn live_only(shared: &Shared) -> Vec<(String, i64)> {
    let configured: Vec<String> = shared
        .config
        .lock()
        .map(|c| c.certificates.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    let mut out: Vec<(String, i64)> = std::fs::read_dir(shared.tree.root.join("live"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !configured.contains(n))
        .filter_map(|n| {
            let v = crate::acme::live_validity(shared, &n)?;
            Some((n, v.0.not_after))
        })
        .collect();
    out.sort();
    out
}

/// A label value escaped per the exposition format (backslash, quote, newline).
pub fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// One metric family: HELP, TYPE, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn family<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out }
}

/// The exposition text for a status snapshot (plus live certificates that are not
/// configured on this node).
pub fn render(s: &Status, unconfigured: &[(String, i64)]) -> String {
    let mut o = String::new();
    let node = s.node.name.as_str();
    let version = env!("CARGO_PKG_VERSION");
    family(
        &mut o,
        "certmesh_info",
        "gauge",
        "Always 1; the node name and version.",
    )
    .sample("certmesh_info", &[("node", node), ("version", version)], 1);
    family(
        &mut o,
        "certmesh_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    )
    .sample("certmesh_uptime_seconds", &[], s.node.uptime_s);
    family(&mut o, "certmesh_peers", "gauge", "Configured peers.").sample(
        "certmesh_peers",
        &[],
        s.peers.len(),
    );
    family(
        &mut o,
        "certmesh_peers_connected",
        "gauge",
        "Configured peers with a live session.",
    )
    .sample(
        "certmesh_peers_connected",
        &[],
        s.peers.iter().filter(|p| p.connected).count(),
    );
    let per_peer = |o: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    v: &dyn Fn(&control::PeerStatus) -> Option<String>| {
        let mut f = family(o, name, kind, help);
        for p in &s.peers {
            if let Some(value) = v(p) {
                f.sample(name, &[("peer", &p.name)], value);
            }
        }
    };
    let b = |x: bool| Some(u8::from(x).to_string());
    per_peer(
        &mut o,
        "certmesh_peer_connected",
        "gauge",
        "1 if the peer has a live session.",
        &|p| b(p.connected),
    );
    per_peer(
        &mut o,
        "certmesh_peer_in_sync",
        "gauge",
        "1 if the peer acknowledged everything we have and we need nothing it announced.",
        &|p| b(p.in_sync),
    );
    per_peer(
        &mut o,
        "certmesh_items_out_of_sync",
        "gauge",
        "Items between us and the peer: ours it has not acknowledged (also while disconnected) plus theirs we still need.",
        &|p| Some(p.out_of_sync.to_string()),
    );
    per_peer(
        &mut o,
        "certmesh_peer_rtt_seconds",
        "gauge",
        "QUIC round-trip time to the peer (connected peers only).",
        &|p| p.rtt_ms.map(|r| (r / 1000.0).to_string()),
    );
    per_peer(
        &mut o,
        "certmesh_peer_last_sync_timestamp_seconds",
        "gauge",
        "Unix time of the last successful sync with the peer: its last ack, or the last time it was seen fully in sync (absent: never since start).",
        &|p| p.last_sync_unix.map(|t| t.to_string()),
    );
    family(
        &mut o,
        "certmesh_tree_files",
        "gauge",
        "Live (not deleted) records in the local index.",
    )
    .sample("certmesh_tree_files", &[], s.tree.files);
    family(
        &mut o,
        "certmesh_tree_items_out_of_sync",
        "gauge",
        "Items this node still needs from its peers.",
    )
    .sample("certmesh_tree_items_out_of_sync", &[], s.tree.out_of_sync);
    family(
        &mut o,
        "certmesh_tree_scans_total",
        "counter",
        "Rescans of the tree since start (watcher-driven and periodic).",
    )
    .sample("certmesh_tree_scans_total", &[], s.tree.scans);
    {
        let name = "certmesh_certificate_not_after_seconds";
        let mut f = family(
            &mut o,
            name,
            "gauge",
            "Unix time the live certificate live/<name>/cert.pem expires (absent while none is live).",
        );
        let configured = s
            .certificates
            .iter()
            .filter_map(|c| Some((c.name.as_str(), c.not_after_unix?)));
        let others = unconfigured.iter().map(|(n, t)| (n.as_str(), *t));
        for (cert, t) in configured.chain(others) {
            f.sample(name, &[("name", cert), ("node", node)], t);
        }
    }
    family(
        &mut o,
        "certmesh_hook_failures_total",
        "counter",
        "Hooks that failed to start, exited non-zero or timed out, since start.",
    )
    .sample(
        "certmesh_hook_failures_total",
        &[],
        s.counters.hook_failures,
    );
    family(
        &mut o,
        "certmesh_acme_failures_total",
        "counter",
        "ACME orders that failed on this node since start.",
    )
    .sample(
        "certmesh_acme_failures_total",
        &[],
        s.counters.acme_failures,
    );
    family(
        &mut o,
        "certmesh_recent_errors",
        "gauge",
        "Errors currently in the status error list (at most 20).",
    )
    .sample("certmesh_recent_errors", &[], s.errors.len());
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
        assert_eq!(escape("plain.example.com"), "plain.example.com");
    }

    #[test]
    fn exposition_format() {
        let s: Status = serde_json::from_value(serde_json::json!({
            "node": {"name": "lb\"0", "id": "X", "listen": "127.0.0.1:1", "uptime_s": 5},
            "tree": {"path": "/t", "files": 3, "out_of_sync": 0, "sequence": 9},
            "peers": [
                {"name": "lb1", "id": "Y", "address": "127.0.0.2:1", "connected": true,
                 "in_sync": true, "rtt_ms": 1.5, "acked": 9, "pending_from": 0,
                 "last_error": null, "last_sync_unix": 1700000000},
                {"name": "lb\\2", "id": "Z", "address": "127.0.0.3:1", "connected": false,
                 "in_sync": false, "rtt_ms": null, "acked": 0, "pending_from": 0,
                 "last_error": "refused", "out_of_sync": 2}
            ],
            "certificates": [],
            "errors": [],
            "counters": {"hook_failures": 2, "acme_failures": 0}
        }))
        .unwrap();
        let text = render(&s, &[("www".into(), 1800000000)]);
        for line in [
            "certmesh_peers_connected 1",
            "certmesh_peer_connected{peer=\"lb1\"} 1",
            "certmesh_peer_connected{peer=\"lb\\\\2\"} 0",
            "certmesh_items_out_of_sync{peer=\"lb\\\\2\"} 2",
            "certmesh_peer_rtt_seconds{peer=\"lb1\"} 0.0015",
            "certmesh_peer_last_sync_timestamp_seconds{peer=\"lb1\"} 1700000000",
            "certmesh_certificate_not_after_seconds{name=\"www\",node=\"lb\\\"0\"} 1800000000",
            "certmesh_hook_failures_total 2",
            "certmesh_acme_failures_total 0",
            "# TYPE certmesh_hook_failures_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(!text.contains("last_sync_timestamp_seconds{peer=\"lb\\\\2\"}"));
        // Every sample belongs to a family announced just before it.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{l}");
            }
        }
    }
}

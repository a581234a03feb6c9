//! The local control socket (`state_dir/control.sock`, mode 0600): one JSON request
//! per line, one JSON answer per line. Commands: `status`; `issue` (with `name`) and
//! `renew` (with `force`, `dry_run`), which the ACME driver answers once done.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::node::Shared;

/// `certmesh status --json`: the keys are stable.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeStatus,
    pub tree: TreeStatus,
    pub peers: Vec<PeerStatus>,
    pub certificates: Vec<CertStatus>,
    pub errors: Vec<String>,
}

/// One configured certificate as this node sees it: what is live in the tree, and
/// (on ACME nodes) the driver's plans.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertStatus {
    pub name: String,
    pub domains: Vec<String>,
    /// RFC 3339; `None` while no certificate is live.
    pub not_after: Option<String>,
    pub not_after_unix: Option<i64>,
    pub days_left: Option<f64>,
    /// The `archive/<name>/<n>` that `live/<name>` points at.
    pub version: Option<u32>,
    pub serial: Option<String>,
    /// Node name of the renewer as this node sees it.
    pub renewer: Option<String>,
    /// Node holding a fresh renewal lease (an order in progress).
    pub lease: Option<String>,
    /// RFC 3339 of the next automatic order (ACME nodes).
    pub next_renewal: Option<String>,
    /// idle | ordering | waiting | backoff (ACME nodes); `-` elsewhere.
    pub state: String,
    pub last_attempt: Option<String>,
    pub last_error: Option<String>,
    pub failures: u32,
    pub waiting_for: Option<String>,
    pub last_took_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: String,
    pub listen: String,
    pub uptime_s: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TreeStatus {
    pub path: String,
    pub files: usize,
    pub out_of_sync: usize,
    pub sequence: u64,
    /// Rescans run since start (watcher-driven and periodic): stays put when idle.
    #[serde(default)]
    pub scans: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub id: String,
    pub address: String,
    pub connected: bool,
    pub in_sync: bool,
    pub rtt_ms: Option<f64>,
    /// Our records this peer has acknowledged (its view of our sequence).
    pub acked: u64,
    /// Records we still need that only this peer has announced.
    pub pending_from: usize,
    pub last_error: Option<String>,
}

/// The certificates part of the status (reads `live/<name>/cert.pem` of each).
pub fn certificates(shared: &Shared) -> Vec<CertStatus> {
    use crate::acme;
    let certs = shared
        .config
        .lock()
        .map(|c| c.certificates.clone())
        .unwrap_or_default();
    if certs.is_empty() {
        return Vec::new();
    }
    let now = acme::unix_now();
    let renewer = acme::renewer(shared).map(|id| acme::node_name(shared, id));
    certs
        .into_iter()
        .map(|c| {
            let live = acme::live_validity(shared, &c.name);
            let rt = shared.acme.get().and_then(|a| a.runtime(&c.name));
            let lease = acme::read_lease(shared, &c.name)
                .filter(|l| l.fresh(now))
                .map(|l| l.node);
            let na = live.as_ref().map(|(v, _, _)| v.not_after);
            CertStatus {
                domains: c.domains,
                not_after: na.map(acme::rfc3339),
                not_after_unix: na,
                days_left: na.map(|t| ((t - now) as f64 / 86400.0 * 10.0).round() / 10.0),
                version: crate::acme::bundle::live_version(&shared.tree.root, &c.name),
                serial: live.map(|(_, _, s)| s),
                renewer: renewer.clone(),
                lease,
                next_renewal: rt.as_ref().and_then(|r| r.next_renewal).map(acme::rfc3339),
                state: rt.as_ref().map_or("-".into(), |r| r.state.clone()),
                last_attempt: rt.as_ref().and_then(|r| r.last_attempt).map(acme::rfc3339),
                last_error: rt.as_ref().and_then(|r| r.last_error.clone()),
                failures: rt.as_ref().map_or(0, |r| r.failures),
                waiting_for: rt.as_ref().and_then(|r| r.waiting_for.clone()),
                last_took_ms: rt.as_ref().and_then(|r| r.last_took_ms),
                name: c.name,
            }
        })
        .collect()
}

/// Builds the status from the live state.
pub fn status(shared: &Shared) -> Status {
    let certificates = certificates(shared);
    let (name, listen, tree) = shared
        .config
        .lock()
        .map(|c| {
            (
                c.name.clone(),
                c.listen.to_string(),
                c.tree.display().to_string(),
            )
        })
        .unwrap_or_default();
    let st = shared.lock();
    let mut peers: Vec<PeerStatus> = st
        .peers
        .iter()
        .map(|(id, slot)| {
            let conn = slot.session.as_ref().map(|s| &s.conn);
            PeerStatus {
                name: slot.config.name.clone(),
                id: id.to_string(),
                address: slot.config.address.to_string(),
                connected: conn.is_some(),
                in_sync: conn.is_some() && st.plan.in_sync(id, &st.index),
                rtt_ms: conn.map(|c| c.rtt().as_secs_f64() * 1000.0),
                acked: st.plan.peer_acked(id),
                pending_from: st.plan.pending_from(id, &st.index),
                last_error: slot.last_error.clone(),
            }
        })
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    Status {
        node: NodeStatus {
            name,
            id: shared.me().to_string(),
            listen,
            uptime_s: shared.started.elapsed().as_secs(),
        },
        tree: TreeStatus {
            path: tree,
            files: st.index.live_count(),
            out_of_sync: st.plan.needs_len(),
            scans: shared.scans.load(std::sync::atomic::Ordering::Relaxed),
            sequence: st.index.sequence(),
        },
        peers,
        certificates,
        errors: st.errors.iter().cloned().collect(),
    }
}

#[derive(Deserialize)]
struct Request {
    cmd: String,
    /// `issue`: the certificate.
    #[serde(default)]
    name: Option<String>,
    /// `renew`: order even if not due (and even if not the renewer).
    #[serde(default)]
    force: bool,
    /// `renew`: only report what would be ordered.
    #[serde(default)]
    dry_run: bool,
}

/// Listens on the control socket.
pub fn start(shared: Arc<Shared>, path: &Path) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{}: another certmesh is already running with this state_dir",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(shared, stream).await {
                    tracing::debug!(error = %e, "control client");
                }
            });
        }
    }))
}

async fn serve(shared: Arc<Shared>, stream: UnixStream) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(64 << 10)).lines();
    while let Some(line) = lines.next_line().await? {
        let no_acme = || serde_json::json!({ "error": "[acme] is not configured on this node" });
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) if req.cmd == "status" => serde_json::to_value(status(&shared))?,
            Ok(req) if req.cmd == "issue" => match (shared.acme.get(), req.name) {
                (None, _) => no_acme(),
                (_, None) => serde_json::json!({ "error": "issue needs a certificate name" }),
                (Some(a), Some(name)) => a.issue(name).await,
            },
            Ok(req) if req.cmd == "renew" => match shared.acme.get() {
                None => no_acme(),
                Some(a) => a.renew(req.force, req.dry_run).await,
            },
            Ok(req) => serde_json::json!({ "error": format!("unknown command {:?}", req.cmd) }),
            Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
        };
        let mut out = serde_json::to_vec(&answer)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// Client side: sends one command to a running daemon.
pub async fn request(socket: &Path, cmd: &str) -> anyhow::Result<serde_json::Value> {
    request_with(socket, serde_json::json!({ "cmd": cmd })).await
}

/// Client side: sends one request (`{"cmd": ..., ...}`) to a running daemon.
pub async fn request_with(
    socket: &Path,
    request: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (is `certmesh run` running with this config?)",
            socket.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut req = serde_json::to_vec(&request)?;
    req.push(b'\n');
    w.write_all(&req).await?;
    let mut lines = BufReader::new(r).lines();
    let line = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("daemon closed the control socket"))?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("daemon: {e}");
    }
    Ok(v)
}

use tokio::io::AsyncReadExt as _;

/// Renders the status as a table for people.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node   {} ({})  listen {}  up {}s",
        s.node.name, s.node.id, s.node.listen, s.node.uptime_s
    );
    let _ = writeln!(
        o,
        "tree   {}  {} files  {} out of sync  seq {}",
        s.tree.path, s.tree.files, s.tree.out_of_sync, s.tree.sequence
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<16} {:<24} {:<10} {:<8} {:>8}  NOTE",
        "PEER", "ADDRESS", "CONNECTED", "IN SYNC", "RTT"
    );
    for p in &s.peers {
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.2}ms"))
            .unwrap_or_else(|| "-".into());
        let note = match (&p.last_error, p.pending_from) {
            (_, n) if n > 0 => format!("{n} items pending"),
            (Some(e), _) if !p.connected => e.chars().take(60).collect(),
            _ => String::new(),
        };
        let yn = |b: bool| if b { "yes" } else { "no" };
        let _ = writeln!(
            o,
            "{:<16} {:<24} {:<10} {:<8} {:>8}  {}",
            p.name,
            p.address,
            yn(p.connected),
            yn(p.in_sync),
            rtt,
            note
        );
    }
    if !s.certificates.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<24} {:<22} {:>6} {:>4} {:<12} {:<22} {:<8}  NOTE",
            "CERTIFICATE", "NOT AFTER", "DAYS", "VER", "RENEWER", "NEXT RENEWAL", "STATE"
        );
        for c in &s.certificates {
            let dash = || "-".to_string();
            let note = match (&c.last_error, &c.waiting_for, &c.lease) {
                (Some(e), _, _) => format!(
                    "{} failures: {}",
                    c.failures,
                    e.chars().take(80).collect::<String>()
                ),
                (_, _, Some(l)) => format!("lease held by {l}"),
                (_, Some(w), _) => w.clone(),
                _ => c.domains.join(" ").chars().take(80).collect(),
            };
            let _ = writeln!(
                o,
                "{:<24} {:<22} {:>6} {:>4} {:<12} {:<22} {:<8}  {}",
                c.name,
                c.not_after.clone().unwrap_or_else(|| "missing".into()),
                c.days_left.map(|d| format!("{d:.1}")).unwrap_or_else(dash),
                c.version.map(|v| v.to_string()).unwrap_or_else(dash),
                c.renewer.clone().unwrap_or_else(dash),
                c.next_renewal.clone().unwrap_or_else(dash),
                c.state,
                note
            );
        }
    }
    if !s.errors.is_empty() {
        let _ = writeln!(o, "\nrecent errors:");
        for e in &s.errors {
            let _ = writeln!(o, "  {e}");
        }
    }
    o
}

//! The local control socket (`state_dir/control.sock`, mode 0600): one JSON request
//! per line, one JSON answer per line. Commands: `status`; `issue` (with `name`) and
//! `renew` (with `force`, `dry_run`), which the ACME driver answers once done.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::clients::Clients;
use crate::identity::DeviceId;
use crate::node::Shared;
use crate::telemetry::RecentError;

/// `certmesh status --json`: the keys are stable.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeStatus,
    pub tree: TreeStatus,
    pub peers: Vec<PeerStatus>,
    pub certificates: Vec<CertStatus>,
    pub errors: Vec<RecentError>,
    /// Failure counters since start (also exported as metrics).
    #[serde(default)]
    pub counters: Counters,
    /// Certificates this node put back after a peer's change broke them, oldest
    /// first: `repairs[].certificate`, `.at`, `.caused_by`, `.from_version`.
    #[serde(default)]
    pub repairs: Vec<crate::repair::RepairStatus>,
    /// The whole cluster's sync, behind hubs too (only with `status --cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::ops::census::ClusterSync>,
}

/// Monotonic counters since the daemon started.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Hooks that failed to start, exited non-zero or timed out.
    pub hook_failures: u64,
    /// ACME orders that failed (0 on nodes without `[acme]`).
    pub acme_failures: u64,
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
    /// "http-01", "dns-01" or "dns-01+http-01" (wildcards by dns-01, the rest http-01).
    #[serde(default)]
    pub challenge: String,
    /// dns-01, while an order waits for propagation: each authoritative nameserver
    /// and whether it serves the records yet.
    #[serde(default)]
    pub dns_propagation: Option<Vec<crate::acme::handle::NsProgress>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: String,
    pub listen: String,
    pub uptime_s: u64,
    /// The daemon's clock (unix seconds) when it answered: ages are relative to it.
    #[serde(default)]
    pub now_unix: i64,
    /// "writer" or "reader" (`[tree] writers`, issue 13).
    #[serde(default)]
    pub role: String,
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
    /// Peers' files larger than `[tree] max_file_size`: not fetched (at most
    /// `TOO_LARGE_SHOWN` listed; `too_large_count` counts them all).
    #[serde(default)]
    pub too_large: Vec<TooLargeFile>,
    #[serde(default)]
    pub too_large_count: usize,
    /// Times a peer's new path was not taken in because the index was full
    /// (`index::MAX_INDEX_RECORDS`), since start.
    #[serde(default)]
    pub not_adopted: u64,
    /// A reader's local changes, not sent ("this node is not a writer") and put
    /// back: the latest paths, newest last, and how many since start.
    #[serde(default)]
    pub not_sent: Vec<String>,
    #[serde(default)]
    pub not_sent_count: u64,
}

/// Records of one peer not taken in because of their authorship (issue 13).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RefusedStatus {
    /// Since start.
    pub count: u64,
    pub last_path: Option<String>,
    /// Device ID the last refused record claimed as its author.
    pub last_author: Option<String>,
    pub last_reason: Option<String>,
}

/// How many files too large `status` lists.
const TOO_LARGE_SHOWN: usize = 100;

/// A peer's file not fetched because of its size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TooLargeFile {
    pub path: String,
    pub size: u64,
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
    /// Items between us and this peer: our records it has not acknowledged (as of
    /// its last ack, also while disconnected) plus `pending_from`.
    #[serde(default)]
    pub out_of_sync: usize,
    /// Unix seconds of the last successful sync: the last ack from this peer, or the
    /// last time it was seen fully in sync. `None`: never since start.
    #[serde(default)]
    pub last_sync_unix: Option<i64>,
    /// The same as RFC 3339.
    #[serde(default)]
    pub last_sync: Option<String>,
    /// Records this peer sent that were refused for their authorship.
    #[serde(default)]
    pub refused: RefusedStatus,
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
            let challenge = c.challenge_label().to_string();
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
                state: rt.as_ref().map_or("-", |r| r.state.as_str()).to_string(),
                last_attempt: rt.as_ref().and_then(|r| r.last_attempt).map(acme::rfc3339),
                last_error: rt.as_ref().and_then(|r| r.last_error.clone()),
                failures: rt.as_ref().map_or(0, |r| r.failures),
                waiting_for: rt.as_ref().and_then(|r| r.waiting_for.clone()),
                last_took_ms: rt.as_ref().and_then(|r| r.last_took_ms),
                dns_propagation: rt.as_ref().and_then(|r| r.dns_propagation.clone()),
                challenge,
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
    let now = crate::acme::unix_now();
    let mut st = shared.lock();
    let (ids, mut peers): (Vec<DeviceId>, Vec<PeerStatus>) = st
        .peers
        .iter()
        .map(|(id, slot)| {
            let conn = slot.session.as_ref().map(|s| &s.conn);
            let in_sync = conn.is_some() && st.engine.plan().in_sync(id, st.engine.index());
            let acked = if conn.is_some() {
                st.engine.plan().peer_acked(id).max(slot.last_acked)
            } else {
                slot.last_acked
            };
            let pending_from = st.engine.plan().pending_from(id, st.engine.index());
            let unacked = st.engine.index().changed_since(acked).count();
            let last_sync = if in_sync { Some(now) } else { slot.last_sync };
            let refused = st.engine.refused().get(id).cloned().unwrap_or_default();
            let p = PeerStatus {
                name: slot.config.name.clone(),
                id: id.to_string(),
                address: slot.config.address.to_string(),
                connected: conn.is_some(),
                in_sync,
                rtt_ms: conn.map(|c| c.rtt().as_secs_f64() * 1000.0),
                acked: st.engine.plan().peer_acked(id),
                pending_from,
                last_error: slot.last_error.clone(),
                out_of_sync: if in_sync { 0 } else { unacked + pending_from },
                last_sync_unix: last_sync,
                last_sync: last_sync.map(crate::acme::rfc3339),
                refused: RefusedStatus {
                    count: refused.count,
                    last_path: refused.last_path.map(|p| p.as_str().to_string()),
                    last_author: refused.last_author.map(|a| a.to_string()),
                    last_reason: refused.last_reason,
                },
            };
            (*id, p)
        })
        .unzip();
    // Seen in sync now: remembered, so the timestamp never goes back.
    for (id, p) in ids.iter().zip(&peers) {
        if let (true, Some(slot)) = (p.in_sync, st.peers.get_mut(id)) {
            slot.last_sync = Some(now);
        }
    }
    let errors = st.errors.iter().cloned().collect();
    let tree = TreeStatus {
        path: tree,
        files: st.engine.index().live_count(),
        out_of_sync: st.engine.plan().needs_len(),
        scans: shared.scans.load(std::sync::atomic::Ordering::Relaxed),
        sequence: st.engine.index().sequence(),
        too_large: st
            .engine
            .plan()
            .too_large()
            .take(TOO_LARGE_SHOWN)
            .map(|(p, size)| TooLargeFile {
                path: p.as_str().to_string(),
                size,
            })
            .collect(),
        too_large_count: st.engine.plan().too_large_len(),
        not_adopted: st.engine.plan().not_adopted(),
        not_sent: st
            .engine
            .not_sent()
            .recent
            .iter()
            .map(|p| p.as_str().to_string())
            .collect(),
        not_sent_count: st.engine.not_sent().count,
    };
    let role = crate::writers::role(st.engine.is_writer()).to_string();
    drop(st);
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    Status {
        node: NodeStatus {
            name,
            id: shared.me().to_string(),
            listen,
            uptime_s: shared.started.elapsed().as_secs(),
            now_unix: now,
            role,
        },
        tree,
        peers,
        certificates,
        errors,
        counters: Counters {
            hook_failures: shared
                .hook_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            acme_failures: shared.acme.get().map_or(0, |a| a.failures_total()),
        },
        repairs: shared.repairs.recent(),
        cluster: None,
    }
}

/// A request on the control socket: one JSON object per line, `cmd` naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The node's status ([`Status`]); with `cluster_ms`, also a census of the
    /// whole cluster, waiting up to that long ([`crate::ops::census`]).
    Status {
        #[serde(default)]
        cluster_ms: Option<u64>,
    },
    /// Order `name` now.
    Issue {
        /// The certificate (`[[certificate]] name`).
        #[serde(default)]
        name: Option<String>,
    },
    /// Order what is due (`force`: everything, even when not the renewer).
    Renew {
        #[serde(default)]
        force: bool,
        /// Only report what would be ordered.
        #[serde(default)]
        dry_run: bool,
    },
    /// Wait until every live node of the cluster has `path` as this node has it
    /// (the ACME challenge barrier, on any path; issue 16).
    Confirm {
        path: String,
        /// Give up after this many milliseconds.
        timeout_ms: u64,
    },
}

/// The answer to [`Request::Confirm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmReply {
    /// Every live node has the path.
    pub done: bool,
    /// Every node known, by name.
    pub nodes: Vec<ConfirmedNode>,
}

/// One node in a [`ConfirmReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmedNode {
    pub name: String,
    pub id: String,
    /// Connected to some node that answered: waited for.
    pub live: bool,
    /// Milliseconds until it had the path; `None`: it did not in time.
    pub after_ms: Option<u64>,
}

/// Runs [`crate::node::wait_peers_have`] for the control socket.
async fn confirm(shared: &Shared, path: &str, timeout_ms: u64) -> serde_json::Value {
    let path = match crate::paths::RelPath::parse_shared(path) {
        Ok(p) => p,
        Err(e) => return serde_json::json!({ "error": format!("{path}: {e}") }),
    };
    if shared.lock().engine.index().get(&path).is_none() {
        return serde_json::json!({ "error": format!("{path} is not in this node's index") });
    }
    let timeout = Duration::from_millis(timeout_ms.min(600_000));
    let acks = crate::node::wait_peers_have(shared, &path, timeout).await;
    let nodes: Vec<ConfirmedNode> = acks
        .into_iter()
        .map(|a| ConfirmedNode {
            name: a.name,
            id: a.peer.to_string(),
            live: a.live,
            after_ms: a.after.map(|d| d.as_millis() as u64),
        })
        .collect();
    let done = nodes.iter().all(|n| !n.live || n.after_ms.is_some());
    serde_json::to_value(ConfirmReply { done, nodes })
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
}

/// Parses one request line; the error says what was wrong.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let cmd = v.get("cmd").and_then(|c| c.as_str()).map(str::to_string);
    serde_json::from_value(v).map_err(|e| match cmd {
        Some(c) if !["status", "issue", "renew", "confirm"].contains(&c.as_str()) => {
            format!("unknown command {c:?}")
        }
        _ => format!("bad request: {e}"),
    })
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
    // Over the cap a connection is closed at once: a stuck or flooding local client
    // cannot exhaust descriptors or tasks. Idle clients are dropped by `serve`.
    let clients = Clients::new("control socket", MAX_CLIENTS);
    Ok(crate::clients::serve_forever(
        listener,
        clients,
        None,
        move |stream| serve(shared.clone(), stream),
    ))
}

/// Control clients served at once (`status`, `issue`, `renew` are one-shot).
const MAX_CLIENTS: usize = 32;
/// A client that sends no complete request line for this long is dropped.
const IDLE: Duration = Duration::from_secs(30);

async fn serve(shared: Arc<Shared>, stream: UnixStream) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(64 << 10)).lines();
    while let Some(line) = tokio::time::timeout(IDLE, lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("no request within {IDLE:?}"))??
    {
        let no_acme = || serde_json::json!({ "error": "[acme] is not configured on this node" });
        let answer = match parse_request(&line) {
            Ok(Request::Status { cluster_ms }) => {
                let cluster = match cluster_ms {
                    Some(ms) => Some(
                        crate::ops::census::run(&shared, Duration::from_millis(ms.min(600_000)))
                            .await,
                    ),
                    None => None,
                };
                serde_json::to_value(Status {
                    cluster,
                    ..status(&shared)
                })?
            }
            Ok(Request::Issue { name }) => match (shared.acme.get(), name) {
                (None, _) => no_acme(),
                (_, None) => serde_json::json!({ "error": "issue needs a certificate name" }),
                (Some(a), Some(name)) => reply(a.issue(name).await)?,
            },
            Ok(Request::Renew { force, dry_run }) => match shared.acme.get() {
                None => no_acme(),
                Some(a) => reply(a.renew(force, dry_run).await)?,
            },
            Ok(Request::Confirm { path, timeout_ms }) => confirm(&shared, &path, timeout_ms).await,
            Err(e) => serde_json::json!({ "error": e }),
        };
        let mut out = serde_json::to_vec(&answer)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// A typed answer on the socket: the value, or `{"error": ...}`.
fn reply<T: Serialize>(r: Result<T, String>) -> serde_json::Result<serde_json::Value> {
    match r {
        Ok(v) => serde_json::to_value(v),
        Err(e) => Ok(serde_json::json!({ "error": e })),
    }
}

/// Client side: `certmesh issue NAME` (waits for the order).
pub async fn issue(socket: &Path, name: &str) -> anyhow::Result<crate::acme::handle::IssueReply> {
    let req = Request::Issue {
        name: Some(name.to_string()),
    };
    Ok(serde_json::from_value(send(socket, &req).await?)?)
}

/// Client side: `certmesh renew [--force] [--dry-run]`.
pub async fn renew(
    socket: &Path,
    force: bool,
    dry_run: bool,
) -> anyhow::Result<crate::acme::handle::RenewReport> {
    let req = Request::Renew { force, dry_run };
    Ok(serde_json::from_value(send(socket, &req).await?)?)
}

/// Client side: sends one command to a running daemon.
pub async fn request(socket: &Path, cmd: &str) -> anyhow::Result<serde_json::Value> {
    request_with(socket, serde_json::json!({ "cmd": cmd })).await
}

/// Client side: sends a typed request to a running daemon.
pub async fn send(socket: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    request_with(socket, serde_json::to_value(req)?).await
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

/// Renders the status as tables for people: node, tree, peers, certificates,
/// recent errors.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let now = if s.node.now_unix > 0 {
        s.node.now_unix
    } else {
        crate::acme::unix_now()
    };
    let dash = || "-".to_string();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {} ({})  listen {}  up {}{}\n",
        s.node.name,
        s.node.id,
        s.node.listen,
        age(s.node.uptime_s as i64),
        if s.node.role.is_empty() {
            String::new()
        } else {
            format!("  {}", s.node.role)
        }
    );
    table(
        &mut o,
        &["TREE", "FILES", "OUT OF SYNC", "SCANS", "SEQUENCE"],
        vec![vec![
            s.tree.path.clone(),
            s.tree.files.to_string(),
            s.tree.out_of_sync.to_string(),
            s.tree.scans.to_string(),
            s.tree.sequence.to_string(),
        ]],
    );
    for f in &s.tree.too_large {
        let _ = writeln!(
            o,
            "too large, not fetched: {} ({} bytes; see [tree] max_file_size)",
            f.path, f.size
        );
    }
    if s.tree.too_large_count > s.tree.too_large.len() {
        let _ = writeln!(
            o,
            "… and {} more files too large",
            s.tree.too_large_count - s.tree.too_large.len()
        );
    }
    if s.tree.not_adopted > 0 {
        let _ = writeln!(
            o,
            "index full: new paths from peers refused {} times",
            s.tree.not_adopted
        );
    }
    if s.tree.not_sent_count > 0 {
        let _ = writeln!(
            o,
            "not sent: this node is not a writer ({} local changes put back): {}",
            s.tree.not_sent_count,
            s.tree.not_sent.join(", ")
        );
    }
    let _ = writeln!(o);
    let peers = s
        .peers
        .iter()
        .map(|p| {
            let sync = if p.in_sync {
                "in sync".to_string()
            } else if p.out_of_sync > 0 {
                format!("{} out of sync", p.out_of_sync)
            } else if p.connected {
                "syncing".to_string()
            } else {
                dash()
            };
            vec![
                p.name.clone(),
                p.address.clone(),
                if p.connected { "yes" } else { "no" }.to_string(),
                p.rtt_ms.map_or_else(dash, |r| format!("{r:.2}ms")),
                sync,
                p.last_sync_unix.map_or_else(
                    || "never".to_string(),
                    |t| match now - t {
                        ..=1 => "just now".to_string(),
                        a => format!("{} ago", age(a)),
                    },
                ),
            ]
        })
        .collect();
    table(
        &mut o,
        &["PEER", "ADDRESS", "CONNECTED", "RTT", "SYNC", "LAST SYNC"],
        peers,
    );
    if let Some(c) = &s.cluster {
        o.push_str(&crate::ops::census::render(c));
    }
    for p in s.peers.iter().filter(|p| p.refused.count > 0) {
        let r = &p.refused;
        let author = r.last_author.as_deref().map_or_else(dash, |a| {
            let known = s.peers.iter().find(|q| q.id == a).map(|q| q.name.as_str());
            match (known, a == s.node.id) {
                (_, true) => format!("{} (this node)", s.node.name),
                (Some(n), _) => format!("{n} ({a})"),
                (None, _) => a.to_string(),
            }
        });
        let _ = writeln!(
            o,
            "refused from {}: {} records for their authorship (last: {}, claiming {author}: {})",
            p.name,
            r.count,
            r.last_path.as_deref().unwrap_or("-"),
            r.last_reason.as_deref().unwrap_or("-")
        );
    }
    if !s.certificates.is_empty() {
        let _ = writeln!(o);
        let certs = s
            .certificates
            .iter()
            .map(|c| {
                let domains = match c.domains.as_slice() {
                    [] => dash(),
                    [one] => one.clone(),
                    [first, rest @ ..] => format!("{first} (+{})", rest.len()),
                };
                let mut note = match (&c.lease, &c.waiting_for) {
                    (Some(l), _) => format!("lease held by {l}"),
                    (_, Some(w)) => w.clone(),
                    _ => String::new(),
                };
                if let Some(p) = &c.dns_propagation {
                    let have = p.iter().filter(|n| n.has_record).count();
                    let missing: Vec<&str> = p
                        .iter()
                        .filter(|n| !n.has_record)
                        .map(|n| n.nameserver.as_str())
                        .collect();
                    let sep = if note.is_empty() { "" } else { "; " };
                    note = format!(
                        "{note}{sep}{} TXT on {have}/{} nameservers{}",
                        c.challenge,
                        p.len(),
                        if missing.is_empty() {
                            String::new()
                        } else {
                            format!(", waiting for {}", missing.join(", "))
                        }
                    );
                }
                vec![
                    c.name.clone(),
                    domains,
                    c.not_after.clone().unwrap_or_else(|| "missing".into()),
                    c.days_left.map_or_else(dash, |d| format!("{d:.1}")),
                    c.version.map_or_else(dash, |v| v.to_string()),
                    c.renewer.clone().unwrap_or_else(dash),
                    c.next_renewal.clone().unwrap_or_else(dash),
                    c.state.clone(),
                    c.challenge.clone(),
                    note,
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "CERTIFICATE",
                "DOMAINS",
                "NOT AFTER",
                "DAYS LEFT",
                "VER",
                "RENEWER",
                "NEXT RENEWAL",
                "STATE",
                "CHALLENGE",
                "NOTE",
            ],
            certs,
        );
    }
    if !s.repairs.is_empty() {
        let _ = writeln!(o);
        let rows = s
            .repairs
            .iter()
            .map(|r| {
                vec![
                    r.certificate.clone(),
                    format!("{} ago", age(now - r.at_unix)),
                    r.caused_by.clone(),
                    r.from_version.to_string(),
                    one_line(&r.reason, 80),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "REPAIRED",
                "WHEN",
                "CAUSED BY",
                "FROM VERSION",
                "WHAT WAS WRONG",
            ],
            rows,
        );
    }
    // Last errors: per peer and per certificate, then the daemon's recent ones.
    let mut errors: Vec<String> = Vec::new();
    for p in s.peers.iter().filter(|p| !p.connected) {
        if let Some(e) = &p.last_error {
            errors.push(format!("peer {}: {}", p.name, one_line(e, 160)));
        }
    }
    for c in &s.certificates {
        if let Some(e) = &c.last_error {
            errors.push(format!(
                "certificate {} ({} failures): {}",
                c.name,
                c.failures,
                one_line(e, 160)
            ));
        }
    }
    const SHOWN: usize = 5;
    let skipped = s.errors.len().saturating_sub(SHOWN);
    for e in &s.errors[skipped..] {
        errors.push(format!(
            "{} ago: {}",
            age(now.saturating_sub(e.at_unix)),
            one_line(&e.message, 160)
        ));
    }
    let counters = &s.counters;
    if counters.hook_failures + counters.acme_failures > 0 {
        errors.push(format!(
            "since start: {} hook failures, {} ACME failures",
            counters.hook_failures, counters.acme_failures
        ));
    }
    if !errors.is_empty() {
        let more = if skipped > 0 {
            format!(" (last {SHOWN} of {}, all in --json)", s.errors.len())
        } else {
            String::new()
        };
        let _ = writeln!(o, "\nERRORS{more}");
        for e in errors {
            let _ = writeln!(o, "  {e}");
        }
    }
    o
}

/// Left-aligned columns as wide as their widest cell; the last one is not padded.
fn table(o: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            if i + 1 < cells.len() {
                l.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
        }
        o.push_str(l.trim_end());
        o.push('\n');
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `95` → `1m35s`, `7300` → `2h01m`, `200000` → `2d07h`.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        ..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The first line of `s`, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let first = s.lines().next().unwrap_or("");
    if first.chars().count() > max {
        let mut t: String = first.chars().take(max).collect();
        t.push('…');
        t
    } else {
        first.to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_parse_as_before_and_name_what_is_wrong() {
        use super::{parse_request, Request};
        assert_eq!(
            parse_request(r#"{"cmd":"status"}"#),
            Ok(Request::Status { cluster_ms: None })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"renew","force":true}"#),
            Ok(Request::Renew {
                force: true,
                dry_run: false
            })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"issue","name":"www"}"#),
            Ok(Request::Issue {
                name: Some("www".into())
            })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"reboot"}"#),
            Err("unknown command \"reboot\"".into())
        );
        assert!(parse_request("{").unwrap_err().starts_with("bad request"));
        assert!(parse_request(r#"{"cmd":"renew","force":"yes"}"#)
            .unwrap_err()
            .starts_with("bad request"));
        let round = serde_json::to_value(Request::Renew {
            force: false,
            dry_run: true,
        })
        .unwrap();
        assert_eq!(
            round,
            serde_json::json!({"cmd":"renew","force":false,"dry_run":true})
        );
    }
    use super::*;

    fn sample() -> Status {
        Status {
            node: NodeStatus {
                name: "lb0".into(),
                id: "AAAA".into(),
                listen: "127.0.0.1:22000".into(),
                uptime_s: 7300,
                now_unix: 1_000_000,
                role: "reader".into(),
            },
            tree: TreeStatus {
                path: "/etc/nginx/certs".into(),
                files: 42,
                out_of_sync: 3,
                sequence: 120,
                scans: 7,
                too_large: vec![TooLargeFile {
                    path: "big.iso".into(),
                    size: 2 << 20,
                }],
                too_large_count: 1,
                not_adopted: 0,
                not_sent: vec!["live/www/cert.pem".into()],
                not_sent_count: 2,
            },
            peers: vec![
                PeerStatus {
                    name: "lb1".into(),
                    id: "B".into(),
                    address: "10.0.0.2:22000".into(),
                    connected: true,
                    in_sync: true,
                    rtt_ms: Some(0.412),
                    acked: 120,
                    pending_from: 0,
                    last_error: None,
                    out_of_sync: 0,
                    last_sync_unix: Some(1_000_000),
                    last_sync: None,
                    refused: RefusedStatus::default(),
                },
                PeerStatus {
                    name: "lb2".into(),
                    id: "C".into(),
                    address: "10.0.0.3:22000".into(),
                    connected: false,
                    in_sync: false,
                    rtt_ms: None,
                    acked: 0,
                    pending_from: 0,
                    last_error: Some("timed out\nsecond line".into()),
                    out_of_sync: 4,
                    last_sync_unix: Some(1_000_000 - 312),
                    last_sync: None,
                    refused: RefusedStatus {
                        count: 3,
                        last_path: Some("live/www/privkey.pem".into()),
                        last_author: Some("B".into()),
                        last_reason: Some("the signature does not match the record".into()),
                    },
                },
            ],
            certificates: Vec::new(),
            errors: vec![
                RecentError {
                    at_unix: 999_990,
                    message: "hook [\"false\"] failed".into(),
                },
                RecentError {
                    at_unix: 999_000,
                    message: "index damaged".into(),
                },
            ],
            counters: Counters {
                hook_failures: 1,
                acme_failures: 0,
            },
            repairs: vec![crate::repair::RepairStatus {
                certificate: "www".into(),
                at: String::new(),
                at_unix: 1_000_000 - 95,
                caused_by: "lb2".into(),
                from_version: 3,
                reason: "live/www missing".into(),
            }],
            cluster: None,
        }
    }

    #[test]
    fn table_is_aligned_and_complete() {
        let out = render(&sample());
        let lines: Vec<&str> = out.lines().collect();
        let head = lines.iter().position(|l| l.starts_with("PEER")).unwrap();
        let col = |l: &str| {
            l.find("CONNECTED")
                .or_else(|| l.find("yes"))
                .or_else(|| l.find("no "))
        };
        assert_eq!(col(lines[head]), col(lines[head + 1]), "{out}");
        assert_eq!(col(lines[head]), col(lines[head + 2]), "{out}");
        for needle in [
            "TREE",
            "OUT OF SYNC",
            "SCANS",
            "in sync",
            "just now",
            "4 out of sync",
            "5m12s ago",
            "0.41ms",
            "peer lb2: timed out",
            "10s ago: hook",
            "index damaged",
            "since start: 1 hook failures, 0 ACME failures",
            "up 2h01m",
            "REPAIRED",
            "1m35s ago",
            "live/www missing",
            "too large, not fetched: big.iso (2097152 bytes",
            "  reader",
            "not sent: this node is not a writer (2 local changes put back): live/www/cert.pem",
            "refused from lb2: 3 records for their authorship (last: live/www/privkey.pem, \
             claiming lb1 (B): the signature does not match the record)",
        ] {
            assert!(out.contains(needle), "{needle:?} missing in:\n{out}");
        }
        assert!(!out.contains("second line"), "{out}");
    }

    #[test]
    fn ages() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(95), "1m35s");
        assert_eq!(age(7300), "2h01m");
        assert_eq!(age(200_000), "2d07h");
        assert_eq!(age(-5), "0s");
    }
}

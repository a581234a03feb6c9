//! The local control socket (`state_dir/control.sock`, mode 0600): one JSON request
//! per line, one JSON answer per line. `status` is the only command of the sync core.

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
    pub certificates: Vec<serde_json::Value>,
    pub errors: Vec<String>,
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

/// Builds the status from the live state.
pub fn status(shared: &Shared) -> Status {
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
            sequence: st.index.sequence(),
        },
        peers,
        certificates: Vec::new(),
        errors: st.errors.iter().cloned().collect(),
    }
}

#[derive(Deserialize)]
struct Request {
    cmd: String,
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
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) if req.cmd == "status" => serde_json::to_value(status(&shared))?,
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
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (is `certmesh run` running with this config?)",
            socket.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut req = serde_json::to_vec(&serde_json::json!({ "cmd": cmd }))?;
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
    if !s.errors.is_empty() {
        let _ = writeln!(o, "\nrecent errors:");
        for e in &s.errors {
            let _ = writeln!(o, "  {e}");
        }
    }
    o
}

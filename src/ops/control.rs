//! The local control socket (`state_dir/control.sock`, mode 0600): one JSON request
//! per line, one JSON answer per line. Commands: `status`; `issue` (with `name`) and
//! `renew` (with `force`, `dry_run`), which the ACME driver answers once done;
//! `confirm` (with `path`, `timeout_ms`). The status types and their rendering are in
//! [`crate::ops::status`] (re-exported here).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::acme::handle::AcmeSlot;
use crate::handles::acme::Barrier;
use crate::net::clients::Clients;
use crate::ops::observe::StatusSource;
use crate::ops::status::Status;

/// What the control socket answers from.
#[derive(Clone)]
pub struct ControlHandles {
    pub status: StatusSource,
    pub acme: AcmeSlot,
    pub barrier: Barrier,
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
        /// Past [`crate::ops::status::SUMMARY_ABOVE`] certificates, send them summed
        /// up ([`Status::cert_summary`]) instead of every one (text `status`).
        #[serde(default)]
        summary: bool,
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
    /// (the ACME challenge barrier, on any path).
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
async fn confirm(h: &ControlHandles, path: &str, timeout_ms: u64) -> serde_json::Value {
    let path = match crate::core::paths::RelPath::parse_shared(path) {
        Ok(p) => p,
        Err(e) => return serde_json::json!({ "error": format!("{path}: {e}") }),
    };
    if !h.status.observer().indexed(&path) {
        return serde_json::json!({ "error": format!("{path} is not in this node's index") });
    }
    let timeout = Duration::from_millis(timeout_ms.min(600_000));
    let acks = h.barrier.wait(&path, timeout).await;
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
pub fn start(h: ControlHandles, path: &Path) -> anyhow::Result<tokio::task::JoinHandle<()>> {
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
    Ok(crate::net::clients::serve_forever(
        listener,
        clients,
        None,
        move |stream| serve(h.clone(), stream),
    ))
}

/// Control clients served at once (`status`, `issue`, `renew` are one-shot).
const MAX_CLIENTS: usize = 32;
/// A client that sends no complete request line for this long is dropped.
const IDLE: Duration = Duration::from_secs(30);

async fn serve(h: ControlHandles, stream: UnixStream) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(64 << 10)).lines();
    while let Some(line) = tokio::time::timeout(IDLE, lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("no request within {IDLE:?}"))??
    {
        let no_acme = || serde_json::json!({ "error": "[acme] is not configured on this node" });
        let answer = match parse_request(&line) {
            // Straight to bytes: at 10,000 certificates the answer is ~9 MB, and a
            // `serde_json::Value` of it first cost as much again.
            Ok(Request::Status {
                cluster_ms,
                summary,
            }) => {
                let cluster = match cluster_ms {
                    Some(ms) => Some(
                        crate::ops::census::run(&h.barrier, Duration::from_millis(ms.min(600_000)))
                            .await,
                    ),
                    None => None,
                };
                let mut s = Status {
                    cluster,
                    ..h.status.status()
                };
                if summary {
                    s.summarise();
                }
                let mut out = serde_json::to_vec(&s)?;
                out.push(b'\n');
                w.write_all(&out).await?;
                continue;
            }
            Ok(Request::Issue { name }) => match (h.acme.get(), name) {
                (None, _) => no_acme(),
                (_, None) => serde_json::json!({ "error": "issue needs a certificate name" }),
                (Some(a), Some(name)) => reply(a.issue(name).await)?,
            },
            Ok(Request::Renew { force, dry_run }) => match h.acme.get() {
                None => no_acme(),
                Some(a) => reply(a.renew(force, dry_run).await)?,
            },
            Ok(Request::Confirm { path, timeout_ms }) => confirm(&h, &path, timeout_ms).await,
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
    Ok(serde_json::from_str(&answer_line(socket, request).await?)?)
}

/// Client side: the daemon's answer to `status`, typed, decoded once.
/// `summary`: many certificates come summed up ([`Request::Status`]).
pub async fn status(
    socket: &Path,
    cluster_ms: Option<u64>,
    summary: bool,
) -> anyhow::Result<Status> {
    let request = Request::Status {
        cluster_ms,
        summary,
    };
    let line = answer_line(socket, serde_json::to_value(request)?).await?;
    serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("daemon answer: {e}"))
}

/// Client side: the daemon's answer line to `request`, unless it is an error.
pub async fn answer_line(socket: &Path, request: serde_json::Value) -> anyhow::Result<String> {
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
    let line = lines.next_line().await?.ok_or_else(|| {
        anyhow::anyhow!(
            "the daemon closed the control socket without answering: it stopped or \
                 crashed while handling the request; see its log (`journalctl -u certmesh`, \
                 or the stderr of `certmesh run`) and whether it is still running"
        )
    })?;
    // An error is `{"error": ...}` alone (see `serve`); nothing else starts so.
    if line.starts_with("{\"error\":") {
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("daemon: {e}");
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_parse_as_before_and_name_what_is_wrong() {
        use super::{parse_request, Request};
        assert_eq!(
            parse_request(r#"{"cmd":"status"}"#),
            Ok(Request::Status {
                cluster_ms: None,
                summary: false
            })
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
}

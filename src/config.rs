//! The TOML config: serde structs with `deny_unknown_fields`, turned into a validated
//! `Config` at start-up. Every error names the key and the line. Nothing else in the
//! crate reads TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::identity::DeviceId;

/// A config that can't be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing key or a wrong type.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value that parses but is not acceptable.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    tree: RawTree,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

/// `[node]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    /// Human name of this node, shown to peers and in status.
    name: Spanned<String>,
    /// Identity, index and control socket live here.
    state_dir: Spanned<String>,
    /// UDP address the QUIC endpoint binds (the backnet address).
    listen: Spanned<String>,
}

/// `[tree]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTree {
    /// The directory kept identical on every node.
    path: Spanned<String>,
    /// Safety-net full rescan period (the watcher handles changes in between).
    rescan_interval: Option<Spanned<String>>,
}

/// `[[peer]]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    /// Name shown in status and logs.
    name: Spanned<String>,
    /// The peer's device ID (`certmesh id` on that node).
    id: Spanned<String>,
    /// Where to dial it (host:port, UDP).
    address: Spanned<String>,
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub id: DeviceId,
    pub address: SocketAddr,
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub name: String,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub tree: PathBuf,
    pub rescan_interval: Duration,
    pub peers: Vec<PeerConfig>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let bad = |span: std::ops::Range<usize>, key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: text[..span.start.min(text.len())].matches('\n').count() + 1,
            key: key.to_string(),
            message,
        };
        let name = raw.node.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err(bad(
                raw.node.name.span(),
                "node.name",
                "must not be empty".into(),
            ));
        }
        let state_dir = absolute(&raw.node.state_dir)
            .map_err(|m| bad(raw.node.state_dir.span(), "node.state_dir", m))?;
        let listen = raw
            .node
            .listen
            .get_ref()
            .parse::<SocketAddr>()
            .map_err(|e| {
                bad(
                    raw.node.listen.span(),
                    "node.listen",
                    format!("{e} (expected ip:port, e.g. \"[2001:db8::1]:22000\")"),
                )
            })?;
        let tree =
            absolute(&raw.tree.path).map_err(|m| bad(raw.tree.path.span(), "tree.path", m))?;
        if state_dir.starts_with(&tree) {
            return Err(bad(
                raw.node.state_dir.span(),
                "node.state_dir",
                "must not be inside tree.path (the node key would be replicated)".into(),
            ));
        }
        let rescan_interval = match &raw.tree.rescan_interval {
            None => Duration::from_secs(3600),
            Some(s) => {
                let d = parse_duration(s.get_ref())
                    .map_err(|m| bad(s.span(), "tree.rescan_interval", m))?;
                if d < Duration::from_secs(1) {
                    return Err(bad(
                        s.span(),
                        "tree.rescan_interval",
                        "must be at least 1s".into(),
                    ));
                }
                d
            }
        };
        let mut peers: Vec<PeerConfig> = Vec::new();
        for p in &raw.peer {
            let pname = p.name.get_ref().trim().to_string();
            if pname.is_empty() {
                return Err(bad(p.name.span(), "peer.name", "must not be empty".into()));
            }
            let id =
                p.id.get_ref()
                    .parse::<DeviceId>()
                    .map_err(|e| bad(p.id.span(), "peer.id", format!("peer {pname:?}: {e}")))?;
            let address = p.address.get_ref().parse::<SocketAddr>().map_err(|e| {
                bad(
                    p.address.span(),
                    "peer.address",
                    format!("peer {pname:?}: {e} (expected ip:port)"),
                )
            })?;
            if pname == name || peers.iter().any(|q| q.name == pname) {
                return Err(bad(
                    p.name.span(),
                    "peer.name",
                    format!("duplicate name {pname:?}"),
                ));
            }
            if peers.iter().any(|q| q.id == id) {
                return Err(bad(
                    p.id.span(),
                    "peer.id",
                    format!("peer {pname:?}: device ID listed twice"),
                ));
            }
            peers.push(PeerConfig {
                name: pname,
                id,
                address,
            });
        }
        Ok(Config {
            file: path.to_path_buf(),
            name,
            state_dir,
            listen,
            tree,
            rescan_interval,
            peers,
        })
    }

    /// The control socket of the daemon using this config.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }
}

fn absolute(s: &Spanned<String>) -> Result<PathBuf, String> {
    let p = PathBuf::from(s.get_ref());
    if !p.is_absolute() {
        return Err(format!("{:?} must be an absolute path", s.get_ref()));
    }
    Ok(p)
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"7d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. \"30s\", \"5m\", \"1h\")"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: unit must be ms, s, m, h or d")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DP-BONSGYY-LTMRWAD";

    fn cfg(extra: &str) -> String {
        format!(
            "[node]\nname = \"lb0\"\nstate_dir = \"/var/lib/certmesh\"\nlisten = \"127.0.0.1:22000\"\n\n[tree]\npath = \"/etc/nginx/certs\"\n{extra}"
        )
    }

    fn err(text: &str) -> String {
        Config::parse(Path::new("c.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_config() {
        let id = DeviceId::of_cert(b"x").to_string();
        let c = Config::parse(
            Path::new("c.toml"),
            &cfg(&format!("rescan_interval = \"10m\"\n[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"[2001:db8::2]:22000\"\n")),
        )
        .unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.rescan_interval, Duration::from_secs(600));
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = err(&cfg("colour = \"blue\"\n"));
        assert!(e.contains("colour") && e.contains("line 8"), "{e}");
        let id = DeviceId::of_cert(b"x").to_string();
        let mut typo = id.clone().into_bytes();
        typo[0] = if typo[0] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        let e = err(&cfg(&format!(
            "[[peer]]\nname = \"lb1\"\nid = \"{typo}\"\naddress = \"127.0.0.2:1\"\n"
        )));
        assert!(e.contains(":10: peer.id") && e.contains("mistyped"), "{e}");
        let e = err(&cfg(&format!(
            "[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"nowhere\"\n"
        )));
        assert!(e.contains("peer.address"), "{e}");
        let e = err(&cfg("rescan_interval = \"10 parsecs\"\n"));
        assert!(e.contains("tree.rescan_interval"), "{e}");
        let e = err(&cfg(&format!(
            "[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"127.0.0.2:1\"\n[[peer]]\nname = \"lb2\"\nid = \"{id}\"\naddress = \"127.0.0.3:1\"\n"
        )));
        assert!(e.contains("listed twice") && e.contains(":14:"), "{e}");
        let e = err(&cfg("").replace("/var/lib/certmesh", "relative"));
        assert!(
            e.contains("node.state_dir") && e.contains("absolute"),
            "{e}"
        );
        let e = err(&cfg("").replace("/var/lib/certmesh", "/etc/nginx/certs/state"));
        assert!(e.contains("inside tree.path"), "{e}");
        let _ = ID;
    }
}

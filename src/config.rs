//! The TOML config: serde structs with `deny_unknown_fields`, turned into a validated
//! `Config` at start-up. Every error names the key and the line. Nothing else in the
//! crate reads TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::core::device::{DeviceId, DeviceIdError};

mod dns;
pub mod frontend;
mod globs;
pub mod tree_certs;

pub use dns::{ChallengeChoice, DnsConfig, DnsProvider, TsigAlgorithm, TsigKeyConfig};
pub use globs::Globs;

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
    acme: Option<RawAcme>,
    #[serde(default)]
    certificate: Vec<RawCertificate>,
    #[serde(default)]
    hook: Vec<RawHook>,
    #[serde(default)]
    frontend: Vec<frontend::RawFrontend>,
    http: Option<RawHttp>,
    metrics: Option<RawMetrics>,
}

/// `[acme]`: present on the nodes allowed to order certificates.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    /// The CA's ACME directory URL (staging vs production is just this), or a list
    /// of them tried in order per order attempt (a fallback CA).
    directory: Spanned<RawDirectories>,
    /// Account contacts, e.g. `["mailto:ops@example.com"]`.
    #[serde(default)]
    contact: Vec<Spanned<String>>,
    /// PEM file of extra roots to trust for the directory's HTTPS (private/test CAs).
    ca_roots: Option<Spanned<String>>,
    /// External account binding: key ID given by the CA.
    eab_kid: Option<Spanned<String>>,
    /// External account binding: base64url HMAC key given by the CA.
    eab_hmac: Option<Spanned<String>>,
    /// ACME profile to request (only if the CA offers profiles).
    profile: Option<Spanned<String>>,
    /// How long peers get to acknowledge a challenge file before `set_ready` anyway.
    barrier_timeout: Option<Spanned<String>>,
    /// How long a starting node waits for its first configured peer to connect
    /// before it orders anyway (default 30s; no wait without peers).
    startup_grace: Option<Spanned<String>>,
    /// How long a renewer's lease holds off the other nodes (default 2m).
    lease: Option<Spanned<String>>,
    /// Longest any one request to the CA may take, body included (default 30s).
    request_timeout: Option<Spanned<String>>,
    /// New orders per hour at most, per CA (default 50: half of Let's Encrypt's
    /// 300 per 3 hours).
    max_orders_per_hour: Option<Spanned<i64>>,
    /// `[acme.dns]`: how dns-01 records are published (needed for wildcards).
    dns: Option<Spanned<dns::RawDns>>,
}

/// `acme.directory`: one URL, or a list tried in order.
enum RawDirectories {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for RawDirectories {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawDirectories;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an https:// directory URL, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDirectories, E> {
                Ok(RawDirectories::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawDirectories, A::Error> {
                let mut out = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    out.push(url);
                }
                Ok(RawDirectories::Many(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[[certificate]]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    /// Directory name under `live/` and `archive/`.
    name: Spanned<String>,
    /// DNS names (SANs), 1 to 100.
    domains: Spanned<Vec<String>>,
    /// rsa2048 | rsa3072 | rsa4096 | ecdsa-p256 | ecdsa-p384
    key: Option<Spanned<String>>,
    /// Keep the current private key on renewal (default: a new key every time).
    #[serde(default)]
    reuse_key: bool,
    /// "http-01" | "dns-01"; unset: dns-01 for wildcard names, http-01 for the rest.
    challenge: Option<Spanned<String>>,
    /// "publish" (default) | "verify": after publishing a new version, the node that
    /// published it checks its own frontends and flips `live/` back if they do not
    /// serve it (issue 26 item 6).
    rollout: Option<Spanned<String>>,
}

/// `[[hook]]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    /// Globs relative to the tree, e.g. `"live/www.example.com/**"`.
    paths: Spanned<Vec<String>>,
    /// argv, run without a shell (or `haproxy_socket` + `haproxy_crt` instead).
    run: Option<Spanned<Vec<String>>>,
    /// HAProxy runtime API socket (admin level): a unix socket path or `ip:port`.
    haproxy_socket: Option<Spanned<String>>,
    /// The certificate path as HAProxy's `crt` names it (`show ssl cert`).
    haproxy_crt: Option<Spanned<String>>,
    /// Killed after this long (default 30s).
    timeout: Option<Spanned<String>>,
    /// While changes keep coming, runs at most once per this long (default 5s).
    min_interval: Option<Spanned<String>>,
}

/// `[http]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// Address of the built-in http-01 responder.
    listen: Spanned<String>,
}

/// `[metrics]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP; keep it local or
    /// on the backnet).
    listen: Spanned<String>,
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
    /// RFC 7919 group written once to `<tree>/dhparam.pem`: ffdhe2048 | ffdhe3072 | ffdhe4096.
    dhparam: Option<Spanned<String>>,
    /// Largest file fetched from a peer (default "64MiB"): a size like "512KiB",
    /// "64MiB", "1GiB", or a number of bytes. Larger ones are not fetched (shown in
    /// `status`); local files of any size are still announced.
    max_file_size: Option<Spanned<RawSize>>,
    /// Most bytes of file content this node holds in the tree (default "256MiB"):
    /// past it, peers' new paths and growing files are not fetched (shown in
    /// `status`, acknowledged as refused); nothing held is removed.
    max_size: Option<Spanned<RawSize>>,
    /// Most live paths in the tree (default 200000): past it, peers' new paths are
    /// not fetched (shown in `status`); nothing held is removed.
    max_files: Option<Spanned<u64>>,
    /// Free space a fetch must leave on the tree's filesystem (default "5%"): a
    /// percentage like "5%" or "0.5%", or a size like "1GiB". A peer's file that
    /// would leave less is not fetched (shown in `status`).
    min_disk_free: Option<Spanned<RawSize>>,
    /// Most bytes the versions kept of what peers' changes replaced or deleted may
    /// hold together (default "256MiB"; `certmesh restore`). Versions of another
    /// node's work are evicted last.
    kept_max_size: Option<Spanned<RawSize>>,
    /// The nodes allowed to change the tree: this node's name, `[[peer]]` names, or
    /// device IDs of nodes further away. Absent: every node may. Records whose
    /// author is not listed are refused; a node not listed keeps its own tree at the
    /// writers' version (issue 13).
    writers: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A size: a number of bytes or a string with a binary unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
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

/// One entry of `[tree] writers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// `node.name`: this node.
    ThisNode,
    /// A `[[peer]]` by name.
    Peer { name: String, id: DeviceId },
    /// A device ID (a node further away than the configured peers, or any node).
    Device(DeviceId),
}

impl Writer {
    /// The device ID, given this node's own.
    pub fn id(&self, me: DeviceId) -> DeviceId {
        match self {
            Writer::ThisNode => me,
            Writer::Peer { id, .. } | Writer::Device(id) => *id,
        }
    }
}

/// Private key algorithm of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa2048,
    Rsa3072,
    Rsa4096,
    EcdsaP256,
    EcdsaP384,
}

impl KeyType {
    pub const NAMES: &'static str = "rsa2048 | rsa3072 | rsa4096 | ecdsa-p256 | ecdsa-p384";

    pub fn parse(s: &str) -> Option<KeyType> {
        Some(match s {
            "rsa2048" => KeyType::Rsa2048,
            "rsa3072" => KeyType::Rsa3072,
            "rsa4096" => KeyType::Rsa4096,
            "ecdsa-p256" => KeyType::EcdsaP256,
            "ecdsa-p384" => KeyType::EcdsaP384,
            _ => return None,
        })
    }
}

/// `acme.max_orders_per_hour` unset: 150 per 3 hours, half of Let's Encrypt's 300.
pub const DEFAULT_MAX_ORDERS_PER_HOUR: u32 = 50;

/// `[acme]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The first CA's directory URL: every order attempt starts here, and its
    /// account is the one in `.certmesh/acme/account.json`.
    pub directory: String,
    /// Further CAs (`directory = [first, ...]`), each tried in turn when the one
    /// before is unreachable, answers 5xx or rate-limits the order.
    pub fallback: Vec<String>,
    pub contact: Vec<String>,
    pub ca_roots: Option<PathBuf>,
    /// External account binding (key ID, base64url HMAC key).
    pub eab: Option<(String, String)>,
    pub profile: Option<String>,
    pub barrier_timeout: Duration,
    /// `acme.startup_grace`: at start-up, no order while none of the configured peers
    /// is connected, for up to this long (issue 23).
    pub startup_grace: Duration,
    /// Renewal lease duration: how long others wait for a renewer that went silent.
    pub lease: Duration,
    /// Longest any one request to the CA may take, body included.
    pub request_timeout: Duration,
    /// `acme.max_orders_per_hour`: the renewer's order budget (issue 29).
    pub max_orders_per_hour: u32,
    /// `[acme.dns]`: dns-01 provider; `None`: only http-01 certificates can be ordered.
    pub dns: Option<DnsConfig>,
}

impl AcmeConfig {
    /// Every configured CA's directory URL, in the order they are tried.
    pub fn directories(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.directory.as_str()).chain(self.fallback.iter().map(String::as_str))
    }
}

/// One `[[certificate]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateConfig {
    pub name: String,
    pub domains: Vec<String>,
    pub key: KeyType,
    pub reuse_key: bool,
    /// Which identifiers use dns-01 ([`ChallengeChoice::uses_dns`]).
    pub challenge: ChallengeChoice,
    /// `rollout = "verify"`: the publisher's own frontends must serve a new version,
    /// or it flips `live/<name>` back (issue 26 item 6).
    pub verify_rollout: bool,
    /// Where it was declared: this node's config file, or the tree
    /// (`.certmesh/certificates/<name>.toml`, `certmesh cert add`).
    pub source: CertSource,
}

/// Where a certificate was declared (`status` `certificates[].source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// A `[[certificate]]` block in this node's config (wins on conflict).
    #[default]
    Config,
    /// A file under `.certmesh/certificates/` in the replicated tree.
    Tree,
}

impl CertSource {
    /// "config" or "tree".
    pub fn label(self) -> &'static str {
        match self {
            CertSource::Config => "config",
            CertSource::Tree => "tree",
        }
    }
}

impl CertificateConfig {
    /// Whether any identifier of this certificate is validated with dns-01.
    pub fn needs_dns(&self) -> bool {
        self.domains.iter().any(|d| self.challenge.uses_dns(d))
    }

    /// "http-01", "dns-01" or "dns-01+http-01" (status).
    pub fn challenge_label(&self) -> &'static str {
        let dns = self
            .domains
            .iter()
            .filter(|d| self.challenge.uses_dns(d))
            .count();
        match dns {
            0 => "http-01",
            n if n == self.domains.len() => "dns-01",
            _ => "dns-01+http-01",
        }
    }
}

/// One `[[hook]]`.
#[derive(Debug, Clone)]
pub struct HookConfig {
    pub paths: Vec<String>,
    pub matcher: Globs,
    pub action: HookAction,
    pub timeout: Duration,
    /// `hook.min_interval`: while certificates keep changing, the hook runs at most
    /// once per this long, and never later than [`HOOK_MAX_DELAY`] after the first
    /// change a run covers (issue 29).
    pub min_interval: Duration,
}

/// A hook run never comes later than this after the first change it covers.
pub const HOOK_MAX_DELAY: Duration = Duration::from_secs(30);

/// What a `[[hook]]` does when its paths change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// `run = [argv]`: a command, without a shell.
    Run(Vec<String>),
    /// `haproxy_socket` + `haproxy_crt`: push `live/<cert>/combined.pem` through the
    /// HAProxy runtime API (`set ssl cert` + `commit ssl cert`), no reload.
    Haproxy {
        socket: HaproxySocket,
        /// The certificate path as HAProxy knows it.
        crt: String,
        /// The certificate name (`live/<cert>/`), from the hook's `paths`.
        cert: String,
    },
}

/// Where HAProxy's runtime API listens (`stats socket ... level admin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaproxySocket {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for HaproxySocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HaproxySocket::Unix(p) => write!(f, "{}", p.display()),
            HaproxySocket::Tcp(a) => write!(f, "{a}"),
        }
    }
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
    /// `tree.dhparam`: the group to write to `<tree>/dhparam.pem` if absent.
    pub dhparam: Option<crate::dhgroup::DhGroup>,
    /// `tree.max_file_size`: larger files from peers are not fetched.
    pub max_file_size: u64,
    /// `tree.max_size`, `tree.max_files`, `tree.min_disk_free`.
    pub budget: crate::core::plan::TreeBudget,
    /// `tree.kept_max_size`: the bytes kept versions may hold together.
    pub kept_max_size: u64,
    /// `tree.writers`: `None`, every node may change the tree.
    pub writers: Option<Vec<Writer>>,
    pub peers: Vec<PeerConfig>,
    /// `None`: this node never orders (it still shows and syncs certificates).
    pub acme: Option<AcmeConfig>,
    pub certificates: Vec<CertificateConfig>,
    pub hooks: Vec<HookConfig>,
    /// `[[frontend]]`: this node's TLS servers, probed for what they serve.
    pub frontends: Vec<frontend::FrontendConfig>,
    /// Built-in http-01 responder address.
    pub http_listen: Option<SocketAddr>,
    /// Prometheus `/metrics` endpoint address (`[metrics] listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// Where some keys are in the file, for the checks made after parsing.
    pub lines: KeyLines,
}

/// Lines (1-based) of the keys checked against the disk or the identity after
/// parsing, so those errors name the line too.
#[derive(Debug, Clone, Default)]
pub struct KeyLines {
    /// `tree.path`.
    pub tree_path: usize,
    /// Each `[[peer]]`'s `id`, in `peers` order.
    pub peer_ids: Vec<usize>,
}

impl Config {
    /// Keys whose change a SIGHUP cannot apply (only `[[peer]]` and
    /// `rescan_interval` are reloaded live): they need a restart.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        // Sections without PartialEq compare by their Debug rendering: any change counts.
        let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}");
        let mut out = Vec::new();
        let checks: [(&'static str, bool); 14] = [
            ("tree.writers", self.writers != new.writers),
            ("node.name", self.name != new.name),
            ("node.state_dir", self.state_dir != new.state_dir),
            ("node.listen", self.listen != new.listen),
            ("tree.path", self.tree != new.tree),
            ("tree.dhparam", self.dhparam != new.dhparam),
            (
                "tree.max_file_size",
                self.max_file_size != new.max_file_size,
            ),
            ("tree.budget", self.budget != new.budget),
            (
                "tree.kept_max_size",
                self.kept_max_size != new.kept_max_size,
            ),
            ("acme", dbg(&self.acme) != dbg(&new.acme)),
            (
                "certificate",
                dbg(&self.configured_certificates()) != dbg(&new.configured_certificates()),
            ),
            ("hook", dbg(&self.hooks) != dbg(&new.hooks)),
            ("http.listen", self.http_listen != new.http_listen),
            ("metrics.listen", self.metrics_listen != new.metrics_listen),
        ];
        for (key, changed) in checks {
            if changed {
                out.push(key);
            }
        }
        out
    }

    /// The `[[certificate]]` blocks of the config file, without those the tree adds.
    pub fn configured_certificates(&self) -> Vec<&CertificateConfig> {
        self.certificates
            .iter()
            .filter(|c| c.source == CertSource::Config)
            .collect()
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` is only used in messages. Each section is checked
    /// in file order; the first bad value is the error.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let line_of = |span: std::ops::Range<usize>| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        };
        let bad = |span: std::ops::Range<usize>, key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(span),
            key: key.to_string(),
            message,
        };
        let lines = KeyLines {
            tree_path: line_of(raw.tree.path.span()),
            peer_ids: raw.peer.iter().map(|p| line_of(p.id.span())).collect(),
        };
        let (name, state_dir, listen) = node(&raw.node, &bad)?;
        let tree =
            absolute(&raw.tree.path).map_err(|m| bad(raw.tree.path.span(), "tree.path", m))?;
        if state_dir.starts_with(&tree) {
            return Err(bad(
                raw.node.state_dir.span(),
                "node.state_dir",
                "must not be inside tree.path (the node key would be replicated)".into(),
            ));
        }
        let TreeSettings {
            rescan_interval,
            dhparam,
            max_file_size,
            budget,
            kept_max_size,
        } = tree_settings(&raw.tree, &bad)?;
        let peers = peers(&raw.peer, &name, &bad)?;
        let writers = raw
            .tree
            .writers
            .as_ref()
            .map(|w| writers(w, &name, &peers, &bad))
            .transpose()?;
        let acme = raw
            .acme
            .as_ref()
            .map(|a| acme(a, &tree, &bad))
            .transpose()?;
        if let (Some(a), Some(w)) = (&raw.acme, &writers) {
            acme_on_a_writer(a, w, &name, &bad)?;
        }
        let certificates = certificates(&raw.certificate, acme.as_ref(), &bad)?;
        let hooks = raw
            .hook
            .iter()
            .map(|h| hook(h, &bad))
            .collect::<Result<Vec<_>, _>>()?;
        let frontends = frontend::frontends(&raw.frontend, &certificates, &bad)?;
        let http_listen = raw
            .http
            .as_ref()
            .map(|h| listen_addr(&h.listen, "http.listen", "127.0.0.1:8402", &bad))
            .transpose()?;
        let metrics_listen = raw
            .metrics
            .as_ref()
            .map(|m| listen_addr(&m.listen, "metrics.listen", "127.0.0.1:9402", &bad))
            .transpose()?;
        Ok(Config {
            file: path.to_path_buf(),
            name,
            state_dir,
            listen,
            tree,
            rescan_interval,
            dhparam,
            max_file_size,
            budget,
            kept_max_size,
            writers,
            peers,
            acme,
            certificates,
            hooks,
            frontends,
            http_listen,
            metrics_listen,
            lines,
        })
    }

    /// `tree.path` exists and is a directory. certmesh never creates it: a typo would
    /// otherwise become a new, synced tree nobody serves (issue 23).
    pub fn check_tree_exists(&self) -> Result<(), ConfigError> {
        let problem = match std::fs::metadata(&self.tree) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => "is not a directory".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
                "does not exist; certmesh does not create it (a typo would become a new tree): \
                 create it, e.g. `install -d -m 2755 {}`, or fix the path",
                self.tree.display()
            ),
            Err(e) => e.to_string(),
        };
        Err(ConfigError::Invalid {
            path: self.file.clone(),
            line: self.lines.tree_path,
            key: "tree.path".into(),
            message: format!("{}: {problem}", self.tree.display()),
        })
    }

    /// No `[[peer]]` has this node's own device ID `me`.
    pub fn check_not_own_peer(&self, me: DeviceId) -> Result<(), ConfigError> {
        match self.peers.iter().position(|p| p.id == me) {
            None => Ok(()),
            Some(i) => Err(ConfigError::Invalid {
                path: self.file.clone(),
                line: self.lines.peer_ids.get(i).copied().unwrap_or(0),
                key: "peer.id".into(),
                message: format!(
                    "peer {:?} has this node's own device ID (from node.state_dir {}); \
                     list the other nodes' IDs (`certmesh id` on each)",
                    self.peers[i].name,
                    self.state_dir.display()
                ),
            }),
        }
    }

    /// The control socket of the daemon using this config.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }
}

type Bad<'a> = dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError + 'a;

/// `[node]`: the name, the state directory and the QUIC address.
fn node(n: &RawNode, bad: &Bad) -> Result<(String, PathBuf, SocketAddr), ConfigError> {
    let name = n.name.get_ref().trim().to_string();
    if name.is_empty() {
        return Err(bad(n.name.span(), "node.name", "must not be empty".into()));
    }
    let state_dir =
        absolute(&n.state_dir).map_err(|m| bad(n.state_dir.span(), "node.state_dir", m))?;
    let listen = n.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
        bad(
            n.listen.span(),
            "node.listen",
            format!("{e} (expected ip:port, e.g. \"[2001:db8::1]:22000\")"),
        )
    })?;
    Ok((name, state_dir, listen))
}

/// `[tree]` besides its path and writers.
struct TreeSettings {
    rescan_interval: Duration,
    dhparam: Option<crate::dhgroup::DhGroup>,
    max_file_size: u64,
    budget: crate::core::plan::TreeBudget,
    kept_max_size: u64,
}

/// A size key of `[tree]`: its value in bytes, or `default` when absent.
fn size_key(
    v: &Option<Spanned<RawSize>>,
    key: &str,
    default: u64,
    bad: &Bad,
) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => match s.get_ref() {
            RawSize::Bytes(n) => Ok(*n),
            RawSize::Text(t) => parse_size(t),
        }
        .map_err(|m| bad(s.span(), key, m)),
    }
}

/// `[tree] max_size`, `max_files`, `min_disk_free` and `kept_max_size`.
fn budgets(t: &RawTree, bad: &Bad) -> Result<(crate::core::plan::TreeBudget, u64), ConfigError> {
    use crate::core::plan::{MinFree, TreeBudget};
    let d = TreeBudget::default();
    let positive = |v: &Option<Spanned<RawSize>>, key: &str, default: u64| {
        let n = size_key(v, key, default, bad)?;
        match v {
            Some(s) if n == 0 => Err(bad(s.span(), key, "must be more than 0".into())),
            _ => Ok(n),
        }
    };
    let max_size = positive(&t.max_size, "tree.max_size", d.max_size)?;
    let kept = positive(
        &t.kept_max_size,
        "tree.kept_max_size",
        crate::disk::keep::MAX_TOTAL_BYTES,
    )?;
    let max_files = match &t.max_files {
        None => d.max_files,
        Some(s) => match usize::try_from(*s.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(bad(
                    s.span(),
                    "tree.max_files",
                    format!("{} is not a number of files above 0", s.get_ref()),
                ))
            }
        },
    };
    let min_disk_free = match &t.min_disk_free {
        None => d.min_disk_free,
        Some(s) => match s.get_ref() {
            RawSize::Bytes(n) => MinFree::Bytes(*n),
            RawSize::Text(v) if v.trim().ends_with('%') => MinFree::Basis(
                parse_percent(v).map_err(|m| bad(s.span(), "tree.min_disk_free", m))?,
            ),
            RawSize::Text(v) => {
                MinFree::Bytes(parse_size(v).map_err(|m| bad(s.span(), "tree.min_disk_free", m))?)
            }
        },
    };
    let budget = TreeBudget {
        max_size,
        max_files,
        min_disk_free,
    };
    Ok((budget, kept))
}

/// "5%" or "0.5%" as hundredths of a percent, at most 100 %.
fn parse_percent(v: &str) -> Result<u32, String> {
    let num = v.trim().trim_end_matches('%').trim();
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let ok = digits(whole) && (frac.is_empty() || (digits(frac) && frac.len() <= 2));
    let basis = ok
        .then(|| {
            let w: u32 = whole.parse().ok()?;
            let f: u32 = format!("{frac:0<2}").parse().ok()?;
            w.checked_mul(100)?.checked_add(f)
        })
        .flatten()
        .filter(|b| *b <= 10_000);
    basis.ok_or_else(|| {
        format!("{v:?} is not a percentage from 0% to 100% (e.g. \"5%\") or a size (e.g. \"1GiB\")")
    })
}

/// `[tree]`: `rescan_interval` (at least 1s), `dhparam`, `max_file_size`, budgets.
fn tree_settings(t: &RawTree, bad: &Bad) -> Result<TreeSettings, ConfigError> {
    let rescan_interval = match &t.rescan_interval {
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
    let dhparam = match &t.dhparam {
        None => None,
        Some(s) => Some(crate::dhgroup::DhGroup::parse(s.get_ref()).ok_or_else(|| {
            bad(
                s.span(),
                "tree.dhparam",
                format!(
                    "unknown group {:?} (expected {})",
                    s.get_ref(),
                    crate::dhgroup::DhGroup::NAMES
                ),
            )
        })?),
    };
    let max_file_size = size_key(
        &t.max_file_size,
        "tree.max_file_size",
        crate::core::plan::DEFAULT_MAX_FILE_SIZE,
        bad,
    )?;
    let (budget, kept_max_size) = budgets(t, bad)?;
    Ok(TreeSettings {
        rescan_interval,
        dhparam,
        max_file_size,
        budget,
        kept_max_size,
    })
}

/// `[[peer]]`: names unique (and not this node's `name`), device IDs unique.
fn peers(raw: &[RawPeer], name: &str, bad: &Bad) -> Result<Vec<PeerConfig>, ConfigError> {
    let mut peers: Vec<PeerConfig> = Vec::new();
    for p in raw {
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
    Ok(peers)
}

/// `[acme]` with `tree.writers`: only a writer may renew, so this node (its name or
/// a device ID, which may be its own) must be listed.
fn acme_on_a_writer(
    a: &RawAcme,
    writers: &[Writer],
    name: &str,
    bad: &Bad,
) -> Result<(), ConfigError> {
    let maybe_me = writers
        .iter()
        .any(|w| matches!(w, Writer::ThisNode | Writer::Device(_)));
    if maybe_me {
        return Ok(());
    }
    Err(bad(
        a.directory.span(),
        "acme",
        format!(
            "node {name:?} is not in tree.writers: only writers may renew \
             certificates (add it to tree.writers or remove [acme])"
        ),
    ))
}

/// `[[certificate]]`: each valid, names unique, dns-01 only with `[acme.dns]`.
fn certificates(
    raw: &[RawCertificate],
    acme: Option<&AcmeConfig>,
    bad: &Bad,
) -> Result<Vec<CertificateConfig>, ConfigError> {
    let mut certificates: Vec<CertificateConfig> = Vec::new();
    for c in raw {
        let cert = certificate(c, bad)?;
        if certificates.iter().any(|o| o.name == cert.name) {
            return Err(bad(
                c.name.span(),
                "certificate.name",
                format!("duplicate certificate name {:?}", cert.name),
            ));
        }
        if cert.needs_dns() && acme.is_some_and(|a| a.dns.is_none()) {
            return Err(bad(
                c.challenge.as_ref().map_or(c.domains.span(), |s| s.span()),
                "certificate.challenge",
                format!(
                    "certificate {:?} needs dns-01 (wildcard names or challenge = \"dns-01\"), \
                     which needs [acme.dns] on this node (RFC 2136 server + TSIG key, or exec)",
                    cert.name
                ),
            ));
        }
        certificates.push(cert);
    }
    Ok(certificates)
}

/// A `listen` address (`[http]`, `[metrics]`); `example` is shown when it is not
/// `ip:port`.
fn listen_addr(
    s: &Spanned<String>,
    key: &str,
    example: &str,
    bad: &Bad,
) -> Result<SocketAddr, ConfigError> {
    s.get_ref().parse::<SocketAddr>().map_err(|e| {
        bad(
            s.span(),
            key,
            format!("{e} (expected ip:port, e.g. \"{example}\")"),
        )
    })
}

/// `[tree] writers`: each entry is this node's name, a peer's name or a device ID.
fn writers(
    list: &Spanned<Vec<Spanned<String>>>,
    name: &str,
    peers: &[PeerConfig],
    bad: &Bad,
) -> Result<Vec<Writer>, ConfigError> {
    if list.get_ref().is_empty() {
        return Err(bad(
            list.span(),
            "tree.writers",
            "names no node: nobody could change the tree (remove the key to let every node write)"
                .into(),
        ));
    }
    let mut out: Vec<Writer> = Vec::new();
    for entry in list.get_ref() {
        let s = entry.get_ref().trim();
        let w = if s == name {
            Writer::ThisNode
        } else if let Some(p) = peers.iter().find(|p| p.name == s) {
            Writer::Peer {
                name: p.name.clone(),
                id: p.id,
            }
        } else {
            match s.parse::<DeviceId>() {
                Ok(id) => Writer::Device(id),
                Err(DeviceIdError::Length(_)) => {
                    return Err(bad(
                        entry.span(),
                        "tree.writers",
                        format!(
                            "unknown writer {s:?}: not node.name ({name:?}), a [[peer]] name \
                             or a device ID"
                        ),
                    ))
                }
                Err(e) => {
                    return Err(bad(
                        entry.span(),
                        "tree.writers",
                        format!("writer {s:?}: {e}"),
                    ))
                }
            }
        };
        if out.contains(&w) {
            return Err(bad(
                entry.span(),
                "tree.writers",
                format!("{s:?} listed twice"),
            ));
        }
        out.push(w);
    }
    Ok(out)
}

fn acme(a: &RawAcme, tree: &Path, bad: &Bad) -> Result<AcmeConfig, ConfigError> {
    let (directory, fallback) = directories(&a.directory, bad)?;
    let mut contact = Vec::new();
    for c in &a.contact {
        if !c.get_ref().contains(':') {
            return Err(bad(
                c.span(),
                "acme.contact",
                format!(
                    "{:?} must be a URL such as \"mailto:ops@example.com\"",
                    c.get_ref()
                ),
            ));
        }
        contact.push(c.get_ref().clone());
    }
    let ca_roots = a
        .ca_roots
        .as_ref()
        .map(|r| absolute(r).map_err(|m| bad(r.span(), "acme.ca_roots", m)))
        .transpose()?;
    let eab = match (&a.eab_kid, &a.eab_hmac) {
        (None, None) => None,
        (Some(k), Some(h)) => {
            use data_encoding::BASE64URL_NOPAD;
            if BASE64URL_NOPAD
                .decode(h.get_ref().trim_end_matches('=').as_bytes())
                .is_err()
            {
                return Err(bad(
                    h.span(),
                    "acme.eab_hmac",
                    "must be base64url (as the CA gives it)".into(),
                ));
            }
            Some((k.get_ref().clone(), h.get_ref().clone()))
        }
        (Some(k), None) => {
            return Err(bad(
                k.span(),
                "acme.eab_kid",
                "needs acme.eab_hmac too".into(),
            ))
        }
        (None, Some(h)) => {
            return Err(bad(
                h.span(),
                "acme.eab_hmac",
                "needs acme.eab_kid too".into(),
            ))
        }
    };
    let barrier_timeout = match &a.barrier_timeout {
        None => Duration::from_secs(10),
        Some(s) => {
            parse_duration(s.get_ref()).map_err(|m| bad(s.span(), "acme.barrier_timeout", m))?
        }
    };
    let startup_grace = match &a.startup_grace {
        None => Duration::from_secs(30),
        Some(s) => {
            parse_duration(s.get_ref()).map_err(|m| bad(s.span(), "acme.startup_grace", m))?
        }
    };
    let lease = match &a.lease {
        None => Duration::from_secs(120),
        Some(s) => {
            let d = parse_duration(s.get_ref()).map_err(|m| bad(s.span(), "acme.lease", m))?;
            if d < Duration::from_secs(1) {
                return Err(bad(s.span(), "acme.lease", "must be at least 1s".into()));
            }
            d
        }
    };
    let request_timeout = match &a.request_timeout {
        None => Duration::from_secs(30),
        Some(s) => {
            let d = parse_duration(s.get_ref())
                .map_err(|m| bad(s.span(), "acme.request_timeout", m))?;
            if d < Duration::from_secs(1) {
                return Err(bad(
                    s.span(),
                    "acme.request_timeout",
                    "must be at least 1s".into(),
                ));
            }
            d
        }
    };
    let max_orders_per_hour = match &a.max_orders_per_hour {
        None => DEFAULT_MAX_ORDERS_PER_HOUR,
        Some(n) => u32::try_from(*n.get_ref())
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| {
                bad(
                    n.span(),
                    "acme.max_orders_per_hour",
                    format!("{} is not between 1 and 100000", n.get_ref()),
                )
            })?,
    };
    Ok(AcmeConfig {
        directory,
        fallback,
        contact,
        ca_roots,
        eab,
        profile: a.profile.as_ref().map(|p| p.get_ref().clone()),
        barrier_timeout,
        startup_grace,
        lease,
        request_timeout,
        max_orders_per_hour,
        dns: a.dns.as_ref().map(|d| dns::dns(d, tree, bad)).transpose()?,
    })
}

/// `acme.directory`: the first CA and the fallback ones, each an `https://` URL with a
/// host, none listed twice.
fn directories(
    d: &Spanned<RawDirectories>,
    bad: &Bad,
) -> Result<(String, Vec<String>), ConfigError> {
    let (list, keyed) = match d.get_ref() {
        RawDirectories::One(u) => (vec![u.trim().to_string()], false),
        RawDirectories::Many(l) => (l.iter().map(|u| u.trim().to_string()).collect(), true),
    };
    let key = |i: usize| {
        if keyed {
            format!("acme.directory[{i}]")
        } else {
            "acme.directory".to_string()
        }
    };
    for (i, url) in list.iter().enumerate() {
        let host = url
            .strip_prefix("https://")
            .and_then(|r| r.split(['/', '?', '#']).next())
            .unwrap_or("");
        if host.is_empty() {
            return Err(bad(
                d.span(),
                &key(i),
                format!("{url:?} must be an https:// URL"),
            ));
        }
        if let Some(j) = list[..i].iter().position(|u| u == url) {
            return Err(bad(
                d.span(),
                &key(i),
                format!("{url:?} is listed twice (also acme.directory[{j}])"),
            ));
        }
    }
    let mut list = list.into_iter();
    let Some(first) = list.next() else {
        return Err(bad(
            d.span(),
            "acme.directory",
            "must list at least one CA directory URL".into(),
        ));
    };
    Ok((first, list.collect()))
}

fn certificate(c: &RawCertificate, bad: &Bad) -> Result<CertificateConfig, ConfigError> {
    let name = c.name.get_ref().clone();
    if !valid_cert_name(&name) {
        return Err(bad(
            c.name.span(),
            "certificate.name",
            format!("{name:?} must be a plain directory name (letters, digits, '.', '-', '_'; not starting with '.')"),
        ));
    }
    let domains = c.domains.get_ref();
    if domains.is_empty() {
        return Err(bad(
            c.domains.span(),
            "certificate.domains",
            format!("certificate {name:?}: must list at least one domain"),
        ));
    }
    if domains.len() > 100 {
        return Err(bad(
            c.domains.span(),
            "certificate.domains",
            format!(
                "certificate {name:?}: {} domains, at most 100",
                domains.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for d in domains {
        if let Err(m) = valid_domain(d) {
            return Err(bad(
                c.domains.span(),
                "certificate.domains",
                format!("certificate {name:?}: {d:?} {m}"),
            ));
        }
        if !seen.insert(d.to_ascii_lowercase()) {
            return Err(bad(
                c.domains.span(),
                "certificate.domains",
                format!("certificate {name:?}: {d:?} listed twice"),
            ));
        }
    }
    let key = match &c.key {
        None => KeyType::EcdsaP256,
        Some(k) => KeyType::parse(k.get_ref()).ok_or_else(|| {
            bad(
                k.span(),
                "certificate.key",
                format!(
                    "certificate {name:?}: unknown key type {:?} (expected {})",
                    k.get_ref(),
                    KeyType::NAMES
                ),
            )
        })?,
    };
    let challenge = match &c.challenge {
        None => ChallengeChoice::Auto,
        Some(s) => ChallengeChoice::parse(s.get_ref()).ok_or_else(|| {
            bad(
                s.span(),
                "certificate.challenge",
                format!(
                    "certificate {name:?}: unknown challenge {:?} (expected \"http-01\" or \"dns-01\")",
                    s.get_ref()
                ),
            )
        })?,
    };
    if challenge == ChallengeChoice::Http01 {
        if let Some(w) = domains.iter().find(|d| d.starts_with("*.")) {
            return Err(bad(
                c.challenge.as_ref().map_or(c.domains.span(), |s| s.span()),
                "certificate.challenge",
                format!(
                    "certificate {name:?}: {w:?} is a wildcard, which only dns-01 can validate \
                     (set challenge = \"dns-01\" or leave it unset)"
                ),
            ));
        }
    }
    let verify_rollout = match c.rollout.as_ref().map(|r| (r.get_ref().as_str(), r.span())) {
        None | Some(("publish", _)) => false,
        Some(("verify", _)) => true,
        Some((other, span)) => {
            return Err(bad(
                span,
                "certificate.rollout",
                format!(
                    "certificate {name:?}: unknown rollout {other:?} (expected \"publish\" or \"verify\")"
                ),
            ))
        }
    };
    Ok(CertificateConfig {
        name,
        domains: domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        key,
        reuse_key: c.reuse_key,
        challenge,
        verify_rollout,
        source: CertSource::Config,
    })
}

fn hook(h: &RawHook, bad: &Bad) -> Result<HookConfig, ConfigError> {
    if h.paths.get_ref().is_empty() {
        return Err(bad(
            h.paths.span(),
            "hook.paths",
            "must list at least one glob, e.g. \"live/www.example.com/**\"".into(),
        ));
    }
    let matcher =
        Globs::new(h.paths.get_ref()).map_err(|e| bad(h.paths.span(), "hook.paths", e))?;
    let action = hook_action(h, bad)?;
    let timeout = match &h.timeout {
        None => Duration::from_secs(30),
        Some(s) => parse_duration(s.get_ref()).map_err(|m| bad(s.span(), "hook.timeout", m))?,
    };
    if timeout.is_zero() {
        return Err(bad(
            h.timeout.as_ref().map_or(h.paths.span(), |t| t.span()),
            "hook.timeout",
            "must be more than 0".into(),
        ));
    }
    let min_interval = match &h.min_interval {
        None => Duration::from_secs(5),
        Some(s) => {
            parse_duration(s.get_ref()).map_err(|m| bad(s.span(), "hook.min_interval", m))?
        }
    };
    if min_interval > HOOK_MAX_DELAY {
        return Err(bad(
            h.min_interval.as_ref().map_or(h.paths.span(), |t| t.span()),
            "hook.min_interval",
            format!(
                "at most {}s (a run never comes later than that after a change)",
                HOOK_MAX_DELAY.as_secs()
            ),
        ));
    }
    Ok(HookConfig {
        paths: h.paths.get_ref().clone(),
        matcher,
        action,
        timeout,
        min_interval,
    })
}

/// `run`, or `haproxy_socket` + `haproxy_crt` (exactly one of the two forms).
fn hook_action(h: &RawHook, bad: &Bad) -> Result<HookAction, ConfigError> {
    match (&h.run, &h.haproxy_socket, &h.haproxy_crt) {
        (Some(run), None, None) => {
            if run.get_ref().is_empty() || run.get_ref()[0].trim().is_empty() {
                return Err(bad(
                    run.span(),
                    "hook.run",
                    "must be a non-empty argv, e.g. [\"systemctl\", \"reload\", \"nginx\"]"
                        .into(),
                ));
            }
            Ok(HookAction::Run(run.get_ref().clone()))
        }
        (Some(run), _, _) => Err(bad(
            run.span(),
            "hook.run",
            "a hook either runs a command or pushes to HAProxy (haproxy_socket + haproxy_crt), not both".into(),
        )),
        (None, Some(socket), Some(crt)) => {
            let text = socket.get_ref().trim();
            let socket_addr = if let Ok(a) = text.parse::<SocketAddr>() {
                HaproxySocket::Tcp(a)
            } else if Path::new(text).is_absolute() {
                HaproxySocket::Unix(PathBuf::from(text))
            } else {
                return Err(bad(
                    socket.span(),
                    "hook.haproxy_socket",
                    format!("{text:?} must be an absolute unix socket path (e.g. \"/run/haproxy/admin.sock\") or ip:port"),
                ));
            };
            let crt_path = crt.get_ref().trim();
            if crt_path.is_empty() || crt_path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    crt.span(),
                    "hook.haproxy_crt",
                    format!("{crt_path:?} must be the certificate path as HAProxy's `crt` names it, without spaces"),
                ));
            }
            let cert = haproxy_cert_name(h.paths.get_ref()).ok_or_else(|| {
                bad(
                    h.paths.span(),
                    "hook.paths",
                    "with haproxy_socket, every glob must be under live/<name>/ of one certificate \
                     (e.g. [\"live/www.example.com/**\"]): its live/<name>/combined.pem is what is pushed"
                        .into(),
                )
            })?;
            Ok(HookAction::Haproxy {
                socket: socket_addr,
                crt: crt_path.to_string(),
                cert,
            })
        }
        (None, Some(socket), None) => Err(bad(
            socket.span(),
            "hook.haproxy_crt",
            "missing: haproxy_socket needs haproxy_crt, the certificate path as HAProxy's `crt` names it".into(),
        )),
        (None, None, Some(crt)) => Err(bad(
            crt.span(),
            "hook.haproxy_socket",
            "missing: haproxy_crt needs haproxy_socket, HAProxy's `stats socket ... level admin`".into(),
        )),
        (None, None, None) => Err(bad(
            h.paths.span(),
            "hook.run",
            "missing: a hook needs run = [argv] or haproxy_socket + haproxy_crt".into(),
        )),
    }
}

/// The one certificate name every glob of a HAProxy hook is under (`live/<name>…`).
fn haproxy_cert_name(paths: &[String]) -> Option<String> {
    let mut name: Option<&str> = None;
    for p in paths {
        let rest = p.strip_prefix("live/")?;
        let n = rest.split('/').next()?;
        if !valid_cert_name(n) || name.is_some_and(|m| m != n) {
            return None;
        }
        name = Some(n);
    }
    name.map(str::to_string)
}

/// A certificate name is a directory under `live/` and `archive/`.
fn valid_cert_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// A DNS name an ACME CA can validate (no IPs); `*.` only as the whole first label.
fn valid_domain(d: &str) -> Result<(), &'static str> {
    let d = d.strip_prefix("*.").unwrap_or(d);
    if d.contains('*') {
        return Err(
            "has a '*' that is not the whole first label (only \"*.example.com\" wildcards exist)",
        );
    }
    if d.parse::<std::net::IpAddr>().is_ok() {
        return Err("is an IP address, not a DNS name");
    }
    if d.is_empty() || d.len() > 253 || !d.contains('.') {
        return Err("is not a fully qualified DNS name");
    }
    for label in d.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err("is not a valid DNS name");
        }
    }
    Ok(())
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

/// Parses a size: bytes ("1048576") or with a unit B, KiB, MiB, GiB (also K, M, G,
/// meaning the same binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. \"512KiB\", \"64MiB\", \"1GiB\")"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (expected B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_file_size_takes_units_or_bytes() {
        let size = |v: &str| {
            Config::parse(Path::new("c.toml"), &cfg(&format!("max_file_size = {v}\n")))
                .map(|c| c.max_file_size)
        };
        let c = Config::parse(Path::new("c.toml"), &cfg("")).unwrap();
        assert_eq!(c.max_file_size, 64 << 20);
        assert_eq!(size("\"64MiB\"").unwrap(), 64 << 20);
        assert_eq!(size("\"1GiB\"").unwrap(), 1 << 30);
        assert_eq!(size("\"512KiB\"").unwrap(), 512 << 10);
        assert_eq!(size("1048576").unwrap(), 1 << 20);
        let e = size("\"64 parsecs\"").unwrap_err().to_string();
        assert!(e.contains("c.toml:8: tree.max_file_size"), "{e}");
        let e = size("\"99999999999GiB\"").unwrap_err().to_string();
        assert!(
            e.contains("tree.max_file_size") && e.contains("too large"),
            "{e}"
        );
        assert!(size("-1").is_err());
    }

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
    fn tree_budgets_take_sizes_percentages_and_refuse_nonsense() {
        use crate::core::plan::{MinFree, TreeBudget};
        let parse = |extra: &str| Config::parse(Path::new("c.toml"), &cfg(extra));
        let d = parse("").unwrap();
        assert_eq!(d.budget, TreeBudget::default());
        assert_eq!(d.budget.min_disk_free, MinFree::Basis(500));
        let c = parse(
            "max_size = \"1GiB\"\nmax_files = 10\nmin_disk_free = \"0.5%\"\nkept_max_size = 4096\n",
        )
        .unwrap();
        assert_eq!(c.budget.max_size, 1 << 30);
        assert_eq!(c.budget.max_files, 10);
        assert_eq!(c.budget.min_disk_free, MinFree::Basis(50));
        assert_eq!(c.kept_max_size, 4096);
        let c = parse("min_disk_free = \"2GiB\"\n").unwrap();
        assert_eq!(c.budget.min_disk_free, MinFree::Bytes(2 << 30));
        for (extra, key) in [
            ("min_disk_free = \"101%\"\n", "tree.min_disk_free"),
            ("min_disk_free = \"five%\"\n", "tree.min_disk_free"),
            ("min_disk_free = \"5 parsecs\"\n", "tree.min_disk_free"),
            ("max_size = 0\n", "tree.max_size"),
            ("max_files = 0\n", "tree.max_files"),
            ("kept_max_size = \"lots\"\n", "tree.kept_max_size"),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(&format!("c.toml:8: {key}")), "{extra}: {e}");
        }
        assert!(parse("max_bytes = 1\n").is_err(), "unknown key accepted");
    }

    #[test]
    fn sighup_names_what_needs_a_restart() {
        let a = Config::parse(Path::new("c.toml"), &cfg("")).unwrap();
        let same = Config::parse(Path::new("c.toml"), &cfg("rescan_interval = \"10m\"\n")).unwrap();
        assert!(a.needs_restart(&same).is_empty());
        let moved = cfg("").replace("127.0.0.1:22000", "127.0.0.1:22001");
        let b = Config::parse(Path::new("c.toml"), &moved).unwrap();
        assert_eq!(a.needs_restart(&b), vec!["node.listen"]);
        let hooked = cfg("[[hook]]\npaths = [\"live/**\"]\nrun = [\"true\"]\n");
        let c = Config::parse(Path::new("c.toml"), &hooked).unwrap();
        assert_eq!(a.needs_restart(&c), vec!["hook"]);
    }

    #[test]
    fn writers_name_this_node_peers_or_device_ids() {
        let id = DeviceId::of_cert(b"x");
        let far = DeviceId::of_cert(b"far");
        let peer = format!("[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"127.0.0.2:1\"\n");
        let c = Config::parse(
            Path::new("c.toml"),
            &cfg(&format!("writers = [\"lb0\", \"lb1\", \"{far}\"]\n{peer}")),
        )
        .unwrap();
        let me = DeviceId::of_cert(b"me");
        let ids: Vec<DeviceId> = c.writers.unwrap().iter().map(|w| w.id(me)).collect();
        assert_eq!(ids, vec![me, id, far]);
        assert!(Config::parse(Path::new("c.toml"), &cfg(""))
            .unwrap()
            .writers
            .is_none());
        let e = err(&cfg(&format!("writers = [\"lb0\", \"ops\"]\n{peer}")));
        assert!(
            e.contains(":8: tree.writers") && e.contains("unknown writer \"ops\""),
            "{e}"
        );
        let e = err(&cfg("writers = []\n"));
        assert!(
            e.contains("tree.writers") && e.contains("names no node"),
            "{e}"
        );
        let e = err(&cfg("writers = [\"lb0\", \"lb0\"]\n"));
        assert!(e.contains("listed twice"), "{e}");
        let mut typo = far.to_string().into_bytes();
        typo[2] = if typo[2] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        let e = err(&cfg(&format!("writers = [\"{typo}\"]\n")));
        assert!(e.contains("tree.writers") && e.contains("mistyped"), "{e}");
    }

    #[test]
    fn acme_on_a_node_that_is_not_a_writer_is_refused() {
        let id = DeviceId::of_cert(b"x");
        let peer = format!("[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"127.0.0.2:1\"\n");
        let acme = "[acme]\ndirectory = \"https://ca.example/dir\"\n";
        let e = err(&cfg(&format!("writers = [\"lb1\"]\n{peer}{acme}")));
        assert!(
            e.contains("acme") && e.contains("not in tree.writers"),
            "{e}"
        );
        let ok = cfg(&format!("writers = [\"lb0\"]\n{peer}{acme}"));
        Config::parse(Path::new("c.toml"), &ok).unwrap();
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

    const ACME: &str = "[acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\ncontact = [\"mailto:ops@example.com\"]\n";

    #[test]
    fn acme_certificates_hooks_http() {
        let c = Config::parse(
            Path::new("c.toml"),
            &cfg(&format!(
                "{ACME}ca_roots = \"/etc/certmesh/roots.pem\"\nprofile = \"shortlived\"\n\
                 [[certificate]]\nname = \"www.example.com\"\ndomains = [\"www.example.com\", \"Example.com\"]\nkey = \"rsa3072\"\nreuse_key = true\n\
                 [[certificate]]\nname = \"api\"\ndomains = [\"api.example.com\"]\n\
                 [[hook]]\npaths = [\"live/www.example.com/**\"]\nrun = [\"systemctl\", \"reload\", \"nginx\"]\ntimeout = \"5s\"\n\
                 [http]\nlisten = \"127.0.0.1:8402\"\n"
            )),
        )
        .unwrap();
        let a = c.acme.unwrap();
        assert_eq!(a.contact, ["mailto:ops@example.com"]);
        assert_eq!(a.profile.as_deref(), Some("shortlived"));
        assert_eq!(a.barrier_timeout, Duration::from_secs(10));
        assert_eq!(a.startup_grace, Duration::from_secs(30));
        assert_eq!(a.request_timeout, Duration::from_secs(30));
        assert_eq!(c.certificates.len(), 2);
        assert_eq!(c.certificates[0].key, KeyType::Rsa3072);
        assert_eq!(c.certificates[0].domains[1], "example.com");
        assert!(c.certificates[0].reuse_key);
        assert_eq!(c.certificates[1].key, KeyType::EcdsaP256);
        assert!(!c.certificates[1].reuse_key);
        assert_eq!(c.hooks[0].timeout, Duration::from_secs(5));
        assert!(c.hooks[0]
            .matcher
            .is_match("live/www.example.com/fullchain.pem"));
        assert!(!c.hooks[0].matcher.is_match("live/api/fullchain.pem"));
        assert_eq!(c.http_listen, Some("127.0.0.1:8402".parse().unwrap()));
    }

    #[test]
    fn directory_may_be_a_list_of_cas_tried_in_order() {
        let one = Config::parse(Path::new("c.toml"), &cfg(ACME)).unwrap();
        let one = one.acme.unwrap();
        assert_eq!(one.directory, "https://127.0.0.1:14000/dir");
        assert!(one.fallback.is_empty());
        let list =
            cfg("[acme]\ndirectory = [\"https://a.example/dir\", \" https://b.example/dir \"]\n");
        let a = Config::parse(Path::new("c.toml"), &list)
            .unwrap()
            .acme
            .unwrap();
        assert_eq!(
            a.directories().collect::<Vec<_>>(),
            ["https://a.example/dir", "https://b.example/dir"]
        );
        let single = cfg("[acme]\ndirectory = [\"https://a.example/dir\"]\n");
        let s = Config::parse(Path::new("c.toml"), &single)
            .unwrap()
            .acme
            .unwrap();
        assert_eq!(
            (s.directory.as_str(), s.fallback.len()),
            ("https://a.example/dir", 0)
        );
    }

    #[test]
    fn bad_directory_lists_name_the_entry() {
        let dirs = |v: &str| cfg(&format!("[acme]\ndirectory = {v}\n"));
        let cases = [
            (dirs("[]"), "acme.directory:", "at least one"),
            (
                dirs("[\"https://a/dir\", \"http://b/dir\"]"),
                "acme.directory[1]:",
                "https://",
            ),
            (dirs("[\"https:///dir\"]"), "acme.directory[0]:", "https://"),
            (
                dirs("[\"https://a/dir\", \"https://b/d\", \"https://a/dir\"]"),
                "acme.directory[2]:",
                "listed twice (also acme.directory[0])",
            ),
            (dirs("\"ftp://a/dir\""), "acme.directory:", "https://"),
            (dirs("[1, 2]"), "directory = [1, 2]", "expected a string"),
            (
                dirs("3"),
                "directory = 3",
                "https:// directory URL, or a list",
            ),
            (
                dirs("[\"https://a/dir\",\n  \"http://b\"]"),
                ":9:",
                "acme.directory[1]",
            ),
        ];
        for (text, key, what) in cases {
            let e = err(&text);
            assert!(
                e.contains(key) && e.contains(what),
                "expected {key} / {what:?} in: {e}"
            );
        }
    }

    #[test]
    fn bad_acme_config_is_named() {
        let cert = |body: &str| cfg(&format!("{ACME}[[certificate]]\n{body}"));
        let cases = [
            (cert("name = \"www\"\ndomains = [\"www.example.com\"]\nkey = \"dsa1024\"\n"), "certificate.key", "dsa1024"),
            (cert("name = \"www\"\ndomains = []\n"), "certificate.domains", "at least one"),
            (cert("name = \"www\"\ndomains = [\"*.example.com\"]\n"), "certificate.challenge", "[acme.dns]"),
            (cert("name = \"www\"\ndomains = [\"a.*.example.com\"]\n"), "certificate.domains", "first label"),
            (cert("name = \"../etc\"\ndomains = [\"a.example.com\"]\n"), "certificate.name", "directory name"),
            (cert("name = \"www\"\ndomains = [\"a.example.com\"]\n[[certificate]]\nname = \"www\"\ndomains = [\"b.example.com\"]\n"), "certificate.name", "duplicate"),
            (cert("name = \"www\"\ndomains = [\"a.example.com\"]\ncolour = 1\n"), "colour", ""),
            (cfg("[acme]\ndirectory = \"http://insecure/dir\"\n"), "acme.directory", "https"),
            (cfg(&format!("{ACME}eab_kid = \"kid\"\n")), "acme.eab_kid", "eab_hmac"),
            (cfg(&format!("{ACME}request_timeout = \"0s\"\n")), "acme.request_timeout", "1s"),
            (cfg("[[hook]]\npaths = [\"live/**\"]\nrun = []\n"), "hook.run", "non-empty"),
            (cfg("[[hook]]\npaths = [\"live/[\"]\nrun = [\"true\"]\n"), "hook.paths", ""),
            (cfg("[http]\nlisten = \"nowhere\"\n"), "http.listen", ""),
            (cfg("[metrics]\nlisten = \"localhost\"\n"), "metrics.listen", ":9:"),
            (cfg("[metrics]\nlisten = \"127.0.0.1:9402\"\npath = \"/m\"\n"), "path", ""),
        ];
        for (text, key, what) in cases {
            let e = err(&text);
            assert!(
                e.contains(key) && e.contains(what),
                "expected {key} / {what:?} in: {e}"
            );
        }
        let hundred_one: Vec<String> = (0..101).map(|i| format!("\"d{i}.example.com\"")).collect();
        let e = err(&cert(&format!(
            "name = \"big\"\ndomains = [{}]\n",
            hundred_one.join(",")
        )));
        assert!(e.contains("at most 100") && e.contains(":13:"), "{e}");
    }

    const DNS: &str = "[acme.dns]\nserver = \"192.0.2.53\"\ntsig_key_name = \"certmesh\"\ntsig_secret_file = \"/etc/certmesh/tsig.key\"\n";

    #[test]
    fn dns01_config_and_the_challenge_rule() {
        let c = Config::parse(
            Path::new("c.toml"),
            &cfg(&format!(
                "{ACME}{DNS}zone = \"Example.com.\"\npropagation_timeout = \"30s\"\n\
                 [[certificate]]\nname = \"mixed\"\ndomains = [\"*.example.com\", \"example.com\"]\n\
                 [[certificate]]\nname = \"all\"\ndomains = [\"internal.example.com\"]\nchallenge = \"dns-01\"\n\
                 [[certificate]]\nname = \"web\"\ndomains = [\"www.example.com\"]\nchallenge = \"http-01\"\n"
            )),
        )
        .unwrap();
        let d = c.acme.unwrap().dns.unwrap();
        assert_eq!(d.zone.as_deref(), Some("example.com"));
        assert_eq!(d.propagation_timeout, Duration::from_secs(30));
        match d.provider {
            DnsProvider::Rfc2136 { server, key } => {
                assert_eq!(server, "192.0.2.53:53".parse().unwrap());
                assert_eq!(key.algorithm, TsigAlgorithm::HmacSha256);
                assert_eq!(key.name, "certmesh");
            }
            other => panic!("{other:?}"),
        }
        let labels: Vec<&str> = c.certificates.iter().map(|c| c.challenge_label()).collect();
        assert_eq!(labels, ["dns-01+http-01", "dns-01", "http-01"]);
        assert!(c.certificates[0].challenge.uses_dns("*.example.com"));
        assert!(!c.certificates[0].challenge.uses_dns("example.com"));
        let exec = Config::parse(
            Path::new("c.toml"),
            &cfg(&format!("{ACME}[acme.dns]\nexec = [\"/usr/local/bin/dns-txt\", \"--zone\", \"x\"]\nexec_timeout = \"5s\"\n")),
        )
        .unwrap();
        assert_eq!(
            exec.acme.unwrap().dns.unwrap().provider,
            DnsProvider::Exec {
                argv: vec!["/usr/local/bin/dns-txt".into(), "--zone".into(), "x".into()],
                timeout: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn bad_dns01_config_is_named() {
        let dns = |extra: &str| cfg(&format!("{ACME}{DNS}{extra}"));
        let cases = [
            (cfg(&format!("{ACME}[acme.dns]\nserver = \"192.0.2.53\"\n")), "acme.dns.tsig_key_name", "missing"),
            (dns("tsig_algorithm = \"hmac-md5\"\n"), "acme.dns.tsig_algorithm", "hmac-sha256"),
            (dns("exec = [\"/bin/true\"]\n"), "acme.dns.exec", "not both"),
            (dns("propagation_timeout = \"soon\"\n"), "acme.dns.propagation_timeout", ""),
            (dns("zone = \"bad zone\"\n"), "acme.dns.zone", "not a DNS zone"),
            (dns("resolver = \"dns.example\"\n"), "acme.dns.resolver", "IP address"),
            (dns("colour = 1\n"), "colour", ""),
            (cfg(&format!("{ACME}{DNS}").replace("/etc/certmesh/tsig.key", "/etc/nginx/certs/tsig.key")), "acme.dns.tsig_secret_file", "inside tree.path"),
            (cfg(&format!("{ACME}{DNS}").replace("/etc/certmesh/tsig.key", "tsig.key")), "acme.dns.tsig_secret_file", "absolute"),
            (cfg(&format!("{ACME}[acme.dns]\nexec = [\"dns-txt\"]\n")), "acme.dns.exec", "absolute"),
            (dns("[[certificate]]\nname = \"w\"\ndomains = [\"*.example.com\"]\nchallenge = \"http-01\"\n"), "certificate.challenge", "only dns-01"),
            (dns("[[certificate]]\nname = \"w\"\ndomains = [\"a.example.com\"]\nchallenge = \"tls-alpn-01\"\n"), "certificate.challenge", "unknown challenge"),
            (cert_dns01_without_dns(), "certificate.challenge", "[acme.dns]"),
        ];
        for (text, key, what) in cases {
            let e = err(&text);
            assert!(
                e.contains(key) && e.contains(what),
                "expected {key} / {what:?} in: {e}"
            );
        }
        // A node without [acme] shows wildcard certificates without needing [acme.dns].
        Config::parse(
            Path::new("c.toml"),
            &cfg("[[certificate]]\nname = \"w\"\ndomains = [\"*.example.com\"]\n"),
        )
        .unwrap();
    }

    #[test]
    fn rollout_is_publish_or_verify() {
        let with = |v: &str| {
            cfg(&format!(
                "[[certificate]]\nname = \"w\"\ndomains = [\"a.example.com\"]\nrollout = \"{v}\"\n"
            ))
        };
        let c = Config::parse(Path::new("c.toml"), &with("verify")).unwrap();
        assert!(c.certificates[0].verify_rollout);
        let c = Config::parse(Path::new("c.toml"), &with("publish")).unwrap();
        assert!(!c.certificates[0].verify_rollout);
        let e = err(&with("check"));
        assert!(
            e.contains("certificate.rollout") && e.contains("\"verify\""),
            "{e}"
        );
    }

    fn cert_dns01_without_dns() -> String {
        cfg(&format!("{ACME}[[certificate]]\nname = \"w\"\ndomains = [\"a.example.com\"]\nchallenge = \"dns-01\"\n"))
    }

    #[test]
    fn haproxy_hooks_and_dhparam() {
        let c = Config::parse(
            Path::new("c.toml"),
            &cfg("dhparam = \"ffdhe3072\"\n\
                  [[hook]]\npaths = [\"live/www.example.com/**\"]\nhaproxy_socket = \"/run/haproxy/admin.sock\"\nhaproxy_crt = \"/etc/haproxy/certs/www.pem\"\n\
                  [[hook]]\npaths = [\"live/api/**\", \"live/api\"]\nhaproxy_socket = \"127.0.0.1:9999\"\nhaproxy_crt = \"/etc/haproxy/api.pem\"\ntimeout = \"3s\"\n"),
        )
        .unwrap();
        assert_eq!(c.dhparam, Some(crate::dhgroup::DhGroup::Ffdhe3072));
        assert_eq!(
            c.hooks[0].action,
            HookAction::Haproxy {
                socket: HaproxySocket::Unix("/run/haproxy/admin.sock".into()),
                crt: "/etc/haproxy/certs/www.pem".into(),
                cert: "www.example.com".into(),
            }
        );
        assert_eq!(
            c.hooks[1].action,
            HookAction::Haproxy {
                socket: HaproxySocket::Tcp("127.0.0.1:9999".parse().unwrap()),
                crt: "/etc/haproxy/api.pem".into(),
                cert: "api".into(),
            }
        );
        let c = Config::parse(Path::new("c.toml"), &cfg("")).unwrap();
        assert_eq!(c.dhparam, None);

        let sock = "haproxy_socket = \"/run/haproxy/admin.sock\"\n";
        let crt = "haproxy_crt = \"/etc/haproxy/www.pem\"\n";
        let www = "[[hook]]\npaths = [\"live/www/**\"]\n";
        let cases = [
            (
                cfg("dhparam = \"ffdhe1024\"\n"),
                "c.toml:8: tree.dhparam",
                "ffdhe1024",
            ),
            (
                cfg(&format!("{www}run = [\"true\"]\n{sock}{crt}")),
                "hook.run",
                "not both",
            ),
            (cfg(&format!("{www}{sock}")), "hook.haproxy_crt", "missing"),
            (
                cfg(&format!("{www}{crt}")),
                "hook.haproxy_socket",
                "missing",
            ),
            (cfg(www), "hook.run", "missing"),
            (
                cfg(&format!("{www}haproxy_socket = \"admin.sock\"\n{crt}")),
                "c.toml:10: hook.haproxy_socket",
                "absolute",
            ),
            (
                cfg(&format!("{www}{sock}haproxy_crt = \"a b.pem\"\n")),
                "hook.haproxy_crt",
                "spaces",
            ),
            (
                cfg(&format!("[[hook]]\npaths = [\"live/**\"]\n{sock}{crt}")),
                "c.toml:9: hook.paths",
                "live/<name>/",
            ),
            (
                cfg(&format!(
                    "[[hook]]\npaths = [\"live/a/**\", \"live/b/**\"]\n{sock}{crt}"
                )),
                "hook.paths",
                "one certificate",
            ),
            (
                cfg(&format!(
                    "[[hook]]\npaths = [\"archive/www/**\"]\n{sock}{crt}"
                )),
                "hook.paths",
                "live/<name>/",
            ),
            (
                cfg(&format!("{www}{sock}{crt}haproxy_reload = true\n")),
                "haproxy_reload",
                "",
            ),
        ];
        for (text, key, what) in cases {
            let e = err(&text);
            assert!(
                e.contains(key) && e.contains(what),
                "expected {key} / {what:?} in: {e}"
            );
        }
    }
}

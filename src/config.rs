//! The TOML config: serde structs with `deny_unknown_fields`, turned into a validated
//! `Config` at start-up. Every error names the key and the line. Nothing else in the
//! crate reads TOML. Each section has its own file (its raw and validated form and its
//! checks); this one holds the whole file's `Config`, `load`/`parse` and the checks
//! that span sections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::core::device::DeviceId;

pub mod acme;
pub mod certificate;
pub mod dns;
pub mod frontend;
pub mod globs;
pub mod hook;
mod metrics;
pub mod node;
pub mod peer;
pub mod tree;
pub mod tree_certs;
pub mod values;

use acme::{AcmeConfig, RawAcme};
use certificate::{CertSource, CertificateConfig, RawCertificate};
use hook::{HookConfig, RawHook};
use node::RawNode;
use peer::{PeerConfig, RawPeer};
use tree::{RawTree, TreeSettings, Writer};
use values::absolute;

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
    metrics: Option<metrics::RawMetrics>,
}

/// `[http]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// Address of the built-in http-01 responder.
    listen: Spanned<String>,
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
    /// `tree.tombstone_retention`: how long learned deletions are kept; the replay
    /// horizon.
    pub tombstone_retention: Duration,
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
    /// `[metrics] per_certificate`: series per certificate, or aggregates only.
    pub metrics_per_certificate: bool,
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
        let checks: [(&'static str, bool); 15] = [
            (
                "tree.tombstone_retention",
                self.tombstone_retention != new.tombstone_retention,
            ),
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
        let (name, state_dir, listen) = node::node(&raw.node, &bad)?;
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
            tombstone_retention,
        } = tree::tree_settings(&raw.tree, &bad)?;
        let peers = peer::peers(&raw.peer, &name, &bad)?;
        let writers = raw
            .tree
            .writers
            .as_ref()
            .map(|w| tree::writers(w, &name, &peers, &bad))
            .transpose()?;
        let acme = raw
            .acme
            .as_ref()
            .map(|a| acme::acme(a, &tree, &bad))
            .transpose()?;
        if let (Some(a), Some(w)) = (&raw.acme, &writers) {
            acme_on_a_writer(a, w, &name, &bad)?;
        }
        let certificates = certificate::certificates(&raw.certificate, acme.as_ref(), &bad)?;
        let hooks = raw
            .hook
            .iter()
            .map(|h| hook::hook(h, &bad))
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
            tombstone_retention,
            writers,
            peers,
            acme,
            certificates,
            hooks,
            frontends,
            http_listen,
            metrics_listen,
            metrics_per_certificate: metrics::per_certificate(raw.metrics.as_ref()),
            lines,
        })
    }

    /// `tree.path` exists and is a directory. certmesh never creates it: a typo would
    /// otherwise become a new, synced tree nobody serves.
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

#[cfg(test)]
mod tests {
    use super::certificate::KeyType;
    use super::*;

    const ID: &str = "MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DP-BONSGYY-LTMRWAD";

    pub(super) fn cfg(extra: &str) -> String {
        format!(
            "[node]\nname = \"lb0\"\nstate_dir = \"/var/lib/certmesh\"\nlisten = \"127.0.0.1:22000\"\n\n[tree]\npath = \"/etc/nginx/certs\"\n{extra}"
        )
    }

    pub(super) fn err(text: &str) -> String {
        Config::parse(Path::new("c.toml"), text)
            .unwrap_err()
            .to_string()
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
        let e = err(&cfg("rescan_interval = \"10 parsecs\"\n"));
        assert!(e.contains("tree.rescan_interval"), "{e}");
        let e = err(&cfg("").replace("/var/lib/certmesh", "/etc/nginx/certs/state"));
        assert!(e.contains("inside tree.path"), "{e}");
        let _ = ID;
    }

    pub(super) const ACME: &str = "[acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\ncontact = [\"mailto:ops@example.com\"]\n";

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
}

//! `[[hook]]`: what runs (a command, or a push through HAProxy's runtime API) when
//! paths of the tree change, and how often.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::certificate::valid_cert_name;
use super::globs::Globs;
use super::values::parse_duration;
use super::{Bad, ConfigError};

/// `[[hook]]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
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

/// One `[[hook]]`.
#[derive(Debug, Clone)]
pub struct HookConfig {
    pub paths: Vec<String>,
    pub matcher: Globs,
    pub action: HookAction,
    pub timeout: Duration,
    /// `hook.min_interval`: while certificates keep changing, the hook runs at most
    /// once per this long, and never later than [`HOOK_MAX_DELAY`] after the first
    /// change a run covers.
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

/// One `[[hook]]`, validated: its globs, action, timeout and `min_interval`.
pub(super) fn hook(h: &RawHook, bad: &Bad) -> Result<HookConfig, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{cfg, err};
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn haproxy_hooks_push_one_certificate() {
        let c = Config::parse(
            Path::new("c.toml"),
            &cfg("[[hook]]\npaths = [\"live/www.example.com/**\"]\nhaproxy_socket = \"/run/haproxy/admin.sock\"\nhaproxy_crt = \"/etc/haproxy/certs/www.pem\"\n\
                  [[hook]]\npaths = [\"live/api/**\", \"live/api\"]\nhaproxy_socket = \"127.0.0.1:9999\"\nhaproxy_crt = \"/etc/haproxy/api.pem\"\ntimeout = \"3s\"\n"),
        )
        .unwrap();
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
        let sock = "haproxy_socket = \"/run/haproxy/admin.sock\"\n";
        let crt = "haproxy_crt = \"/etc/haproxy/www.pem\"\n";
        let www = "[[hook]]\npaths = [\"live/www/**\"]\n";
        let cases = [
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

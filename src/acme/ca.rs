//! The CAs of `[acme] directory`: one, or a list tried in order per order attempt (a
//! fallback CA, as certmagic falls back from Let's Encrypt to another CA). This file
//! owns which account file each CA uses, when an order leaves a CA for the next one
//! ([`falls_over`]), and the record of which CA issued each live certificate
//! (`.certmesh/acme/issued/<name>`, shown in `status`).
//!
//! Accounts: the first CA keeps `.certmesh/acme/account.json` (so an upgrade from a
//! single `directory` re-registers nothing, and `certmesh import` and the http-01
//! responder's stateless answer keep working); every other CA's account is in
//! `.certmesh/acme/accounts/<id>.json`, `<id>` a stable hash of its directory URL.
//! Both are checked against their own directory on load ([`super::account`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::acme::AcmeConfig;
use crate::core::paths::RelPath;
use crate::disk::tree::{self, Expect};
use crate::handles::TreeWriter;

/// The first CA's account (the one file when `directory` names a single CA).
pub const ACCOUNT_FILE: &str = ".certmesh/acme/account.json";

/// Accounts of every CA but the first, one file per CA.
pub const ACCOUNTS_DIR: &str = ".certmesh/acme/accounts";
/// Which CA issued each certificate's live version, one file per certificate name.
pub const ISSUED_DIR: &str = ".certmesh/acme/issued";
/// An issued-by record is at most this many bytes.
pub const MAX_ISSUED_BYTES: usize = 4096;
/// ACME's problem type for a rate limit (RFC 8555 §6.7).
pub const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";

/// One configured CA: its place in `acme.directory` and its directory URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ca {
    /// 0 for the first (or only) CA.
    pub index: usize,
    pub directory: String,
}

impl Ca {
    /// Every configured CA, in the order they are tried.
    pub fn all(cfg: &AcmeConfig) -> Vec<Ca> {
        cfg.directories()
            .enumerate()
            .map(|(index, d)| Ca {
                index,
                directory: d.to_string(),
            })
            .collect()
    }

    /// The shared account file of this CA (relative to the tree).
    pub fn account_file(&self) -> String {
        if self.index == 0 {
            ACCOUNT_FILE.to_string()
        } else {
            other_account_file(&self.directory)
        }
    }

    /// Where this CA's account may be instead, after `acme.directory` was reordered
    /// (the former first CA's account stays in `account.json` until a new first CA
    /// needs that file, see [`super::account::create`]).
    pub fn moved_account_file(&self) -> String {
        if self.index == 0 {
            other_account_file(&self.directory)
        } else {
            ACCOUNT_FILE.to_string()
        }
    }
}

/// A stable id of a directory URL: 16 hex digits of its BLAKE3 hash.
pub fn ca_id(directory: &str) -> String {
    blake3::hash(directory.as_bytes()).to_hex()[..16].to_string()
}

/// The account file of `directory` when it is not the first CA.
pub fn other_account_file(directory: &str) -> String {
    format!("{ACCOUNTS_DIR}/{}.json", ca_id(directory))
}

/// `host[:port]` of a directory URL, for tables (the port only when not 443).
pub fn ca_label(directory: &str) -> String {
    let rest = directory.strip_prefix("https://").unwrap_or(directory);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    authority
        .strip_suffix(":443")
        .unwrap_or(authority)
        .to_string()
}

/// Why a CA could not take an order: the transport failed, it did not answer in
/// time, or it answered with a server error. Each of these moves the order to the
/// next configured CA ([`falls_over`]).
#[derive(Debug, thiserror::Error)]
pub enum CaUnavailable {
    /// Connection refused, reset, unreachable, or the TLS handshake failed.
    #[error("{what}: cannot reach the CA: {why}")]
    Unreachable { what: String, why: String },
    /// No complete answer within the request timeout.
    #[error("{what}: no complete answer from the CA within {limit:?}")]
    Timeout { what: String, limit: Duration },
    /// An HTTP 5xx answer.
    #[error("{what}: the CA answered HTTP {status}{detail}")]
    ServerError {
        what: String,
        status: u16,
        /// `": <problem detail or start of the body>"`, or empty.
        detail: String,
    },
}

impl CaUnavailable {
    /// As instant-acme's error (what an `HttpClient` returns).
    pub fn into_acme(self) -> instant_acme::Error {
        instant_acme::Error::Other(Box::new(self))
    }
}

/// Whether an order's error means the CA is down or limits us — unreachable, timed
/// out, HTTP 5xx, or ACME `rateLimited` — so the order moves to the next CA. Anything
/// else (unauthorized, rejected identifier, a failed challenge, a DNS or tree error)
/// would fail at the next CA too: it goes to the usual backoff.
pub fn falls_over(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if c.downcast_ref::<CaUnavailable>().is_some() {
            return true;
        }
        match c.downcast_ref::<instant_acme::Error>() {
            Some(instant_acme::Error::Api(p)) => {
                p.r#type.as_deref() == Some(RATE_LIMITED) || p.status.is_some_and(|s| s >= 500)
            }
            Some(instant_acme::Error::Other(b)) => b.downcast_ref::<CaUnavailable>().is_some(),
            _ => false,
        }
    })
}

/// Whether an order's error is the CA's ACME `rateLimited` answer.
pub fn rate_limited(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<instant_acme::Error>(),
            Some(instant_acme::Error::Api(p)) if p.r#type.as_deref() == Some(RATE_LIMITED))
    })
}

/// ACME's `badNonce`: the CA refused the request's nonce before looking at it
/// (RFC 8555 §6.5: retry with a fresh one; Pebble refuses 5 % of them on purpose).
pub const BAD_NONCE: &str = "urn:ietf:params:acme:error:badNonce";

/// Whether an error is the CA's `badNonce` answer (left after instant-acme's own
/// retries): the request was not acted on, so sending it again is safe.
pub fn bad_nonce(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<instant_acme::Error>(),
            Some(instant_acme::Error::Api(p)) if p.r#type.as_deref() == Some(BAD_NONCE))
    })
}

/// When to try again after every CA failed: not before the soonest Retry-After if
/// every CA gave one (each would refuse until then); `None` (the usual backoff) if
/// any did not, since that one may be back at any time.
pub fn retry_after_all(each: impl IntoIterator<Item = Option<Duration>>) -> Option<Duration> {
    each.into_iter()
        .collect::<Option<Vec<Duration>>>()
        .and_then(|v| v.into_iter().min())
}

/// The file under [`ISSUED_DIR`]: the CA that issued the certificate with `serial`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedBy {
    /// The leaf's serial as `status` shows it (hex, `:`-separated).
    pub serial: String,
    /// The CA's directory URL.
    pub directory: String,
}

impl IssuedBy {
    /// Parses a record from the tree (untrusted: any peer writes it): at most
    /// [`MAX_ISSUED_BYTES`], a hex serial, an `https://` directory of printable ASCII.
    pub fn parse(bytes: &[u8]) -> Option<IssuedBy> {
        if bytes.len() > MAX_ISSUED_BYTES {
            return None;
        }
        let r: IssuedBy = serde_json::from_slice(bytes).ok()?;
        let serial_ok = !r.serial.is_empty()
            && r.serial.len() <= 200
            && r.serial.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
        let dir_ok = r.directory.starts_with("https://")
            && r.directory.len() <= 2048
            && r.directory.chars().all(|c| c.is_ascii_graphic());
        (serial_ok && dir_ok).then_some(r)
    }
}

/// `.certmesh/acme/issued/<name>`.
pub fn issued_file(name: &str) -> anyhow::Result<RelPath> {
    tree::rel(&format!("{ISSUED_DIR}/{name}"))
}

/// Records that `directory` issued `name`'s certificate `serial` (before the
/// `live/<name>` flip, so peers have it by the time they show the new version).
pub fn record_issuer(
    writer: &TreeWriter,
    name: &str,
    serial: &str,
    directory: &str,
) -> anyhow::Result<(RelPath, Expect)> {
    let p = issued_file(name)?;
    let body = serde_json::to_vec(&IssuedBy {
        serial: serial.to_string(),
        directory: directory.to_string(),
    })?;
    let e = writer.write(&p, &body, 0o644)?;
    Ok((p, e))
}

/// The directory URL of the CA that issued the certificate with `serial` (the one
/// live for `name`), if a record names that serial.
pub fn issuer(root: &std::path::Path, name: &str, serial: &str) -> Option<String> {
    let bytes = tree::read(root, &format!("{ISSUED_DIR}/{name}"))?;
    IssuedBy::parse(&bytes)
        .filter(|r| r.serial == serial)
        .map(|r| r.directory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme_err(e: instant_acme::Error) -> anyhow::Error {
        anyhow::Error::new(e).context("new order")
    }

    fn problem(kind: &str, status: u16) -> instant_acme::Error {
        let p: instant_acme::Problem = serde_json::from_value(
            serde_json::json!({"type": kind, "detail": "x", "status": status}),
        )
        .expect("a problem document");
        instant_acme::Error::Api(p)
    }

    #[test]
    fn a_bad_nonce_is_told_apart_from_other_problems() {
        assert!(bad_nonce(&acme_err(problem(BAD_NONCE, 400))));
        assert!(!bad_nonce(&acme_err(problem(RATE_LIMITED, 429))));
        assert!(!bad_nonce(&anyhow::anyhow!(
            "badNonce in a message is not the type"
        )));
    }

    #[test]
    fn outages_and_rate_limits_fall_over_other_errors_do_not() {
        let refused = CaUnavailable::Unreachable {
            what: "GET https://a/dir".into(),
            why: "connection refused".into(),
        };
        assert!(falls_over(&acme_err(refused.into_acme())));
        let slow = CaUnavailable::Timeout {
            what: "finalize".into(),
            limit: Duration::from_secs(30),
        };
        assert!(falls_over(&anyhow::Error::new(slow).context("x")));
        let e502 = CaUnavailable::ServerError {
            what: "POST".into(),
            status: 502,
            detail: String::new(),
        };
        assert!(falls_over(&acme_err(e502.into_acme())));
        assert!(falls_over(&acme_err(problem(RATE_LIMITED, 429))));
        assert!(falls_over(&acme_err(problem(
            "urn:ietf:params:acme:error:serverInternal",
            500
        ))));
        for kind in ["unauthorized", "rejectedIdentifier", "connection", "badCSR"] {
            let e = problem(&format!("urn:ietf:params:acme:error:{kind}"), 403);
            assert!(!falls_over(&acme_err(e)), "{kind}");
        }
        assert!(!falls_over(&anyhow::anyhow!(
            "order is Invalid: www: challenge failed"
        )));
        assert!(!falls_over(&acme_err(instant_acme::Error::Str("missing"))));
    }

    #[test]
    fn every_ca_failing_waits_for_the_soonest_retry_after_only_if_all_gave_one() {
        let s = Duration::from_secs;
        assert_eq!(retry_after_all([Some(s(600)), Some(s(60))]), Some(s(60)));
        assert_eq!(retry_after_all([Some(s(600)), None]), None);
        assert_eq!(retry_after_all([]), None);
    }

    #[test]
    fn the_first_ca_keeps_the_old_account_file() {
        let cfg = crate::config::Config::parse(
            std::path::Path::new("c.toml"),
            "[node]\nname = \"a\"\nstate_dir = \"/s\"\nlisten = \"127.0.0.1:1\"\n[tree]\npath = \"/t\"\n\
             [acme]\ndirectory = [\"https://a.example/dir\", \"https://b.example:14000/dir\"]\n",
        )
        .expect("config")
        .acme
        .expect("[acme]");
        let cas = Ca::all(&cfg);
        assert_eq!(cas[0].account_file(), ACCOUNT_FILE);
        let b = cas[1].account_file();
        assert!(b.starts_with(".certmesh/acme/accounts/") && b.ends_with(".json"));
        assert_eq!(b, other_account_file("https://b.example:14000/dir"));
        assert_ne!(b, other_account_file("https://a.example/dir"));
        assert_eq!(cas[1].moved_account_file(), ACCOUNT_FILE);
        assert_eq!(ca_id("https://b.example:14000/dir").len(), 16);
        assert_eq!(ca_label("https://b.example:14000/dir"), "b.example:14000");
        assert_eq!(ca_label("https://a.example:443/dir"), "a.example");
    }

    #[test]
    fn issued_records_are_bounded_and_checked() {
        let good = br#"{"serial":"0a:1b","directory":"https://ca.example/dir"}"#;
        let r = IssuedBy::parse(good).expect("a good record");
        assert_eq!(r.directory, "https://ca.example/dir");
        for bad in [
            &br#"{"serial":"0a","directory":"http://ca.example/dir"}"#[..],
            br#"{"serial":"zz","directory":"https://ca.example/dir"}"#,
            br#"{"serial":"","directory":"https://ca.example/dir"}"#,
            b"{\"serial\":\"0a\",\"directory\":\"https://ca\\n.example\"}",
            br#"{"serial":"0a","directory":"https://ca.example/dir","x":1}"#,
            b"not json",
        ] {
            assert!(
                IssuedBy::parse(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(IssuedBy::parse(&vec![b' '; MAX_ISSUED_BYTES + 1]).is_none());
    }
}

//! `[acme]`: the CA directories tried in order, the account, and the timings and
//! order budget of renewals. `[acme.dns]` is `config::dns`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::dns::{self, DnsConfig};
use super::values::{absolute, parse_duration};
use super::{Bad, ConfigError};

/// `[acme]`: present on the nodes allowed to order certificates.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    /// The CA's ACME directory URL (staging vs production is just this), or a list
    /// of them tried in order per order attempt (a fallback CA).
    pub(super) directory: Spanned<RawDirectories>,
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
    /// Versions kept under `archive/<name>/`, the live one included (default 3,
    /// at least 2 so a rollback has the one before).
    keep_versions: Option<Spanned<i64>>,
    /// `[acme.dns]`: how dns-01 records are published (needed for wildcards).
    dns: Option<Spanned<dns::RawDns>>,
}

/// `acme.directory`: one URL, or a list tried in order.
pub(super) enum RawDirectories {
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

/// `acme.keep_versions` unset: archive versions kept per certificate.
pub const DEFAULT_KEEP_VERSIONS: u32 = 3;
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
    /// is connected, for up to this long.
    pub startup_grace: Duration,
    /// Renewal lease duration: how long others wait for a renewer that went silent.
    pub lease: Duration,
    /// Longest any one request to the CA may take, body included.
    pub request_timeout: Duration,
    /// `acme.max_orders_per_hour`: the renewer's order budget.
    pub max_orders_per_hour: u32,
    /// `acme.keep_versions`: archive versions kept per certificate; older ones
    /// are pruned by the renewer on publish.
    pub keep_versions: u32,
    /// `[acme.dns]`: dns-01 provider; `None`: only http-01 certificates can be ordered.
    pub dns: Option<DnsConfig>,
}

impl AcmeConfig {
    /// Every configured CA's directory URL, in the order they are tried.
    pub fn directories(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.directory.as_str()).chain(self.fallback.iter().map(String::as_str))
    }
}

/// `[acme]`, validated: the directories, contacts, EAB, timings, order budget and
/// `[acme.dns]`.
pub(super) fn acme(a: &RawAcme, tree: &Path, bad: &Bad) -> Result<AcmeConfig, ConfigError> {
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
    let keep_versions = match &a.keep_versions {
        None => DEFAULT_KEEP_VERSIONS,
        Some(n) => u32::try_from(*n.get_ref())
            .ok()
            .filter(|n| (2..=1000).contains(n))
            .ok_or_else(|| {
                bad(
                    n.span(),
                    "acme.keep_versions",
                    format!("{} is not between 2 and 1000", n.get_ref()),
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
        keep_versions,
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

#[cfg(test)]
mod tests {
    use crate::config::tests::ACME;
    use crate::config::tests::{cfg, err};
    use crate::config::Config;
    use std::path::Path;

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
}

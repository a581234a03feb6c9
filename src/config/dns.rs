//! `[acme.dns]` and `[[certificate]] challenge`: how dns-01 challenges are answered
//! (RFC 2136 updates with TSIG, or an operator's program) and which identifiers use
//! dns-01. Parsed and validated here like the rest of the config; the secret file
//! itself is read at use (and by `certmesh check`), never here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::values::{absolute, parse_duration};
use super::{Bad, ConfigError};

/// `[acme.dns]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    /// RFC 2136: the primary nameserver that takes dynamic updates, `ip:port`.
    server: Option<Spanned<String>>,
    /// The zone to update (default: found by asking for the SOA of the name).
    zone: Option<Spanned<String>>,
    /// RFC 2136: the TSIG key's name as the server knows it.
    tsig_key_name: Option<Spanned<String>>,
    /// RFC 2136: hmac-sha256 (default), hmac-sha384 or hmac-sha512.
    tsig_algorithm: Option<Spanned<String>>,
    /// RFC 2136: file with the base64 secret or a whole BIND `key { … };` clause
    /// (mode 0600 or stricter, outside the tree).
    tsig_secret_file: Option<Spanned<String>>,
    /// Instead of RFC 2136: argv called as `argv… present|cleanup <fqdn> <value>`.
    exec: Option<Spanned<Vec<String>>>,
    /// Longest one `exec` call may take (default 60s).
    exec_timeout: Option<Spanned<String>>,
    /// Longest wait for every authoritative nameserver to serve the record
    /// before the CA is told (default 120s).
    propagation_timeout: Option<Spanned<String>>,
    /// DNS server asked for the zone's SOA and NS records and the nameservers'
    /// addresses, `ip:port` (default: `server`, else the first nameserver of
    /// /etc/resolv.conf).
    resolver: Option<Spanned<String>>,
}

/// TSIG MAC algorithms (those hickory-proto can compute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsigAlgorithm {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl TsigAlgorithm {
    pub const NAMES: &'static str = "hmac-sha256, hmac-sha384, hmac-sha512";

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().trim_end_matches('.').to_ascii_lowercase().as_str() {
            "hmac-sha256" => Some(Self::HmacSha256),
            "hmac-sha384" => Some(Self::HmacSha384),
            "hmac-sha512" => Some(Self::HmacSha512),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HmacSha256 => "hmac-sha256",
            Self::HmacSha384 => "hmac-sha384",
            Self::HmacSha512 => "hmac-sha512",
        }
    }
}

/// The TSIG key as configured (the secret stays in its file until used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsigKeyConfig {
    pub name: String,
    pub algorithm: TsigAlgorithm,
    pub secret_file: PathBuf,
}

/// How records are put into DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsProvider {
    /// RFC 2136 dynamic updates signed with TSIG, sent to `server`.
    Rfc2136 {
        server: SocketAddr,
        key: TsigKeyConfig,
    },
    /// `argv… present|cleanup <fqdn> <value>`, no shell, killed after `timeout`.
    Exec {
        argv: Vec<String>,
        timeout: Duration,
    },
}

/// `[acme.dns]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    pub provider: DnsProvider,
    /// The zone (absolute, lowercase, no trailing dot); `None`: found by SOA lookup.
    pub zone: Option<String>,
    pub propagation_timeout: Duration,
    pub resolver: Option<SocketAddr>,
}

/// Which challenge a certificate's identifiers use (`[[certificate]] challenge`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChallengeChoice {
    /// Unset: dns-01 for wildcard names, http-01 for the rest.
    #[default]
    Auto,
    Http01,
    Dns01,
}

impl ChallengeChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "http-01" => Some(Self::Http01),
            "dns-01" => Some(Self::Dns01),
            _ => None,
        }
    }

    /// Whether `domain` is validated with dns-01 under this choice.
    pub fn uses_dns(self, domain: &str) -> bool {
        match self {
            Self::Dns01 => true,
            Self::Http01 => false,
            Self::Auto => domain.starts_with("*."),
        }
    }
}

fn socket_addr(s: &Spanned<String>, key: &str, bad: &Bad) -> Result<SocketAddr, ConfigError> {
    let text = s.get_ref().trim();
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| {
            bad(
                s.span(),
                key,
                format!(
                    "{text:?} must be an IP address with an optional port, e.g. \"192.0.2.53:53\""
                ),
            )
        })
}

/// A zone name as configured: a DNS name, lowercase, without the trailing dot.
fn zone_name(s: &Spanned<String>, bad: &Bad) -> Result<String, ConfigError> {
    let z = s
        .get_ref()
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let ok = !z.is_empty()
        && z.len() <= 253
        && z.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !ok {
        return Err(bad(
            s.span(),
            "acme.dns.zone",
            format!("{:?} is not a DNS zone name", s.get_ref()),
        ));
    }
    Ok(z)
}

fn duration(
    s: &Option<Spanned<String>>,
    key: &str,
    default: Duration,
    bad: &Bad,
) -> Result<Duration, ConfigError> {
    match s {
        None => Ok(default),
        Some(s) => {
            let d = parse_duration(s.get_ref()).map_err(|m| bad(s.span(), key, m))?;
            if d < Duration::from_secs(1) {
                return Err(bad(s.span(), key, "must be at least 1s".into()));
            }
            Ok(d)
        }
    }
}

/// Validates `[acme.dns]`; `tree`: the replicated tree, which must not hold the secret.
pub(super) fn dns(d: &Spanned<RawDns>, tree: &Path, bad: &Bad) -> Result<DnsConfig, ConfigError> {
    let span = d.span();
    let d = d.get_ref();
    let rfc2136 = [
        d.server.as_ref().map(|s| s.span()),
        d.tsig_key_name.as_ref().map(|s| s.span()),
        d.tsig_secret_file.as_ref().map(|s| s.span()),
        d.tsig_algorithm.as_ref().map(|s| s.span()),
    ];
    let provider = match &d.exec {
        Some(exec) => {
            if let Some(s) = rfc2136.iter().flatten().next() {
                return Err(bad(
                    s.clone(),
                    "acme.dns.exec",
                    "either exec or server + tsig_* (RFC 2136), not both".into(),
                ));
            }
            let argv = exec.get_ref();
            if argv.is_empty() || !Path::new(&argv[0]).is_absolute() {
                return Err(bad(
                    exec.span(),
                    "acme.dns.exec",
                    "must be an argv whose program is an absolute path, e.g. [\"/usr/local/bin/dns-txt\"]".into(),
                ));
            }
            let timeout = duration(
                &d.exec_timeout,
                "acme.dns.exec_timeout",
                Duration::from_secs(60),
                bad,
            )?;
            DnsProvider::Exec {
                argv: argv.clone(),
                timeout,
            }
        }
        None => {
            if let Some(t) = &d.exec_timeout {
                return Err(bad(
                    t.span(),
                    "acme.dns.exec_timeout",
                    "only with acme.dns.exec".into(),
                ));
            }
            let missing = |key: &str| {
                bad(
                    span.clone(),
                    key,
                    "missing: [acme.dns] needs server, tsig_key_name and tsig_secret_file (RFC 2136), or exec".into(),
                )
            };
            let server = d
                .server
                .as_ref()
                .ok_or_else(|| missing("acme.dns.server"))?;
            let server = socket_addr(server, "acme.dns.server", bad)?;
            let name = d
                .tsig_key_name
                .as_ref()
                .ok_or_else(|| missing("acme.dns.tsig_key_name"))?;
            let key_name = name.get_ref().trim().trim_end_matches('.').to_string();
            if key_name.is_empty() || key_name.len() > 253 || key_name.contains(char::is_whitespace)
            {
                return Err(bad(
                    name.span(),
                    "acme.dns.tsig_key_name",
                    format!("{:?} is not a key name", name.get_ref()),
                ));
            }
            let algorithm = match &d.tsig_algorithm {
                None => TsigAlgorithm::HmacSha256,
                Some(a) => TsigAlgorithm::parse(a.get_ref()).ok_or_else(|| {
                    bad(
                        a.span(),
                        "acme.dns.tsig_algorithm",
                        format!(
                            "unknown algorithm {:?} (expected {})",
                            a.get_ref(),
                            TsigAlgorithm::NAMES
                        ),
                    )
                })?,
            };
            let file = d
                .tsig_secret_file
                .as_ref()
                .ok_or_else(|| missing("acme.dns.tsig_secret_file"))?;
            let secret_file =
                absolute(file).map_err(|m| bad(file.span(), "acme.dns.tsig_secret_file", m))?;
            if secret_file.starts_with(tree) {
                return Err(bad(
                    file.span(),
                    "acme.dns.tsig_secret_file",
                    "must not be inside tree.path (the secret would be replicated to every node)"
                        .into(),
                ));
            }
            DnsProvider::Rfc2136 {
                server,
                key: TsigKeyConfig {
                    name: key_name,
                    algorithm,
                    secret_file,
                },
            }
        }
    };
    Ok(DnsConfig {
        provider,
        zone: d.zone.as_ref().map(|z| zone_name(z, bad)).transpose()?,
        propagation_timeout: duration(
            &d.propagation_timeout,
            "acme.dns.propagation_timeout",
            Duration::from_secs(120),
            bad,
        )?,
        resolver: d
            .resolver
            .as_ref()
            .map(|r| socket_addr(r, "acme.dns.resolver", bad))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::ACME;
    use crate::config::tests::{cfg, err};
    use crate::config::Config;
    use std::path::Path;

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

    fn cert_dns01_without_dns() -> String {
        cfg(&format!("{ACME}[[certificate]]\nname = \"w\"\ndomains = [\"a.example.com\"]\nchallenge = \"dns-01\"\n"))
    }
}

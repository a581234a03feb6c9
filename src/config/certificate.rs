//! `[[certificate]]`: a certificate's name, domains, key type, challenge and rollout,
//! and where it was declared (this node's config or the tree).

use serde::Deserialize;
use toml::Spanned;

use super::acme::AcmeConfig;
use super::dns::ChallengeChoice;
use super::{Bad, ConfigError};

/// `[[certificate]]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
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
    /// serve it.
    rollout: Option<Spanned<String>>,
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
    /// or it flips `live/<name>` back.
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

/// `[[certificate]]`: each valid, names unique, dns-01 only with `[acme.dns]`.
pub(super) fn certificates(
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

/// One `[[certificate]]`, validated: its name, domains, key type, challenge and
/// rollout (also how `config::tree_certs` reads a tree entry).
pub(super) fn certificate(c: &RawCertificate, bad: &Bad) -> Result<CertificateConfig, ConfigError> {
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

/// A certificate name is a directory under `live/` and `archive/`.
pub(super) fn valid_cert_name(s: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use crate::config::tests::{cfg, err};
    use crate::config::Config;
    use std::path::Path;

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
}

//! Certificates as data: `.certmesh/certificates/<name>.toml` in the
//! replicated tree, one small file per certificate, written by `certmesh cert add`.
//! Pure: parsing and validating one entry (the same rules as a `[[certificate]]`
//! block, plus a size cap and the file name matching `name`), rendering one, and the
//! effective set (the config's blocks, then the tree's entries; the config wins on a
//! name both declare). Reading the directory is `crate::certs`.

use super::acme::AcmeConfig;
use super::certificate::{certificate, CertSource, CertificateConfig, KeyType, RawCertificate};
use super::dns::ChallengeChoice;
use super::ConfigError;

/// Where the entries live, relative to the tree.
pub const DIR: &str = ".certmesh/certificates";
/// The largest entry read (100 domains of 100 characters fit); a larger one is refused.
pub const MAX_ENTRY_BYTES: u64 = 16 * 1024;
/// At most this many entries are taken (by name order); the rest are refused.
pub const MAX_ENTRIES: usize = 50_000;

/// The tree path of certificate `name`'s entry.
pub fn entry_path(name: &str) -> String {
    format!("{DIR}/{name}.toml")
}

/// Parses and validates the entry `file_name` (`<name>.toml`) holding `text`;
/// `acme`: this node's `[acme]` (a dns-01 entry needs `[acme.dns]` there). The error
/// names what is wrong.
pub fn parse_entry(
    file_name: &str,
    text: &str,
    acme: Option<&AcmeConfig>,
) -> Result<CertificateConfig, String> {
    let stem = file_name
        .strip_suffix(".toml")
        .ok_or_else(|| "not a .toml file".to_string())?;
    if text.len() as u64 > MAX_ENTRY_BYTES {
        return Err(format!("{} bytes, at most {MAX_ENTRY_BYTES}", text.len()));
    }
    let raw: RawCertificate =
        toml::from_str(text).map_err(|e| e.message().trim_end().replace('\n', " "))?;
    let line_of =
        |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    let bad = |span: std::ops::Range<usize>, key: &str, message: String| ConfigError::Invalid {
        path: file_name.into(),
        line: line_of(span),
        key: key.trim_start_matches("certificate.").to_string(),
        message,
    };
    let mut cert = certificate(&raw, &bad).map_err(|e| match e {
        ConfigError::Invalid {
            line, key, message, ..
        } => format!("line {line}: {key}: {message}"),
        e => e.to_string(),
    })?;
    if cert.name != stem {
        return Err(format!(
            "name {:?} does not match the file name (expected {stem:?})",
            cert.name
        ));
    }
    if cert.needs_dns() && acme.is_some_and(|a| a.dns.is_none()) {
        return Err(
            "needs dns-01 (wildcard names or challenge = \"dns-01\"), which needs [acme.dns] \
             on this node"
                .to_string(),
        );
    }
    cert.source = CertSource::Tree;
    Ok(cert)
}

/// The text of `cert`'s entry (what `certmesh cert add` writes).
pub fn render_entry(cert: &CertificateConfig) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let domains: Vec<String> = cert.domains.iter().map(|d| q(d)).collect();
    let mut out = format!(
        "# Written by `certmesh cert add`; replicated to every node.\nname = {}\ndomains = [{}]\nkey = {}\n",
        q(&cert.name),
        domains.join(", "),
        q(key_name(cert.key)),
    );
    if cert.reuse_key {
        out.push_str("reuse_key = true\n");
    }
    match cert.challenge {
        ChallengeChoice::Auto => {}
        ChallengeChoice::Http01 => out.push_str("challenge = \"http-01\"\n"),
        ChallengeChoice::Dns01 => out.push_str("challenge = \"dns-01\"\n"),
    }
    out
}

/// The name `KeyType::parse` reads back.
pub fn key_name(k: KeyType) -> &'static str {
    match k {
        KeyType::Rsa2048 => "rsa2048",
        KeyType::Rsa3072 => "rsa3072",
        KeyType::Rsa4096 => "rsa4096",
        KeyType::EcdsaP256 => "ecdsa-p256",
        KeyType::EcdsaP384 => "ecdsa-p384",
    }
}

/// The effective certificates: the config's blocks (in file order), then the tree's
/// entries (by name) whose name no block declares.
pub fn effective(
    configured: &[&CertificateConfig],
    mut tree: Vec<CertificateConfig>,
) -> Vec<CertificateConfig> {
    tree.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: Vec<CertificateConfig> = configured.iter().map(|c| (*c).clone()).collect();
    out.extend(
        tree.into_iter()
            .filter(|t| !configured.iter().any(|c| c.name == t.name)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, domains: &[&str]) -> CertificateConfig {
        CertificateConfig {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            key: KeyType::EcdsaP384,
            reuse_key: true,
            challenge: ChallengeChoice::Http01,
            verify_rollout: false,
            source: CertSource::Tree,
        }
    }

    #[test]
    fn a_rendered_entry_parses_back_to_the_same_certificate() {
        let c = entry("shop", &["shop.example.com", "www.shop.example.com"]);
        let text = render_entry(&c);
        assert_eq!(parse_entry("shop.toml", &text, None), Ok(c));
    }

    #[test]
    fn a_bad_entry_is_refused_with_what_is_wrong() {
        let err = |f: &str, t: &str| parse_entry(f, t, None).unwrap_err();
        assert!(err("a.toml", "name = \"a\"\n").contains("domains"));
        assert!(err("a.toml", "name = \"b\"\ndomains = [\"x.example\"]\n").contains("file name"));
        assert!(err("a.toml", "name = \"a\"\ndomains = [\"x..y\"]\n").contains("line 2: domains"));
        assert!(err(
            "a.toml",
            "name = \"a\"\ndomains = [\"a.example\"]\nevil = 1\n"
        )
        .contains("evil"));
        let big = format!("name = \"a\"\ndomains = []\n#{}\n", "x".repeat(20_000));
        assert!(err("a.toml", &big).contains("at most"));
        assert!(err("../a.toml", "name = \"../a\"\ndomains = [\"a.example\"]\n").contains("name"));
    }

    #[test]
    fn the_config_wins_over_a_tree_entry_of_the_same_name() {
        let mut mine = entry("www", &["www.example.com"]);
        mine.source = CertSource::Config;
        let tree = vec![entry("zz", &["z.example"]), entry("www", &["evil.example"])];
        let all = effective(&[&mine], tree);
        let names: Vec<(&str, CertSource)> =
            all.iter().map(|c| (c.name.as_str(), c.source)).collect();
        assert_eq!(
            names,
            [("www", CertSource::Config), ("zz", CertSource::Tree)]
        );
        assert_eq!(all[0].domains, ["www.example.com"]);
    }
}

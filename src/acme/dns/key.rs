//! The TSIG secret file: mode 0600 or stricter, holding the base64 secret alone or a
//! whole BIND `key "name" { algorithm …; secret "…"; };` clause (`tsig-keygen`'s output).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm as WireAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::rr::Name;

use super::error::DnsError;
use crate::config::{dns::TsigAlgorithm, dns::TsigKeyConfig};

/// Largest secret file read (a key clause is a few hundred bytes).
const MAX_FILE: u64 = 64 * 1024;
/// Allowed clock difference with the server (RFC 8945 recommends 300 s).
const FUDGE: u16 = 300;

/// What a secret file holds.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedKey {
    /// From a key clause.
    pub name: Option<String>,
    pub algorithm: Option<String>,
    pub secret: Vec<u8>,
}

/// Parses a secret file's text: a base64 secret, or a BIND key clause.
pub fn parse_secret(text: &str) -> Result<ParsedKey, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("is empty (expected the base64 secret or a key { … }; clause)".into());
    }
    if !t.starts_with("key") {
        return Ok(ParsedKey {
            name: None,
            algorithm: None,
            secret: base64(t)?,
        });
    }
    // key "name" { algorithm hmac-sha256; secret "base64"; };
    let rest = t["key".len()..].trim_start();
    let (name, rest) = match rest.strip_prefix('"') {
        Some(r) => {
            let end = r.find('"').ok_or("key clause: unterminated key name")?;
            (r[..end].to_string(), &r[end + 1..])
        }
        None => {
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '{')
                .unwrap_or(rest.len());
            (rest[..end].to_string(), &rest[end..])
        }
    };
    let body = rest
        .trim_start()
        .strip_prefix('{')
        .ok_or("key clause: expected '{' after the key name")?;
    let end = body.rfind('}').ok_or("key clause: missing '}'")?;
    let mut algorithm = None;
    let mut secret = None;
    for stmt in body[..end].split(';') {
        let stmt = stmt.trim();
        if stmt.is_empty() {
            continue;
        }
        let (word, value) = stmt.split_once(char::is_whitespace).unwrap_or((stmt, ""));
        let value = value.trim().trim_matches('"');
        match word {
            "algorithm" => algorithm = Some(value.to_ascii_lowercase()),
            "secret" => secret = Some(base64(value)?),
            other => return Err(format!("key clause: unknown statement {other:?}")),
        }
    }
    Ok(ParsedKey {
        name: Some(name.trim_end_matches('.').to_string()),
        algorithm,
        secret: secret.ok_or("key clause: no secret \"…\"; statement")?,
    })
}

fn base64(s: &str) -> Result<Vec<u8>, String> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = data_encoding::BASE64
        .decode(compact.as_bytes())
        .map_err(|e| format!("the secret is not base64 ({e})"))?;
    if bytes.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(bytes)
}

fn wire(a: TsigAlgorithm) -> WireAlgorithm {
    match a {
        TsigAlgorithm::HmacSha256 => WireAlgorithm::HmacSha256,
        TsigAlgorithm::HmacSha384 => WireAlgorithm::HmacSha384,
        TsigAlgorithm::HmacSha512 => WireAlgorithm::HmacSha512,
    }
}

/// Reads and checks the secret file, returns the signer. Checked: mode (nothing for
/// group or others), size, content, and that a key clause agrees with the config.
pub fn load(cfg: &TsigKeyConfig) -> Result<TSigner, DnsError> {
    let path = &cfg.secret_file;
    let err = |why: String| DnsError::Key {
        path: path.clone(),
        why,
    };
    let text = read_private(path).map_err(err)?;
    let parsed = parse_secret(&text).map_err(err)?;
    if let Some(n) = &parsed.name {
        if !n.eq_ignore_ascii_case(&cfg.name) {
            return Err(err(format!(
                "the key clause names key {n:?}, but acme.dns.tsig_key_name is {:?}",
                cfg.name
            )));
        }
    }
    if let Some(a) = &parsed.algorithm {
        if TsigAlgorithm::parse(a) != Some(cfg.algorithm) {
            return Err(err(format!(
                "the key clause says algorithm {a}, but acme.dns.tsig_algorithm is {}",
                cfg.algorithm.as_str()
            )));
        }
    }
    let name = Name::from_ascii(&cfg.name)
        .map_err(|e| err(format!("acme.dns.tsig_key_name {:?}: {e}", cfg.name)))?;
    TSigner::new(parsed.secret, wire(cfg.algorithm), name, FUDGE).map_err(|e| err(e.to_string()))
}

/// Reads a file that must be private to its owner.
fn read_private(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {mode:04o} lets others read the secret: it must be 0600 or stricter (chmod 600 {})",
            path.display()
        ));
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "{} bytes, larger than a key file can be",
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYGEN: &str = "key \"certmesh\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0LXNlY3JldC1zZWNyZXQ=\";\n};\n";

    #[test]
    fn a_bare_secret_is_base64() {
        let k = parse_secret("c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n").unwrap();
        assert_eq!(k.secret, b"secret-secret-secret");
        assert_eq!((k.name, k.algorithm), (None, None));
        assert!(parse_secret("not base64!")
            .unwrap_err()
            .contains("not base64"));
        assert!(parse_secret("  \n").unwrap_err().contains("empty"));
    }

    #[test]
    fn tsig_keygen_output_is_accepted() {
        let k = parse_secret(KEYGEN).unwrap();
        assert_eq!(k.name.as_deref(), Some("certmesh"));
        assert_eq!(k.algorithm.as_deref(), Some("hmac-sha256"));
        assert_eq!(k.secret, b"secret-secret-secret");
        let unquoted =
            parse_secret("key certmesh. { algorithm HMAC-SHA512; secret \"c2VjcmV0\"; };").unwrap();
        assert_eq!(unquoted.name.as_deref(), Some("certmesh"));
        assert_eq!(unquoted.algorithm.as_deref(), Some("hmac-sha512"));
    }

    #[test]
    fn broken_key_clauses_say_what_is_wrong() {
        for (text, what) in [
            ("key \"k\" { algorithm hmac-sha256; };", "no secret"),
            ("key \"k\" algorithm hmac-sha256;", "expected '{'"),
            ("key \"k { secret c2VjcmV0; };", "unterminated"),
            (
                "key \"k\" { secret \"c2VjcmV0\"; colour blue; };",
                "unknown statement",
            ),
            ("key \"k\" { secret \"c2VjcmV0\";", "missing '}'"),
            ("key \"k\" { secret \"@@@\"; };", "not base64"),
        ] {
            let e = parse_secret(text).unwrap_err();
            assert!(e.contains(what), "{text}: {e}");
        }
    }

    #[test]
    fn the_file_must_be_private_and_agree_with_the_config() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("key");
        std::fs::write(&f, KEYGEN).unwrap();
        let cfg = |name: &str, algorithm| TsigKeyConfig {
            name: name.into(),
            algorithm,
            secret_file: f.clone(),
        };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&cfg("certmesh", TsigAlgorithm::HmacSha256))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("0644") && e.contains("0600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&cfg("certmesh", TsigAlgorithm::HmacSha256)).is_ok());
        let e = load(&cfg("other", TsigAlgorithm::HmacSha256))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tsig_key_name"), "{e}");
        let e = load(&cfg("certmesh", TsigAlgorithm::HmacSha512))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tsig_algorithm"), "{e}");
    }
}

//! Does a file hold private key material, whatever its format? PEM text
//! (`-----BEGIN … PRIVATE KEY-----`), DER (PKCS#8, encrypted PKCS#8, SEC1, PKCS#1),
//! PKCS#12, and JSON holding a JWK with its private `d` member or a base64 string
//! that decodes to one of those DER forms (instant-acme's `key_pkcs8`). A small DER
//! header walker, no full parse: false positives only make a file more private.
//!
//! Pure: bytes in, a verdict out.

/// Largest content judged whole; larger files are only scanned for PEM text.
pub const MAX_JUDGED: usize = 1 << 20;

/// Deepest JSON nesting looked into.
const MAX_JSON_DEPTH: usize = 16;

/// Whether `data` holds private key material in any known format.
pub fn holds_key_material(data: &[u8]) -> bool {
    if data.len() > MAX_JUDGED {
        return false;
    }
    pem_key(data) || der_key(data) || json_key(data)
}

/// PEM text with a private key block.
fn pem_key(data: &[u8]) -> bool {
    data.windows(16).any(|w| w == b"PRIVATE KEY-----")
}

/// One DER TLV: tag, content, rest.
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&first, mut d) = d.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        d = &d[n..];
        len
    };
    (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
/// 1.2.840.113549.1.7 (PKCS#7 content types: PKCS#12's authSafe).
const PKCS7: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07];
/// 1.2.840.113549.1.5 (PKCS#5: PBES2 …) and 1.2.840.113549.1.12 (PKCS#12 PBE).
const PKCS5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05];
const PKCS12_PBE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c];

/// A DER private key (PKCS#8, encrypted PKCS#8, SEC1, PKCS#1) or a PKCS#12 file:
/// one SEQUENCE filling the input, with the shape of one of those.
fn der_key(data: &[u8]) -> bool {
    let Some((SEQUENCE, body, rest)) = tlv(data) else {
        return false;
    };
    if !rest.is_empty() {
        return false;
    }
    let Some((first, value, after)) = tlv(body) else {
        return false;
    };
    let Some((second, second_value, after2)) = tlv(after) else {
        return false;
    };
    match (first, value, second) {
        // PKCS#8 (v1, v2): version, AlgorithmIdentifier, OCTET STRING key.
        (INTEGER, [0] | [1], SEQUENCE) => {
            matches!(tlv(second_value), Some((OID, _, _)))
                && matches!(tlv(after2), Some((OCTET_STRING, _, _)))
        }
        // SEC1: version 1, OCTET STRING key.
        (INTEGER, [1], OCTET_STRING) => true,
        // PKCS#1: version 0, then eight more INTEGERs (n, e, d, p, q, …).
        (INTEGER, [0], INTEGER) => {
            let mut d = after2;
            let mut ints = 1;
            while let Some((INTEGER, _, r)) = tlv(d) {
                ints += 1;
                d = r;
            }
            ints >= 8
        }
        // PKCS#12: version 3, authSafe ContentInfo (a PKCS#7 content type).
        (INTEGER, [3], SEQUENCE) => {
            matches!(tlv(second_value), Some((OID, oid, _)) if oid.starts_with(PKCS7))
        }
        // EncryptedPrivateKeyInfo: PBE AlgorithmIdentifier, OCTET STRING.
        (SEQUENCE, alg, OCTET_STRING) => {
            matches!(tlv(alg), Some((OID, oid, _)) if oid.starts_with(PKCS5) || oid.starts_with(PKCS12_PBE))
        }
        _ => false,
    }
}

/// JSON with a JWK private key (`kty` and `d`) or a string that is a key itself
/// (PEM, or base64 / base64url of a DER key), at any depth.
fn json_key(data: &[u8]) -> bool {
    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'{' | b'[')) {
        return false;
    }
    match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => json_value_key(&v, 0),
        Err(_) => false,
    }
}

fn json_value_key(v: &serde_json::Value, depth: usize) -> bool {
    use serde_json::Value;
    if depth > MAX_JSON_DEPTH {
        return false;
    }
    match v {
        Value::Object(m) => {
            (m.contains_key("kty") && m.get("d").is_some_and(Value::is_string))
                || m.values().any(|v| json_value_key(v, depth + 1))
        }
        Value::Array(a) => a.iter().any(|v| json_value_key(v, depth + 1)),
        Value::String(s) => string_key(s),
        _ => false,
    }
}

/// A string that is a PEM key, or base64 (standard or URL-safe, padded or not) of
/// a DER key.
fn string_key(s: &str) -> bool {
    if pem_key(s.as_bytes()) {
        return true;
    }
    if s.len() < 32 {
        return false;
    }
    use data_encoding::{BASE64, BASE64URL, BASE64URL_NOPAD, BASE64_NOPAD};
    [BASE64, BASE64_NOPAD, BASE64URL, BASE64URL_NOPAD]
        .iter()
        .filter_map(|e| e.decode(s.as_bytes()).ok())
        .any(|der| der_key(&der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    fn openssl(args: &[&str]) -> Option<Vec<u8>> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    fn pkcs8() -> Vec<u8> {
        rcgen::KeyPair::generate().unwrap().serialize_der()
    }

    #[test]
    fn pem_and_pkcs8_der_keys_are_found() {
        let key = rcgen::KeyPair::generate().unwrap();
        assert!(holds_key_material(key.serialize_pem().as_bytes()));
        assert!(holds_key_material(&key.serialize_der()));
    }

    #[test]
    fn sec1_pkcs1_and_pkcs12_keys_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let d = |f: &str| dir.path().join(f).display().to_string();
        let Some(_) = openssl(&["version"]) else {
            return;
        };
        let sec1 = openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-outform",
            "DER",
        ])
        .unwrap();
        assert!(holds_key_material(&sec1), "SEC1");
        openssl(&["genrsa", "-traditional", "-out", &d("rsa.pem"), "2048"]).unwrap();
        let pkcs1 = openssl(&[
            "rsa",
            "-in",
            &d("rsa.pem"),
            "-traditional",
            "-outform",
            "DER",
        ])
        .unwrap();
        assert!(holds_key_material(&pkcs1), "PKCS#1");
        let enc = openssl(&[
            "pkcs8",
            "-topk8",
            "-in",
            &d("rsa.pem"),
            "-outform",
            "DER",
            "-passout",
            "pass:x",
        ])
        .unwrap();
        assert!(holds_key_material(&enc), "encrypted PKCS#8");
        openssl(&[
            "req",
            "-x509",
            "-key",
            &d("rsa.pem"),
            "-subj",
            "/CN=x",
            "-days",
            "1",
            "-out",
            &d("c.pem"),
        ])
        .unwrap();
        let p12 = openssl(&[
            "pkcs12",
            "-export",
            "-inkey",
            &d("rsa.pem"),
            "-in",
            &d("c.pem"),
            "-passout",
            "pass:x",
        ])
        .unwrap();
        assert!(holds_key_material(&p12), "PKCS#12");
    }

    #[test]
    fn json_with_a_jwk_or_a_pkcs8_string_is_found() {
        let jwk = br#"{"key":{"kty":"EC","crv":"P-256","x":"AA","y":"AA","d":"AA"}}"#;
        assert!(holds_key_material(jwk));
        let b64 = data_encoding::BASE64URL_NOPAD.encode(&pkcs8());
        let acct = format!(r#"{{"id":"https://ca/acct/1","key_pkcs8":"{b64}"}}"#);
        assert!(holds_key_material(acct.as_bytes()));
        let nested = format!(
            r#"{{"credentials":[{{"k":"{}"}}]}}"#,
            data_encoding::BASE64.encode(&pkcs8())
        );
        assert!(holds_key_material(nested.as_bytes()));
    }

    #[test]
    fn public_material_is_not_a_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(!holds_key_material(cert.pem().as_bytes()));
        assert!(!holds_key_material(cert.der()));
        assert!(!holds_key_material(&key.subject_public_key_info()));
        let public_jwk = br#"{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}"#;
        assert!(!holds_key_material(public_jwk));
        assert!(!holds_key_material(br#"{"node":"a","refreshed":1}"#));
        assert!(!holds_key_material(b"plain text"));
        assert!(!holds_key_material(&[0x30, 0x82, 0xff]));
    }
}

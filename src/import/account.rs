//! certbot's and lego's ACME account as certmesh's `.certmesh/acme/account.json`:
//! only an ECDSA P-256 key (what instant-acme signs with) whose account URL is on
//! the configured directory's origin; anything else is reported, not imported.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use rustls::pki_types::{pem::PemObject, PrivateKeyDer};

use super::source::read_inside;
use super::{bad, io, ImportError};
use crate::acme::account::{https_origin, parse_account};
use crate::acme::ca::ACCOUNT_FILE;

/// certmesh's account file content for an account URL and a P-256 PKCS#8 key,
/// checked with the same parser the daemon uses.
fn stored_account(directory: &str, url: &str, pkcs8: &[u8]) -> Result<Vec<u8>, String> {
    let v = serde_json::json!({
        "directory": directory,
        "credentials": {
            "id": url,
            "key_pkcs8": data_encoding::BASE64URL_NOPAD.encode(pkcs8),
            "directory": directory,
        }
    });
    let bytes = serde_json::to_vec_pretty(&v).map_err(|e| e.to_string())?;
    let _ = parse_account(&bytes, directory).map_err(|e| format!("refused: {e}"))?;
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8),
        &rcgen::PKCS_ECDSA_P256_SHA256,
    )
    .map_err(|e| format!("the key is not a usable P-256 key: {e}"))?;
    Ok(bytes)
}

/// `host[:port]` + path of the directory URL, as certbot names its account dir.
fn certbot_server_dir(directory: &str) -> Option<String> {
    let rest = directory.strip_prefix("https://")?;
    Some(rest.trim_end_matches('/').to_string())
}

/// certbot: `accounts/<host[:port]>/<path>/<id>/{regr.json,private_key.json}`.
pub(super) fn certbot_account(base: &Path, directory: &str) -> Result<Vec<u8>, String> {
    let server = certbot_server_dir(directory).ok_or("the directory is not https")?;
    let dir = base.join("accounts").join(server);
    let ids = fs::read_dir(&dir).map_err(|e| {
        format!(
            "no certbot account for {directory} ({}: {e})",
            dir.display()
        )
    })?;
    let mut why = Vec::new();
    for id in ids.flatten() {
        let p = id.path();
        let read = |f: &str| -> Result<serde_json::Value, String> {
            let b = read_inside(base, &p.join(f)).map_err(|e| e.to_string())?;
            serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.join(f).display()))
        };
        let attempt = (|| {
            let regr = read("regr.json")?;
            let url = regr["uri"]
                .as_str()
                .ok_or_else(|| format!("{}: no \"uri\"", p.join("regr.json").display()))?;
            let jwk = read("private_key.json")?;
            let pkcs8 = jwk_p256_pkcs8(&jwk)
                .map_err(|e| format!("{}: {e}", p.join("private_key.json").display()))?;
            stored_account(directory, url, &pkcs8)
        })();
        match attempt {
            Ok(b) => return Ok(b),
            Err(e) => why.push(e),
        }
    }
    Err(if why.is_empty() {
        format!("no certbot account in {}", dir.display())
    } else {
        why.join("; ")
    })
}

/// A JWK EC P-256 private key (`kty`, `crv`, `d`, `x`, `y`) as PKCS#8 DER.
fn jwk_p256_pkcs8(jwk: &serde_json::Value) -> Result<Vec<u8>, String> {
    match (jwk["kty"].as_str(), jwk["crv"].as_str()) {
        (Some("EC"), Some("P-256")) => {}
        (Some("RSA"), _) => {
            return Err(
                "an RSA account key (certbot's default); certmesh's ACME client signs \
                 with ECDSA P-256 only, so a new account is registered at the first order \
                 (the imported certificates do not need one)"
                    .into(),
            )
        }
        (k, c) => return Err(format!("unsupported key kty={k:?} crv={c:?}")),
    }
    let field = |n: &str| -> Result<Vec<u8>, String> {
        let s = jwk[n].as_str().ok_or(format!("no \"{n}\""))?;
        let b = data_encoding::BASE64URL_NOPAD
            .decode(s.trim_end_matches('=').as_bytes())
            .map_err(|e| format!("\"{n}\": {e}"))?;
        (b.len() == 32)
            .then_some(b)
            .ok_or(format!("\"{n}\" is not 32 bytes"))
    };
    let (d, x, y) = (field("d")?, field("x")?, field("y")?);
    // PKCS#8 { v0, ecPublicKey/prime256v1, ECPrivateKey { 1, d, [1] 04||x||y } }.
    let mut der = hex("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420");
    der.extend(d);
    der.extend(hex("a14403420004"));
    der.extend(x);
    der.extend(y);
    Ok(der)
}

/// One DER element: tag, minimal length, content.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let n = content.len();
    let mut out = vec![tag];
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn hex(s: &str) -> Vec<u8> {
    data_encoding::HEXLOWER
        .decode(s.as_bytes())
        .expect("a constant hex string")
}

/// A SEC1 `EC PRIVATE KEY` (P-256) wrapped as PKCS#8, or a PKCS#8 key as it is.
fn p256_pkcs8_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    match PrivateKeyDer::from_pem_slice(pem).map_err(|e| e.to_string())? {
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(k) => {
            let mut inner = hex("020100301306072a8648ce3d020106082a8648ce3d030107");
            inner.extend(der_tlv(0x04, k.secret_sec1_der()));
            Ok(der_tlv(0x30, &inner))
        }
        _ => Err(
            "an RSA account key; certmesh's ACME client signs with ECDSA P-256 only, so \
                  a new account is registered at the first order"
                .into(),
        ),
    }
}

/// lego: `accounts/<host>_<port>/<email>/{account.json,keys/<email>.key}`.
pub(super) fn lego_account(base: &Path, directory: &str) -> Result<Vec<u8>, String> {
    let (host, port) = https_origin(directory).ok_or("the directory is not https")?;
    let server = if port == 443 {
        host.clone()
    } else {
        format!("{host}_{port}")
    };
    let dir = base.join("accounts").join(&server);
    let emails = fs::read_dir(&dir)
        .map_err(|e| format!("no lego account for {directory} ({}: {e})", dir.display()))?;
    let mut why = Vec::new();
    for e in emails.flatten() {
        let p = e.path();
        let email = e.file_name().to_string_lossy().to_string();
        let attempt = (|| {
            let acc = read_inside(base, &p.join("account.json")).map_err(|e| e.to_string())?;
            let acc: serde_json::Value = serde_json::from_slice(&acc)
                .map_err(|e| format!("{}: {e}", p.join("account.json").display()))?;
            let url = acc["registration"]["uri"].as_str().ok_or_else(|| {
                format!("{}: no registration.uri", p.join("account.json").display())
            })?;
            let kp = p.join("keys").join(format!("{email}.key"));
            let key = read_inside(base, &kp).map_err(|e| e.to_string())?;
            let pkcs8 = p256_pkcs8_from_pem(&key).map_err(|e| format!("{}: {e}", kp.display()))?;
            stored_account(directory, url, &pkcs8)
        })();
        match attempt {
            Ok(b) => return Ok(b),
            Err(e) => why.push(e),
        }
    }
    Err(if why.is_empty() {
        format!("no lego account in {}", dir.display())
    } else {
        why.join("; ")
    })
}

/// Writes `.certmesh/acme/account.json` (0600) unless one is there already.
pub(super) fn write_account(tree: &Path, bytes: &[u8]) -> Result<String, ImportError> {
    let dest = tree.join(ACCOUNT_FILE);
    if fs::symlink_metadata(&dest).is_ok() {
        return Ok(format!(
            "account: {} exists already; kept it",
            dest.display()
        ));
    }
    let dir = dest.parent().ok_or_else(|| bad(&dest, "no parent"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    // Staged under `.certmesh/tmp` (same file system, not watched) and renamed.
    crate::disk::atomic::replace_via(&tree.join(".certmesh/tmp"), &dest, bytes, 0o600)
        .map_err(io(&dest))?;
    Ok(format!("account: imported into {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwk_p256_key_becomes_pkcs8_that_signs() {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = k.serialize_der();
        // The last 65 bytes of rcgen's PKCS#8 are 04||x||y; d follows the fixed prefix.
        let d = &der[36..68];
        let xy = &der[der.len() - 64..];
        let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "d": b64(d), "x": b64(&xy[..32]), "y": b64(&xy[32..])
        });
        let out = jwk_p256_pkcs8(&jwk).unwrap();
        let back = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(out.as_slice()),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )
        .unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(back.subject_public_key_info(), k.subject_public_key_info());
        let rsa = serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"});
        assert!(jwk_p256_pkcs8(&rsa).unwrap_err().contains("RSA"));
        let short =
            serde_json::json!({"kty": "EC", "crv": "P-256", "d": "AA", "x": "AA", "y": "AA"});
        assert!(jwk_p256_pkcs8(&short).is_err());
    }

    #[test]
    fn an_account_for_another_directory_is_refused() {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let dir = "https://acme.example/dir";
        assert!(stored_account(dir, "https://acme.example/acct/1", &k.serialize_der()).is_ok());
        let e = stored_account(dir, "https://evil.example/acct/1", &k.serialize_der());
        assert!(e.unwrap_err().contains("refused"));
        assert_eq!(
            certbot_server_dir("https://127.0.2.1:14000/dir").as_deref(),
            Some("127.0.2.1:14000/dir")
        );
    }
}

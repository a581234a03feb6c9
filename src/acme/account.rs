//! The ACME account, shared by every node through the tree in
//! `.certmesh/acme/account.json` (0600; with a list of CAs, one account per CA, see
//! [`super::ca`]): created by the first node that needs it, loaded by all others. It
//! talks to the CA through [`super::client`].
//!
//! The account file is untrusted (any peer can write it): [`parse_account`] uses it
//! only if its outer directory and every URL inside instant-acme's credentials
//! (`directory`, the `urls` of older files, the account URL) belong to the configured
//! directory's origin; otherwise no request goes to them and a new account is made.

use anyhow::Context;
use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};
use serde::{Deserialize, Serialize};

use super::ca::{Ca, ACCOUNT_FILE};
use super::client::{http_client, within};
use crate::config::acme::AcmeConfig;
use crate::disk::tree;
use crate::handles::TreeWriter;

/// An account file is at most this many bytes.
pub const MAX_ACCOUNT_BYTES: usize = 64 * 1024;

/// On disk: the directory the account belongs to, and instant-acme's credentials.
#[derive(Serialize, Deserialize)]
struct Stored {
    directory: String,
    credentials: AccountCredentials,
}

/// The URLs in an account file, mirroring what instant-acme 0.8 serialises in
/// `AccountCredentials` (`id`, `directory`, and `urls` in files of older versions).
#[derive(Deserialize)]
struct StoredUrls {
    directory: String,
    credentials: CredentialUrls,
}

#[derive(Deserialize)]
struct CredentialUrls {
    /// The account URL.
    id: String,
    directory: Option<String>,
    urls: Option<DirectoryUrls>,
}

/// instant-acme's `Directory` (camelCase, as the CA's directory object).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DirectoryUrls {
    new_nonce: String,
    new_account: String,
    new_order: String,
    new_authz: Option<String>,
    revoke_cert: Option<String>,
    key_change: Option<String>,
    renewal_info: Option<String>,
}

/// Why an account file is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountRefused {
    /// Larger than [`MAX_ACCOUNT_BYTES`].
    #[error("{0} bytes (at most {MAX_ACCOUNT_BYTES})")]
    TooLarge(usize),
    /// Not an account file.
    #[error("unreadable: {0}")]
    Json(String),
    /// The outer `directory` is not the configured one.
    #[error("it belongs to directory {found:?}, not {configured:?}")]
    Directory { found: String, configured: String },
    /// A URL inside the credentials is not on the configured directory's origin.
    #[error("credentials field {field} is {found:?}, not on the origin of {configured:?}")]
    Url {
        field: &'static str,
        found: String,
        configured: String,
    },
    /// The configured directory is not an https URL with a host.
    #[error("the configured directory {0:?} has no https origin")]
    Configured(String),
}

/// `(host, port)` of an `https://` URL (lowercased host, default port 443); `None`
/// for anything else, userinfo included.
pub fn https_origin(url: &str) -> Option<(String, u16)> {
    let rest = url
        .get(..8)
        .filter(|s| s.eq_ignore_ascii_case("https://"))?;
    let rest = &url[rest.len()..];
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (format!("[{h}]"), after)
    } else {
        match authority.rfind(':') {
            Some(i) => (authority[..i].to_string(), &authority[i..]),
            None => (authority.to_string(), ""),
        }
    };
    let port = match port {
        "" => 443,
        p => p.strip_prefix(':')?.parse().ok()?,
    };
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// Parses an account file (untrusted) and returns its credentials only if every URL
/// in it belongs to `directory` (the configured one): the outer `directory` and the
/// inner one equal it, and the account URL and any stored directory URLs are on its
/// origin. Nothing is fetched.
pub fn parse_account(bytes: &[u8], directory: &str) -> Result<AccountCredentials, AccountRefused> {
    if bytes.len() > MAX_ACCOUNT_BYTES {
        return Err(AccountRefused::TooLarge(bytes.len()));
    }
    let origin =
        https_origin(directory).ok_or_else(|| AccountRefused::Configured(directory.into()))?;
    let urls: StoredUrls =
        serde_json::from_slice(bytes).map_err(|e| AccountRefused::Json(e.to_string()))?;
    if urls.directory != directory {
        return Err(AccountRefused::Directory {
            found: urls.directory,
            configured: directory.into(),
        });
    }
    let c = &urls.credentials;
    let same = |field: &'static str, url: &str, exact: bool| {
        let ok = if exact {
            url == directory
        } else {
            https_origin(url).as_ref() == Some(&origin)
        };
        if ok {
            Ok(())
        } else {
            Err(AccountRefused::Url {
                field,
                found: url.chars().take(200).collect(),
                configured: directory.into(),
            })
        }
    };
    same("id", &c.id, false)?;
    if let Some(d) = &c.directory {
        same("directory", d, true)?;
    }
    if let Some(u) = &c.urls {
        same("urls.newNonce", &u.new_nonce, false)?;
        same("urls.newAccount", &u.new_account, false)?;
        same("urls.newOrder", &u.new_order, false)?;
        let optional = [
            ("urls.newAuthz", &u.new_authz),
            ("urls.revokeCert", &u.revoke_cert),
            ("urls.keyChange", &u.key_change),
            ("urls.renewalInfo", &u.renewal_info),
        ];
        for (field, url) in optional {
            if let Some(url) = url {
                same(field, url, false)?;
            }
        }
    }
    let stored: Stored =
        serde_json::from_slice(bytes).map_err(|e| AccountRefused::Json(e.to_string()))?;
    Ok(stored.credentials)
}

/// RFC 7638 thumbprint of an account file's key (instant-acme's accounts are ECDSA
/// P-256), what the CA expects after `<token>.`: the key is read through
/// instant-acme's public `AccountCredentials::private_key`, not its JSON field names
/// (`Account::key_thumbprint` needs a live `Account`, which the stateless http-01
/// responder does not have).
pub fn key_thumbprint(bytes: &[u8]) -> Option<String> {
    if bytes.len() > MAX_ACCOUNT_BYTES {
        return None;
    }
    let stored: Stored = serde_json::from_slice(bytes).ok()?;
    let der = stored.credentials.private_key().secret_pkcs8_der();
    let raw = rcgen::KeyPair::try_from(der)
        .ok()?
        .public_key_raw()
        .to_vec();
    if raw.len() != 65 || raw[0] != 4 {
        return None;
    }
    let enc = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        enc(&raw[1..33]),
        enc(&raw[33..])
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, jwk.as_bytes());
    Some(enc(digest.as_ref()))
}

/// Loads the shared account of `ca`, or creates it (once, cluster-wide: the file
/// syncs to every node). Returns the account and whether it was created.
pub async fn load_or_create(
    writer: &TreeWriter,
    cfg: &AcmeConfig,
    ca: &Ca,
) -> anyhow::Result<(Account, bool)> {
    let own = ca.account_file();
    // Its own file first; after a reorder of `acme.directory`, the file it had.
    for file in [own.clone(), ca.moved_account_file()] {
        let Some(bytes) = tree::read(writer.root(), &file) else {
            continue;
        };
        match parse_account(&bytes, &ca.directory) {
            Ok(credentials) => {
                let account = within(
                    cfg.request_timeout,
                    &format!("loading the shared ACME account for {}", ca.directory),
                    Account::builder_with_http(http_client(cfg)?).from_credentials(credentials),
                )
                .await?;
                return Ok((account, false));
            }
            // Another CA's account (the list was reordered, or the directory changed).
            Err(AccountRefused::Directory { .. }) => {}
            Err(e) if file == own => tracing::warn!(
                "{file} is not used: {e}; creating an account at {}",
                ca.directory
            ),
            Err(_) => {}
        }
    }
    tracing::info!(
        "no shared account for {} in {own}; creating one",
        ca.directory
    );
    create(writer, cfg, ca).await.map(|a| (a, true))
}

/// Before the first CA writes `account.json`: an account in it for another CA of
/// the list (the list was reordered) moves to that CA's own file, unless that one
/// holds an account already.
fn keep_moved_account(writer: &TreeWriter, cfg: &AcmeConfig, ca: &Ca) -> anyhow::Result<()> {
    if ca.index != 0 {
        return Ok(());
    }
    let Some(bytes) = tree::read(writer.root(), ACCOUNT_FILE) else {
        return Ok(());
    };
    for other in cfg.fallback.iter() {
        let dest = super::ca::other_account_file(other);
        if parse_account(&bytes, other).is_ok() && tree::read(writer.root(), &dest).is_none() {
            writer.write(&tree::rel(&dest)?, &bytes, 0o600)?;
            tracing::info!("{ACCOUNT_FILE}: the account of {other} moved to {dest}");
        }
    }
    Ok(())
}

/// Creates a new account at `ca` and shares it in its file (replacing the file of
/// an account the CA no longer knows).
pub async fn create(writer: &TreeWriter, cfg: &AcmeConfig, ca: &Ca) -> anyhow::Result<Account> {
    let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
    let eab = match &cfg.eab {
        None => None,
        Some((kid, hmac)) => {
            let key = data_encoding::BASE64URL_NOPAD
                .decode(hmac.trim_end_matches('=').as_bytes())
                .context("acme.eab_hmac")?;
            Some(ExternalAccountKey::new(kid.clone(), &key))
        }
    };
    let (account, credentials) = within(
        cfg.request_timeout,
        &format!("creating an ACME account at {}", ca.directory),
        Account::builder_with_http(http_client(cfg)?).create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            ca.directory.clone(),
            eab.as_ref(),
        ),
    )
    .await?;
    let stored = serde_json::to_vec_pretty(&Stored {
        directory: ca.directory.clone(),
        credentials,
    })?;
    keep_moved_account(writer, cfg, ca)?;
    let file = ca.account_file();
    writer.write(&tree::rel(&file)?, &stored, 0o600)?;
    tracing::info!(
        id = account.id(),
        ca = %ca.directory,
        "ACME account created and shared in {file}"
    );
    Ok(account)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "https://127.0.0.1:14000/dir";

    /// An account file as instant-acme 0.8 writes it, with `inner` spliced into the
    /// credentials object.
    fn file(outer: &str, inner: &str) -> Vec<u8> {
        format!(
            r#"{{"directory":"{outer}","credentials":{{"id":"https://127.0.0.1:14000/my-account/1","key_pkcs8":"AAAA"{inner}}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn account_for_the_configured_directory_is_used() {
        assert!(parse_account(&file(DIR, &format!(r#","directory":"{DIR}""#)), DIR).is_ok());
        assert!(parse_account(&file(DIR, ""), DIR).is_ok());
    }

    #[test]
    fn forged_inner_directory_is_refused() {
        let forged = file(DIR, r#","directory":"https://evil.example/dir""#);
        let Err(e) = parse_account(&forged, DIR) else {
            panic!("forged directory accepted")
        };
        assert!(
            matches!(
                e,
                AccountRefused::Url {
                    field: "directory",
                    ..
                }
            ),
            "{e}"
        );
        // Same origin, other path: still not the configured directory.
        let other = file(DIR, r#","directory":"https://127.0.0.1:14000/other""#);
        assert!(parse_account(&other, DIR).is_err());
    }

    #[test]
    fn forged_urls_are_refused() {
        let urls = |nonce: &str, order: &str| {
            format!(
                r#","directory":null,"urls":{{"newNonce":"{nonce}","newAccount":"https://127.0.0.1:14000/acct","newOrder":"{order}","renewalInfo":null}}"#
            )
        };
        let good = urls(
            "https://127.0.0.1:14000/nonce",
            "https://127.0.0.1:14000/order",
        );
        assert!(parse_account(&file(DIR, &good), DIR).is_ok());
        for (nonce, order) in [
            (
                "https://127.0.0.50:14000/nonce",
                "https://127.0.0.1:14000/order",
            ),
            (
                "https://127.0.0.1:14000/nonce",
                "http://127.0.0.1:14000/order",
            ),
            (
                "https://127.0.0.1:14001/nonce",
                "https://127.0.0.1:14000/order",
            ),
            (
                "https://127.0.0.1:14000@evil/nonce",
                "https://127.0.0.1:14000/order",
            ),
        ] {
            let Err(e) = parse_account(&file(DIR, &urls(nonce, order)), DIR) else {
                panic!("{nonce} {order} accepted")
            };
            assert!(
                matches!(e, AccountRefused::Url { .. }),
                "{nonce} {order}: {e}"
            );
        }
    }

    #[test]
    fn forged_account_url_and_outer_directory_are_refused() {
        let evil_id = br#"{"directory":"https://127.0.0.1:14000/dir","credentials":{"id":"https://evil.example/acct/1","key_pkcs8":"AAAA","directory":"https://127.0.0.1:14000/dir"}}"#;
        assert!(matches!(
            parse_account(evil_id, DIR),
            Err(AccountRefused::Url { field: "id", .. })
        ));
        assert!(matches!(
            parse_account(&file("https://evil.example/dir", ""), DIR),
            Err(AccountRefused::Directory { .. })
        ));
        assert!(parse_account(b"{}", DIR).is_err());
        assert!(parse_account(&vec![b' '; MAX_ACCOUNT_BYTES + 1], DIR).is_err());
    }

    #[test]
    fn origins() {
        assert_eq!(
            https_origin("https://A.example/x"),
            Some(("a.example".into(), 443))
        );
        assert_eq!(
            https_origin("https://a.example:443"),
            Some(("a.example".into(), 443))
        );
        assert_eq!(
            https_origin("https://[::1]:14000/d"),
            Some(("[::1]".into(), 14000))
        );
        for bad in [
            "http://a/x",
            "https://",
            "https://u@a/",
            "https://a:99999/",
            "ftp://a",
        ] {
            assert_eq!(https_origin(bad), None, "{bad}");
        }
    }
}

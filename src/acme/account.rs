//! The ACME account, shared by every node through the tree in
//! `.certmesh/acme/account.json` (0600): created by the first node that needs it,
//! loaded by all others. Also the HTTPS client, trusting the system roots plus
//! `acme.ca_roots`.

use std::time::Duration;

use anyhow::{bail, Context};
use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};
use serde::{Deserialize, Serialize};

use super::tree;
use crate::config::AcmeConfig;
use crate::node::Shared;

pub const ACCOUNT_FILE: &str = ".certmesh/acme/account.json";

/// On disk: the directory the account belongs to, and instant-acme's credentials.
#[derive(Serialize, Deserialize)]
struct Stored {
    directory: String,
    credentials: AccountCredentials,
}

/// The HTTPS client for the CA: system roots plus `ca_roots`.
fn http_client(cfg: &AcmeConfig) -> anyhow::Result<Box<dyn instant_acme::HttpClient>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &cfg.ca_roots {
        let mut n = 0;
        for c in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading acme.ca_roots {}", path.display()))?
        {
            let c = c.with_context(|| format!("parsing acme.ca_roots {}", path.display()))?;
            roots
                .add(c)
                .with_context(|| format!("acme.ca_roots {}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            bail!("acme.ca_roots {}: no certificate in it", path.display());
        }
    }
    if roots.is_empty() {
        bail!("no trusted roots: none in the system store and no acme.ca_roots");
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    Ok(Box::new(client))
}

/// Loads the shared account for `cfg.directory`, or creates it (once, cluster-wide:
/// the file syncs to every node). Returns the account and whether it was created.
pub async fn load_or_create(shared: &Shared, cfg: &AcmeConfig) -> anyhow::Result<(Account, bool)> {
    let path = shared.tree.root.join(ACCOUNT_FILE);
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<Stored>(&bytes) {
            Ok(s) if s.directory == cfg.directory => {
                let account = Account::builder_with_http(http_client(cfg)?)
                    .from_credentials(s.credentials)
                    .await
                    .context("loading the shared ACME account")?;
                return Ok((account, false));
            }
            Ok(s) => tracing::info!(
                old = %s.directory,
                new = %cfg.directory,
                "the shared account belongs to another directory; creating one"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "{ACCOUNT_FILE} is unreadable; creating a new account")
            }
        }
    }
    create(shared, cfg).await.map(|a| (a, true))
}

/// Creates a new account and shares it (replacing the file of an account the CA
/// no longer knows).
pub async fn create(shared: &Shared, cfg: &AcmeConfig) -> anyhow::Result<Account> {
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
    let (account, credentials) = Account::builder_with_http(http_client(cfg)?)
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            eab.as_ref(),
        )
        .await
        .with_context(|| format!("creating an ACME account at {}", cfg.directory))?;
    let stored = serde_json::to_vec_pretty(&Stored {
        directory: cfg.directory.clone(),
        credentials,
    })?;
    tree::write_file(shared, &tree::rel(ACCOUNT_FILE)?, &stored, 0o600)?;
    tracing::info!(
        id = account.id(),
        "ACME account created and shared in {ACCOUNT_FILE}"
    );
    Ok(account)
}

//! One ACME order, start to publish: http-01 challenges written into the tree, dns-01
//! records put in DNS and checked on every authoritative nameserver ([`super::dns`]),
//! the ack barrier (every connected peer has the token before `set_ready`), finalize
//! with a fresh (or reused) key, publish as one unit, tokens and records removed
//! whatever happens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};

use super::account::within;
use super::bundle::{self, Bundle};
use super::ca::{self, Ca};
use super::dns01;
use super::tree::{self, Expect};
use crate::config::{AcmeConfig, CertificateConfig};
use crate::node::Shared;
use crate::paths::RelPath;

/// Where http-01 key authorizations go (nginx: `root <tree>/acme;`).
pub const CHALLENGE_DIR: &str = "acme/.well-known/acme-challenge";

/// A published certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The directory URL of the CA that issued it.
    pub ca: String,
    pub version: u32,
    pub not_after: i64,
    pub took: Duration,
}

/// An order that failed, with the CA's Retry-After when it gave one.
#[derive(Debug)]
pub struct Failed {
    pub error: anyhow::Error,
    pub retry_after: Option<Duration>,
    /// Not an error: another node's lease won (it orders, we do not).
    pub lost_to: Option<String>,
}

impl From<anyhow::Error> for Failed {
    fn from(error: anyhow::Error) -> Self {
        let retry_after = error.chain().find_map(|c| match c.downcast_ref() {
            Some(instant_acme::Error::Timeout(Some(at))) => Some(
                at.saturating_duration_since(Instant::now())
                    .min(super::schedule::MAX_RETRY_AFTER),
            ),
            _ => None,
        });
        Failed {
            error,
            retry_after,
            lost_to: None,
        }
    }
}

/// How long validation, and then issuance, may take at the CA.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);

fn policy() -> RetryPolicy {
    // Pebble without VA sleep (and Let's Encrypt) validate within milliseconds.
    // A Retry-After from the CA is capped before instant-acme sees it (see
    // `account::capped_retry_after`); one beyond the timeout ends the poll.
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(10))
        .backoff(1.5)
        .timeout(POLL_TIMEOUT)
}

/// Times out a wait for the next authorization (each may be one request).
async fn next_within<'a>(
    limit: Duration,
    auths: &'a mut instant_acme::Authorizations<'_>,
) -> Result<Option<instant_acme::AuthorizationHandle<'a>>, anyhow::Error> {
    match tokio::time::timeout(limit, auths.next()).await {
        Ok(None) => Ok(None),
        Ok(Some(a)) => a.map(Some).context("fetching an authorization"),
        Err(_) => Err(anyhow!(
            "fetching an authorization: no answer from the CA within {limit:?}"
        )),
    }
}

/// The CA no longer knows the account (a test CA restarted, a staging reset).
pub fn account_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref(),
            Some(instant_acme::Error::Api(p))
                if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist")
        )
    })
}

fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// What an order put in place, removed when it settles.
#[derive(Default)]
struct Placed {
    /// http-01 tokens in the tree.
    tokens: Vec<RelPath>,
    dns: dns01::Dns01,
}

/// Orders `cert` from `ca` with its `account` and publishes it. `replaces`: the ARI
/// identifier of the certificate being renewed, when that CA issued it and supports
/// ARI. `lease`: our renewal lease, already in the local index; the order is dropped
/// before `set_ready` if another's won.
pub async fn run(
    shared: &Arc<Shared>,
    cfg: &AcmeConfig,
    ca: &Ca,
    account: &Account,
    cert: &CertificateConfig,
    replaces: Option<CertificateIdentifier<'static>>,
    lease: &RelPath,
) -> Result<Issued, Failed> {
    let start = Instant::now();
    let mut placed = Placed::default();
    let result = order(shared, cfg, ca, account, cert, replaces, lease, &mut placed).await;
    // The order has settled: the tokens and TXT records go, whatever happened.
    let mut gone: Vec<(RelPath, Expect)> = placed
        .tokens
        .iter()
        .map(|t| (t.clone(), tree::remove(shared, t)))
        .collect();
    gone.extend(placed.dns.finish(shared, &cert.name).await);
    if !gone.is_empty() {
        if let Err(e) = tree::await_indexed(shared, &gone, Duration::from_secs(5)).await {
            tracing::debug!(error = %e, "token removal not indexed yet");
        }
    }
    let (version, not_after) = result?;
    Ok(Issued {
        ca: ca.directory.clone(),
        version,
        not_after,
        took: start.elapsed(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn order(
    shared: &Arc<Shared>,
    cfg: &AcmeConfig,
    ca: &Ca,
    account: &Account,
    cert: &CertificateConfig,
    replaces: Option<CertificateIdentifier<'static>>,
    lease: &RelPath,
    placed: &mut Placed,
) -> Result<(u32, i64), Failed> {
    let Placed { tokens, dns } = placed;
    let t0 = Instant::now();
    // Before the CA is asked: a tree the certificate cannot be published into (a
    // certbot `live/<name>` directory) must not cost an order per retry.
    tree::check_publish_target(&shared.tree.root, &cert.name)
        .map_err(|e| anyhow!("not ordering {}: {e}", cert.name))?;
    // dns-01: the key, the zones and leftovers before the CA is asked, so a bad
    // secret or a missing zone costs no order.
    dns.prepare(shared, cfg, cert).await?;
    let ids: Vec<Identifier> = cert
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut new = NewOrder::new(&ids);
    if let Some(p) = &cfg.profile {
        new = new.profile(p);
    }
    if let Some(r) = replaces {
        new = new.replaces(r);
    }
    let limit = cfg.request_timeout;
    let mut order = within(limit, "new order", account.new_order(&new)).await?;
    tracing::debug!(url = order.url(), "order created");

    // 1. Key authorizations into the tree.
    let mut written: Vec<(RelPath, Expect)> = Vec::new();
    {
        let mut auths = order.authorizations();
        while let Some(mut a) = next_within(limit, &mut auths).await? {
            let ident = a.identifier().to_string();
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                s => return Err(anyhow!("authorization for {ident} is {s:?}").into()),
            }
            if cert.challenge.uses_dns(&ident) {
                let ch = a
                    .challenge(ChallengeType::Dns01)
                    .ok_or_else(|| anyhow!("the CA offers no dns-01 challenge for {ident}"))?;
                dns.want(&ident, ch.key_authorization().dns_value());
                continue;
            }
            let ch = a
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| anyhow!("the CA offers no http-01 challenge for {ident}"))?;
            if !valid_token(&ch.token) {
                return Err(
                    anyhow!("the CA sent a token that is not base64url: {:?}", ch.token).into(),
                );
            }
            let path = tree::rel(&format!("{CHALLENGE_DIR}/{}", ch.token))?;
            let ka = ch.key_authorization();
            let e = tree::write_file(shared, &path, ka.as_str().as_bytes(), 0o644)?;
            tokens.push(path.clone());
            written.push((path, e));
        }
    }

    // dns-01: recorded in the tree (and acknowledged), put in DNS, served by every
    // authoritative nameserver.
    if let Some(w) = dns.present(shared, cfg, &cert.name).await? {
        written.push(w);
    }

    // 2. The barrier: the local index has every token, then every connected peer
    //    has acknowledged it. Only then may the CA's validator ask any node. Acks are
    //    cumulative, so this also means every peer has our renewal lease (written
    //    before the tokens); with no token to place, wait for the lease itself.
    if !written.is_empty() {
        tree::await_indexed(shared, &written, Duration::from_secs(10)).await?;
    }
    let last = {
        let st = shared.lock();
        written
            .iter()
            .map(|(p, _)| p)
            .max_by_key(|p| st.engine.index().get(p).map_or(0, |e| e.sequence))
            .unwrap_or(lease)
            .clone()
    };
    let t_barrier = Instant::now();
    let acks = crate::node::wait_peers_have(shared, &last, cfg.barrier_timeout).await;
    for a in &acks {
        match a.after {
            Some(d) => tracing::info!(
                peer = %a.name,
                ms = format!("{:.1}", d.as_secs_f64() * 1000.0),
                "challenge acknowledged"
            ),
            None => tracing::warn!(
                peer = %a.name,
                connected = a.live,
                timeout = ?cfg.barrier_timeout,
                "peer did not acknowledge the challenge in time; going ahead"
            ),
        }
    }
    tracing::info!(
        tokens = written.len(),
        peers = acks.len(),
        barrier_ms = format!("{:.1}", t_barrier.elapsed().as_secs_f64() * 1000.0),
        since_order_ms = t0.elapsed().as_millis() as u64,
        "challenges in place on every connected node"
    );
    // Every peer has our lease now; if another node's lease won meanwhile, it orders.
    if let Some(l) = super::read_lease(shared, &cert.name) {
        if l.holder != shared.me() && l.fresh(super::unix_now()) {
            return Err(Failed {
                error: anyhow!("{} took the renewal lease first", l.node),
                retry_after: None,
                lost_to: Some(l.node),
            });
        }
    }

    // 3. Tell the CA.
    {
        let mut auths = order.authorizations();
        while let Some(mut a) = next_within(limit, &mut auths).await? {
            if a.status != AuthorizationStatus::Pending {
                continue;
            }
            let kind = if cert.challenge.uses_dns(&a.identifier().to_string()) {
                ChallengeType::Dns01
            } else {
                ChallengeType::Http01
            };
            let mut ch = a
                .challenge(kind.clone())
                .ok_or_else(|| anyhow!("no {kind:?} challenge"))?;
            within(limit, "set_ready", ch.set_ready()).await?;
        }
    }
    let status = within(
        POLL_TIMEOUT + limit,
        "waiting for validation",
        order.poll_ready(&policy()),
    )
    .await?;
    if status != OrderStatus::Ready {
        let mut why = Vec::new();
        let mut auths = order.authorizations();
        while let Ok(Some(mut a)) = next_within(limit, &mut auths).await {
            if let Ok(Ok(s)) = tokio::time::timeout(limit, a.refresh()).await {
                for c in &s.challenges {
                    if let Some(p) = &c.error {
                        why.push(format!("{}: {}", s.identifier(), p));
                    }
                }
            }
        }
        return Err(anyhow!("order is {status:?}: {}", why.join("; ")).into());
    }
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "order ready");

    // 4. Key, CSR, certificate.
    let root = shared.tree.root.clone();
    let key = match cert
        .reuse_key
        .then(|| bundle::live_key(&root, &cert.name))
        .flatten()
    {
        Some(k) => k,
        None => {
            let kind = cert.key;
            tokio::task::spawn_blocking(move || bundle::generate_key(kind))
                .await
                .map_err(|e| anyhow!("key generation: {e}"))??
        }
    };
    let csr = bundle::csr(&cert.domains, &key)?;
    within(limit, "finalize", order.finalize_csr(&csr)).await?;
    // Many CAs (Pebble among them) answer finalize with the order already valid.
    let ready = match order.state().status {
        OrderStatus::Valid => {
            within(limit, "fetching the certificate", order.certificate()).await?
        }
        _ => None,
    };
    let chain = match ready {
        Some(c) => c,
        None => {
            within(
                POLL_TIMEOUT + limit,
                "fetching the certificate",
                order.poll_certificate(&policy()),
            )
            .await?
        }
    };
    let b = Bundle::new(&chain, &key, &cert.domains)?;

    // 5. Which CA issued it (before the flip: peers have it when they show the new
    //    version), then publish as one unit.
    if let Err(e) = ca::record_issuer(shared, &cert.name, &b.leaf.serial, &ca.directory) {
        tracing::warn!(cert = %cert.name, error = %e, "recording which CA issued the certificate");
    }
    let (version, _) = bundle::publish(shared, &cert.name, &b).await?;
    Ok((version, b.leaf.validity.not_after))
}

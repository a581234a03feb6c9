//! One ACME order, start to publish: http-01 challenges written into the tree, dns-01
//! records put in DNS and checked on every authoritative nameserver ([`super::dns`]),
//! the ack barrier (every connected peer has the token before `set_ready`), finalize
//! with a fresh (or reused) key, publish as one unit, tokens and records removed
//! whatever happens.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    Order, OrderStatus, RetryPolicy,
};

use super::bundle::{self, Bundle};
use super::ca::{self, Ca};
use super::client::within;
use super::dns01;
use super::AcmeHandles;
use crate::config::{acme::AcmeConfig, certificate::CertificateConfig};
use crate::core::paths::RelPath;
use crate::disk::tree::{self, Expect};

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
    // `client::capped_retry_after`); one beyond the timeout ends the poll.
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
/// ARI. Our renewal lease is already in the local index; the order is dropped before
/// `set_ready` if another's won.
pub async fn run(
    h: &AcmeHandles,
    cfg: &AcmeConfig,
    ca: &Ca,
    account: &Account,
    cert: &CertificateConfig,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, Failed> {
    let start = Instant::now();
    let mut placed = Placed::default();
    let result = order(h, cfg, ca, account, cert, replaces, &mut placed).await;
    // The order has settled: the tokens and TXT records go, whatever happened.
    let mut gone: Vec<(RelPath, Expect)> = placed
        .tokens
        .iter()
        .map(|t| (t.clone(), h.writer.remove(t)))
        .collect();
    gone.extend(placed.dns.finish(h, &cert.name).await);
    if !gone.is_empty() {
        if let Err(e) = h.writer.await_indexed(&gone, Duration::from_secs(5)).await {
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

/// The steps of one order; what it placed is left in `placed` for [`run`] to remove.
#[allow(clippy::too_many_arguments)]
async fn order(
    h: &AcmeHandles,
    cfg: &AcmeConfig,
    ca: &Ca,
    account: &Account,
    cert: &CertificateConfig,
    replaces: Option<CertificateIdentifier<'static>>,
    placed: &mut Placed,
) -> Result<(u32, i64), Failed> {
    let t0 = Instant::now();
    before_ordering(h, cfg, cert, &mut placed.dns).await?;
    let limit = cfg.request_timeout;
    let mut order = new_order(cfg, account, cert, replaces).await?;
    // 1. Key authorizations into the tree; dns-01 records into DNS.
    let mut written = place_challenges(h, &mut order, cert, limit, placed).await?;
    if let Some(w) = placed.dns.present(h, cfg, &cert.name).await? {
        written.push(w);
    }
    // 2. Every node has them, and our lease still stands.
    barrier(h, cfg, &written, t0).await?;
    // If another node's lease won meanwhile, it orders.
    lease_still_ours(h, cert)?;
    // 3. Tell the CA. A failure while configured peers were not connected most likely
    // came from one of them (the CA asked a node without the token): name them.
    let missing = super::not_connected(h);
    validate(&mut order, cert, limit).await.map_err(|e| {
        if missing.is_empty() || written.is_empty() {
            return e;
        }
        e.context(format!(
            "validation failed while {} {} not connected (the likely target: the CA \
             may have asked a node that did not have the challenge)",
            missing.join(", "),
            if missing.len() == 1 { "was" } else { "were" }
        ))
    })?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "order ready");
    // 4. Key, CSR, certificate.
    let b = finalize(h, &mut order, cert, limit).await?;
    // 5. Which CA issued it, then publish.
    let version = publish(h, ca, cert, &b).await?;
    Ok((version, b.leaf.validity.not_after))
}

/// Before the CA is asked: a tree the certificate cannot be published into (a
/// certbot `live/<name>` directory) must not cost an order per retry; for dns-01,
/// the key, the zones and leftovers, so a bad secret or a missing zone costs no
/// order either.
async fn before_ordering(
    h: &AcmeHandles,
    cfg: &AcmeConfig,
    cert: &CertificateConfig,
    dns: &mut dns01::Dns01,
) -> Result<(), Failed> {
    // The same checks as publishing makes: no order that cannot be published.
    let plan = super::bundle::plan_publish(h.writer.root(), &cert.name)
        .map_err(|e| anyhow!("not ordering {}: {e}", cert.name))?;
    for (path, why) in &plan.ignored {
        tracing::warn!(cert = %cert.name, path = %path, "ignoring {path}: {why}");
        h.reports
            .error(format!("acme: {}: ignoring {path}: {why}", cert.name));
    }
    remove_orphaned_tokens(h).await;
    dns.prepare(h, cfg, cert).await?;
    Ok(())
}

/// http-01 tokens a renewer left when it died mid-order (they would stay, publicly
/// served, on every node): removed by the next lease holder before it orders, and at
/// start-up by the renewer, as dns-01 records are. Not while another node holds a
/// fresh lease on any certificate: its order's tokens share the directory. This
/// node's own orders run one at a time, so none of its tokens is live here.
///
/// Runs before every order, so it costs O(tokens + leases present), not O(the
/// certificates): the token directory is looked at first (almost always empty), and
/// only the lease files that exist are read (issue 29: at 10,000 certificates,
/// reading every certificate's lease took 60 % of the renewer's CPU).
pub(super) async fn remove_orphaned_tokens(h: &AcmeHandles) {
    let tokens = left_tokens(h);
    if tokens.is_empty() {
        return;
    }
    let me = h.mesh.me();
    let now = super::unix_now();
    if let Some(l) = lease_names(h)
        .iter()
        .filter_map(|name| super::read_lease(h, name))
        .find(|l| l.holder != me && l.fresh(now))
    {
        tracing::debug!(node = %l.node, "another node holds a fresh lease; http-01 tokens left alone");
        return;
    }
    let mut gone = Vec::new();
    for token in tokens {
        let Ok(rel) = tree::rel(&format!("{CHALLENGE_DIR}/{token}")) else {
            continue;
        };
        tracing::info!(%token, by = ?h.mesh.modified_by(&rel), "removing an http-01 token left behind");
        gone.push((rel.clone(), h.writer.remove(&rel)));
    }
    if !gone.is_empty() {
        if let Err(e) = h.writer.await_indexed(&gone, Duration::from_secs(5)).await {
            tracing::debug!(error = %e, "token removal not indexed yet");
        }
    }
}

/// The names in `dir` of the tree, none when it is missing or unreadable.
fn names_in(h: &AcmeHandles, dir: &str) -> Vec<String> {
    let Ok(root) = crate::disk::safe_fs::Root::open(h.writer.root()) else {
        return Vec::new();
    };
    let Ok(d) = root.dir(dir) else {
        return Vec::new(); // no such directory: nothing in it
    };
    match crate::disk::safe_fs::list(std::os::fd::AsFd::as_fd(&d)) {
        Ok(names) => names
            .into_iter()
            .filter_map(|n| String::from_utf8(n).ok())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing {dir}");
            Vec::new()
        }
    }
}

/// The http-01 tokens in the tree (an operator's other files there are kept).
fn left_tokens(h: &AcmeHandles) -> Vec<String> {
    let mut t = names_in(h, CHALLENGE_DIR);
    t.retain(|n| valid_token(n));
    t
}

/// The configured certificates that have a lease file in the tree (a peer's lease
/// files for other names are not read).
fn lease_names(h: &AcmeHandles) -> Vec<String> {
    let mut names = names_in(h, super::LEASES_DIR);
    // One set of the configured names: a peer's many lease files cost O(files), not
    // O(files × certificates).
    let configured: std::collections::HashSet<String> = h
        .settings
        .read(|c| c.certificates.iter().map(|x| x.name.clone()).collect())
        .unwrap_or_default();
    names.retain(|n| configured.contains(n));
    names
}

/// Places the order for `cert`'s domains (with the profile and ARI's `replaces`).
async fn new_order(
    cfg: &AcmeConfig,
    account: &Account,
    cert: &CertificateConfig,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Order, Failed> {
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
    let order = within(cfg.request_timeout, "new order", account.new_order(&new)).await?;
    tracing::debug!(url = order.url(), "order created");
    Ok(order)
}

/// Writes each pending http-01 key authorization into the tree (recorded in
/// `placed.tokens`) and hands each dns-01 value to `placed.dns`. Returns what the
/// index must show.
async fn place_challenges(
    h: &AcmeHandles,
    order: &mut Order,
    cert: &CertificateConfig,
    limit: Duration,
    placed: &mut Placed,
) -> Result<Vec<(RelPath, Expect)>, Failed> {
    let mut written: Vec<(RelPath, Expect)> = Vec::new();
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
            placed.dns.want(&ident, ch.key_authorization().dns_value());
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
        let e = h.writer.write(&path, ka.as_str().as_bytes(), 0o644)?;
        placed.tokens.push(path.clone());
        written.push((path, e));
    }
    Ok(written)
}

/// The barrier: the local index has every token, then every connected peer has
/// acknowledged it. Only then may the CA's validator ask any node. With nothing to
/// place (the CA reused every authorization: no token, no record) there is nothing
/// for the validator to fetch, so no wait; the lease is checked right after.
async fn barrier(
    h: &AcmeHandles,
    cfg: &AcmeConfig,
    written: &[(RelPath, Expect)],
    t0: Instant,
) -> anyhow::Result<()> {
    if written.is_empty() {
        tracing::info!("no challenge to place (authorizations reused); no barrier");
        return Ok(());
    }
    h.writer
        .await_indexed(written, Duration::from_secs(10))
        .await?;
    let Some(last) = h.writer.newest(written.iter().map(|(p, _)| p)).cloned() else {
        return Ok(());
    };
    let t_barrier = Instant::now();
    let acks = h.barrier.wait(&last, cfg.barrier_timeout).await;
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
    let barrier_ms = format!("{:.1}", t_barrier.elapsed().as_secs_f64() * 1000.0);
    let since_order_ms = t0.elapsed().as_millis() as u64;
    let missing = super::not_connected(h);
    if missing.is_empty() {
        tracing::info!(
            tokens = written.len(),
            peers = acks.len(),
            barrier_ms,
            since_order_ms,
            "challenges in place on every node"
        );
    } else {
        tracing::warn!(
            tokens = written.len(),
            peers = acks.len(),
            barrier_ms,
            since_order_ms,
            not_connected = %missing.join(", "),
            "challenges in place on the connected nodes only; a validation that reaches a node not connected will fail"
        );
    }
    Ok(())
}

/// Our lease stands: no other node's fresh lease is in the tree (if one won, that
/// node orders, not us).
pub(super) fn lease_still_ours(h: &AcmeHandles, cert: &CertificateConfig) -> Result<(), Failed> {
    if let Some(l) = super::read_lease(h, &cert.name) {
        if l.holder != h.mesh.me() && l.fresh(super::unix_now()) {
            return Err(Failed {
                error: anyhow!("{} took the renewal lease first", l.node),
                retry_after: None,
                lost_to: Some(l.node),
            });
        }
    }
    Ok(())
}

/// Tells the CA that every pending challenge is ready and waits until the order is
/// ready; if it is not, why (each challenge's error).
async fn validate(
    order: &mut Order,
    cert: &CertificateConfig,
    limit: Duration,
) -> anyhow::Result<()> {
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
        return Err(anyhow!("order is {status:?}: {}", why.join("; ")));
    }
    Ok(())
}

/// How many more times finalize is sent when the CA keeps refusing its nonce.
const BAD_NONCE_RETRIES: u32 = 3;

/// A fresh key (or the live one, with `reuse_key`), the CSR, finalize, and the
/// certificate chain as a bundle.
async fn finalize(
    h: &AcmeHandles,
    order: &mut Order,
    cert: &CertificateConfig,
    limit: Duration,
) -> anyhow::Result<Bundle> {
    let key = match cert
        .reuse_key
        .then(|| bundle::live_key(h.writer.root(), &cert.name))
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
    // A nonce refused three times in a row (instant-acme retries twice) is still
    // no answer to the request: send it again, a few times, before giving up.
    let mut refused = 0;
    loop {
        match within(limit, "finalize", order.finalize_csr(&csr)).await {
            Err(e) if super::ca::bad_nonce(&e) && refused < BAD_NONCE_RETRIES => {
                refused += 1;
                tracing::debug!(refused, "finalize: the CA refused the nonce; sending again");
            }
            r => break r?,
        }
    }
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
    Bundle::new(&chain, &key, &cert.domains)
}

/// Records which CA issued it (before the flip: peers have it when they show the
/// new version), then publishes the bundle as one unit; the new version.
async fn publish(
    h: &AcmeHandles,
    ca: &Ca,
    cert: &CertificateConfig,
    b: &Bundle,
) -> anyhow::Result<u32> {
    if let Err(e) = ca::record_issuer(&h.writer, &cert.name, &b.leaf.serial, &ca.directory) {
        tracing::warn!(cert = %cert.name, error = %e, "recording which CA issued the certificate");
    }
    let keep = super::acme_config(&h.settings).map_or(bundle::KEEP_VERSIONS, |c| c.keep_versions);
    let (version, _) = bundle::publish(&h.writer, &cert.name, b, keep).await?;
    Ok(version)
}

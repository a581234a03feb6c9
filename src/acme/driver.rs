//! The ACME driver: one task per ACME-enabled node. It waits for the mesh to form,
//! then orders whatever is missing or due when this node is the renewer, at most
//! once a minute when idle, with backoff on failure; it also serves `issue` and
//! `renew` from the control socket. With several CAs in `acme.directory`, each order
//! attempt starts at the first and moves to the next while a CA is down or
//! rate-limits ([`ca::falls_over`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{Account, CertificateIdentifier};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::agenda::Agenda;
use super::budget::{self, Budget, Due, Kind, PAUSED_DIR};
use super::ca::{self, Ca};
use super::handle::{Acme, QueueStatus, QueuedOrder};
use super::handle::{AcmeState, IssueReply, RenewReport, RenewResult};
use super::schedule::{self, RenewalLease, Window};
use super::{
    account, acme_config, bundle, node_name, order, read_lease, renewer, rfc3339, served, snapshot,
    this_node, unix_now, AcmeHandles, Command, LEASES_DIR,
};
use crate::config::{acme::AcmeConfig, certificate::CertificateConfig};
use crate::core::paths::RelPath;
use crate::disk::tree;

/// How long a starting node waits for every configured peer to be connected and in
/// sync before it orders (after `acme.startup_grace` if none was).
const FORMED_WAIT: Duration = Duration::from_secs(10);
/// The driver's idle wakeups are at least this far apart.
const MIN_WAKE: i64 = 60;
/// ... and at most this far (to notice a certificate that fell due or a lost renewer).
const MAX_WAKE: i64 = 3600;

/// While none of the configured peers is connected, waits up to `acme.startup_grace`
/// ([`schedule::startup_may_order`]): alone, an order would likely fail against a
/// node that is down and count against the CA's limits. Then waits until the mesh
/// has formed, or [`FORMED_WAIT`]: the renewer choice (which reads the peers'
/// announcements in the tree) and the challenge barrier are only meaningful then.
async fn startup_grace(h: &AcmeHandles) {
    let start = tokio::time::Instant::now();
    let grace = acme_config(&h.settings).map_or(Duration::ZERO, |c| c.startup_grace);
    let mut progress = h.mesh.progress();
    let mut said = false;
    loop {
        let configured = h.settings.read(|c| c.peers.len()).unwrap_or(0);
        let connected = h.mesh.connected().len();
        if schedule::startup_may_order(configured, connected, start.elapsed(), grace) {
            break;
        }
        if !said {
            said = true;
            tracing::info!(
                grace = ?grace,
                "no configured peer connected yet; no order until one is or acme.startup_grace ends"
            );
        }
        let left = grace.saturating_sub(start.elapsed());
        let _ = tokio::time::timeout(left, progress.changed()).await;
    }
    if h.mesh.wait_formed(FORMED_WAIT).await {
        return;
    }
    let missing = super::not_connected(h);
    if missing.is_empty() {
        return;
    }
    if h.mesh.connected().is_empty() {
        tracing::warn!(
            not_connected = %missing.join(", "),
            grace = ?grace,
            "no configured peer connected within acme.startup_grace; an order goes ahead \
             alone (an http-01 validation that reaches one of them will fail)"
        );
    } else {
        tracing::info!(
            not_connected = %missing.join(", "),
            "not every peer is connected and in sync; going ahead with the ones that are"
        );
    }
}

struct Driver {
    h: AcmeHandles,
    handle: Arc<Acme>,
    /// The loaded account of each CA, by directory URL.
    accounts: BTreeMap<String, Account>,
    /// Per directory URL: `false` once the directory showed it has no ARI, `true`
    /// once it answered an ARI query.
    ari: BTreeMap<String, bool>,
    /// Orders placed in the last hour (`[acme] max_orders_per_hour`).
    budget: Budget,
    /// Per directory URL: when this node first saw the CA paused, without a break.
    pause_seen: BTreeMap<String, i64>,
    /// When each certificate next needs a look: a tick costs O(due), not O(all).
    agenda: Agenda,
    /// The certificates by name, as of `config` (rebuilt when the config changes).
    certs: HashMap<String, CertificateConfig>,
    acme: Option<AcmeConfig>,
    /// The config as the driver last took it in (`None`: not yet).
    config: Option<tokio::sync::watch::Receiver<Arc<crate::config::Config>>>,
    /// The local index sequence up to which tree changes were looked at.
    seen_sequence: u64,
    /// The renewer at the last tick: a new one looks at every certificate again.
    seen_renewer: Option<crate::core::device::DeviceId>,
}

pub(super) async fn run(
    h: AcmeHandles,
    handle: Arc<Acme>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    startup_grace(&h).await;
    super::dns01::sweep(&h).await;
    if renewer(&h) == Some(h.mesh.me()) {
        order::remove_orphaned_tokens(&h).await;
    }
    let h2 = h.clone();
    let mut d = Driver {
        h,
        handle,
        accounts: BTreeMap::new(),
        ari: BTreeMap::new(),
        budget: Budget::per_hour(acme_config(&h2.settings).map_or(1, |c| c.max_orders_per_hour)),
        pause_seen: BTreeMap::new(),
        agenda: Agenda::default(),
        certs: HashMap::new(),
        acme: None,
        config: None,
        seen_sequence: 0,
        seen_renewer: None,
    };
    // Peers connecting and leaving bump `progress`: when that changes who the
    // renewer is (the renewer went away, say), look again at once.
    let mut progress = d.h.mesh.progress();
    // The set of certificates changed (`certmesh cert add` on some node): look now.
    let mut config = d.h.settings.subscribe();
    let mut seen_renewer = renewer(&d.h);
    loop {
        let wake = d.tick().await;
        let sleep = Duration::from_secs(wake.saturating_sub(unix_now()).clamp(1, MAX_WAKE) as u64);
        let deadline = tokio::time::Instant::now() + sleep;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                changed = config.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                changed = progress.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = renewer(&d.h);
                    if now != seen_renewer {
                        tracing::info!(
                            renewer = %now.map(|id| node_name(&d.h, id)).unwrap_or_default(),
                            "the renewer changed"
                        );
                        seen_renewer = now;
                        break;
                    }
                }
                cmd = commands.recv() => {
                    match cmd {
                        None => return,
                        Some(Command::Issue { name, reply }) => {
                            let v = d.issue(&name).await;
                            let _ = reply.send(v);
                        }
                        Some(Command::Renew { force, dry_run, reply }) => {
                            let v = d.renew(force, dry_run).await;
                            let _ = reply.send(v);
                        }
                    }
                    break;
                }
            }
        }
    }
}

impl Driver {
    /// Orders what is due and ours, under the budget (renewals first, then new
    /// names, soonest expiry first); returns when to look again (Unix seconds): not
    /// sooner than [`MIN_WAKE`] from now, except to take over a lease that expires
    /// or when the budget frees a slot. Looks only at the certificates the agenda
    /// hands out: due, or changed since the last tick.
    async fn tick(&mut self) -> i64 {
        // Adverts expire unless refreshed ([`super::advert::TTL`]).
        super::advertise(&self.h);
        let Some(cfg) = self.refresh() else {
            return unix_now() + MAX_WAKE;
        };
        let mut wake = unix_now() + MAX_WAKE;
        let mut due = Vec::new();
        let looked = self.agenda.take(unix_now());
        tracing::debug!(
            looked = looked.len(),
            waiting = self.agenda.len(),
            "renewal tick"
        );
        for name in looked {
            let Some(cert) = self.certs.get(&name).cloned() else {
                continue;
            };
            let now = unix_now();
            let (at, look) = self.look_at(&cert).await;
            if at > now {
                self.agenda.set(&name, look);
                continue;
            }
            due.push(
                match served::served_leaf(self.h.writer.root(), &cert.name) {
                    Some(l) => Due {
                        name: cert.name.clone(),
                        kind: Kind::Renewal,
                        key: l.validity.not_after,
                    },
                    None => Due {
                        name: cert.name.clone(),
                        kind: Kind::New,
                        key: at,
                    },
                },
            );
        }
        let mut queue: std::collections::VecDeque<Due> = budget::queue(due).into();
        let paused = self.all_paused(&cfg, unix_now());
        match paused {
            Some(until) => wake = wake.min(until.saturating_add(1)),
            None => {
                while !queue.is_empty() {
                    let now = unix_now();
                    if self.budget.left(now) == 0 {
                        wake = wake.min(self.budget.next_slot(now).max(now + 1));
                        break;
                    }
                    let Some(d) = queue.pop_front() else { break };
                    let Some(cert) = self.certs.get(&d.name).cloned() else {
                        continue;
                    };
                    let again = self.order_due(&cert).await;
                    self.agenda.set(&d.name, again);
                    wake = wake.min(again);
                }
            }
        }
        // Still due: looked at again at the next tick.
        let now = unix_now();
        for d in &queue {
            self.agenda.set(&d.name, now);
        }
        self.publish_queue(&cfg, &queue);
        if let Some(next) = self.agenda.next_at() {
            wake = wake.min(next.max(now.saturating_add(MIN_WAKE)));
        }
        wake
    }

    /// The `[acme]` config, after bringing the agenda up to date with what changed
    /// since the last tick: the certificates (a new config: O(all), then only),
    /// the renewer, the tree under `live/` and `archive/` (O(changes)).
    fn refresh(&mut self) -> Option<AcmeConfig> {
        let rx = self
            .config
            .get_or_insert_with(|| self.h.settings.subscribe());
        // A fresh receiver has seen nothing yet: the first tick takes it all in.
        let fresh = self.certs.is_empty() && self.acme.is_none();
        if fresh || rx.has_changed().unwrap_or(false) {
            let config = rx.borrow_and_update().clone();
            if self.acme.as_ref() != config.acme.as_ref() {
                self.agenda.mark_all();
            }
            let certs: HashMap<String, CertificateConfig> = config
                .certificates
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect();
            for (name, c) in &certs {
                if self.certs.get(name).is_some_and(|old| old != c) {
                    self.agenda.mark(name);
                }
            }
            self.agenda.sync(certs.keys().map(String::as_str));
            self.certs = certs;
            self.acme = config.acme.clone();
        }
        let (changed, sequence) = self.h.mesh.certificates_changed_since(self.seen_sequence);
        self.seen_sequence = sequence;
        for name in changed.iter().filter(|n| self.certs.contains_key(*n)) {
            self.agenda.mark(name);
        }
        let who = renewer(&self.h);
        if who != self.seen_renewer {
            self.seen_renewer = who;
            self.agenda.mark_all();
        }
        self.acme.clone()
    }

    /// When `cert` is due (its renewal time or its backoff, whichever is later),
    /// and when to look at it again if it is not due yet: then, or sooner when
    /// its ARI window should be asked for again.
    async fn look_at(&mut self, cert: &CertificateConfig) -> (i64, i64) {
        let due_at = self.due(cert).await;
        let rt = self.handle.runtime(&cert.name).unwrap_or_default();
        let at = due_at.max(rt.retry_at.unwrap_or(0));
        let ari = rt.ari_next_query;
        let look = if ari > unix_now() { at.min(ari) } else { at };
        (at, look)
    }

    /// One automatic attempt for a due certificate; when to look again.
    async fn order_due(&mut self, cert: &CertificateConfig) -> i64 {
        let now = unix_now();
        match self.attempt(cert, false).await {
            Ok(_) => now + MAX_WAKE,
            Err(Attempt::Wait(schedule::Wait::Leased { until, .. })) => {
                // The holder may be gone: look again right when its lease ends.
                until.saturating_add(1).min(now + MIN_WAKE)
            }
            Err(Attempt::Wait(_)) => now + MIN_WAKE,
            Err(Attempt::Failed(_)) => {
                let r = self.handle.runtime(&cert.name).and_then(|r| r.retry_at);
                r.unwrap_or(now + MIN_WAKE).max(now + MIN_WAKE)
            }
        }
    }

    /// What `status` shows of the queue.
    fn publish_queue(&mut self, cfg: &AcmeConfig, queue: &std::collections::VecDeque<Due>) {
        let now = unix_now();
        let first = Ca::all(cfg).into_iter().next();
        let q = QueueStatus {
            queued: queue.len(),
            next: queue
                .iter()
                .take(10)
                .map(|d| QueuedOrder {
                    name: d.name.clone(),
                    kind: d.kind,
                })
                .collect(),
            budget_left: self.budget.left(now),
            max_per_hour: cfg.max_orders_per_hour,
            eta_s: self.budget.eta(queue.len(), now),
            paused_until: first.and_then(|ca| self.pause_of(&ca, now)),
        };
        *self.handle.queue.lock().unwrap_or_else(|p| p.into_inner()) = q;
    }

    /// Until when a CA is paused after a `rateLimited` answer (the tree's
    /// `.certmesh/acme/paused/<ca-id>`, capped: [`budget::paused_until`]).
    fn pause_of(&mut self, ca: &Ca, now: i64) -> Option<i64> {
        let rel = format!("{PAUSED_DIR}/{}", ca::ca_id(&ca.directory));
        let p = tree::read(self.h.writer.root(), &rel)
            .and_then(|b| budget::Pause::parse(&b, &ca.directory));
        if !p.as_ref().is_some_and(|p| budget::pause_active(p, now)) {
            self.pause_seen.remove(&ca.directory);
            return None;
        }
        let first = *self.pause_seen.entry(ca.directory.clone()).or_insert(now);
        budget::paused_until(p.as_ref(), now, first)
    }

    /// The soonest end of the CAs' pauses when every CA is paused.
    fn all_paused(&mut self, cfg: &AcmeConfig, now: i64) -> Option<i64> {
        let mut soonest: Option<i64> = None;
        for ca in Ca::all(cfg) {
            let until = self.pause_of(&ca, now)?;
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
        }
        soonest
    }

    /// Shares a CA's `rateLimited` answer with the fleet: no node orders from it
    /// until its Retry-After (at most [`budget::MAX_PAUSE`]).
    fn write_pause(&self, ca: &Ca, retry_after: Option<Duration>) {
        let now = unix_now();
        let wait = retry_after
            .map_or(3600, schedule::secs)
            .clamp(1, budget::MAX_PAUSE);
        let pause = budget::Pause {
            since: now,
            until: now.saturating_add(wait),
            directory: ca.directory.clone(),
        };
        let rel = format!("{PAUSED_DIR}/{}", ca::ca_id(&ca.directory));
        tracing::warn!(ca = %ca.directory, until = %rfc3339(pause.until), "the CA rate-limits us: pausing orders to it fleet-wide");
        match tree::rel(&rel).and_then(|p| self.h.writer.write(&p, &pause.to_json(), 0o644)) {
            Ok(_) => {}
            Err(e) => self.h.reports.error(format!(
                "acme: writing the pause of CA {}: {e:#}",
                ca.directory
            )),
        }
    }

    /// When `cert` is due (0: now), updating `next_renewal` in its runtime.
    async fn due(&mut self, cert: &CertificateConfig) -> i64 {
        let leaf = served::served_leaf(self.h.writer.root(), &cert.name);
        let missing_domain = leaf
            .as_ref()
            .is_some_and(|l| cert.domains.iter().any(|d| !l.domains.contains(d)));
        let current = if missing_domain {
            None // the config gained a domain: order a new certificate now
        } else {
            leaf.as_ref().map(|l| l.validity)
        };
        if let Some(l) = &leaf {
            self.refresh_ari(cert, l).await;
            // Another node published a new certificate since our last failure: our
            // backoff, count and error no longer stand.
            self.handle.update(&cert.name, |r| {
                if r.state == AcmeState::Backoff && r.failed_serial.as_ref() != Some(&l.serial) {
                    r.state = AcmeState::Idle;
                    r.failures = 0;
                    r.retry_at = None;
                    r.last_error = None;
                    r.failed_serial = None;
                }
            });
        }
        self.handle.update(&cert.name, |_| {});
        let rt = self.handle.runtime(&cert.name).unwrap_or_default();
        let window = match (rt.ari_start, rt.ari_end) {
            (Some(start), Some(end)) => Some(Window { start, end }),
            _ => None,
        };
        let due = schedule::due_at(current, window, rt.jitter);
        self.handle.update(&cert.name, |r| {
            // "Due now" is 0: shown as now, never as 1970.
            r.next_renewal = Some(due.max(r.retry_at.unwrap_or(0)).max(unix_now()))
        });
        due
    }

    /// Asks the CA for its ARI window (RFC 9773) when this node is the renewer and
    /// the CA offers ARI; at most every 6 hours per certificate.
    async fn refresh_ari(&mut self, cert: &CertificateConfig, leaf: &bundle::Leaf) {
        if renewer(&self.h) != Some(self.h.mesh.me()) {
            return;
        }
        let Some(cfg) = acme_config(&self.h.settings) else {
            return;
        };
        // ARI is asked of the CA that issued the live certificate.
        let Some(ca) = self.live_ca(&cfg, &cert.name) else {
            return;
        };
        if self.ari.get(&ca.directory) == Some(&false) {
            return;
        }
        let rt = self.handle.runtime(&cert.name).unwrap_or_default();
        let now = unix_now();
        if rt.ari_serial == leaf.serial && rt.ari_next_query > now {
            return;
        }
        let Some(id) = self.cert_id(&cert.name) else {
            return;
        };
        let Ok(account) = self.account(&cfg, &ca).await else {
            return;
        };
        let limit = cfg.request_timeout;
        let answer = match tokio::time::timeout(limit, account.renewal_info(&id)).await {
            Ok(a) => a,
            Err(_) => Err(instant_acme::Error::Str("no answer from the CA in time")),
        };
        match answer {
            Ok((info, retry)) => {
                self.ari.insert(ca.directory.clone(), true);
                let serial = leaf.serial.clone();
                let next = now.saturating_add(schedule::secs(schedule::ari_retry(retry)));
                let window = schedule::clamp_window(
                    Window {
                        start: info.suggested_window.start.unix_timestamp(),
                        end: info.suggested_window.end.unix_timestamp(),
                    },
                    leaf.validity,
                );
                if window.is_none() {
                    tracing::warn!(cert = %cert.name, "the CA's ARI window is inverted; ignoring it");
                }
                self.handle.update(&cert.name, |r| {
                    r.ari_start = window.map(|w| w.start);
                    r.ari_end = window.map(|w| w.end);
                    r.ari_serial = serial;
                    r.ari_next_query = next;
                });
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                tracing::info!(
                    ca = %ca.directory,
                    "the CA does not offer ARI; renewing with a third of the lifetime left"
                );
                self.ari.insert(ca.directory.clone(), false);
            }
            Err(e) => {
                tracing::debug!(cert = %cert.name, error = %e, "ARI query failed");
                self.handle
                    .update(&cert.name, |r| r.ari_next_query = now + 3600);
            }
        }
    }

    fn cert_id(&self, name: &str) -> Option<CertificateIdentifier<'static>> {
        let pem = tree::read(self.h.writer.root(), &format!("live/{name}/cert.pem"))?;
        let der = bundle::chain_der(&pem).ok()?.into_iter().next()?;
        let der = rustls::pki_types::CertificateDer::from(der);
        CertificateIdentifier::try_from(&der)
            .ok()
            .map(|c| c.into_owned())
    }

    /// The CA that issued `name`'s live certificate, if it is still configured; a
    /// live certificate without a record (issued before records were kept) counts
    /// as the first CA's.
    fn live_ca(&self, cfg: &AcmeConfig, name: &str) -> Option<Ca> {
        let root = self.h.writer.root();
        let leaf = served::served_leaf(root, name)?;
        let cas = Ca::all(cfg);
        match ca::issuer(root, name, &leaf.serial) {
            Some(dir) => cas.into_iter().find(|c| c.directory == dir),
            None => cas.into_iter().next(),
        }
    }

    async fn account(&mut self, cfg: &AcmeConfig, ca: &Ca) -> anyhow::Result<Account> {
        if let Some(a) = self.accounts.get(&ca.directory) {
            // Nobody removed the shared file meanwhile.
            let root = self.h.writer.root();
            if tree::read(root, &ca.account_file()).is_some()
                || tree::read(root, &ca.moved_account_file()).is_some()
            {
                return Ok(a.clone());
            }
        }
        let (a, _) = account::load_or_create(&self.h.writer, cfg, ca).await?;
        self.accounts.insert(ca.directory.clone(), a.clone());
        Ok(a)
    }

    async fn issue(&mut self, name: &str) -> Result<IssueReply, String> {
        let Some((_, certs)) = snapshot(&self.h.settings) else {
            return Err("[acme] is not configured on this node".into());
        };
        let Some(cert) = certs.into_iter().find(|c| c.name == name) else {
            return Err(format!(
                "no certificate named {name:?} (neither a [[certificate]] block nor a tree entry)"
            ));
        };
        match self.attempt(&cert, true).await {
            Ok(i) => Ok(IssueReply {
                name: name.to_string(),
                ca: i.ca,
                version: i.version,
                not_after: rfc3339(i.not_after),
                took_ms: i.took.as_millis() as u64,
            }),
            Err(e) => Err(format!("{name}: {e}")),
        }
    }

    async fn renew(&mut self, force: bool, dry_run: bool) -> Result<RenewReport, String> {
        let Some((_, certs)) = snapshot(&self.h.settings) else {
            return Err("[acme] is not configured on this node".into());
        };
        let mut results = Vec::new();
        let mut failed = 0;
        for cert in &certs {
            let now = unix_now();
            let due = self.due(cert).await;
            let is_due = force || due <= now;
            let me = self.h.mesh.me();
            let who = renewer(&self.h).unwrap_or(me);
            let lease = read_lease(&self.h, &cert.name);
            let allowed = schedule::may_order(me, who, lease.as_ref(), now, force);
            let mut r = RenewResult {
                name: cert.name.clone(),
                due: is_due,
                next_renewal: rfc3339(due),
                renewer: node_name(&self.h, who),
                ..RenewResult::default()
            };
            if dry_run {
                r.would_order = Some(is_due && allowed.is_ok());
                r.waiting_for = allowed.err().map(|w| w.to_string());
            } else if is_due {
                r.ordered = Some(false);
                match self.attempt(cert, force).await {
                    Ok(i) => {
                        r.ordered = Some(true);
                        r.version = Some(i.version);
                        r.not_after = Some(rfc3339(i.not_after));
                        r.took_ms = Some(i.took.as_millis() as u64);
                    }
                    Err(Attempt::Wait(w)) => r.waiting_for = Some(w.to_string()),
                    Err(Attempt::Failed(e)) => {
                        failed += 1;
                        r.error = Some(e.to_string());
                    }
                }
            }
            results.push(r);
        }
        Ok(RenewReport {
            dry_run,
            failed,
            results,
        })
    }

    /// One attempt: lease, order, publish, bookkeeping. `forced`: asked by an operator
    /// (ignores the schedule and the renewer choice, not another node's lease).
    async fn attempt(
        &mut self,
        cert: &CertificateConfig,
        forced: bool,
    ) -> Result<order::Issued, Attempt> {
        let h = self.h.clone();
        let me = h.mesh.me();
        let now = unix_now();
        let who = renewer(&h).unwrap_or(me);
        let lease = read_lease(&h, &cert.name);
        if let Err(w) = schedule::may_order(me, who, lease.as_ref(), now, forced) {
            let why = w.to_string();
            self.handle.update(&cert.name, |r| {
                r.state = AcmeState::Waiting;
                r.waiting_for = Some(why);
            });
            return Err(Attempt::Wait(w));
        }
        self.handle.update(&cert.name, |r| {
            r.state = AcmeState::Ordering;
            r.waiting_for = None;
            r.last_attempt = Some(now);
        });
        // Every order counts against the budget, an operator's too.
        self.budget.spend(now);
        tracing::info!(cert = %cert.name, domains = ?cert.domains, forced, "ordering");
        let span = tracing::info_span!("order", cert = %cert.name);
        let result = self.lease_and_order(cert).instrument(span).await;
        let lease_path = tree::rel(&format!("{LEASES_DIR}/{}", cert.name));
        if let Ok(p) = lease_path {
            if read_lease(&h, &cert.name).is_some_and(|l| l.holder == me) {
                h.writer.remove(&p);
            }
        }
        match result {
            Ok(i) => {
                tracing::info!(
                    cert = %cert.name,
                    version = i.version,
                    ca = %i.ca,
                    ms = i.took.as_millis() as u64,
                    "certificate issued and published"
                );
                crate::telemetry::order_finished(&cert.name, true);
                self.handle.update(&cert.name, |r| {
                    r.state = AcmeState::Idle;
                    r.failures = 0;
                    r.retry_at = None;
                    r.last_error = None;
                    r.last_success = Some(unix_now());
                    r.last_took_ms = Some(i.took.as_millis() as u64);
                    r.jitter = rand::random();
                });
                Ok(i)
            }
            Err(f) if f.lost_to.is_some() => {
                let w = schedule::Wait::Leased {
                    node: f.lost_to.unwrap_or_default(),
                    until: read_lease(&self.h, &cert.name).map_or(unix_now(), |l| l.expires),
                };
                tracing::info!(cert = %cert.name, "{w}; not ordering");
                let why = w.to_string();
                self.handle.update(&cert.name, |r| {
                    r.state = AcmeState::Waiting;
                    r.waiting_for = Some(why);
                });
                Err(Attempt::Wait(w))
            }
            Err(f) => {
                let msg = format!("{:#}", f.error);
                let live = served::served_leaf(self.h.writer.root(), &cert.name).map(|l| l.serial);
                h.reports.error(format!("acme: {}: {msg}", cert.name));
                crate::telemetry::order_finished(&cert.name, false);
                self.handle
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.handle.update(&cert.name, |r| {
                    r.failures += 1;
                    let wait = schedule::backoff(r.failures, rand::random(), f.retry_after);
                    r.state = AcmeState::Backoff;
                    r.retry_at = Some(unix_now().saturating_add(schedule::secs(wait)));
                    r.next_renewal = r.retry_at;
                    r.last_error = Some(msg.clone());
                    r.failed_serial = live;
                });
                // A broken account file or directory change: reload next time.
                self.accounts.clear();
                Err(Attempt::Failed(msg))
            }
        }
    }

    async fn lease_and_order(
        &mut self,
        cert: &CertificateConfig,
    ) -> Result<order::Issued, order::Failed> {
        let h = self.h.clone();
        self.write_lease(cert).await?;
        let cfg = acme_config(&h.settings).ok_or_else(|| anyhow::anyhow!("[acme] was removed"))?;
        // Another node's lease already applied here won the conflict: it orders.
        order::lease_still_ours(&h, cert)?;
        let cas = Ca::all(&cfg);
        let live_ca = self.live_ca(&cfg, &cert.name);
        // Each CA in turn while the one before is down or rate-limits.
        let mut down: Vec<(String, order::Failed)> = Vec::new();
        for (i, ca) in cas.iter().enumerate() {
            if let Some(until) = self.pause_of(ca, unix_now()) {
                let f = order::Failed {
                    error: anyhow::anyhow!(
                        "paused after the CA rate-limited the fleet, until {}",
                        rfc3339(until)
                    ),
                    retry_after: Some(Duration::from_secs(
                        until.saturating_sub(unix_now()).max(1) as u64
                    )),
                    lost_to: None,
                };
                down.push((ca.directory.clone(), f));
                continue;
            }
            if i > 0 {
                // The CAs before may have taken a while: the lease starts again.
                self.write_lease(cert).await?;
            }
            let span = tracing::info_span!("ca", ca = %ca.directory);
            let result = self
                .order_at(&cfg, cert, ca, live_ca.as_ref())
                .instrument(span)
                .await;
            if let Err(f) = &result {
                if ca::rate_limited(&f.error) {
                    self.write_pause(ca, f.retry_after);
                }
            }
            let f = match result {
                Ok(issued) => return Ok(issued),
                Err(f) if f.lost_to.is_some() || cas.len() == 1 => return Err(f),
                Err(f) => f,
            };
            if !ca::falls_over(&f.error) {
                // It would fail at the next CA too: the usual backoff.
                let after: Vec<&str> = down.iter().map(|(d, _)| d.as_str()).collect();
                let context = if after.is_empty() {
                    format!("CA {}", ca.directory)
                } else {
                    format!("CA {} (after {} failed)", ca.directory, after.join(", "))
                };
                return Err(order::Failed {
                    error: f.error.context(context),
                    ..f
                });
            }
            if let Some(next) = cas.get(i + 1) {
                let msg = format!(
                    "{}: CA {} failed, fell over to {}: {:#}",
                    cert.name, ca.directory, next.directory, f.error
                );
                h.reports.error(format!("acme: {msg}"));
            }
            down.push((ca.directory.clone(), f));
        }
        // Every CA is down or limits us. The next attempt starts at the first again,
        // no sooner than every CA's Retry-After (when each gave one).
        let retry_after = ca::retry_after_all(down.iter().map(|(_, f)| f.retry_after));
        let each: Vec<String> = down
            .iter()
            .map(|(d, f)| format!("CA {d}: {:#}", f.error))
            .collect();
        Err(order::Failed {
            error: anyhow::anyhow!("every CA failed: {}", each.join("; ")),
            retry_after,
            lost_to: None,
        })
    }

    /// Writes (or renews) this node's lease on `cert` and waits until the local
    /// index has it.
    async fn write_lease(&self, cert: &CertificateConfig) -> anyhow::Result<RelPath> {
        let h = &self.h;
        let node = this_node(&h.settings);
        let ttl = acme_config(&h.settings).map_or(Duration::from_secs(120), |c| c.lease);
        let lease = RenewalLease::new(h.mesh.me(), &node, unix_now(), ttl);
        let p = tree::rel(&format!("{LEASES_DIR}/{}", cert.name))?;
        let e = h.writer.write(&p, &lease.to_json(), 0o644)?;
        h.writer
            .await_indexed(&[(p.clone(), e)], Duration::from_secs(5))
            .await?;
        Ok(p)
    }

    /// One order at one CA, with its account (made anew if the CA forgot it).
    /// `live_ca`: the CA of the live certificate; ARI's `replaces` only goes to it.
    async fn order_at(
        &mut self,
        cfg: &AcmeConfig,
        cert: &CertificateConfig,
        ca: &Ca,
        live_ca: Option<&Ca>,
    ) -> Result<order::Issued, order::Failed> {
        let h = self.h.clone();
        let account = self.account(cfg, ca).await?;
        // A renewal names the certificate it replaces (Let's Encrypt exempts those
        // from its rate limits) whenever the CA offers ARI: `due` asked it first.
        // (instant-acme refuses `replaces` towards a directory without ARI.)
        let replaces = if live_ca == Some(ca) && self.ari.get(&ca.directory) == Some(&true) {
            self.cert_id(&cert.name)
        } else {
            None
        };
        match order::run(&h, cfg, ca, &account, cert, replaces.clone()).await {
            Err(f) if order::account_gone(&f.error) => {
                tracing::warn!(
                    ca = %ca.directory,
                    "the CA does not know the shared account any more; creating a new one"
                );
                let account = account::create(&h.writer, cfg, ca).await?;
                self.accounts.insert(ca.directory.clone(), account.clone());
                order::run(&h, cfg, ca, &account, cert, replaces).await
            }
            r => r,
        }
    }
}

/// Why an attempt did not order.
#[derive(Debug)]
enum Attempt {
    Wait(schedule::Wait),
    Failed(String),
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Wait(w) => write!(f, "not ordering: {w}"),
            Attempt::Failed(e) => f.write_str(e),
        }
    }
}

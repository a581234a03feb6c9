//! Builds what `status` shows from the node's state ([`StatusSource::status`]):
//! one short pass under the state lock for the peers and the tree, the certificates
//! from the tree (through [`CertCache`]) and the ACME driver outside it.

use std::sync::Arc;

use crate::acme::acme_handles;
use crate::acme::handle::AcmeSlot;
use crate::core::device::DeviceId;
use crate::core::paths::RelPath;
use crate::core::rollout_time::{Finished, Published, Seen};
use crate::handles::Observer;
use crate::node::Shared;
use crate::ops::cert_cache::CertCache;

use crate::ops::status::*;
use crate::telemetry::RecentError;

/// What `status` is built from: the node, through its [`Observer`], and what each
/// certificate's files say, cached until they change ([`CertCache`]). The daemon
/// makes one; its clones (the control socket, `/metrics`, systemd) share the cache.
#[derive(Clone)]
pub struct StatusSource {
    observer: Observer,
    cache: CertCache,
    acme: AcmeSlot,
}

impl StatusSource {
    pub fn new(observer: Observer, acme: AcmeSlot) -> Self {
        StatusSource {
            observer,
            cache: CertCache::default(),
            acme,
        }
    }

    /// The status as `certmesh status` shows it.
    pub fn status(&self) -> Status {
        status(&self.observer.0, &self.cache, &self.acme)
    }

    /// The node's other views (index, peers, wake-ups).
    pub fn observer(&self) -> &Observer {
        &self.observer
    }
}

/// The certificates part of the status (the leaf `live/<name>/fullchain.pem` serves,
/// and whether the bundle around it is good).
fn certificates(shared: &Arc<Shared>, cache: &CertCache, slot: &AcmeSlot) -> Vec<CertStatus> {
    use crate::acme;
    let certs = shared.config().certificates.clone();
    let _pass = cache.pass();
    cache.retain(&certs.iter().map(|c| c.name.as_str()).collect());
    if certs.is_empty() {
        return Vec::new();
    }
    let now = acme::unix_now();
    let mut served = served_by_cert(shared);
    let h = acme_handles(shared, slot.clone());
    let renewer = acme::renewer(&h).map(|id| acme::node_name(&h, id));
    let me = acme::node_name(&h, h.mesh.me());
    certs
        .into_iter()
        .map(|c| {
            let facts = cache.facts(&shared.tree.root, &c.name, &c.domains);
            let live = facts.leaf.as_ref();
            let rt = slot.get().and_then(|a| a.runtime(&c.name));
            let lease = acme::read_lease(&h, &c.name)
                .filter(|l| l.fresh(now))
                .map(|l| l.node);
            let na = live.map(|l| l.validity.not_after);
            let challenge = c.challenge_label().to_string();
            let bundle_error = facts
                .fault
                .clone()
                .map(|why| acme::with_author(&h, &c.name, why));
            // Due from now on (before any jitter) and nobody will order it.
            let in_window =
                live.is_some_and(|l| now >= acme::schedule::due_at(Some(l.validity), None, 0.0));
            let planned = rt.as_ref().and_then(|r| r.next_renewal).is_some();
            let warning = match (&renewer, in_window) {
                (None, true) => Some(
                    "inside its renewal window and no ACME node is reachable to renew it"
                        .to_string(),
                ),
                (Some(r), true) if *r == me && !planned => {
                    Some("inside its renewal window and no order is planned".to_string())
                }
                _ => None,
            };
            let served = served.remove(&c.name).unwrap_or_default();
            let version = facts.version;
            let rollout = rollout(shared, &c.name, version, &served);
            CertStatus {
                last_rollout_ms: rollout.as_ref().map(|r| r.ms),
                last_rollout_version: rollout.as_ref().map(|r| r.version),
                last_rollout_node: rollout.map(|r| r.last_node),
                domains: c.domains,
                not_after: na.map(acme::rfc3339),
                not_after_unix: na,
                days_left: na.map(|t| ((t - now) as f64 / 86400.0 * 10.0).round() / 10.0),
                version,
                ca: facts.ca.clone(),
                runway_s: live.map(|l| acme::served::runway(l.validity, now)),
                serial: live.map(|l| l.serial.clone()),
                renewer: renewer.clone(),
                lease,
                next_renewal: rt.as_ref().and_then(|r| r.next_renewal).map(acme::rfc3339),
                next_renewal_unix: rt.as_ref().and_then(|r| r.next_renewal),
                last_attempt_unix: rt.as_ref().and_then(|r| r.last_attempt),
                state: rt.as_ref().map(|r| r.state),
                last_attempt: rt.as_ref().and_then(|r| r.last_attempt).map(acme::rfc3339),
                last_error: rt.as_ref().and_then(|r| r.last_error.clone()),
                failures: rt.as_ref().map_or(0, |r| r.failures),
                waiting_for: rt.as_ref().and_then(|r| r.waiting_for.clone()),
                last_took_ms: rt.as_ref().and_then(|r| r.last_took_ms),
                dns_propagation: rt.as_ref().and_then(|r| r.dns_propagation.clone()),
                bundle_error,
                warning,
                challenge,
                served,
                source: c.source,
                name: c.name,
            }
        })
        .collect()
}

/// What still holds when `status` answers, as errors: peers not connected (with why),
/// certificates whose last order failed, damaged bundles, certificates nobody renews.
/// `--json` `errors[]`, the text list and the `certmesh_recent_errors` metric all
/// read the one list these start.
fn ongoing_errors(peers: &[PeerStatus], certs: &[CertStatus], now: i64) -> Vec<RecentError> {
    let at = |t: Option<i64>, message: String| RecentError {
        at_unix: t.unwrap_or(now),
        message,
        ongoing: true,
    };
    let mut out = Vec::new();
    for p in peers.iter().filter(|p| !p.connected) {
        if let Some(e) = &p.last_error {
            out.push(at(None, format!("peer {}: {e}", p.name)));
        }
    }
    for c in certs {
        if let Some(e) = &c.last_error {
            let n = c.failures;
            let when = c.last_attempt_unix;
            out.push(at(
                when,
                format!("certificate {} ({n} failures): {e}", c.name),
            ));
        }
        if let Some(e) = &c.bundle_error {
            out.push(at(
                None,
                format!("certificate {}: damaged bundle: {e}", c.name),
            ));
        }
        if let Some(w) = &c.warning {
            out.push(at(None, format!("certificate {}: {w}", c.name)));
        }
    }
    out
}

/// What every node's frontends serve, per certificate: this node's and
/// its peers' latest probe results, judged against this node's tree (a peer says
/// which leaf it saw, never whether it is current).
fn served_by_cert(
    shared: &Arc<Shared>,
) -> std::collections::HashMap<String, Vec<crate::ops::status::ServedStatus>> {
    use crate::core::served::ServedRecord;
    let me = shared.config().name.clone();
    let now_ms = crate::clock::now_ns() / 1_000_000;
    // (node, record, stale): a report not refreshed lately is shown, not counted.
    let records: Vec<(String, ServedRecord, bool)> = {
        let st = shared.lock();
        let board = st.engine.served();
        let mut out: Vec<_> = board
            .mine()
            .iter()
            .map(|r| (me.clone(), r.clone(), false))
            .collect();
        for o in board.others(now_ms) {
            let (id, own_name) = (o.device, o.name);
            // A configured peer by its configured name; a node further away by the
            // name it signed, marked when it would pose as a known one.
            let name = match st.peers.get(id) {
                Some(slot) => slot.config.name.clone(),
                None if own_name == me || st.peers.values().any(|s| s.config.name == own_name) => {
                    format!("{own_name} (unverified {})", &id.to_string()[..7])
                }
                None => own_name.to_string(),
            };
            out.extend(o.records.iter().map(|r| (name.clone(), r.clone(), o.stale)));
        }
        out
    };
    let mut leaves: std::collections::HashMap<String, crate::probe::Leaves> = Default::default();
    let mut by_cert: std::collections::HashMap<String, Vec<_>> = Default::default();
    for (node, r, stale) in records {
        let l = leaves
            .entry(r.cert.clone())
            .or_insert_with(|| crate::probe::Leaves::read(&shared.tree.root, &r.cert));
        let sha = r.leaf_sha256;
        by_cert
            .entry(r.cert)
            .or_default()
            .push(crate::ops::status::ServedStatus {
                node,
                frontend: r.frontend,
                current: sha.as_ref().is_some_and(|s| l.is_current(s)),
                version: sha.as_ref().and_then(|s| l.version_of(s)),
                leaf_sha256: sha.map(|s| data_encoding::HEXLOWER.encode(&s)),
                not_after_unix: r.not_after_unix,
                error: r.error,
                seen_unix: r.seen_unix,
                since_unix: r.since_unix,
                since_ms: r.since_ms,
                stale,
            });
    }
    for v in by_cert.values_mut() {
        v.sort_by(|a, b| (&a.node, &a.frontend).cmp(&(&b.node, &b.frontend)));
    }
    by_cert
}

/// Builds the status from the live state.
fn status(shared: &Arc<Shared>, cache: &CertCache, acme: &AcmeSlot) -> Status {
    let certificates = certificates(shared, cache, acme);
    let (name, listen, tree) = {
        let c = shared.config();
        (
            c.name.clone(),
            c.listen.to_string(),
            c.tree.display().to_string(),
        )
    };
    let now = crate::acme::unix_now();
    let mut st = shared.lock();
    let (ids, mut peers): (Vec<DeviceId>, Vec<PeerStatus>) = st
        .peers
        .iter()
        .map(|(id, slot)| {
            let conn = slot.session.as_ref().map(|s| &s.conn);
            let in_sync = conn.is_some() && st.engine.plan().in_sync(id, st.engine.index());
            let acked = st.engine.peer_acked(id);
            let pending_from = st.engine.plan().pending_from(id, st.engine.index());
            let unacked = st.engine.index().changed_since(acked).count();
            let last_sync = if in_sync { Some(now) } else { slot.last_sync };
            let refused = st.engine.refused().get(id).cloned().unwrap_or_default();
            let over_cap = st.engine.over_cap().get(id).cloned().unwrap_or_default();
            let p = PeerStatus {
                name: slot.config.name.clone(),
                id: id.to_string(),
                address: slot.config.address.to_string(),
                connected: conn.is_some(),
                in_sync,
                rtt_ms: conn.map(|c| c.rtt().as_secs_f64() * 1000.0),
                acked,
                pending_from,
                last_error: slot.last_error.clone(),
                out_of_sync: if in_sync { 0 } else { unacked + pending_from },
                last_sync_unix: last_sync,
                last_sync: last_sync.map(crate::acme::rfc3339),
                refused: RefusedStatus {
                    count: refused.count,
                    last_path: refused.last_path.map(|p| p.as_str().to_string()),
                    last_author: refused.last_author.map(|a| a.to_string()),
                    last_reason: refused.last_reason,
                },
                over_cap: OverCapStatus {
                    count: over_cap.count,
                    last_path: over_cap.last_path.map(|p| p.as_str().to_string()),
                },
            };
            (*id, p)
        })
        .unzip();
    // Seen in sync now: remembered, so the timestamp never goes back.
    for (id, p) in ids.iter().zip(&peers) {
        if let (true, Some(slot)) = (p.in_sync, st.peers.get_mut(id)) {
            slot.last_sync = Some(now);
        }
    }
    let recent: Vec<RecentError> = st.errors.iter().cloned().collect();
    let tree = TreeStatus {
        path: tree,
        files: st.engine.index().live_count(),
        out_of_sync: st.engine.plan().needs_len(),
        scans: shared.scans.load(std::sync::atomic::Ordering::Relaxed),
        sequence: st.engine.index().sequence(),
        too_large: st
            .engine
            .plan()
            .too_large()
            .take(TOO_LARGE_SHOWN)
            .map(|(p, size)| TooLargeFile {
                path: p.as_str().to_string(),
                size,
            })
            .collect(),
        too_large_count: st.engine.plan().too_large_len(),
        refused: st
            .engine
            .plan()
            .refused()
            .take(REFUSED_SHOWN)
            .map(|(p, r)| RefusedPath {
                path: p.as_str().to_string(),
                reason: r.reason.key().to_string(),
                peer: r.peer.map(|id| {
                    st.peers
                        .get(&id)
                        .map_or_else(|| id.to_string(), |s| s.config.name.clone())
                }),
                size: r.size,
            })
            .collect(),
        refused_count: st.engine.plan().refused_len(),
        refused_total: st.engine.plan().refused_total(),
        not_adopted: st.engine.plan().not_adopted(),
        not_sent: st
            .engine
            .not_sent()
            .recent
            .iter()
            .map(|p| p.as_str().to_string())
            .collect(),
        not_sent_count: st.engine.not_sent().count,
    };
    let role = crate::writers::role(st.engine.is_writer()).to_string();
    drop(st);
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let mut errors = ongoing_errors(&peers, &certificates, now);
    errors.extend(recent);
    Status {
        node: NodeStatus {
            name,
            id: shared.me().to_string(),
            listen,
            uptime_s: shared.started.elapsed().as_secs(),
            now_unix: now,
            role,
        },
        tree,
        peers,
        certificates,
        errors,
        counters: Counters {
            hook_failures: shared
                .hook_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            acme_failures: acme.get().map_or(0, |a| a.failures_total()),
            probe_failures: shared.probes.failures(),
            rollout_seconds: shared.probes.rollout_times(|t| t.histogram().clone()),
        },
        repairs: shared.repairs.recent(),
        cluster: None,
        acme_queue: acme.get().map(|a| a.queue()),
        cert_summary: None,
    }
}

/// The last finished rollout of `cert`, given what `served` shows
/// now: the publish is the `live/<cert>` flip of the live `version` (its index
/// record's mtime, by the publisher's clock; this node's own flips are counted in
/// the histogram), the end the latest `since` of the nodes' probes.
pub fn rollout(
    shared: &Arc<Shared>,
    cert: &str,
    version: Option<u32>,
    served: &[ServedStatus],
) -> Option<Finished> {
    let link = RelPath::parse(&format!("live/{cert}")).ok()?;
    let flip = {
        let st = shared.lock();
        st.engine
            .index()
            .get(&link)
            .filter(|e| !e.record.deleted)
            .map(|e| (e.record.mtime_ns, e.record.modified_by))
    };
    let seen: Vec<Seen> = served
        .iter()
        .filter(|s| !s.stale)
        .map(|s| Seen {
            node: &s.node,
            current: s.current,
            since_ms: if s.since_ms > 0 {
                s.since_ms
            } else {
                s.since_unix.saturating_mul(1000)
            },
        })
        .collect();
    let started = i64::try_from(shared.started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let start_ms = (crate::clock::now_ns() / 1_000_000).saturating_sub(started);
    shared.probes.rollout_times(|t| match (version, flip) {
        (Some(version), Some((mtime_ns, by))) => {
            let p = Published {
                version,
                publish_ms: mtime_ns / 1_000_000,
                mine: by == shared.me().short(),
            };
            t.observe(cert, p, &seen, start_ms)
        }
        _ => t.last(cert),
    })
}

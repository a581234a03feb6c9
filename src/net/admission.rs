//! Admission of QUIC handshakes, before any TLS work: anyone who reaches the port can
//! send Initials, and each accepted one costs a full TLS handshake (a signature) before
//! the device-ID pin refuses it. So handshakes in flight are counted; past
//! [`RETRY_ABOVE`] a client must first prove its address with a stateless Retry (a
//! spoofed source never answers, and the Retry costs us no state), and at
//! [`MAX_IN_FLIGHT`] new ones are turned away (refused if their address is proven,
//! else ignored: nothing is reflected to a spoofed address). A handshake that has
//! not completed after [`HANDSHAKE_TIMEOUT`] is dropped (peers on a backnet take
//! milliseconds). Sessions already up are not affected.
//!
//! A Retry stops spoofed sources only: a stranger with a real address echoes the
//! token, and each of its handshakes still costs a signature. So an address whose
//! handshakes failed [`FAILS_TO_SHUN`] times within [`SHUN_WINDOW`] (a device ID not
//! in the peer list, a bad certificate, a handshake that never completed) is
//! [`Strangers::shunned`] for [`SHUN_FOR`]: its Initials are dropped before any TLS
//! work. Only an address that completed the first flights of a handshake can be
//! counted, so a spoofed source cannot get a peer's address shunned; configured
//! peers' addresses are never counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Handshakes in flight from which on a new one must prove its address (Retry).
pub const RETRY_ABOVE: usize = 16;
/// Most handshakes in flight; more are turned away.
pub const MAX_IN_FLIGHT: usize = 128;
/// A handshake not done by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Failed handshakes from one address, within [`SHUN_WINDOW`], that shun it.
pub const FAILS_TO_SHUN: u32 = 3;
/// The window in which those failures count.
pub const SHUN_WINDOW: Duration = Duration::from_secs(10);
/// How long a shunned address's Initials are dropped.
pub const SHUN_FOR: Duration = Duration::from_secs(30);
/// Addresses remembered at most (a flood from many addresses starts the table
/// again: they are then only as costly as before, never more).
const MAX_REMEMBERED: usize = 4096;

/// Addresses whose handshakes failed, and those shunned for it.
#[derive(Debug, Clone, Default)]
pub struct Strangers(Arc<Mutex<HashMap<IpAddr, Failures>>>);

#[derive(Debug, Clone, Copy)]
struct Failures {
    /// When the first failure of the current window was seen.
    since: Instant,
    count: u32,
    until: Option<Instant>,
}

impl Strangers {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handshake from `ip` failed at `now`; true if that shuns the address.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut t = self.table();
        if t.len() >= MAX_REMEMBERED && !t.contains_key(&ip) {
            t.retain(|_, f| f.until.is_some_and(|u| u > now));
            if t.len() >= MAX_REMEMBERED {
                t.clear();
            }
        }
        let f = t.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
            until: None,
        });
        if now.duration_since(f.since) > SHUN_WINDOW {
            (f.since, f.count) = (now, 0);
        }
        f.count += 1;
        if f.count >= FAILS_TO_SHUN && f.until.is_none_or(|u| u <= now) {
            f.until = Some(now + SHUN_FOR);
            return true;
        }
        false
    }

    /// Whether Initials from `ip` are dropped at `now`.
    pub fn shunned(&self, ip: IpAddr, now: Instant) -> bool {
        self.table()
            .get(&ip)
            .is_some_and(|f| f.until.is_some_and(|u| u > now))
    }
}

/// What to do with a new Initial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the handshake.
    Accept,
    /// Answer with a stateless Retry: the client must echo its token.
    Retry,
    /// Send a stateless refusal (the address is proven).
    Refuse,
    /// Drop it without an answer (the address may be spoofed).
    Ignore,
}

/// The rule, for `in_flight` handshakes already running and an Initial whose source
/// address is (`validated`) or is not proven, and that may (`may_retry`) still be
/// sent a Retry.
pub fn decide(in_flight: usize, validated: bool, may_retry: bool) -> Decision {
    match (
        in_flight >= MAX_IN_FLIGHT,
        in_flight >= RETRY_ABOVE,
        validated,
    ) {
        (true, _, true) => Decision::Refuse,
        (true, _, false) => Decision::Ignore,
        (false, false, _) | (false, true, true) => Decision::Accept,
        (false, true, false) if may_retry => Decision::Retry,
        // Already retried once yet not validated (a bad or stale token).
        (false, true, false) => Decision::Ignore,
    }
}

/// The count of handshakes in flight on one endpoint.
#[derive(Debug, Clone, Default)]
pub struct Handshakes(Arc<AtomicUsize>);

/// One handshake counted as in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Handshakes {
    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Applies the rule to `incoming`: the handshake to await (counted until the
    /// returned guard drops), or `None` when it was retried, refused or ignored.
    pub fn admit(
        &self,
        incoming: quinn::Incoming,
        strangers: &Strangers,
    ) -> Option<(quinn::Incoming, InFlight)> {
        let remote = incoming.remote_address();
        if strangers.shunned(remote.ip(), Instant::now()) {
            incoming.ignore();
            return None;
        }
        let validated = incoming.remote_address_validated();
        match decide(self.in_flight(), validated, incoming.may_retry()) {
            Decision::Accept => {
                self.0.fetch_add(1, Ordering::Relaxed);
                Some((incoming, InFlight(self.0.clone())))
            }
            Decision::Retry => {
                tracing::debug!(%remote, in_flight = self.in_flight(), "handshake: Retry (address validation)");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                None
            }
            Decision::Refuse => {
                tracing::debug!(%remote, "handshake refused: too many in flight");
                incoming.refuse();
                None
            }
            Decision::Ignore => {
                incoming.ignore();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_handshakes_are_accepted_at_once() {
        assert_eq!(decide(0, false, true), Decision::Accept);
        assert_eq!(decide(RETRY_ABOVE - 1, false, true), Decision::Accept);
    }

    #[test]
    fn past_the_threshold_an_address_must_be_proven() {
        assert_eq!(decide(RETRY_ABOVE, false, true), Decision::Retry);
        assert_eq!(decide(RETRY_ABOVE, true, false), Decision::Accept);
        assert_eq!(decide(RETRY_ABOVE, false, false), Decision::Ignore);
    }

    #[test]
    fn at_the_cap_nothing_more_starts_and_nothing_is_reflected_unproven() {
        assert_eq!(decide(MAX_IN_FLIGHT, true, false), Decision::Refuse);
        assert_eq!(decide(MAX_IN_FLIGHT, false, true), Decision::Ignore);
    }

    #[test]
    fn an_address_whose_handshakes_keep_failing_is_shunned_for_a_while() {
        let s = Strangers::default();
        let (ip, other): (IpAddr, IpAddr) =
            ("127.0.0.50".parse().unwrap(), "127.0.0.51".parse().unwrap());
        let t0 = Instant::now();
        assert!(!s.failed(ip, t0) && !s.failed(ip, t0 + Duration::from_secs(1)));
        assert!(!s.shunned(ip, t0 + Duration::from_secs(1)));
        assert!(s.failed(ip, t0 + Duration::from_secs(2)), "the third shuns");
        assert!(s.shunned(ip, t0 + Duration::from_secs(3)));
        assert!(
            !s.shunned(other, t0 + Duration::from_secs(3)),
            "per address"
        );
        assert!(!s.shunned(ip, t0 + Duration::from_secs(2) + SHUN_FOR));
        // Failures spread wider than the window never add up.
        let slow = Strangers::default();
        for i in 0..10u64 {
            assert!(!slow.failed(ip, t0 + (SHUN_WINDOW + Duration::from_secs(1)) * i as u32));
        }
    }

    #[test]
    fn the_table_of_addresses_stays_bounded() {
        let s = Strangers::default();
        let t0 = Instant::now();
        for i in 0..(MAX_REMEMBERED as u32 + 10) {
            s.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(s.table().len() <= MAX_REMEMBERED);
    }

    #[test]
    fn a_guard_counts_until_dropped() {
        let h = Handshakes::default();
        let g = InFlight({
            h.0.fetch_add(1, Ordering::Relaxed);
            h.0.clone()
        });
        assert_eq!(h.in_flight(), 1);
        drop(g);
        assert_eq!(h.in_flight(), 0);
    }
}

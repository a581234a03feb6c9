//! When to order and who orders: pure functions over plain data. Times are Unix
//! seconds passed in by the caller; randomness comes in as a `jitter` in `[0, 1)`.
//!
//! Leases come from the replicated tree, so any peer can write one: they are parsed
//! into a [`RenewalLease`] with bounded fields ([`RenewalLease::parse`]) and honoured
//! for at most the configured `lease` from when this node first saw that content
//! ([`LeaseClock`]), whatever their `expires` says. Times from the tree or the CA are
//! combined with saturating arithmetic only.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::device::DeviceId;

/// First retry after a failure; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(60);
/// Longest wait between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);
/// Longest `Retry-After` (or ARI retry) honoured from a CA.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);
/// A lease file is at most this many bytes.
pub const MAX_LEASE_BYTES: usize = 1024;
/// A lease's node name (shown to people, never used as a path) is at most this long.
pub const MAX_NODE_NAME: usize = 128;
/// Latest time accepted from a lease: 9999-12-31T23:59:59Z.
pub const MAX_UNIX_TIME: i64 = 253_402_300_799;

/// Whole seconds of `d`, saturating at `i64::MAX`.
pub fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The validity of the certificate currently live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// An ARI (RFC 9773) suggested window, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

/// When the certificate should be renewed: now if there is none; inside the ARI
/// window when the CA gave one (at `jitter` of its width); otherwise when a third of
/// the lifetime is left, moved earlier by up to a fifteenth of the lifetime so a
/// fleet's certificates do not all renew in the same minute.
pub fn due_at(current: Option<Validity>, ari: Option<Window>, jitter: f64) -> i64 {
    let Some(v) = current else { return 0 };
    let jitter = jitter.clamp(0.0, 1.0);
    if let Some(w) = ari {
        if w.end > w.start {
            return w.start + ((w.end - w.start) as f64 * jitter) as i64;
        }
        if w.end == w.start {
            return w.start;
        }
    }
    let lifetime = v.not_after.saturating_sub(v.not_before).max(0);
    v.not_after
        .saturating_sub(lifetime / 3)
        .saturating_sub((lifetime as f64 / 15.0 * jitter) as i64)
}

/// Time an ARI window must leave before expiry for retries: a day, or a tenth of
/// the lifetime if that is more.
pub fn ari_reserve(v: Validity) -> i64 {
    let lifetime = v.not_after.saturating_sub(v.not_before).max(0);
    (lifetime / 10).max(86_400)
}

/// An ARI window as trusted: clamped to the certificate's lifetime (a CA cannot
/// push a renewal before issuance), and ending at least [`ari_reserve`] before
/// expiry (a window that ends at notAfter would leave one last-second attempt);
/// a window wholly past that point becomes that point. `None` if it is inverted.
pub fn clamp_window(w: Window, v: Validity) -> Option<Window> {
    let latest = v.not_after.saturating_sub(ari_reserve(v)).max(v.not_before);
    let end = w.end.clamp(v.not_before, latest);
    let start = w.start.clamp(v.not_before, end);
    (w.start <= w.end).then_some(Window { start, end })
}

/// The CA's ARI retry hint as used: ask again after 10 minutes at the soonest and
/// 6 hours at the latest (well under [`MAX_RETRY_AFTER`]), whatever the CA said.
pub fn ari_retry(retry: Duration) -> Duration {
    retry.clamp(Duration::from_secs(600), Duration::from_secs(6 * 3600))
}

/// Wait before the next attempt after `failures` consecutive failures (≥ 1):
/// exponential from [`BACKOFF_BASE`], capped at [`BACKOFF_MAX`], with +0–50 % jitter,
/// and never sooner than the CA's Retry-After.
pub fn backoff(failures: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    let d = base.mul_f64(1.0 + 0.5 * jitter.clamp(0.0, 1.0));
    match retry_after.map(|r| r.min(MAX_RETRY_AFTER)) {
        Some(r) if r > d => r,
        _ => d,
    }
}

/// The renewer lease in `.certmesh/leases/<name>`, parsed and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalLease {
    /// The holder.
    pub holder: DeviceId,
    /// Its node name (for people): at most [`MAX_NODE_NAME`] bytes, no control chars.
    pub node: String,
    /// Unix seconds after which the lease is void, in `0..=MAX_UNIX_TIME`.
    pub expires: i64,
}

/// The lease file as JSON.
#[derive(Serialize, Deserialize)]
struct RawLease {
    holder: String,
    node: String,
    expires: i64,
}

/// Why a lease file is not a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Larger than [`MAX_LEASE_BYTES`].
    #[error("{0} bytes (at most {MAX_LEASE_BYTES})")]
    TooLarge(usize),
    /// Not the lease JSON.
    #[error("not a lease: {0}")]
    Json(String),
    /// `holder` is not a device ID.
    #[error("holder {0:?} is not a device ID")]
    Holder(String),
    /// `node` is empty, too long or holds control characters.
    #[error("node name is empty, longer than {MAX_NODE_NAME} bytes or has control characters")]
    Node,
    /// `expires` outside `0..=MAX_UNIX_TIME`.
    #[error("expires {0} is out of range")]
    Expires(i64),
    /// The holder is neither this node nor a configured peer.
    #[error("holder {0} is neither this node nor a configured peer")]
    Stranger(DeviceId),
}

impl RenewalLease {
    pub fn new(me: DeviceId, node: &str, now: i64, ttl: Duration) -> Self {
        RenewalLease {
            holder: me,
            node: node.to_string(),
            expires: now.saturating_add(secs(ttl)).clamp(0, MAX_UNIX_TIME),
        }
    }

    /// Parses a lease file (untrusted: any peer can write one).
    pub fn parse(bytes: &[u8]) -> Result<Self, LeaseError> {
        if bytes.len() > MAX_LEASE_BYTES {
            return Err(LeaseError::TooLarge(bytes.len()));
        }
        let raw: RawLease =
            serde_json::from_slice(bytes).map_err(|e| LeaseError::Json(e.to_string()))?;
        let holder = raw
            .holder
            .parse()
            .map_err(|_| LeaseError::Holder(raw.holder.chars().take(64).collect()))?;
        if raw.node.is_empty()
            || raw.node.len() > MAX_NODE_NAME
            || raw.node.chars().any(char::is_control)
        {
            return Err(LeaseError::Node);
        }
        if !(0..=MAX_UNIX_TIME).contains(&raw.expires) {
            return Err(LeaseError::Expires(raw.expires));
        }
        Ok(RenewalLease {
            holder,
            node: raw.node,
            expires: raw.expires,
        })
    }

    /// Parses a lease file and accepts it only from `me` or one of `peers`.
    pub fn parse_from(bytes: &[u8], me: DeviceId, peers: &[DeviceId]) -> Result<Self, LeaseError> {
        let l = Self::parse(bytes)?;
        if l.holder != me && !peers.contains(&l.holder) {
            return Err(LeaseError::Stranger(l.holder));
        }
        Ok(l)
    }

    /// The lease file's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&RawLease {
            holder: self.holder.to_string(),
            node: self.node.clone(),
            expires: self.expires,
        })
        .expect("a struct of strings and an integer serialises")
    }

    pub fn fresh(&self, now: i64) -> bool {
        self.expires > now
    }
}

/// Lease contents remembered per certificate name (older ones are forgotten first).
const REMEMBERED_PER_NAME: usize = 16;

/// When this node first saw each lease content: a lease is honoured for at most
/// `max` (the configured `lease`) from then, whatever its `expires` says. Times are a
/// monotonic clock (`mono`, any fixed origin) so a wall-clock jump extends nothing.
/// Memory: at most [`REMEMBERED_PER_NAME`] contents per certificate name, and the
/// callers only ask about configured names.
#[derive(Debug, Default)]
pub struct LeaseClock {
    /// name -> (content hash, first seen), oldest first.
    seen: HashMap<String, Vec<([u8; 32], Duration)>>,
    /// name -> the run of leases it is in: (start, first sight of its newest content).
    /// A new content first seen within `max` of the run's previous one continues the
    /// run, so rewriting the lease every few seconds (a new content each time) buys
    /// nothing: the run as a whole is honoured for `max`.
    runs: HashMap<String, (Duration, Duration)>,
    /// (name, content hash) already reported as ignored.
    reported: HashSet<(String, [u8; 32])>,
}

impl LeaseClock {
    /// `lease` (read from `name`'s lease file, whose content hashes to `content`) as
    /// honoured at `now` (Unix seconds) / `mono`: its `expires` lowered to first seen
    /// + `max`.
    pub fn honour(
        &mut self,
        name: &str,
        content: [u8; 32],
        mut lease: RenewalLease,
        now: i64,
        mono: Duration,
        max: Duration,
    ) -> RenewalLease {
        let list = self.seen.entry(name.to_string()).or_default();
        let first = match list.iter().find(|(h, _)| *h == content) {
            Some((_, t)) => *t,
            None => {
                if list.len() >= REMEMBERED_PER_NAME {
                    list.remove(0);
                }
                list.push((content, mono));
                mono
            }
        };
        let since = match self.runs.get_mut(name) {
            Some((since, newest)) if first <= newest.saturating_add(max) => {
                *newest = (*newest).max(first);
                (*since).min(first)
            }
            _ => {
                self.runs.insert(name.to_string(), (first, first));
                first
            }
        };
        let left = max.saturating_sub(mono.saturating_sub(since));
        // Round up: a lease seen 0.4 s ago with 1 s to go still holds this second.
        let left = secs(left).saturating_add(i64::from(left.subsec_nanos() > 0));
        lease.expires = lease.expires.min(now.saturating_add(left));
        lease
    }

    /// True the first time an ignored lease content is reported (log it once).
    pub fn first_report(&mut self, name: &str, content: [u8; 32]) -> bool {
        if self.reported.len() >= 1024 {
            self.reported.clear();
        }
        self.reported.insert((name.to_string(), content))
    }
}

/// The renewer of every certificate: the lowest device ID among this node and the
/// connected peers that advertise ACME. Nodes that see each other agree on it.
pub fn renewer(me: DeviceId, connected_acme_peers: &[DeviceId]) -> DeviceId {
    connected_acme_peers
        .iter()
        .copied()
        .chain(std::iter::once(me))
        .min()
        .expect("the chain holds at least `me`")
}

/// Why this node does not order now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Another node holds a fresh lease.
    Leased { node: String, until: i64 },
    /// Another node is the renewer (and is connected).
    NotRenewer { renewer: DeviceId },
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Leased { node, until } => {
                let until = super::rfc3339(*until);
                write!(f, "{node} holds the renewal lease until {until}")
            }
            Wait::NotRenewer { renewer } => write!(f, "{renewer} is the renewer"),
        }
    }
}

/// May this node order now? A fresh lease of another node always wins (so two
/// nodes that see each other never order at once); otherwise the renewer orders,
/// and any ACME node may when asked explicitly (`forced`: `certmesh issue`).
pub fn may_order(
    me: DeviceId,
    renewer: DeviceId,
    lease: Option<&RenewalLease>,
    now: i64,
    forced: bool,
) -> Result<(), Wait> {
    if let Some(l) = lease {
        if l.fresh(now) && l.holder != me {
            return Err(Wait::Leased {
                node: l.node.clone(),
                until: l.expires,
            });
        }
    }
    if !forced && renewer != me {
        return Err(Wait::NotRenewer { renewer });
    }
    Ok(())
}

/// At start-up, may this node order yet? Not while none of its
/// `configured` peers is connected and `elapsed` is within `grace`: the CA could ask
/// a node that is down for the token. A node without peers orders at once.
pub fn startup_may_order(
    configured: usize,
    connected: usize,
    elapsed: Duration,
    grace: Duration,
) -> bool {
    configured == 0 || connected > 0 || elapsed >= grace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_start_up_no_order_while_no_configured_peer_is_connected() {
        let grace = Duration::from_secs(30);
        let s = Duration::from_secs;
        assert!(startup_may_order(0, 0, s(0), grace), "no peers: at once");
        assert!(!startup_may_order(2, 0, s(29), grace), "alone: wait");
        assert!(startup_may_order(2, 1, s(0), grace), "a peer is there");
        assert!(startup_may_order(2, 0, s(30), grace), "grace over");
    }

    const DAY: i64 = 86_400;

    fn id(b: u8) -> DeviceId {
        DeviceId([b; 32])
    }

    #[test]
    fn missing_certificate_is_due_now() {
        assert_eq!(due_at(None, None, 0.5), 0);
    }

    #[test]
    fn a_third_of_the_lifetime_left_with_earlier_jitter() {
        let v = Validity {
            not_before: 0,
            not_after: 90 * DAY,
        };
        assert_eq!(due_at(Some(v), None, 0.0), 60 * DAY);
        let j = due_at(Some(v), None, 0.999);
        assert!(j < 60 * DAY && j > 54 * DAY, "{j}");
        // Short-lived (6 days): renews with 2 days left.
        let s = Validity {
            not_before: 0,
            not_after: 6 * DAY,
        };
        assert_eq!(due_at(Some(s), None, 0.0), 4 * DAY);
    }

    #[test]
    fn ari_window_wins_over_the_lifetime_rule() {
        let v = Validity {
            not_before: 0,
            not_after: 90 * DAY,
        };
        let w = Window {
            start: 10 * DAY,
            end: 12 * DAY,
        };
        assert_eq!(due_at(Some(v), Some(w), 0.0), 10 * DAY);
        assert_eq!(due_at(Some(v), Some(w), 0.5), 11 * DAY);
        let t = due_at(Some(v), Some(w), 0.99);
        assert!(t < 12 * DAY && t > 11 * DAY);
        // A window in the past (revocation, say): due now.
        let past = Window { start: -5, end: -1 };
        assert!(due_at(Some(v), Some(past), 0.3) < 0);
        // A degenerate window is its start; an inverted one is ignored.
        let point = Window { start: 7, end: 7 };
        assert_eq!(due_at(Some(v), Some(point), 0.3), 7);
        let inverted = Window { start: 9, end: 1 };
        assert_eq!(due_at(Some(v), Some(inverted), 0.0), 60 * DAY);
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        assert_eq!(backoff(1, 0.0, None), Duration::from_secs(60));
        assert_eq!(backoff(2, 0.0, None), Duration::from_secs(120));
        assert_eq!(backoff(4, 0.0, None), Duration::from_secs(480));
        assert_eq!(backoff(1, 1.0, None), Duration::from_secs(90));
        assert_eq!(backoff(30, 0.0, None), BACKOFF_MAX);
        assert_eq!(
            backoff(1, 0.0, Some(Duration::from_secs(3600))),
            Duration::from_secs(3600)
        );
        assert_eq!(
            backoff(3, 0.0, Some(Duration::from_secs(1))),
            Duration::from_secs(240)
        );
    }

    #[test]
    fn lowest_connected_acme_node_renews() {
        assert_eq!(renewer(id(5), &[]), id(5));
        assert_eq!(renewer(id(5), &[id(7), id(3)]), id(3));
        assert_eq!(renewer(id(1), &[id(7), id(3)]), id(1));
    }

    #[test]
    fn leases_are_respected_while_fresh() {
        let me = id(1);
        let ttl = Duration::from_secs(120);
        let other = RenewalLease::new(id(2), "lb1", 100, ttl);
        let now = 150;
        assert!(matches!(
            may_order(me, me, Some(&other), now, true),
            Err(Wait::Leased { .. })
        ));
        // Expired: the renewer takes over.
        let later = 100 + ttl.as_secs() as i64;
        assert_eq!(may_order(me, me, Some(&other), later, false), Ok(()));
        // Our own lease does not stop us.
        let mine = RenewalLease::new(me, "lb0", 100, ttl);
        assert_eq!(may_order(me, me, Some(&mine), now, false), Ok(()));
        // Not the renewer: only when forced.
        assert_eq!(
            may_order(id(9), me, None, now, false),
            Err(Wait::NotRenewer { renewer: me })
        );
        assert_eq!(may_order(id(9), me, None, now, true), Ok(()));
    }

    const MIN: Duration = Duration::from_secs(60);

    fn lease_bytes(holder: DeviceId, expires: i64) -> Vec<u8> {
        RenewalLease {
            holder,
            node: "bad".into(),
            expires,
        }
        .to_json()
    }

    #[test]
    fn century_lease_is_honoured_only_lease_long() {
        let now = 1_700_000_000;
        let century = RenewalLease::parse(&lease_bytes(id(2), now + 100 * 365 * DAY)).unwrap();
        let mut clock = LeaseClock::default();
        let t0 = Duration::from_secs(1000);
        let seen = clock.honour("www", [7; 32], century.clone(), now, t0, MIN);
        assert_eq!(seen.expires, now + 60);
        assert!(may_order(id(1), id(1), Some(&seen), now, true).is_err());
        // 61 s later (monotonic), same content: void, whatever `expires` says.
        let later = clock.honour(
            "www",
            [7; 32],
            century.clone(),
            now + 61,
            t0 + MIN + Duration::from_secs(1),
            MIN,
        );
        assert!(!later.fresh(now + 61));
        assert_eq!(
            may_order(id(1), id(1), Some(&later), now + 61, false),
            Ok(())
        );
        // A wall clock set back a year extends nothing.
        let back = clock.honour("www", [7; 32], century, now - 365 * DAY, t0 + 2 * MIN, MIN);
        assert!(!back.fresh(now - 365 * DAY));
    }

    #[test]
    fn a_short_lease_keeps_its_own_expiry() {
        let now = 1_700_000_000;
        let short = RenewalLease::parse(&lease_bytes(id(2), now + 10)).unwrap();
        let mut clock = LeaseClock::default();
        let seen = clock.honour("www", [1; 32], short, now, Duration::ZERO, MIN);
        assert_eq!(seen.expires, now + 10);
    }

    #[test]
    fn a_lease_rewritten_every_second_holds_only_lease_long_in_all() {
        let mut clock = LeaseClock::default();
        let l = RenewalLease::new(id(2), "lb1", 0, MIN * 100);
        for i in 0..100u8 {
            let t = Duration::from_secs(u64::from(i));
            let now = i64::from(i);
            let seen = clock.honour("www", [i; 32], l.clone(), now, t, MIN);
            assert_eq!(seen.fresh(now), i < 60, "second {i}");
        }
        assert_eq!(clock.seen["www"].len(), REMEMBERED_PER_NAME);
    }

    #[test]
    fn a_new_lease_after_a_quiet_lease_period_is_a_new_run() {
        let mut clock = LeaseClock::default();
        let l = RenewalLease::new(id(2), "lb1", 0, MIN * 100);
        let first = clock.honour("www", [1; 32], l.clone(), 0, Duration::ZERO, MIN);
        assert_eq!(first.expires, 60);
        // The next attempt's lease, 3 minutes later: honoured in full again.
        let t = Duration::from_secs(180);
        let next = clock.honour("www", [2; 32], l, 180, t, MIN);
        assert_eq!(next.expires, 240);
    }

    #[test]
    fn lease_from_an_unknown_holder_is_ignored() {
        let bytes = lease_bytes(id(9), 2_000_000_000);
        assert_eq!(
            RenewalLease::parse_from(&bytes, id(1), &[id(2), id(3)]),
            Err(LeaseError::Stranger(id(9)))
        );
        assert!(RenewalLease::parse_from(&bytes, id(9), &[]).is_ok());
        assert!(RenewalLease::parse_from(&bytes, id(1), &[id(9)]).is_ok());
    }

    #[test]
    fn malformed_leases_are_refused() {
        let ok = String::from_utf8(lease_bytes(id(2), 5)).unwrap();
        let holder = id(2).to_string();
        let cases = [
            r#"{"holder":"nope","node":"lb1","expires":5}"#.to_string(),
            format!(r#"{{"holder":"{holder}","node":"","expires":5}}"#),
            format!(
                r#"{{"holder":"{holder}","node":"a
b","expires":5}}"#
            ),
            format!(
                r#"{{"holder":"{holder}","node":"{}","expires":5}}"#,
                "x".repeat(200)
            ),
            format!(r#"{{"holder":"{holder}","node":"lb1","expires":-1}}"#),
            format!(
                r#"{{"holder":"{holder}","node":"lb1","expires":{}}}"#,
                i64::MAX
            ),
            format!(
                r#"{{"holder":"{holder}","node":"lb1","expires":{}}}"#,
                u64::MAX
            ),
            format!("{ok}{}", " ".repeat(MAX_LEASE_BYTES)),
            "[]".into(),
        ];
        for c in cases {
            assert!(RenewalLease::parse(c.as_bytes()).is_err(), "{c}");
        }
        assert!(RenewalLease::parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let l = RenewalLease::new(id(1), "lb0", i64::MAX, Duration::from_secs(u64::MAX));
        assert_eq!(l.expires, MAX_UNIX_TIME);
        let mut clock = LeaseClock::default();
        let h = clock.honour(
            "www",
            [0; 32],
            l.clone(),
            i64::MAX,
            Duration::MAX,
            Duration::MAX,
        );
        assert_eq!(h.expires, MAX_UNIX_TIME);
        let h = clock.honour("www", [1; 32], l, i64::MIN, Duration::ZERO, Duration::MAX);
        assert!(h.expires <= MAX_UNIX_TIME);
        let v = Validity {
            not_before: i64::MIN,
            not_after: i64::MAX,
        };
        let _ = due_at(Some(v), None, 0.5);
        let _ = due_at(
            Some(Validity {
                not_before: i64::MAX,
                not_after: i64::MIN,
            }),
            None,
            1.0,
        );
        assert_eq!(secs(Duration::MAX), i64::MAX);
        assert_eq!(backoff(u32::MAX, 1.0, Some(Duration::MAX)), MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_and_ari_are_capped() {
        assert_eq!(
            backoff(1, 0.0, Some(Duration::from_secs(u64::MAX))),
            MAX_RETRY_AFTER
        );
        assert_eq!(
            ari_retry(Duration::from_secs(u64::MAX)),
            Duration::from_secs(6 * 3600)
        );
        assert_eq!(ari_retry(Duration::ZERO), Duration::from_secs(600));
        let v = Validity {
            not_before: 0,
            not_after: 90 * DAY,
        };
        let w = |start, end| Window { start, end };
        // Never later than a tenth of the lifetime (9 days) before expiry.
        assert_eq!(
            clamp_window(w(50 * DAY, i64::MAX), v),
            Some(w(50 * DAY, 81 * DAY))
        );
        assert_eq!(clamp_window(w(i64::MIN, -5), v), Some(w(0, 0)));
        assert_eq!(clamp_window(w(80 * DAY, 20 * DAY), v), None);
        let all = clamp_window(w(i64::MIN, i64::MAX), v).unwrap();
        let due = due_at(Some(v), Some(all), 0.99);
        assert!((0..=81 * DAY).contains(&due), "{due}");
    }

    #[test]
    fn an_ari_window_leaves_a_day_or_a_tenth_of_the_lifetime_for_retries() {
        let w = |start, end| Window { start, end };
        let v = Validity {
            not_before: 0,
            not_after: 90 * DAY,
        };
        // Ending exactly at notAfter: moved back to 9 days before it.
        assert_eq!(
            clamp_window(w(85 * DAY, 90 * DAY), v),
            Some(w(81 * DAY, 81 * DAY))
        );
        // A 6-day certificate: a tenth is less than a day, so a day.
        let short = Validity {
            not_before: 0,
            not_after: 6 * DAY,
        };
        assert_eq!(ari_reserve(short), DAY);
        assert_eq!(
            clamp_window(w(4 * DAY, 6 * DAY), short),
            Some(w(4 * DAY, 5 * DAY))
        );
        // A window the CA placed well before the reserve is kept as is.
        assert_eq!(
            clamp_window(w(60 * DAY, 62 * DAY), v),
            Some(w(60 * DAY, 62 * DAY))
        );
    }
}

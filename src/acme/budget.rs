//! Rate limits by design, pure: no I/O, time passed in.
//!
//! - [`Budget`]: at most `max` new orders in any sliding `window` (`[acme]
//!   max_orders_per_hour`: `max` per 3600 s). Let's Encrypt allows 300 new orders per
//!   3 hours per account; the default (50/h, 150 per 3 h) leaves half for others
//!   (`config::acme::DEFAULT_MAX_ORDERS_PER_HOUR`).
//! - [`queue`]: what is due, in the order it is ordered — renewals first, then new
//!   names, each soonest expiry (or longest waiting) first.
//! - [`Pause`]: a CA's `rateLimited` answer, shared in the tree
//!   (`.certmesh/acme/paused/<ca-id>`) so a renewer that takes over does not hammer
//!   the CA again; validated and capped so a forged pause cannot stop renewals for
//!   longer than [`MAX_PAUSE`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The tree directory of CA pauses, one file per CA ([`super::ca::ca_id`]).
pub const PAUSED_DIR: &str = ".certmesh/acme/paused";
/// A pause never holds longer than this from when it was written or first seen.
pub const MAX_PAUSE: i64 = 6 * 3600;
/// A pause file larger than this is ignored.
pub const MAX_PAUSE_BYTES: usize = 512;
/// Clock skew tolerated on a pause's `since`.
const SKEW: i64 = 300;

/// At most `max` orders in any `window` seconds.
#[derive(Debug, Clone)]
pub struct Budget {
    max: u32,
    window: i64,
    /// When each order in the last `window` was placed, oldest first.
    placed: VecDeque<i64>,
}

impl Budget {
    pub fn new(max: u32, window: i64) -> Budget {
        Budget {
            max,
            window: window.max(1),
            placed: VecDeque::new(),
        }
    }

    /// `[acme] max_orders_per_hour`.
    pub fn per_hour(max: u32) -> Budget {
        Budget::new(max, 3600)
    }

    fn expire(&mut self, now: i64) {
        while self.placed.front().is_some_and(|&t| t <= now - self.window) {
            self.placed.pop_front();
        }
    }

    /// Orders that may be placed now.
    pub fn left(&mut self, now: i64) -> u32 {
        self.expire(now);
        self.max.saturating_sub(self.placed.len() as u32)
    }

    /// Counts an order placed at `now`.
    pub fn spend(&mut self, now: i64) {
        self.expire(now);
        self.placed.push_back(now);
    }

    /// When the next order may be placed (`now` if one may).
    pub fn next_slot(&mut self, now: i64) -> i64 {
        if self.left(now) > 0 {
            return now;
        }
        let k = self.placed.len() - self.max as usize;
        self.placed
            .get(k)
            .map_or(now, |t| t.saturating_add(self.window))
    }

    /// Seconds until `queued` more orders have all been placed, each as soon as the
    /// budget allows (0: none queued, or all fit now; `None`: the budget is 0).
    pub fn eta(&mut self, queued: usize, now: i64) -> Option<i64> {
        self.expire(now);
        let max = self.max as usize;
        if max == 0 {
            return (queued == 0).then_some(0);
        }
        let mut times: Vec<i64> = self.placed.iter().copied().collect();
        let mut last = now;
        for _ in 0..queued {
            last = match times.len().checked_sub(max) {
                Some(k) => now.max(times[k].saturating_add(self.window)),
                None => now,
            };
            times.push(last);
        }
        Some(last - now)
    }
}

/// Why a certificate is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A live certificate to replace: goes first (ARI `replaces` exempts it from
    /// Let's Encrypt's new-order limits, and an outage is worse than a delay).
    Renewal,
    /// A name with no live certificate yet.
    New,
}

/// One certificate that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub name: String,
    pub kind: Kind,
    /// Renewal: the live leaf's not-after; new: when it became due.
    pub key: i64,
}

/// `due`, in the order the budget spends on them: renewals (soonest expiry first),
/// then new names (longest waiting first); ties by name.
pub fn queue(mut due: Vec<Due>) -> Vec<Due> {
    due.sort_by(|a, b| (a.kind, a.key, &a.name).cmp(&(b.kind, b.key, &b.name)));
    due
}

/// A CA's `rateLimited` pause as the tree holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pause {
    /// When the CA answered `rateLimited` (unix seconds).
    pub since: i64,
    /// Its `Retry-After` (unix seconds).
    pub until: i64,
    /// The directory URL (checked against the CA the file is named for).
    pub directory: String,
}

impl Pause {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A pause file, if it is one for `directory`, small and well-formed.
    pub fn parse(bytes: &[u8], directory: &str) -> Option<Pause> {
        if bytes.len() > MAX_PAUSE_BYTES {
            return None;
        }
        let p: Pause = serde_json::from_slice(bytes).ok()?;
        (p.directory == directory).then_some(p)
    }
}

/// Whether a pause holds by its own terms (before any cap): `since` not in the
/// future, `until` not passed.
pub fn pause_active(p: &Pause, now: i64) -> bool {
    p.since <= now + SKEW && p.since <= p.until && p.until > now
}

/// Until when the CA is paused (`None`: not paused): the file's `until`, but never
/// past `since` + [`MAX_PAUSE`] nor `first_seen` (when this node first saw the CA
/// paused, without a break) + [`MAX_PAUSE`]; a `since` in the future is refused.
pub fn paused_until(pause: Option<&Pause>, now: i64, first_seen: i64) -> Option<i64> {
    let p = pause?;
    if p.since > now + SKEW || p.until < p.since {
        return None;
    }
    let until = p
        .until
        .min(p.since.saturating_add(MAX_PAUSE))
        .min(first_seen.saturating_add(MAX_PAUSE));
    (until > now).then_some(until)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10,000 new names and 500 renewals, all due at once, against Let's Encrypt's
    /// 300 per 3 hours, on a simulated clock ticking each minute: every renewal is
    /// ordered before any new name, no 3-hour window ever holds more than 300, and the
    /// queue empties in the time the budget needs.
    #[test]
    fn renewals_go_first_and_the_budget_is_never_exceeded() {
        const WINDOW: i64 = 3 * 3600;
        let mut due: Vec<Due> = (0..10_000)
            .map(|i| Due {
                name: format!("new{i:05}"),
                kind: Kind::New,
                key: 0,
            })
            .collect();
        due.extend((0..500).map(|i| Due {
            name: format!("old{i:03}"),
            kind: Kind::Renewal,
            key: 1_000_000 - i,
        }));
        let mut q: VecDeque<Due> = queue(due).into();
        let mut budget = Budget::new(300, WINDOW);
        let start = 1_700_000_000;
        let eta = budget.eta(q.len(), start);
        let mut placed: Vec<(i64, Due)> = Vec::new();
        let mut now = start;
        while !q.is_empty() {
            while budget.left(now) > 0 {
                let Some(d) = q.pop_front() else { break };
                budget.spend(now);
                placed.push((now, d));
            }
            now += 60;
        }
        let kinds: Vec<Kind> = placed.iter().map(|(_, d)| d.kind).collect();
        assert!(kinds[..500].iter().all(|k| *k == Kind::Renewal));
        assert!(kinds[500..].iter().all(|k| *k == Kind::New));
        // Soonest expiry first among renewals.
        assert_eq!(placed[0].1.name, "old499");
        for (i, (t, _)) in placed.iter().enumerate() {
            let in_window = placed[..=i].iter().filter(|(u, _)| *u > t - WINDOW).count();
            assert!(in_window <= 300, "{in_window} orders in the 3 h before {t}");
        }
        let took = placed.last().unwrap().0 - start;
        // 10,500 / 300 = 35 windows: the last batch starts 34 windows in.
        assert_eq!(took, 34 * WINDOW);
        assert_eq!(eta, Some(34 * WINDOW));
    }

    #[test]
    fn a_forged_pause_holds_at_most_the_cap() {
        let now = 1_700_000_000;
        let far = Pause {
            since: now,
            until: now + 365 * 86_400,
            directory: "https://ca/dir".into(),
        };
        assert_eq!(paused_until(Some(&far), now, now), Some(now + MAX_PAUSE));
        // Rewritten later with a fresh `since`: still bounded by when it was first seen.
        let again = Pause {
            since: now + MAX_PAUSE - 10,
            ..far.clone()
        };
        assert_eq!(
            paused_until(Some(&again), now + MAX_PAUSE - 5, now),
            Some(now + MAX_PAUSE)
        );
        assert_eq!(paused_until(Some(&again), now + MAX_PAUSE, now), None);
        // A `since` in the future, or for another CA, does not count.
        let future = Pause {
            since: now + 86_400,
            ..far.clone()
        };
        assert_eq!(paused_until(Some(&future), now, now), None);
        assert!(Pause::parse(&far.to_json(), "https://other/dir").is_none());
        assert_eq!(Pause::parse(&far.to_json(), "https://ca/dir"), Some(far));
    }

    #[test]
    fn the_budget_frees_slots_as_the_window_slides() {
        let mut b = Budget::per_hour(2);
        b.spend(100);
        b.spend(200);
        assert_eq!(b.left(300), 0);
        assert_eq!(b.next_slot(300), 3700);
        assert_eq!(b.left(3700), 1);
        // 3700 now, 3800 (when 200 leaves the window), 7300, 7400, 10900.
        assert_eq!(b.eta(5, 3700), Some(7200));
    }
}

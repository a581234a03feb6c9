//! When to probe a certificate again after its hook ran, and when to re-run the
//! hook. Pure: time comes in as `now`, decisions go out as values.
//!
//! After a hook run that follows a change, the certificate is probed on a short
//! schedule (servers such as nginx reload asynchronously) for up to [`WINDOW`]. A
//! frontend still presenting another leaf than `live/<name>` after that (or at once,
//! when the hook itself failed: no reload is coming) gets the hook re-run, at most
//! [`MAX_RERUNS`] times with a growing delay; then the repair gives up until the
//! next change. A frontend that does not answer is named but never makes a hook
//! re-run: re-running cannot bring a server up, and must not storm it. A frontend
//! that answers but whose handshake fails (it refused the new bundle, or offers
//! nothing a client can use with it) counts like one on another leaf.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a reload may take to show in a probe.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Probe delays after a hook run (the last ones repeat until [`WINDOW`] ends).
pub const STEPS: [Duration; 6] = [
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// Most hook re-runs after one change.
pub const MAX_RERUNS: u32 = 3;

/// Delay before re-run `n` (1-based): 1 s, 2 s, 4 s.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1 << n.saturating_sub(1).min(6))
}

/// What one probe round found for a certificate across this node's frontends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every frontend presents the leaf of `live/<name>`.
    Current,
    /// A frontend presents another leaf.
    Stale,
    /// No frontend presents another leaf, but one did not answer.
    Unreachable,
    /// A frontend took the connection but the TLS handshake failed.
    Broken,
}

impl Verdict {
    /// The verdict of a round with both `self` and `other` among its frontends.
    pub fn worst(self, other: Verdict) -> Verdict {
        let rank = |v: Verdict| match v {
            Verdict::Current => 0,
            Verdict::Unreachable => 1,
            Verdict::Stale => 2,
            Verdict::Broken => 3,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// What to tell people after a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The hook is re-run (re-run `n` of [`MAX_RERUNS`]) after the backoff.
    Rerun(u32),
    /// Still stale after [`MAX_RERUNS`] re-runs: given up until the next change.
    GaveUp(u32),
}

#[derive(Debug, Clone)]
enum Phase {
    /// Probing on the schedule until `deadline`.
    Checking {
        step: usize,
        deadline: Instant,
        hook_ok: bool,
    },
    /// Re-run the hook at `next`.
    Rerun,
    /// The re-run was asked for; waiting for the hook runner.
    Waiting,
}

#[derive(Debug, Clone)]
struct Rollout {
    phase: Phase,
    next: Instant,
    reruns: u32,
    /// When the change's first hook run was reported (kept across re-runs).
    started: Instant,
}

/// Rollouts in progress, by certificate name.
#[derive(Debug, Default)]
pub struct Rollouts {
    certs: BTreeMap<String, Rollout>,
}

impl Rollouts {
    /// A hook ran for `cert` (`ok`: it exited 0). `rerun`: it was one this asked
    /// for (the count goes on); otherwise a new change starts a fresh count.
    pub fn hook_ran(&mut self, cert: &str, ok: bool, rerun: bool, now: Instant) {
        let (reruns, started) = match (rerun, self.certs.get(cert)) {
            (true, Some(r)) => (r.reruns, r.started),
            _ => (0, now),
        };
        self.certs.insert(
            cert.to_string(),
            Rollout {
                phase: Phase::Checking {
                    step: 0,
                    deadline: now + WINDOW,
                    hook_ok: ok,
                },
                next: now + STEPS[0],
                reruns,
                started,
            },
        );
    }

    /// When the change of `cert` being checked began (its first hook run).
    pub fn started(&self, cert: &str) -> Option<Instant> {
        self.certs.get(cert).map(|r| r.started)
    }

    /// Certificates to probe now.
    pub fn probes_due(&self, now: Instant) -> Vec<String> {
        self.certs
            .iter()
            .filter(|(_, r)| matches!(r.phase, Phase::Checking { .. }) && r.next <= now)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Certificates whose hook to re-run now (each then waits for its hook run).
    pub fn reruns_due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for (c, r) in &mut self.certs {
            if matches!(r.phase, Phase::Rerun) && r.next <= now {
                r.phase = Phase::Waiting;
                due.push(c.clone());
            }
        }
        due
    }

    /// When something is due next.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.certs
            .values()
            .filter(|r| !matches!(r.phase, Phase::Waiting))
            .map(|r| r.next)
            .min()
    }

    /// A probe round of `cert` found `verdict` at `now`.
    pub fn probed(&mut self, cert: &str, verdict: Verdict, now: Instant) -> Option<Outcome> {
        let r = self.certs.get_mut(cert)?;
        let Phase::Checking {
            step,
            deadline,
            hook_ok,
        } = r.phase
        else {
            return None;
        };
        let next = now + STEPS[(step + 1).min(STEPS.len() - 1)];
        let keep_checking = next < deadline && (hook_ok || verdict == Verdict::Unreachable);
        match verdict {
            Verdict::Current => {
                self.certs.remove(cert);
                None
            }
            _ if keep_checking => {
                r.phase = Phase::Checking {
                    step: step + 1,
                    deadline,
                    hook_ok,
                };
                r.next = next;
                None
            }
            Verdict::Unreachable => {
                self.certs.remove(cert);
                None
            }
            Verdict::Stale | Verdict::Broken if r.reruns < MAX_RERUNS => {
                r.reruns += 1;
                r.phase = Phase::Rerun;
                r.next = now + backoff(r.reruns);
                Some(Outcome::Rerun(r.reruns))
            }
            Verdict::Stale | Verdict::Broken => {
                let n = r.reruns;
                self.certs.remove(cert);
                Some(Outcome::GaveUp(n))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs rounds finding `verdict` until nothing more is due; returns the outcomes
    /// and how many hook re-runs were asked for.
    fn drive(
        r: &mut Rollouts,
        verdict: Verdict,
        hook_ok: bool,
        t0: Instant,
    ) -> (Vec<Outcome>, u32) {
        let mut now = t0;
        let (mut outcomes, mut reruns) = (Vec::new(), 0);
        while let Some(next) = r.next_wakeup() {
            now = now.max(next);
            for c in r.probes_due(now) {
                outcomes.extend(r.probed(&c, verdict, now));
            }
            for c in r.reruns_due(now) {
                reruns += 1;
                r.hook_ran(&c, hook_ok, true, now);
            }
        }
        (outcomes, reruns)
    }

    #[test]
    fn a_failed_hook_is_rerun_three_times_then_given_up() {
        let (mut r, t0) = (Rollouts::default(), Instant::now());
        r.hook_ran("www", false, false, t0);
        let (outcomes, reruns) = drive(&mut r, Verdict::Stale, false, t0);
        assert_eq!(reruns, MAX_RERUNS);
        assert_eq!(
            outcomes,
            vec![
                Outcome::Rerun(1),
                Outcome::Rerun(2),
                Outcome::Rerun(3),
                Outcome::GaveUp(3)
            ]
        );
    }

    #[test]
    fn a_hook_that_worked_is_given_the_whole_window_before_a_rerun() {
        let (mut r, t0) = (Rollouts::default(), Instant::now());
        r.hook_ran("www", true, false, t0);
        let mut now;
        let first = loop {
            now = r.next_wakeup().expect("still checking");
            if let Some(o) = r.probed("www", Verdict::Stale, now) {
                break o;
            }
        };
        assert_eq!(first, Outcome::Rerun(1));
        assert!(now >= t0 + WINDOW - STEPS[STEPS.len() - 1]);
    }

    #[test]
    fn a_frontend_that_is_down_never_makes_a_rerun() {
        let (mut r, t0) = (Rollouts::default(), Instant::now());
        r.hook_ran("www", true, false, t0);
        let (outcomes, reruns) = drive(&mut r, Verdict::Unreachable, true, t0);
        assert_eq!((outcomes, reruns), (Vec::new(), 0));
        assert!(r.next_wakeup().is_none());
    }

    #[test]
    fn a_new_change_starts_a_fresh_count() {
        let (mut r, t0) = (Rollouts::default(), Instant::now());
        r.hook_ran("www", false, false, t0);
        let _ = drive(&mut r, Verdict::Stale, false, t0);
        r.hook_ran("www", false, false, t0);
        let (_, reruns) = drive(&mut r, Verdict::Stale, false, t0);
        assert_eq!(reruns, MAX_RERUNS);
    }

    #[test]
    fn a_failing_handshake_is_checked_for_the_window_then_repaired_like_another_leaf() {
        let (mut r, t0) = (Rollouts::default(), Instant::now());
        r.hook_ran("www", true, false, t0);
        let mut now;
        let first = loop {
            now = r.next_wakeup().expect("still checking");
            if let Some(o) = r.probed("www", Verdict::Broken, now) {
                break o;
            }
        };
        assert_eq!(first, Outcome::Rerun(1));
        assert!(now >= t0 + WINDOW - STEPS[STEPS.len() - 1]);
        assert_eq!(Verdict::Stale.worst(Verdict::Broken), Verdict::Broken);
        assert_eq!(Verdict::Unreachable.worst(Verdict::Stale), Verdict::Stale);
    }
}

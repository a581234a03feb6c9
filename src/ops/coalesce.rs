//! Hook coalescing, pure: time is passed in. While certificates keep
//! changing, one `[[hook]]` runs at most once per its `min_interval`, and never later
//! than `config::hook::HOOK_MAX_DELAY` after the first change a run covers. The hook
//! runner (`hooks.rs`) keeps one [`Coalesce`] per hook, adds each debounced burst's
//! matching paths, and runs the hook when [`Coalesce::take`] hands them out.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

/// The paths waiting for one hook's next run.
#[derive(Debug)]
pub struct Coalesce {
    min_interval: Duration,
    max_delay: Duration,
    last_run: Option<Instant>,
    first_pending: Option<Instant>,
    pending: BTreeSet<String>,
}

impl Coalesce {
    pub fn new(min_interval: Duration, max_delay: Duration) -> Coalesce {
        Coalesce {
            min_interval,
            max_delay,
            last_run: None,
            first_pending: None,
            pending: BTreeSet::new(),
        }
    }

    /// Paths that changed at `now`.
    pub fn add(&mut self, paths: impl IntoIterator<Item = String>, now: Instant) {
        let before = self.pending.len();
        self.pending.extend(paths);
        if self.pending.len() > before && self.first_pending.is_none() {
            self.first_pending = Some(now);
        }
    }

    /// When the waiting paths are due (`None`: nothing waits): `min_interval` after
    /// the last run, but never later than `max_delay` after the first waiting change.
    pub fn due_at(&self) -> Option<Instant> {
        let first = self.first_pending?;
        let spaced = self
            .last_run
            .map_or(first, |l| (l + self.min_interval).max(first));
        Some(spaced.min(first + self.max_delay))
    }

    /// The waiting paths, sorted, if they are due at `now` (the run counts from `now`).
    pub fn take(&mut self, now: Instant) -> Option<Vec<String>> {
        if self.due_at()? > now {
            return None;
        }
        self.last_run = Some(now);
        self.first_pending = None;
        Some(std::mem::take(&mut self.pending).into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change every 100 ms for a minute, `min_interval` 5 s: about 12 runs, each at
    /// least 5 s apart, each change covered by a run within 30 s.
    #[test]
    fn a_minute_of_changes_runs_the_hook_about_twelve_times() {
        let t0 = Instant::now();
        let mut c = Coalesce::new(Duration::from_secs(5), Duration::from_secs(30));
        let mut runs: Vec<Instant> = Vec::new();
        let mut covered = 0;
        for i in 0..700u64 {
            let now = t0 + Duration::from_millis(100 * i);
            if i < 600 {
                c.add([format!("live/c{i}/cert.pem")], now);
            }
            if let Some(p) = c.take(now) {
                covered += p.len();
                runs.push(now);
            }
        }
        assert_eq!(covered, 600);
        assert!((12..=13).contains(&runs.len()), "{} runs", runs.len());
        assert!(runs
            .windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_secs(5)));
    }

    #[test]
    fn a_long_interval_still_runs_within_the_deadline() {
        let t0 = Instant::now();
        let mut c = Coalesce::new(Duration::from_secs(30), Duration::from_secs(10));
        c.add(["a".to_string()], t0);
        assert!(c.take(t0).is_some());
        c.add(["b".to_string()], t0 + Duration::from_secs(1));
        assert_eq!(c.due_at(), Some(t0 + Duration::from_secs(11)));
        assert!(c.take(t0 + Duration::from_secs(10)).is_none());
        assert_eq!(
            c.take(t0 + Duration::from_secs(11)),
            Some(vec!["b".to_string()])
        );
        assert_eq!(c.due_at(), None);
    }
}

//! The rollout time: from the publish of a version of a
//! certificate (the `live/<name>` flip, by the publisher's clock: the mtime its
//! index record carries) until every node that reports serving probes serves that
//! version's leaf on every frontend (each node's own clock: the moment its probe
//! first saw the leaf). Clocks of different nodes differ: the figure is as good as
//! their NTP.
//!
//! Pure: the viewer hands in what it sees, judged against its own tree. A
//! [`RolloutTimes`] remembers each certificate's last finished rollout and counts,
//! in a histogram, those this node published (so the fleet's histograms add up to
//! each rollout once).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Upper bounds of the histogram's buckets, in seconds (`+Inf` is implied).
pub const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// Most certificates remembered (the configured ones are kept; beyond this, none
/// new is taken).
pub const MAX_CERTS: usize = 100_000;

/// One node's frontend for a certificate, as the viewer judges it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub node: &'a str,
    /// It serves the leaf of `live/<name>` on the viewer.
    pub current: bool,
    /// Since when (unix milliseconds, the node's clock).
    pub since_ms: i64,
}

/// A rollout that finished: every reporting node serves `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub version: u32,
    /// The flip's mtime (unix milliseconds, the publisher's clock).
    pub publish_ms: i64,
    /// From the publish to the last node serving it (0 when clocks put it before).
    pub ms: u64,
    /// The node that served it last.
    pub last_node: String,
}

/// When every entry of `seen` serves the current leaf: how long after
/// `publish_ms` the last of them began to, and which node that was.
pub fn finished(publish_ms: i64, seen: &[Seen]) -> Option<(u64, String)> {
    if seen.iter().any(|s| !s.current) {
        return None;
    }
    let last = seen.iter().max_by_key(|s| s.since_ms)?;
    let ms = u64::try_from(last.since_ms.saturating_sub(publish_ms)).unwrap_or(0);
    Some((ms, last.node.to_string()))
}

/// Cumulative-ready counts of rollout times (the Prometheus histogram).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Rollouts per bucket of [`BUCKETS`] (not cumulative), then those beyond.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if self.counts.len() != BUCKETS.len() + 1 {
            self.counts = vec![0; BUCKETS.len() + 1];
        }
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// `(upper bound, cumulative count)` per bucket, `+Inf` last.
    pub fn cumulative(&self) -> Vec<(String, u64)> {
        let mut acc = 0;
        let mut out = Vec::with_capacity(BUCKETS.len() + 1);
        for i in 0..=BUCKETS.len() {
            acc += self.counts.get(i).copied().unwrap_or(0);
            let le = BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), f64::to_string);
            out.push((le, acc));
        }
        out
    }
}

/// Each certificate's last finished rollout, and the histogram of this node's.
#[derive(Debug, Default)]
pub struct RolloutTimes {
    last: HashMap<String, Finished>,
    histogram: Histogram,
}

/// A version as the viewer's tree has it.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub version: u32,
    /// The flip's mtime (unix milliseconds).
    pub publish_ms: i64,
    /// This node made the flip.
    pub mine: bool,
}

impl RolloutTimes {
    /// Looks at `cert`, whose live version is `p`, served as `seen`: a rollout
    /// that finished is remembered (and counted once when this node published it).
    /// Versions published before `not_before_ms` (this node's start: it did not see
    /// them begin, and its own probes restarted) are not measured. Returns the
    /// certificate's last finished rollout.
    pub fn observe(
        &mut self,
        cert: &str,
        p: Published,
        seen: &[Seen],
        not_before_ms: i64,
    ) -> Option<Finished> {
        let known = self
            .last
            .get(cert)
            .is_some_and(|f| f.version == p.version && f.publish_ms == p.publish_ms);
        let room = self.last.len() < MAX_CERTS || self.last.contains_key(cert);
        if !known && room && p.publish_ms >= not_before_ms {
            if let Some((ms, last_node)) = finished(p.publish_ms, seen) {
                if p.mine {
                    self.histogram.observe(ms as f64 / 1000.0);
                }
                let f = Finished {
                    version: p.version,
                    publish_ms: p.publish_ms,
                    ms,
                    last_node,
                };
                self.last.insert(cert.to_string(), f);
            }
        }
        self.last.get(cert).cloned()
    }

    /// The last finished rollout of `cert`.
    pub fn last(&self, cert: &str) -> Option<Finished> {
        self.last.get(cert).cloned()
    }

    /// Forgets certificates no longer configured.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.last.retain(|c, _| keep(c));
    }

    pub fn histogram(&self) -> &Histogram {
        &self.histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(node: &str, current: bool, since_ms: i64) -> Seen<'_> {
        Seen {
            node,
            current,
            since_ms,
        }
    }

    const P: Published = Published {
        version: 2,
        publish_ms: 10_000,
        mine: true,
    };

    #[test]
    fn a_rollout_finishes_when_the_last_node_serves_it() {
        let mut t = RolloutTimes::default();
        let half = [seen("a", true, 10_300), seen("b", false, 9_000)];
        assert_eq!(t.observe("www", P, &half, 0), None);
        let all = [seen("a", true, 10_300), seen("b", true, 10_800)];
        let f = t.observe("www", P, &all, 0).expect("finished");
        assert_eq!((f.ms, f.last_node.as_str()), (800, "b"));
        // Seen again (every status and scrape looks): counted once.
        t.observe("www", P, &all, 0);
        assert_eq!(t.histogram().count, 1);
        let cum = t.histogram().cumulative();
        assert_eq!(cum[3], ("0.5".to_string(), 0));
        assert_eq!(cum[4], ("1".to_string(), 1));
        assert_eq!(cum.last(), Some(&("+Inf".to_string(), 1)));
    }

    #[test]
    fn the_last_finished_rollout_stays_while_the_next_one_runs() {
        let mut t = RolloutTimes::default();
        t.observe("www", P, &[seen("a", true, 10_100)], 0);
        let next = Published {
            version: 3,
            publish_ms: 50_000,
            mine: false,
        };
        let f = t.observe("www", next, &[seen("a", false, 10_100)], 0);
        assert_eq!(f.map(|f| f.version), Some(2));
        let f = t.observe("www", next, &[seen("a", true, 52_000)], 0);
        assert_eq!(f.map(|f| (f.version, f.ms)), Some((3, 2000)));
        assert_eq!(t.histogram().count, 1, "version 3 was another node's");
    }

    #[test]
    fn a_version_published_before_start_is_not_measured() {
        let mut t = RolloutTimes::default();
        assert_eq!(
            t.observe("www", P, &[seen("a", true, 99_000)], 20_000),
            None
        );
        assert_eq!(t.histogram().count, 0);
    }

    #[test]
    fn skewed_clocks_never_make_a_negative_time() {
        assert_eq!(
            finished(10_000, &[seen("a", true, 9_500)]).map(|f| f.0),
            Some(0)
        );
        assert_eq!(finished(10_000, &[]), None);
    }
}

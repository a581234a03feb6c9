//! Version vectors: `{device → number of changes}` per path, compared to tell a newer
//! record from an older or a concurrent one.

use std::cmp::Ordering;

use smallvec::SmallVec;

use crate::core::device::ShortId;

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    Equal,
    /// Left has seen everything right has, and more.
    Newer,
    /// Right has seen everything left has, and more.
    Older,
    /// Each has changes the other has not seen.
    Concurrent,
}

/// A counter that is at `u64::MAX` cannot record another change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("version counter of device {0:?} is at its maximum")]
pub struct CounterOverflow(pub ShortId);

/// Sorted `(device, counter)` pairs, no zero counters. One pair inline: almost every
/// record has one author, and an index entry then holds no second allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector(SmallVec<[(ShortId, u64); 1]>);

impl VersionVector {
    /// Builds from unsorted pairs; duplicate devices keep their highest counter.
    pub fn from_pairs(mut pairs: Vec<(ShortId, u64)>) -> Self {
        pairs.retain(|(_, v)| *v > 0);
        pairs.sort();
        let mut out: SmallVec<[(ShortId, u64); 1]> = SmallVec::with_capacity(pairs.len());
        for (d, v) in pairs {
            match out.last_mut() {
                Some(last) if last.0 == d => last.1 = last.1.max(v),
                _ => out.push((d, v)),
            }
        }
        VersionVector(out)
    }

    pub fn pairs(&self) -> &[(ShortId, u64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The counter of one device.
    pub fn counter(&self, d: ShortId) -> u64 {
        self.0
            .binary_search_by_key(&d, |(k, _)| *k)
            .map(|i| self.0[i].1)
            .unwrap_or(0)
    }

    /// Records one more change by `d`.
    pub fn bump(&mut self, d: ShortId) -> Result<(), CounterOverflow> {
        self.bump_at(d, 0)
    }

    /// Records one more change by `d`, with a counter of at least `floor`. Passing
    /// the clock (µs) as `floor` keeps a device's counters fresh even if it lost part
    /// of its index in a crash, so one version never names two different contents.
    /// A counter that cannot grow is refused (the vector is left as it was), never
    /// saturated: a saturated counter would make the next change look like no
    /// change. The wire and the store refuse counters far ahead of the clock, so this
    /// only happens on a corrupted state.
    pub fn bump_at(&mut self, d: ShortId, floor: u64) -> Result<(), CounterOverflow> {
        match self.0.binary_search_by_key(&d, |(k, _)| *k) {
            Ok(i) => {
                let next = self.0[i].1.checked_add(1).ok_or(CounterOverflow(d))?;
                self.0[i].1 = next.max(floor);
            }
            Err(i) => self.0.insert(i, (d, floor.max(1))),
        }
        Ok(())
    }

    /// The element-wise maximum: a vector that has seen both.
    pub fn merge(&self, other: &Self) -> Self {
        let mut pairs = self.0.to_vec();
        pairs.extend_from_slice(&other.0);
        Self::from_pairs(pairs)
    }

    pub fn compare(&self, other: &Self) -> Relation {
        let (mut newer, mut older) = (false, false);
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() || j < other.0.len() {
            let a = self.0.get(i);
            let b = other.0.get(j);
            let ord = match (a, b) {
                (Some(a), Some(b)) => a.0.cmp(&b.0),
                (Some(_), None) => Ordering::Less,
                (None, _) => Ordering::Greater,
            };
            match ord {
                Ordering::Less => {
                    newer = true;
                    i += 1;
                }
                Ordering::Greater => {
                    older = true;
                    j += 1;
                }
                Ordering::Equal => {
                    let (x, y) = (a.map_or(0, |p| p.1), b.map_or(0, |p| p.1));
                    newer |= x > y;
                    older |= x < y;
                    i += 1;
                    j += 1;
                }
            }
        }
        match (newer, older) {
            (false, false) => Relation::Equal,
            (true, false) => Relation::Newer,
            (false, true) => Relation::Older,
            (true, true) => Relation::Concurrent,
        }
    }

    /// True when `self` has seen everything `other` has.
    pub fn covers(&self, other: &Self) -> bool {
        matches!(self.compare(other), Relation::Equal | Relation::Newer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(p: &[(u64, u64)]) -> VersionVector {
        VersionVector::from_pairs(p.iter().map(|(d, v)| (ShortId(*d), *v)).collect())
    }

    #[test]
    fn relations() {
        assert_eq!(vv(&[(1, 1)]).compare(&vv(&[(1, 1)])), Relation::Equal);
        assert_eq!(vv(&[(1, 2)]).compare(&vv(&[(1, 1)])), Relation::Newer);
        assert_eq!(
            vv(&[(1, 1)]).compare(&vv(&[(1, 1), (2, 1)])),
            Relation::Older
        );
        assert_eq!(
            vv(&[(1, 2)]).compare(&vv(&[(1, 1), (2, 1)])),
            Relation::Concurrent
        );
        assert_eq!(vv(&[]).compare(&vv(&[(3, 1)])), Relation::Older);
        let mut a = vv(&[(2, 1)]);
        a.bump(ShortId(1)).unwrap();
        a.bump(ShortId(2)).unwrap();
        assert_eq!(a, vv(&[(1, 1), (2, 2)]));
    }

    #[test]
    fn a_counter_at_the_maximum_is_refused_not_saturated() {
        let mut a = vv(&[(1, u64::MAX), (2, 5)]);
        assert_eq!(a.bump_at(ShortId(1), 10), Err(CounterOverflow(ShortId(1))));
        assert_eq!(a, vv(&[(1, u64::MAX), (2, 5)]));
        a.bump_at(ShortId(2), 0).unwrap();
        assert_eq!(a.counter(ShortId(2)), 6);
    }

    proptest! {
        #[test]
        fn merge_covers_both(a in prop::collection::vec((0u64..5, 0u64..4), 0..6),
                             b in prop::collection::vec((0u64..5, 0u64..4), 0..6)) {
            let (a, b) = (vv(&a), vv(&b));
            let m = a.merge(&b);
            prop_assert!(m.covers(&a) && m.covers(&b));
            prop_assert_eq!(m.clone(), b.merge(&a));
            let r = a.compare(&b);
            let back = b.compare(&a);
            let expected = match r {
                Relation::Newer => Relation::Older,
                Relation::Older => Relation::Newer,
                x => x,
            };
            prop_assert_eq!(back, expected);
        }
    }
}

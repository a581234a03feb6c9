//! The duplicate-session rule: when a second session with a peer comes up (both
//! dialled at once, or the peer restarted), both sides must keep the same one
//! without talking about it.

use crate::core::device::DeviceId;

/// One session with a peer, as the rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionFacts {
    /// The peer process's random instance number (new after each start).
    pub instance: u64,
    /// This node dialled it.
    pub dialed_by_me: bool,
    /// Not closed yet.
    pub alive: bool,
}

/// Whether `new` replaces `existing` on this node (`me`) for `peer`: a restarted
/// peer (another instance) or a dead session is replaced; between two live
/// sessions of the same instance, the one dialled by the lower device ID stays, so
/// both ends keep the same one.
pub fn replaces(me: DeviceId, peer: DeviceId, existing: SessionFacts, new: SessionFacts) -> bool {
    let preferred = |s: &SessionFacts| s.dialed_by_me == (me < peer);
    let keep = existing.alive
        && existing.instance == new.instance
        && (preferred(&existing) || !preferred(&new));
    !keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(instance: u64, dialed_by_me: bool) -> SessionFacts {
        SessionFacts {
            instance,
            dialed_by_me,
            alive: true,
        }
    }

    #[test]
    fn both_ends_keep_the_session_the_lower_device_dialled() {
        let (lo, hi) = (DeviceId([1; 32]), DeviceId([2; 32]));
        // lo dialled session A, hi dialled session B; each side sees one as existing.
        for (a_first, expect_a) in [(true, true), (false, true)] {
            let (a_lo, b_lo) = (s(7, true), s(7, false)); // as lo sees them
            let (a_hi, b_hi) = (s(7, false), s(7, true)); // as hi sees them
            let keeps_a_on = |me, peer, a, b| {
                if a_first {
                    !replaces(me, peer, a, b)
                } else {
                    replaces(me, peer, b, a)
                }
            };
            assert_eq!(
                keeps_a_on(lo, hi, a_lo, b_lo),
                expect_a,
                "lo, A first: {a_first}"
            );
            assert_eq!(
                keeps_a_on(hi, lo, a_hi, b_hi),
                expect_a,
                "hi, A first: {a_first}"
            );
        }
    }

    #[test]
    fn a_restarted_peer_or_a_dead_session_is_replaced() {
        let (me, peer) = (DeviceId([1; 32]), DeviceId([2; 32]));
        assert!(replaces(me, peer, s(7, true), s(8, false)), "new instance");
        let dead = SessionFacts {
            alive: false,
            ..s(7, true)
        };
        assert!(replaces(me, peer, dead, s(7, false)), "dead session");
        assert!(
            !replaces(me, peer, s(7, true), s(7, true)),
            "a second of the kept kind"
        );
    }
}

//! Admission of QUIC handshakes, before any TLS work: anyone who reaches the port can
//! send Initials, and each accepted one costs a full TLS handshake (a signature) before
//! the device-ID pin refuses it. So handshakes in flight are counted; past
//! [`RETRY_ABOVE`] a client must first prove its address with a stateless Retry (a
//! spoofed source never answers, and the Retry costs us no state), and at
//! [`MAX_IN_FLIGHT`] new ones are turned away (refused if their address is proven,
//! else ignored: nothing is reflected to a spoofed address). A handshake that has
//! not completed after [`HANDSHAKE_TIMEOUT`] is dropped (peers on a backnet take
//! milliseconds). Sessions already up are not affected.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Handshakes in flight from which on a new one must prove its address (Retry).
pub const RETRY_ABOVE: usize = 16;
/// Most handshakes in flight; more are turned away.
pub const MAX_IN_FLIGHT: usize = 128;
/// A handshake not done by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub fn admit(&self, incoming: quinn::Incoming) -> Option<(quinn::Incoming, InFlight)> {
        let remote = incoming.remote_address();
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

//! Recent errors, typed: what `status` shows under ERRORS and `--json` as
//! `errors[].at_unix` / `errors[].message`. A bounded ring; it imports nothing of the
//! daemon, so both the daemon's state and the control socket's types can hold it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How many recent errors are kept (and shown by `status --json`).
pub const RECENT_ERRORS: usize = 20;

/// One error the daemon reported, with when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentError {
    /// When it happened (Unix seconds).
    pub at_unix: i64,
    /// What happened, one message as logged.
    pub message: String,
}

/// The last [`RECENT_ERRORS`] errors, oldest first.
#[derive(Debug, Clone, Default)]
pub struct RecentErrors(VecDeque<RecentError>);

impl RecentErrors {
    /// Records `message` as happened at `at_unix`, dropping the oldest when full.
    pub fn push(&mut self, at_unix: i64, message: String) {
        if self.0.len() == RECENT_ERRORS {
            self.0.pop_front();
        }
        self.0.push_back(RecentError { at_unix, message });
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &RecentError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_in_order() {
        let mut r = RecentErrors::default();
        for i in 0..(RECENT_ERRORS as i64 + 5) {
            r.push(i, format!("e{i}"));
        }
        assert_eq!(r.len(), RECENT_ERRORS);
        let first = r.iter().next().unwrap();
        assert_eq!((first.at_unix, first.message.as_str()), (5, "e5"));
        let json = serde_json::to_string(first).unwrap();
        assert_eq!(json, r#"{"at_unix":5,"message":"e5"}"#);
    }
}

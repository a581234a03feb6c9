//! What the daemon reports about itself, typed: recent errors (`status` ERRORS, and
//! `--json` `errors[].at_unix` / `errors[].message`, a bounded ring) and the repair
//! queue with its recent results. It imports nothing of the daemon, so both the
//! daemon's state and the control socket's types can hold it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::paths::RelPath;

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

/// Repairs shown in `status`.
const RECENT_REPAIRS: usize = 20;

/// One repair, as `status` shows it (stable JSON keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairStatus {
    pub certificate: String,
    /// RFC 3339.
    pub at: String,
    pub at_unix: i64,
    /// The node whose change broke the certificate (peer name, or short ID).
    pub caused_by: String,
    /// The `archive/<name>/<n>` version put back.
    pub from_version: u32,
    /// What was wrong.
    pub reason: String,
}

/// The repair queue and its recent results (a handle in `Shared`).
#[derive(Default)]
pub struct Repairs {
    pub(crate) wake: Notify,
    pending: Mutex<BTreeSet<String>>,
    recent: Mutex<VecDeque<RepairStatus>>,
}

impl Repairs {
    /// The puller applied these paths from peers: queue the certificates they touch.
    pub fn touched<'a>(&self, names: &[String], paths: impl IntoIterator<Item = &'a RelPath>) {
        let mut hit = BTreeSet::new();
        for p in paths {
            let mut parts = p.as_str().splitn(3, '/');
            if let (Some("live" | "archive"), Some(n)) = (parts.next(), parts.next()) {
                if names.iter().any(|c| c == n) {
                    hit.insert(n.to_string());
                }
            }
        }
        if !hit.is_empty() {
            self.lock_pending().extend(hit);
            self.wake.notify_one();
        }
    }

    /// Recent repairs, oldest first.
    pub fn recent(&self) -> Vec<RepairStatus> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn lock_pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push(&self, r: RepairStatus) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_REPAIRS {
            recent.pop_front();
        }
        recent.push_back(r);
    }
}

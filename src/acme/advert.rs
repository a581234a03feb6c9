//! ACME adverts (`.certmesh/acme/nodes/<device id>`): an ACME-enabled node
//! says it may renew, and keeps saying so. An advert counts only if the index record
//! of the file names the device it speaks for as its last writer (signed whenever
//! `[tree] writers` is set) and its `refreshed` time is recent by this node's clock,
//! so a peer can neither speak for another node nor leave a claim behind for ever.
//!
//! Pure: parsing, formatting and the verdict take `now` and the record's author.

use serde::{Deserialize, Serialize};

use crate::core::device::{DeviceId, ShortId};

/// The owner rewrites its advert when it is older than this (the ACME driver wakes
/// at least this often).
pub const REFRESH: i64 = 1800;
/// An advert older than this (by its `refreshed` time, against this node's clock) no
/// longer counts: a few refresh periods.
pub const TTL: i64 = 4 * 3600;
/// Clock skew tolerated for an advert dated in the future.
pub const MAX_SKEW: i64 = 600;
/// Largest advert read (a node name and a time).
pub const MAX_BYTES: usize = 512;

/// The content of an advert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advert {
    /// The node's name (for people).
    pub node: String,
    /// When the owner last wrote it (Unix seconds, its clock).
    pub refreshed: i64,
}

impl Advert {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an advert always serializes")
    }
}

/// Why an advert does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The index has no record of the file (not synced yet, or gone).
    #[error("the index has no record of it")]
    Unindexed,
    /// Another node wrote it: only a node speaks for itself.
    #[error("written by another node (short id {author:016x}), not by the node it names")]
    NotItsOwn { author: u64 },
    /// Not an advert (too large, not JSON, missing fields).
    #[error("not an advert: {0}")]
    Malformed(String),
    /// Not refreshed for [`TTL`].
    #[error("stale: last refreshed {age} s ago (adverts expire after {TTL} s)")]
    Stale { age: i64 },
    /// Dated further in the future than clocks drift.
    #[error("dated {ahead} s in the future")]
    Future { ahead: i64 },
}

/// The advert of `named`, if it counts: `author` is the last writer of the file as
/// the index records it, `bytes` its content, `now` this node's clock.
pub fn check(
    named: DeviceId,
    author: Option<ShortId>,
    bytes: &[u8],
    now: i64,
) -> Result<Advert, Refused> {
    let author = author.ok_or(Refused::Unindexed)?;
    if author != named.short() {
        return Err(Refused::NotItsOwn { author: author.0 });
    }
    let a = parse(bytes)?;
    if a.refreshed > now.saturating_add(MAX_SKEW) {
        return Err(Refused::Future {
            ahead: a.refreshed.saturating_sub(now),
        });
    }
    let age = now.saturating_sub(a.refreshed);
    if age > TTL {
        return Err(Refused::Stale { age });
    }
    Ok(a)
}

/// Parses an advert's content (bounded).
pub fn parse(bytes: &[u8]) -> Result<Advert, Refused> {
    if bytes.len() > MAX_BYTES {
        return Err(Refused::Malformed(format!(
            "{} bytes, more than {MAX_BYTES}",
            bytes.len()
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| Refused::Malformed(e.to_string()))
}

/// Whether this node (`me`, called `name`) must write its advert again: it is
/// missing, not its own, not this node's name, or half-way to [`TTL`].
pub fn needs_refresh(
    me: DeviceId,
    name: &str,
    current: Option<(&[u8], Option<ShortId>)>,
    now: i64,
) -> bool {
    let Some((bytes, author)) = current else {
        return true;
    };
    match check(me, author, bytes, now) {
        Ok(a) => a.node != name || now.saturating_sub(a.refreshed) >= REFRESH,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> DeviceId {
        DeviceId([b; 32])
    }

    fn advert(at: i64) -> Vec<u8> {
        Advert {
            node: "a".into(),
            refreshed: at,
        }
        .to_json()
    }

    #[test]
    fn an_advert_counts_only_written_by_the_node_it_names() {
        let now = 1_000_000;
        assert!(check(id(1), Some(id(1).short()), &advert(now), now).is_ok());
        let e = check(id(1), Some(id(2).short()), &advert(now), now).unwrap_err();
        assert!(matches!(e, Refused::NotItsOwn { .. }), "{e}");
        assert_eq!(
            check(id(1), None, &advert(now), now),
            Err(Refused::Unindexed)
        );
    }

    #[test]
    fn an_advert_expires_unless_refreshed() {
        let now = 1_000_000;
        let me = Some(id(1).short());
        assert!(check(id(1), me, &advert(now - TTL), now).is_ok());
        let e = check(id(1), me, &advert(now - TTL - 1), now).unwrap_err();
        assert_eq!(e, Refused::Stale { age: TTL + 1 });
        // Far in the future: refused, so a claim cannot be made to last for ever.
        let e = check(id(1), me, &advert(now + 365 * 86_400), now).unwrap_err();
        assert!(matches!(e, Refused::Future { .. }), "{e}");
        assert!(check(id(1), me, &advert(now + MAX_SKEW), now).is_ok());
    }

    #[test]
    fn junk_is_not_an_advert() {
        let me = Some(id(1).short());
        for junk in [&b"node-a"[..], b"{}", b"{\"node\":\"a\"}", &[b' '; 600]] {
            let e = check(id(1), me, junk, 0).unwrap_err();
            assert!(matches!(e, Refused::Malformed(_)), "{e}");
        }
    }

    #[test]
    fn the_owner_refreshes_half_way_or_when_not_its_own() {
        let now = 1_000_000;
        let me = id(1);
        let own = Some(me.short());
        assert!(needs_refresh(me, "a", None, now));
        assert!(!needs_refresh(me, "a", Some((&advert(now - 10), own)), now));
        assert!(needs_refresh(
            me,
            "a",
            Some((&advert(now - REFRESH), own)),
            now
        ));
        assert!(needs_refresh(me, "b", Some((&advert(now), own)), now));
        let theirs = Some(id(2).short());
        assert!(needs_refresh(me, "a", Some((&advert(now), theirs)), now));
    }
}

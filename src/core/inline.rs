//! Small file contents kept in memory for a short while, keyed by BLAKE3, so a change
//! can travel inline with its index record (no extra round trip to fetch it) and be
//! relayed the same way by nodes that received it. Bounded in entries and bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::core::record::ContentHash;

const MAX_ENTRIES: usize = 1024;
const MAX_BYTES: usize = 8 << 20;

/// FIFO-bounded map of recent small contents.
#[derive(Default)]
pub struct InlineCache {
    map: HashMap<ContentHash, Arc<Vec<u8>>>,
    order: VecDeque<ContentHash>,
    bytes: usize,
}

impl InlineCache {
    /// Remembers `data` (whose BLAKE3 the caller has verified to be `hash`).
    pub fn insert(&mut self, hash: ContentHash, data: Arc<Vec<u8>>) {
        if self.map.contains_key(&hash) {
            return;
        }
        self.bytes += data.len();
        self.map.insert(hash, data);
        self.order.push_back(hash);
        while self.order.len() > MAX_ENTRIES || self.bytes > MAX_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.map.remove(&old) {
                self.bytes -= d.len();
            }
        }
    }

    pub fn get(&self, hash: &ContentHash) -> Option<Arc<Vec<u8>>> {
        self.map.get(hash).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_bounded() {
        let mut c = InlineCache::default();
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_be_bytes());
            c.insert(ContentHash(h), Arc::new(vec![0; 16 << 10]));
        }
        assert!(c.bytes <= MAX_BYTES && c.map.len() <= MAX_ENTRIES && c.map.len() == c.order.len());
    }
}

//! A queue that takes turns between keys: [`Fair::pop_front`] serves each key with
//! queued items once per round, so one key's backlog never holds up another's item.
//! The puller keys its fetch queues by the peer a fetch goes to first: a peer that
//! announces thousands of small files it never serves (each fetch waiting out its
//! timeout) cannot put a healthy peer's change at the back of its backlog.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

#[derive(Debug)]
pub struct Fair<K, T> {
    queues: HashMap<K, VecDeque<T>>,
    /// Keys with queued items, in the order of their next turn.
    turns: VecDeque<K>,
    len: usize,
}

impl<K: Hash + Eq + Clone, T> Default for Fair<K, T> {
    fn default() -> Self {
        Fair {
            queues: HashMap::new(),
            turns: VecDeque::new(),
            len: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, T> Fair<K, T> {
    /// Queues `item` last among `key`'s.
    pub fn push_back(&mut self, key: K, item: T) {
        self.queue(key).push_back(item);
    }

    /// Queues `item` first among `key`'s, and gives `key` the next turn.
    pub fn push_front(&mut self, key: K, item: T) {
        self.queue(key.clone()).push_front(item);
        if let Some(i) = self.turns.iter().position(|k| *k == key) {
            self.turns.remove(i);
        }
        self.turns.push_front(key);
    }

    fn queue(&mut self, key: K) -> &mut VecDeque<T> {
        self.len += 1;
        let q = self.queues.entry(key.clone()).or_default();
        if q.is_empty() {
            self.turns.push_back(key);
        }
        q
    }

    /// The first item of the key whose turn it is; that key's next turn comes after
    /// every other key's.
    pub fn pop_front(&mut self) -> Option<T> {
        let key = self.turns.pop_front()?;
        let q = self.queues.get_mut(&key)?;
        let item = q.pop_front();
        if q.is_empty() {
            self.queues.remove(&key);
        } else {
            self.turns.push_back(key);
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.queues.clear();
        self.turns.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_backlog_does_not_hold_up_another_keys_item() {
        let mut q = Fair::default();
        for i in 0..1000 {
            q.push_back("flooder", i);
        }
        q.push_back("healthy", -1);
        let first: Vec<i32> = (0..2).filter_map(|_| q.pop_front()).collect();
        assert_eq!(first, [0, -1]);
        assert_eq!(q.len(), 999);
    }

    #[test]
    fn turns_alternate_and_each_key_keeps_its_order() {
        let mut q = Fair::default();
        for (k, i) in [("a", 1), ("a", 2), ("b", 10), ("a", 3), ("b", 20)] {
            q.push_back(k, i);
        }
        let order: Vec<i32> = std::iter::from_fn(|| q.pop_front()).collect();
        assert_eq!(order, [1, 10, 2, 20, 3]);
        assert!(q.is_empty());
    }

    #[test]
    fn an_item_pushed_to_the_front_goes_next() {
        let mut q = Fair::default();
        q.push_back("a", 1);
        q.push_back("b", 2);
        q.push_front("b", 0);
        assert_eq!(q.pop_front(), Some(0));
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.pop_front(), None);
        assert_eq!(q.len(), 0);
    }
}

//! The renewal scheduler's agenda: when each certificate next needs a
//! look, in time order, so a tick costs O(due), not O(all). A tick takes what has
//! come due and what changed since the last one (a new config, a peer's new
//! `live/<name>`); everything else waits in the map untouched. Pure: times are Unix
//! seconds passed in by the caller.

use std::collections::{BTreeSet, HashMap};

/// Next look per certificate, ordered by time, plus the certificates marked as
/// changed since the last tick.
#[derive(Debug, Default)]
pub struct Agenda {
    by_time: BTreeSet<(i64, String)>,
    at: HashMap<String, i64>,
    marked: BTreeSet<String>,
    /// Certificates handed out by [`Agenda::take`] so far: the scheduler's work.
    pub taken: u64,
}

impl Agenda {
    /// `name` next needs a look at `at`.
    pub fn set(&mut self, name: &str, at: i64) {
        if let Some(old) = self.at.insert(name.to_string(), at) {
            self.by_time.remove(&(old, name.to_string()));
        }
        self.by_time.insert((at, name.to_string()));
    }

    /// `name` changed: the next tick looks at it whatever its time.
    pub fn mark(&mut self, name: &str) {
        self.marked.insert(name.to_string());
    }

    /// Every certificate changed (this node became the renewer, say): O(all), on
    /// such a change only.
    pub fn mark_all(&mut self) {
        self.marked.extend(self.at.keys().cloned());
    }

    /// The certificates are now `names`: the others leave, the new ones are
    /// marked. O(all), on a config change only.
    pub fn sync<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let keep: std::collections::HashSet<&str> = names.into_iter().collect();
        let gone: Vec<String> = self
            .at
            .keys()
            .filter(|n| !keep.contains(n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            if let Some(t) = self.at.remove(&n) {
                self.by_time.remove(&(t, n.clone()));
            }
            self.marked.remove(&n);
        }
        for n in keep {
            if !self.at.contains_key(n) {
                self.marked.insert(n.to_string());
            }
        }
    }

    /// What a tick looks at: the marked certificates and those whose time has
    /// come (at or before `now`), each once. They leave the agenda until the
    /// caller [`Agenda::set`]s their next look.
    pub fn take(&mut self, now: i64) -> Vec<String> {
        let mut out: BTreeSet<String> = std::mem::take(&mut self.marked);
        while let Some((t, _)) = self.by_time.first() {
            if *t > now {
                break;
            }
            let Some((_, name)) = self.by_time.pop_first() else {
                break;
            };
            out.insert(name);
        }
        for n in &out {
            if let Some(t) = self.at.remove(n) {
                self.by_time.remove(&(t, n.clone()));
            }
        }
        self.taken += out.len() as u64;
        out.into_iter().collect()
    }

    /// When the next certificate needs a look (`None`: nothing waits).
    pub fn next_at(&self) -> Option<i64> {
        match self.marked.is_empty() {
            true => self.by_time.first().map(|(t, _)| *t),
            false => Some(i64::MIN),
        }
    }

    /// Certificates waiting for a time.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty() && self.marked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn a_tick_takes_only_what_is_due_or_marked() {
        let mut a = Agenda::default();
        a.set("soon", 100);
        a.set("later", 200);
        a.set("much later", 300);
        a.mark("much later");
        assert_eq!(a.take(150), ["much later", "soon"]);
        assert_eq!(a.next_at(), Some(200));
        assert_eq!(a.take(150), Vec::<String>::new());
        a.set("soon", 250);
        assert_eq!(a.take(260), ["later", "soon"]);
        assert!(a.is_empty());
    }

    #[test]
    fn a_new_config_drops_the_removed_and_marks_the_added() {
        let mut a = Agenda::default();
        a.set("a", 100);
        a.set("b", 100);
        a.sync(["b", "c"]);
        assert_eq!(a.len(), 1);
        assert_eq!(a.next_at(), Some(i64::MIN));
        assert_eq!(a.take(0), ["c"]);
        assert_eq!(a.take(100), ["b"]);
    }

    /// Issue 29: 10,000 certificates of 90 days, renewed 30 days before expiry,
    /// a tick every minute for 120 days. Each tick looks at the certificates due
    /// then and no other: the work is one look per renewal, plus the first.
    #[test]
    fn ten_thousand_certificates_cost_o_due_per_tick() {
        let n = 10_000i64;
        let mut a = Agenda::default();
        // Issued over the first 60 days; each is due 60 days after its issue.
        let mut due_at: HashMap<String, i64> = HashMap::new();
        for i in 0..n {
            let name = format!("c{i}");
            let t = 60 * DAY + i * 60 * DAY / n;
            a.set(&name, t);
            due_at.insert(name, t);
        }
        let (mut renewals, mut worst) = (0u64, 0u64);
        let mut now = 0;
        while now < 120 * DAY {
            let before = a.taken;
            for name in a.take(now) {
                assert!(due_at[&name] <= now, "{name} taken before it was due");
                // Renewed: the new certificate is due 60 days from now.
                renewals += 1;
                let next = now + 60 * DAY;
                due_at.insert(name.clone(), next);
                a.set(&name, next);
            }
            worst = worst.max(a.taken - before);
            now += 60;
        }
        // Every certificate renewed once between day 60 and 120, none more.
        assert_eq!(renewals, n as u64);
        assert_eq!(a.taken, renewals);
        // 10,000 spread over 86,400 one-minute ticks: at most 1 each.
        assert!(worst <= 1, "a tick looked at {worst} certificates");
    }
}

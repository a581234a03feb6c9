//! What `status` derives from each certificate's files, kept until they change: the
//! served leaf of `live/<name>/fullchain.pem`, whether the bundle around it is good,
//! the live version and the CA that issued the leaf. Reading and checking a bundle
//! (five files, a key parse, a signature) costs milliseconds; with 10,000
//! certificates, `status` and every `/metrics` scrape paid it for each one on every
//! call (issue 29 item 3).
//!
//! A certificate's entry is reused only while its [`Key`] is unchanged: the lstat of
//! `live/<name>` and of each file the checks read (device, inode, size, mtime and
//! ctime in nanoseconds), and the configured domains. Any write, rename or
//! replacement of one of those files, by this node or applied from a peer, changes
//! the inode or the ctime (which no writer can set), so a forged `cert.pem` is
//! checked again at the next status. The stamps are taken before the files are read:
//! a change in between leaves an older key, and the next call reads again.
//!
//! File times are coarse (a kernel tick, seconds on some file systems): a file
//! rewritten in place within the tick of its last change, at the same size, keeps
//! its stamp. So, as git does with "racily clean" entries, facts whose files changed
//! less than [`RACY`] before the look are not kept, and are read again next time.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::acme::bundle::{Leaf, FILES};

/// Files changed this recently are read again at every look (see the module doc).
pub const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// What the files of one certificate say.
#[derive(Debug, Clone, Default)]
pub struct CertFacts {
    /// The leaf `live/<name>/fullchain.pem` serves, whatever the rest says.
    pub leaf: Option<Leaf>,
    /// Why the bundle is damaged (without who wrote the file: that is looked up
    /// when shown), `None` when good or when there is no `live/<name>`.
    pub fault: Option<String>,
    /// The archive version `live/<name>` points at.
    pub version: Option<u32>,
    /// The CA directory that issued the live leaf.
    pub ca: Option<String>,
}

/// One file as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::symlink_metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// What a certificate's facts were derived from: `live/<name>`, its bundle files,
/// the issued-by record, and the configured domains. The stamps are kept as a
/// BLAKE3 digest (16 bytes, where the stamps themselves took 560 per certificate:
/// issue 29, RSS at 10,000 certificates) and the newest file time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    stamps: [u8; 16],
    newest_ns: i128,
    domains: Vec<String>,
}

impl Key {
    /// Some file changed within `margin` of `now_ns` (or lies in the future).
    fn racy(&self, now_ns: i128, margin: std::time::Duration) -> bool {
        let margin = i128::try_from(margin.as_nanos()).unwrap_or(i128::MAX);
        self.newest_ns.saturating_add(margin) > now_ns
    }

    fn of(root: &Path, name: &str, domains: &[String]) -> Key {
        let live = root.join("live").join(name);
        let mut paths = Vec::with_capacity(FILES.len() + 2);
        paths.push(live.clone());
        paths.extend(FILES.iter().map(|f| live.join(f)));
        paths.push(root.join(crate::acme::ca::ISSUED_DIR).join(name));
        let mut h = blake3::Hasher::new();
        let mut newest_ns = i128::MIN;
        for p in &paths {
            match Stamp::of(p) {
                None => {
                    h.update(&[0]);
                }
                Some(s) => {
                    h.update(&[1]);
                    for n in [s.dev, s.ino, s.size] {
                        h.update(&n.to_le_bytes());
                    }
                    h.update(&s.mtime_ns.to_le_bytes());
                    h.update(&s.ctime_ns.to_le_bytes());
                    newest_ns = newest_ns.max(s.mtime_ns).max(s.ctime_ns);
                }
            }
        }
        let mut stamps = [0; 16];
        stamps.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Key {
            stamps,
            newest_ns,
            domains: domains.to_vec(),
        }
    }
}

/// Reads and checks what `live/<name>` holds, uncached.
fn derive(root: &Path, name: &str, domains: &[String]) -> CertFacts {
    use crate::acme::served;
    let live = std::fs::symlink_metadata(root.join("live").join(name)).is_ok();
    let checked = live.then(|| served::check_live(root, name, domains));
    let (leaf, fault) = match checked {
        None => (None, None),
        Some(Ok(leaf)) => (Some(leaf), None),
        // Damaged: the served leaf may still parse.
        Some(Err(why)) => (served::served_leaf(root, name), Some(why)),
    };
    let ca = leaf
        .as_ref()
        .and_then(|l| crate::acme::ca::issuer(root, name, &l.serial));
    CertFacts {
        leaf,
        fault,
        version: crate::acme::bundle::live_version(root, name),
        ca,
    }
}

/// Each certificate's facts with the key they were derived under, by name.
type Entries = HashMap<String, (Key, Arc<CertFacts>)>;

/// The facts of every certificate `status` has looked at, by name. Clones share it.
#[derive(Clone)]
pub struct CertCache {
    entries: Arc<Mutex<Entries>>,
    /// Facts read from the files (misses), for tests and logs.
    reads: Arc<std::sync::atomic::AtomicU64>,
    /// Files changed within this of a look are not trusted to the cache.
    racy: std::time::Duration,
    /// Held by a whole pass over the certificates ([`CertCache::pass`]).
    pass: Arc<Mutex<()>>,
}

impl Default for CertCache {
    fn default() -> Self {
        CertCache::with_racy(RACY)
    }
}

impl CertCache {
    /// A cache that keeps nothing whose files changed within `racy` of the look.
    pub fn with_racy(racy: std::time::Duration) -> Self {
        CertCache {
            entries: Default::default(),
            reads: Default::default(),
            racy,
            pass: Default::default(),
        }
    }

    /// One pass over the certificates at a time: a `status` asked while another
    /// fills the cache (the start-up warm-up, a scrape) waits for it and then finds
    /// every entry, instead of reading the same files beside it. Nothing that
    /// holds it waits on anything but the files.
    pub fn pass(&self) -> std::sync::MutexGuard<'_, ()> {
        self.pass.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The facts of `name`: the cached ones while its files and domains are
    /// unchanged, else read again. The lock is not held while files are read.
    pub fn facts(&self, root: &Path, name: &str, domains: &[String]) -> Arc<CertFacts> {
        let now_ns = i128::from(crate::clock::now_ns());
        let key = Key::of(root, name, domains);
        if let Some((k, f)) = self.lock().get(name) {
            if *k == key {
                return f.clone();
            }
        }
        let facts = Arc::new(derive(root, name, domains));
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut entries = self.lock();
        if key.racy(now_ns, self.racy) {
            entries.remove(name);
        } else {
            entries.insert(name.to_string(), (key, facts.clone()));
        }
        facts
    }

    /// Forgets certificates not in `names` (removed from the config or the tree).
    pub fn retain(&self, names: &std::collections::HashSet<&str>) {
        self.lock().retain(|n, _| names.contains(n.as_str()));
    }

    /// How many times facts were read from the files rather than reused.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The map holds plain values: one left by a panicking reader is still whole.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::acme::served::tests::{bundle, ca, www, Ca};

    /// Publishes a good bundle for `www.example.com` as version `v` of `www`
    /// (`archive/www/<v>/`, `live/www` → it); returns the leaf's PEM.
    fn publish(root: &Path, ca: &Ca, v: u32) -> String {
        let b = bundle(ca, 2031);
        let dir = root.join(format!("archive/www/{v}"));
        std::fs::create_dir_all(&dir).expect("archive dir");
        for (f, data) in [
            ("cert.pem", &b.cert),
            ("chain.pem", &b.chain),
            ("fullchain.pem", &b.fullchain),
            ("privkey.pem", &b.key),
            ("combined.pem", &b.combined),
        ] {
            std::fs::write(dir.join(f), data.as_deref().unwrap_or_default())
                .expect("a bundle file");
        }
        std::fs::create_dir_all(root.join("live")).expect("live dir");
        let tmp = root.join("live/.www.tmp");
        std::os::unix::fs::symlink(format!("../archive/www/{v}"), &tmp).expect("link");
        std::fs::rename(&tmp, root.join("live/www")).expect("flip");
        String::from_utf8(b.cert.unwrap_or_default()).expect("PEM")
    }

    /// A cache that trusts even files written a moment ago (the tests' files are).
    fn trusting() -> CertCache {
        CertCache::with_racy(std::time::Duration::ZERO)
    }

    #[test]
    fn an_unchanged_tree_reuses_the_facts() {
        let d = tempfile::tempdir().expect("tempdir");
        publish(d.path(), &ca(), 1);
        let cache = trusting();
        let first = cache.facts(d.path(), "www", &www());
        let again = cache.facts(d.path(), "www", &www());
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(cache.reads(), 1);
        assert!(first.fault.is_none(), "{first:?}");
        assert_eq!(first.version, Some(1));
    }

    #[test]
    fn a_new_version_is_read_again() {
        let d = tempfile::tempdir().expect("tempdir");
        let ca = ca();
        publish(d.path(), &ca, 1);
        let cache = trusting();
        let old = cache.facts(d.path(), "www", &www());
        publish(d.path(), &ca, 2);
        let new = cache.facts(d.path(), "www", &www());
        assert_eq!(new.version, Some(2));
        assert_ne!(
            old.leaf.as_ref().map(|l| &l.serial),
            new.leaf.as_ref().map(|l| &l.serial)
        );
    }

    /// Another CA's leaf for the same name.
    fn forged_leaf() -> String {
        let other = tempfile::tempdir().expect("tempdir");
        publish(other.path(), &ca(), 1)
    }

    #[test]
    fn a_forged_cert_pem_put_in_place_is_caught_at_the_next_look() {
        let d = tempfile::tempdir().expect("tempdir");
        publish(d.path(), &ca(), 1);
        let cache = trusting();
        assert!(cache.facts(d.path(), "www", &www()).fault.is_none());
        // As a peer's file is applied: staged, then renamed over cert.pem.
        let staged = d.path().join("archive/www/1/.cert.pem.tmp");
        std::fs::write(&staged, forged_leaf()).expect("stage");
        std::fs::rename(&staged, d.path().join("archive/www/1/cert.pem")).expect("place");
        let f = cache.facts(d.path(), "www", &www());
        let why = f.fault.as_deref().unwrap_or_default();
        assert!(why.contains("cert.pem is not the leaf"), "{f:?}");
    }

    #[test]
    fn a_file_changed_just_now_is_not_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        publish(d.path(), &ca(), 1);
        let cache = CertCache::default();
        assert!(cache.facts(d.path(), "www", &www()).fault.is_none());
        // In place, maybe within the same file-time tick and at the same size.
        std::fs::write(d.path().join("archive/www/1/cert.pem"), forged_leaf()).expect("forge");
        let f = cache.facts(d.path(), "www", &www());
        assert!(f.fault.is_some(), "{f:?}");
        assert_eq!(cache.reads(), 2);
    }

    #[test]
    fn changed_domains_are_checked_again() {
        let d = tempfile::tempdir().expect("tempdir");
        publish(d.path(), &ca(), 1);
        let cache = trusting();
        assert!(cache.facts(d.path(), "www", &www()).fault.is_none());
        let more = vec!["www.example.com".into(), "api.example.com".into()];
        let f = cache.facts(d.path(), "www", &more);
        assert!(
            f.fault
                .as_deref()
                .unwrap_or_default()
                .contains("api.example.com"),
            "{f:?}"
        );
    }

    #[test]
    fn no_live_link_no_fault() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = CertCache::default().facts(d.path(), "www", &www());
        assert!(f.leaf.is_none() && f.fault.is_none() && f.version.is_none());
    }
}

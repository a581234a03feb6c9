//! Turning filesystem activity into index changes: notify (inotify) events are
//! debounced for 300 µs of quiet (hard deadline 10 ms; a burst of whole ACME challenge
//! tokens ends at once when nothing is queued behind it) and the touched paths rescanned;
//! a full rescan runs at start-up, on watcher overflow and periodically as a safety
//! net. Paths being applied by the puller are rescanned only after their apply, so our
//! own writes are never announced as new local changes.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::core::index::Observed;
use crate::core::paths::RelPath;
use crate::core::record::Kind;
use crate::disk::scan::{self, Seen};
use crate::handles::sync::SyncHandle;

/// Quiet time that ends a burst of events.
const QUIET: Duration = Duration::from_micros(300);
/// A burst is cut after this long, however busy.
const DEADLINE: Duration = Duration::from_millis(10);

enum Batch {
    /// Paths to rescan, and those of them that are new directories (created or
    /// renamed in): those get their inotify watch from us before the rescan.
    Paths {
        paths: BTreeSet<RelPath>,
        new_dirs: BTreeSet<RelPath>,
    },
    Full,
}

impl Batch {
    fn paths(paths: impl IntoIterator<Item = RelPath>) -> Batch {
        Batch::Paths {
            paths: paths.into_iter().collect(),
            new_dirs: BTreeSet::new(),
        }
    }
}

/// The tree's watcher, shared by the scan loop and the periodic rescan. notify adds
/// the watch on a new directory only after it has delivered the directory's create
/// event, so a file written there in between would go unseen until the next full
/// rescan; watching new directories ourselves before rescanning them closes that gap.
#[derive(Clone)]
pub struct Watch {
    /// `None` once stopped.
    watcher: Arc<std::sync::Mutex<Option<notify::RecommendedWatcher>>>,
    covered: Arc<std::sync::Mutex<Covered>>,
}

/// The directories known to hold an inotify watch, each as a hash of its path and
/// inode (a directory removed and made again under the same name is a new one).
///
/// A full rescan covers only directories missing here (their create event was lost
/// in a queue overflow), never the whole tree again: covering it makes notify's
/// thread open every directory (each open is an event on it and on its parent) while
/// it reads none, so from about 8,000 directories the kernel queue (16,384 events)
/// overflowed, and the overflow asked for the next full rescan, without end, also on
/// an idle node (issue 29).
#[derive(Default)]
struct Covered {
    /// `None` until the first full rescan: the tree was just watched whole at start,
    /// so that walk's directories are what is covered.
    known: Option<HashSet<u64>>,
}

impl Covered {
    fn key(dir: &RelPath, ino: u64) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (dir.as_str(), ino).hash(&mut h);
        h.finish()
    }

    /// After a full walk (`dirs` in walk order, parents first): the directories to
    /// cover, each the topmost of an uncovered subtree. The walk becomes what is known
    /// (so removed directories are forgotten).
    fn after_full_walk(&mut self, dirs: &[(RelPath, u64)]) -> Vec<RelPath> {
        let walked: HashSet<u64> = dirs.iter().map(|(d, i)| Self::key(d, *i)).collect();
        let mut tops: Vec<RelPath> = Vec::new();
        if let Some(known) = &self.known {
            for (d, i) in dirs {
                let below_last = tops.last().is_some_and(|t| d.is_within(t));
                if !below_last && !known.contains(&Self::key(d, *i)) {
                    tops.push(d.clone());
                }
            }
        }
        self.known = Some(walked);
        tops
    }

    /// Directories covered since (new ones, with what was found below them).
    fn add(&mut self, dirs: &[(RelPath, u64)]) {
        if let Some(known) = &mut self.known {
            known.extend(dirs.iter().map(|(d, i)| Self::key(d, *i)));
        }
    }
}

impl Watch {
    /// Watches `dir` (recursively) now: when this returns, changes below it raise
    /// events. A directory gone meanwhile is not an error.
    fn cover(&self, dir: &std::path::Path) {
        let Ok(mut w) = self.watcher.lock() else {
            return;
        };
        let Some(w) = w.as_mut() else {
            return;
        };
        match w.watch(dir, RecursiveMode::Recursive) {
            Ok(()) => {}
            Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {}
            Err(e) if matches!(&e.kind, notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound) =>
                {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %explain(&e, sysctl), "watching a new directory")
            }
        }
    }

    /// Stops watching (shutdown): notify's thread closes the inotify instance now,
    /// while the node stops, not when the last clone of this handle goes.
    pub fn stop(&self) {
        let w = self.watcher.lock().ok().and_then(|mut w| w.take());
        drop(w);
    }

    /// Rescans everything on disk and everything in the index, covering first the
    /// directories that lost their watch (and walking them again, for what was made
    /// in them meanwhile).
    pub async fn full_rescan(&self, sync: &SyncHandle) {
        let (w, s) = (self.clone(), sync.clone());
        let r = tokio::task::spawn_blocking(move || {
            let root = s.root();
            let mut errors = Vec::new();
            let (mut all, mut dirs) = (Vec::new(), Vec::new());
            scan::walk(root, None, &mut all, &mut dirs, &mut errors);
            let tops = match w.covered.lock() {
                Ok(mut c) => c.after_full_walk(&dirs),
                Err(_) => Vec::new(),
            };
            if !tops.is_empty() {
                tracing::info!(
                    dirs = tops.len(),
                    "watching directories whose watch was missing"
                );
            }
            let mut again = Vec::new();
            for d in &tops {
                w.cover(&d.under(root));
                scan::walk(root, Some(d), &mut all, &mut again, &mut errors);
            }
            w.note_covered(&again);
            let mut todo: BTreeSet<RelPath> = all.into_iter().collect();
            todo.extend(s.indexed_paths());
            rescan_blocking(&s, todo, errors)
        })
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "rescan task failed");
        }
    }

    fn note_covered(&self, dirs: &[(RelPath, u64)]) {
        if let Ok(mut c) = self.covered.lock() {
            c.add(dirs);
        }
    }

    /// Watches the new directories, then rescans the paths.
    async fn rescan_new(&self, sync: &SyncHandle, paths: Vec<RelPath>, new_dirs: Vec<RelPath>) {
        use std::os::unix::fs::MetadataExt;
        let (w, s) = (self.clone(), sync.clone());
        let r = tokio::task::spawn_blocking(move || {
            let root = s.root();
            let mut covered = Vec::new();
            for d in &new_dirs {
                let abs = d.under(root);
                if let Ok(m) = std::fs::symlink_metadata(&abs) {
                    if m.is_dir() {
                        w.cover(&abs);
                        covered.push((d.clone(), m.ino()));
                    }
                }
            }
            let mut errors = Vec::new();
            let mut dirs = Vec::new();
            let todo = expand(&s, paths, &mut dirs, &mut errors);
            // What was found below a directory just covered is covered too.
            dirs.retain(|(d, _)| covered.iter().any(|(c, _)| d.is_within(c)));
            covered.extend(dirs);
            w.note_covered(&covered);
            rescan_blocking(&s, todo, errors)
        })
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "rescan task failed");
        }
    }
}

/// Reads an inotify limit (`max_user_instances`, `max_user_watches`) from
/// `/proc/sys/fs/inotify/`.
fn sysctl(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/fs/inotify/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A watcher error as an operator can act on it: running out of inotify instances
/// (one per daemon: the 129th daemon of one user, by default) or watches (one per
/// directory of the tree) names the limit, its value (`limit` reads it) and the
/// sysctl to raise, not a bare "Too many open files (os error 24)".
fn explain(e: &notify::Error, limit: fn(&str) -> Option<u64>) -> String {
    let value = |name: &str| limit(name).map_or_else(|| "?".to_string(), |v| v.to_string());
    let raw = match &e.kind {
        notify::ErrorKind::Io(io) => io.raw_os_error(),
        _ => None,
    };
    if raw == Some(libc::EMFILE) {
        return format!(
            "cannot create an inotify instance ({e}): the per-user limit \
             fs.inotify.max_user_instances ({}) is reached, or this process's open-file \
             limit; raise it, e.g. `sysctl -w fs.inotify.max_user_instances=1024` (and a \
             file in /etc/sysctl.d/ to keep it)",
            value("max_user_instances")
        );
    }
    if raw == Some(libc::ENOSPC) || matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
        return format!(
            "cannot watch the tree ({e}): the per-user limit fs.inotify.max_user_watches \
             ({}, one per directory) is reached; raise it, e.g. \
             `sysctl -w fs.inotify.max_user_watches=524288` (and a file in /etc/sysctl.d/ \
             to keep it)",
            value("max_user_watches")
        );
    }
    format!("watching the tree: {e}")
}

/// Starts watching the tree; the returned handle keeps the watcher alive.
pub fn start(
    sync: SyncHandle,
    requests: mpsc::UnboundedReceiver<Vec<RelPath>>,
) -> anyhow::Result<Watch> {
    let (tx, rx) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
    // Never through links: a directory watched via `live/x -> ../archive/x/1` shares
    // that directory's inotify watch, and notify then reports its events under the
    // link's path, which the scanner does not follow (edits went unseen). Links out of
    // the tree would also be watched.
    let event_root = sync.root().to_path_buf();
    let mut watcher = notify::RecommendedWatcher::new(
        move |ev: notify::Result<notify::Event>| {
            // Filtered here, on notify's thread: every apply raises half a dozen
            // events in `.certmesh/tmp` and every read of the tree an open, and each
            // one sent would wake the debouncer for nothing.
            if matters(&event_root, &ev) {
                tracing::trace!(target: crate::clock::STAGE, stage = "event", t_us = crate::clock::mono_us());
                let _ = tx.send(ev);
            }
        },
        notify::Config::default().with_follow_symlinks(false),
    )
    .map_err(|e| anyhow::anyhow!(explain(&e, sysctl)))?;
    watcher
        .watch(sync.root(), RecursiveMode::Recursive)
        .map_err(|e| anyhow::anyhow!(explain(&e, sysctl)))?;
    let watch = Watch {
        watcher: Arc::new(std::sync::Mutex::new(Some(watcher))),
        covered: Arc::default(),
    };
    let (batches_tx, batches_rx) = mpsc::unbounded_channel();
    let root = sync.root().to_path_buf();
    // A plain thread: tokio timers tick in whole milliseconds, too coarse here.
    std::thread::Builder::new()
        .name("certmesh-debounce".into())
        .spawn(move || debounce(&root, rx, batches_tx))?;
    tokio::spawn(scan_loop(watch.clone(), sync, batches_rx, requests));
    Ok(watch)
}

/// Collects events (those that [`matters`] let through) into batches: a burst ends
/// after `QUIET` without events, or at `DEADLINE` after its first event.
fn debounce(
    root: &std::path::Path,
    events: std::sync::mpsc::Receiver<notify::Result<notify::Event>>,
    out: mpsc::UnboundedSender<Batch>,
) {
    let add = |batch: &mut Batch, ev: notify::Result<notify::Event>| match ev {
        Ok(ev) if !ev.need_rescan() => {
            if let Batch::Paths { paths, new_dirs } = batch {
                let maybe_new_dir = is_new_dir(&ev.kind);
                for p in ev.paths {
                    if let Some(rel) = RelPath::from_fs(root, &p) {
                        if !rel.is_local_only() {
                            if maybe_new_dir {
                                new_dirs.insert(rel.clone());
                            }
                            paths.insert(rel);
                        }
                    }
                }
            }
        }
        Ok(_) => *batch = Batch::Full,
        Err(e) => {
            tracing::warn!(error = %e, "watcher error; doing a full rescan");
            *batch = Batch::Full;
        }
    };
    while let Ok(first) = events.recv() {
        let mut batch = Batch::paths([]);
        let mut tokens = Tokens::default();
        tokens.see(root, &first);
        add(&mut batch, first);
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            // A burst of whole challenge tokens ends with nothing queued behind it.
            let quiet = if tokens.complete() {
                Duration::ZERO
            } else {
                QUIET
            };
            match events.recv_timeout(quiet.min(deadline - now)) {
                Ok(ev) => {
                    tokens.see(root, &ev);
                    add(&mut batch, ev)
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        tracing::trace!(target: crate::clock::STAGE, stage = "debounced", t_us = crate::clock::mono_us());
        if out.send(batch).is_err() {
            return;
        }
    }
}

/// Where http-01 challenge tokens live (`acme::order::CHALLENGE_DIR`).
const TOKEN_DIR: &str = "acme/.well-known/acme-challenge/";

/// Whether a burst so far is only ACME challenge tokens, the last one left whole.
/// A token is one file, served on its own and written in one step (renamed into
/// place, or closed after writing): nothing else belongs in its batch, so its burst
/// need not wait out [`QUIET`] (issue 28: the fixed delay was ~15 % of a token's way
/// to the peers). Any other path keeps the quiet time that holds a bundle's files and
/// its link flip together.
#[derive(Default)]
struct Tokens {
    other: bool,
    last_whole: bool,
}

impl Tokens {
    fn see(&mut self, root: &std::path::Path, ev: &notify::Result<notify::Event>) {
        use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
        let Ok(ev) = ev else {
            self.other = true;
            return;
        };
        // Tree paths only: a staged file renamed in from `.certmesh/tmp` is named too.
        let paths: Vec<RelPath> = ev
            .paths
            .iter()
            .filter_map(|p| RelPath::from_fs(root, p))
            .filter(|r| !r.is_local_only())
            .collect();
        let token = |r: &RelPath| {
            r.as_str()
                .strip_prefix(TOKEN_DIR)
                .is_some_and(|name| !name.is_empty() && !name.contains('/'))
        };
        self.other |= ev.need_rescan() || paths.is_empty() || !paths.iter().all(token);
        self.last_whole = matches!(
            ev.kind,
            notify::EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
                | notify::EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
    }

    fn complete(&self) -> bool {
        !self.other && self.last_whole
    }
}

/// False for an event that cannot change the index: a read or an open (also what our
/// own scans and serving cause, so following them would loop), or one whose paths are
/// all outside the tree or local-only (`.certmesh/tmp`, where applies stage files).
/// Errors and overflows matter.
fn matters(root: &std::path::Path, ev: &notify::Result<notify::Event>) -> bool {
    let Ok(ev) = ev else {
        return true;
    };
    if ev.need_rescan() {
        return true;
    }
    !is_read_only(&ev.kind)
        && ev
            .paths
            .iter()
            .any(|p| RelPath::from_fs(root, p).is_some_and(|rel| !rel.is_local_only()))
}

/// A directory created, or anything renamed in (it may be a directory).
fn is_new_dir(kind: &notify::EventKind) -> bool {
    use notify::event::{CreateKind, ModifyKind, RenameMode};
    matches!(
        kind,
        notify::EventKind::Create(CreateKind::Folder | CreateKind::Any)
            | notify::EventKind::Modify(ModifyKind::Name(
                RenameMode::To | RenameMode::Both | RenameMode::Any
            ))
    )
}

fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(kind, notify::EventKind::Access(a) if !matches!(a, AccessKind::Close(AccessMode::Write)))
}

async fn scan_loop(
    watch: Watch,
    sync: SyncHandle,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    mut requests: mpsc::UnboundedReceiver<Vec<RelPath>>,
) {
    loop {
        let mut batch = tokio::select! {
            b = batches.recv() => match b { Some(b) => b, None => return },
            r = requests.recv() => match r { Some(ps) => Batch::paths(ps), None => return },
        };
        // Fold in whatever else is already queued.
        while let Ok(more) = batches
            .try_recv()
            .map(Some)
            .or_else(|_| requests.try_recv().map(|ps| Some(Batch::paths(ps))))
            .or(Ok::<_, ()>(None))
        {
            let Some(more) = more else { break };
            batch = match (batch, more) {
                (
                    Batch::Paths {
                        mut paths,
                        mut new_dirs,
                    },
                    Batch::Paths {
                        paths: p,
                        new_dirs: d,
                    },
                ) => {
                    paths.extend(p);
                    new_dirs.extend(d);
                    Batch::Paths { paths, new_dirs }
                }
                _ => Batch::Full,
            };
        }
        match batch {
            Batch::Full => watch.full_rescan(&sync).await,
            Batch::Paths { paths, new_dirs } if !paths.is_empty() => {
                watch
                    .rescan_new(
                        &sync,
                        paths.into_iter().collect(),
                        new_dirs.into_iter().collect(),
                    )
                    .await
            }
            Batch::Paths { .. } => {}
        }
    }
}

fn rescan_blocking(sync: &SyncHandle, todo: BTreeSet<RelPath>, mut errors: Vec<String>) {
    sync.count_scan();
    let observed = look_at(sync, todo, &mut errors);
    sync.observed(observed, errors);
}

/// The paths to look at: directories bring their contents (and go into `dirs`),
/// vanished ones their indexed children.
fn expand(
    sync: &SyncHandle,
    paths: Vec<RelPath>,
    dirs: &mut Vec<(RelPath, u64)>,
    errors: &mut Vec<String>,
) -> BTreeSet<RelPath> {
    let root = sync.root();
    let mut todo: BTreeSet<RelPath> = BTreeSet::new();
    for p in paths {
        if p.is_local_only() {
            continue;
        }
        let mut below = Vec::new();
        if std::fs::symlink_metadata(p.under(root)).is_ok_and(|m| m.is_dir()) {
            scan::walk(root, Some(&p), &mut below, dirs, errors);
        }
        todo.extend(below);
        todo.extend(sync.indexed_within(&p));
        todo.insert(p);
    }
    todo
}

/// Looks (stat) outside the lock, skips what is being applied, hashes what changed:
/// what each path is now (`None`: gone).
fn look_at(
    sync: &SyncHandle,
    todo: BTreeSet<RelPath>,
    errors: &mut Vec<String>,
) -> Vec<(RelPath, Option<Observed>)> {
    let root = sync.root();
    let mut observed = Vec::with_capacity(todo.len());
    for p in todo {
        if p.is_local_only() || sync.defer_if_applying(&p) {
            continue;
        }
        let seen = match scan::look(root, &p) {
            Ok(s) => s,
            Err(e) => {
                errors.push(format!("{p}: {e}"));
                continue;
            }
        };
        let obs = match seen {
            Seen::Absent => None,
            Seen::Skipped(why) if sync.not_synced(&p, &why) => None,
            Seen::Skipped(_) => continue,
            Seen::Present { kind, stat, target } => {
                if kind == Kind::File && sync.unchanged(&p, &stat) {
                    continue;
                }
                match scan::observe(root, &p, kind, stat, target) {
                    Ok(Some((o, data))) => {
                        tracing::trace!(target: crate::clock::STAGE, stage = "hashed", path = %p, t_us = crate::clock::mono_us());
                        if let Some(d) = data {
                            sync.remember_inline(o.hash, d);
                        }
                        Some(o)
                    }
                    Ok(None) => {
                        // Changed while hashing: look again shortly.
                        sync.rescan_later(vec![p]);
                        continue;
                    }
                    Err(e) => {
                        errors.push(format!("{p}: {e}"));
                        continue;
                    }
                }
            }
        };
        observed.push((p, obs));
    }
    observed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_rescan_covers_only_directories_whose_watch_may_be_missing() {
        let d = |p: &str, ino: u64| (RelPath::parse(p).unwrap(), ino);
        let names = |v: Vec<RelPath>| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let mut c = Covered::default();
        let tree = [d("a", 1), d("a/x", 2), d("b", 3)];
        // The first walk follows the watch of the whole tree at start: nothing to cover.
        assert!(c.after_full_walk(&tree).is_empty());
        // Nothing changed: nothing to cover (this was the endless rescan).
        assert!(c.after_full_walk(&tree).is_empty());
        // New directories unseen (their events lost): only the topmost of each subtree;
        // `b` made again (new inode) has lost its watch too.
        let grown = [
            d("a", 1),
            d("a/x", 2),
            d("a/y", 4),
            d("a/y/z", 5),
            d("ab", 6),
            d("b", 7),
        ];
        assert_eq!(names(c.after_full_walk(&grown)), ["a/y", "ab", "b"]);
        assert!(c.after_full_walk(&grown).is_empty());
        // One covered by a path batch meanwhile is not covered again.
        let mut more = grown.to_vec();
        more.push(d("c", 8));
        c.add(&[d("c", 8)]);
        assert!(c.after_full_walk(&more).is_empty());
        // A removed directory is forgotten: made again, even with the same inode, it
        // is covered.
        assert!(c.after_full_walk(&grown).is_empty());
        assert_eq!(names(c.after_full_walk(&more)), ["c"]);
    }

    #[test]
    fn a_whole_challenge_token_ends_its_burst_anything_else_waits() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode,
        };
        let root = std::path::Path::new("/srv/tree");
        let ev = |kind: EventKind, paths: &[&str]| -> notify::Result<notify::Event> {
            let e = paths
                .iter()
                .fold(notify::Event::new(kind), |e, p| e.add_path(root.join(p)));
            Ok(e)
        };
        let burst = |evs: &[notify::Result<notify::Event>]| {
            let mut t = Tokens::default();
            evs.iter().for_each(|e| t.see(root, e));
            t.complete()
        };
        let to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let created = EventKind::Create(CreateKind::File);
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let tok = "acme/.well-known/acme-challenge/tok1";
        // Renamed in (from outside, or staged by certmesh), or written and closed.
        assert!(burst(&[ev(to, &[tok])]));
        assert!(burst(&[
            ev(to, &[tok]),
            ev(both, &[".certmesh/tmp/1f2e", tok])
        ]));
        assert!(burst(&[ev(created, &[tok]), ev(closed, &[tok])]));
        // Still being written; another path in the burst; not a token.
        assert!(!burst(&[ev(created, &[tok])]));
        assert!(!burst(&[
            ev(to, &["archive/www/2/cert.pem"]),
            ev(to, &[tok])
        ]));
        assert!(!burst(&[ev(
            to,
            &["acme/.well-known/acme-challenge/dir/x"]
        )]));
        assert!(!burst(&[ev(created, &["acme/.well-known/acme-challenge"])]));
    }

    #[test]
    fn only_events_that_can_change_the_index_reach_the_debouncer() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode,
        };
        let root = std::path::Path::new("/srv/tree");
        let ev = |kind: EventKind, paths: &[&str]| -> notify::Result<notify::Event> {
            let mut e = notify::Event::new(kind);
            for p in paths {
                e = e.add_path(root.join(p));
            }
            Ok(e)
        };
        let create = EventKind::Create(CreateKind::File);
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        // An apply's staging file, and a read anywhere: nothing to rescan.
        assert!(!matters(root, &ev(create, &[".certmesh/tmp/1f2e"])));
        assert!(!matters(root, &ev(open, &["live/www/privkey.pem"])));
        // Its rename into the tree, a write closed, a new file: rescanned.
        assert!(matters(
            root,
            &ev(rename, &[".certmesh/tmp/1f2e", "live/www/privkey.pem"])
        ));
        assert!(matters(root, &ev(closed, &["live/www/privkey.pem"])));
        assert!(matters(root, &ev(create, &["acme/x"])));
        // Outside the tree, or a name that is not a tree path: nothing.
        let mut outside = notify::Event::new(create);
        outside = outside.add_path("/etc/passwd".into());
        assert!(!matters(root, &Ok(outside)));
        // Overflow and errors always get through (they mean a full rescan).
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(matters(root, &Ok(overflow)));
        assert!(matters(
            root,
            &Err(notify::Error::generic("queue overflow"))
        ));
    }

    #[test]
    fn running_out_of_inotify_instances_or_watches_names_the_sysctl() {
        fn limit(name: &str) -> Option<u64> {
            Some(if name == "max_user_instances" {
                128
            } else {
                8192
            })
        }
        let e = notify::Error::io(std::io::Error::from_raw_os_error(libc::EMFILE));
        let m = explain(&e, limit);
        assert!(m.contains("fs.inotify.max_user_instances (128)"), "{m}");
        assert!(
            m.contains("sysctl -w fs.inotify.max_user_instances="),
            "{m}"
        );
        let e = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
        let m = explain(&e, limit);
        assert!(m.contains("fs.inotify.max_user_watches (8192"), "{m}");
        let e = notify::Error::io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(explain(&e, limit).contains("max_user_watches"));
        let e = notify::Error::io(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(!explain(&e, limit).contains("sysctl"));
    }
}

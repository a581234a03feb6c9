//! Turning filesystem activity into index changes: notify (inotify) events are
//! debounced for 300 µs of quiet (hard deadline 10 ms) and the touched paths rescanned;
//! a full rescan runs at start-up, on watcher overflow and periodically as a safety
//! net. Paths being applied by the puller are rescanned only after their apply, so our
//! own writes are never announced as new local changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::index::{Kind, Observed};
use crate::node::{now_ns, Shared};
use crate::paths::RelPath;
use crate::scan::{self, Seen};

/// Quiet time that ends a burst of events.
const QUIET: Duration = Duration::from_micros(300);
/// A burst is cut after this long, however busy.
const DEADLINE: Duration = Duration::from_millis(10);

enum Batch {
    Paths(BTreeSet<RelPath>),
    Full,
}

/// Starts watching the tree; the returned watcher must be kept alive.
pub fn start(
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<Vec<RelPath>>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let (tx, rx) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })?;
    watcher.watch(&shared.tree.root, RecursiveMode::Recursive)?;
    let (batches_tx, batches_rx) = mpsc::unbounded_channel();
    let root = shared.tree.root.clone();
    // A plain thread: tokio timers tick in whole milliseconds, too coarse here.
    std::thread::Builder::new()
        .name("certmesh-debounce".into())
        .spawn(move || debounce(&root, rx, batches_tx))?;
    tokio::spawn(scan_loop(shared, batches_rx, requests));
    Ok(watcher)
}

/// Collects events into batches: a burst ends after `QUIET` without events, or at
/// `DEADLINE` after its first event.
fn debounce(
    root: &std::path::Path,
    events: std::sync::mpsc::Receiver<notify::Result<notify::Event>>,
    out: mpsc::UnboundedSender<Batch>,
) {
    let add = |batch: &mut Batch, ev: notify::Result<notify::Event>| match ev {
        // Reads and opens are not changes; they are also what our own scans and
        // serving cause, so following them would loop.
        Ok(ev) if is_read_only(&ev.kind) => {}
        Ok(ev) if !ev.need_rescan() => {
            if let Batch::Paths(set) = batch {
                for p in ev.paths {
                    if let Some(rel) = RelPath::from_fs(root, &p) {
                        if !rel.is_local_only() {
                            set.insert(rel);
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
        let mut batch = Batch::Paths(BTreeSet::new());
        add(&mut batch, first);
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            match events.recv_timeout(QUIET.min(deadline - now)) {
                Ok(ev) => add(&mut batch, ev),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        if out.send(batch).is_err() {
            return;
        }
    }
}

fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(kind, notify::EventKind::Access(a) if !matches!(a, AccessKind::Close(AccessMode::Write)))
}

async fn scan_loop(
    shared: Arc<Shared>,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    mut requests: mpsc::UnboundedReceiver<Vec<RelPath>>,
) {
    loop {
        let mut batch = tokio::select! {
            b = batches.recv() => match b { Some(b) => b, None => return },
            r = requests.recv() => match r { Some(ps) => Batch::Paths(ps.into_iter().collect()), None => return },
        };
        // Fold in whatever else is already queued.
        while let Ok(more) = batches
            .try_recv()
            .map(Some)
            .or_else(|_| {
                requests
                    .try_recv()
                    .map(|ps| Some(Batch::Paths(ps.into_iter().collect())))
            })
            .or(Ok::<_, ()>(None))
        {
            let Some(more) = more else { break };
            batch = match (batch, more) {
                (Batch::Paths(mut a), Batch::Paths(b)) => {
                    a.extend(b);
                    Batch::Paths(a)
                }
                _ => Batch::Full,
            };
        }
        match batch {
            Batch::Full => full_rescan(&shared).await,
            Batch::Paths(set) if !set.is_empty() => {
                rescan(&shared, set.into_iter().collect(), false).await
            }
            Batch::Paths(_) => {}
        }
    }
}

/// Rescans everything on disk and everything in the index.
pub async fn full_rescan(shared: &Arc<Shared>) {
    rescan(shared, Vec::new(), true).await;
}

/// Rescans the given paths (directories with their contents).
pub async fn rescan(shared: &Arc<Shared>, paths: Vec<RelPath>, full: bool) {
    let s = shared.clone();
    let r = tokio::task::spawn_blocking(move || rescan_blocking(&s, paths, full)).await;
    if let Err(e) = r {
        tracing::error!(error = %e, "rescan task failed");
    }
}

fn rescan_blocking(shared: &Arc<Shared>, paths: Vec<RelPath>, full: bool) {
    shared
        .scans
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = &shared.tree.root;
    let mut errors = Vec::new();
    // Expand: directories bring their contents, vanished ones their indexed children.
    let mut todo: BTreeSet<RelPath> = BTreeSet::new();
    if full {
        let mut all = Vec::new();
        scan::walk(root, None, &mut all, &mut errors);
        todo.extend(all);
        todo.extend(
            shared
                .lock()
                .engine
                .index()
                .entries()
                .map(|e| e.record.path.clone()),
        );
    } else {
        for p in paths {
            if p.is_local_only() {
                continue;
            }
            let mut below = Vec::new();
            if std::fs::symlink_metadata(p.under(root)).is_ok_and(|m| m.is_dir()) {
                scan::walk(root, Some(&p), &mut below, &mut errors);
            }
            todo.extend(below);
            todo.extend(shared.lock().engine.index().paths_within(&p));
            todo.insert(p);
        }
    }
    // Look (stat) outside the lock; skip what is being applied; hash what changed.
    let mut observed: Vec<(RelPath, Option<Observed>)> = Vec::with_capacity(todo.len());
    for p in todo {
        if p.is_local_only() {
            continue;
        }
        {
            let mut st = shared.lock();
            if st.applying.contains(&p) {
                st.rescan_after_apply.push(p);
                continue;
            }
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
            Seen::Skipped(why) => {
                let mut st = shared.lock();
                if st.engine.index().get(&p).is_none_or(|e| e.record.deleted) {
                    // Also on full rescans (start, then hourly): a link made in the
                    // tree that breaks the link rules must be seen by the operator.
                    tracing::warn!(path = %p, %why, "not synced");
                    continue;
                }
                st.error(format!("{p}: {why}; treating as removed"));
                None
            }
            Seen::Present { kind, stat, target } => {
                if kind == Kind::File && shared.lock().engine.index().unchanged(&p, &stat) {
                    continue;
                }
                match scan::observe(root, &p, kind, stat, target) {
                    Ok(Some((o, data))) => {
                        if let Some(d) = data {
                            shared.inline().insert(o.hash, Arc::new(d));
                        }
                        Some(o)
                    }
                    Ok(None) => {
                        // Changed while hashing: look again shortly.
                        let _ = shared.rescan.send(vec![p]);
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
    let mut st = shared.lock();
    for e in errors {
        st.error(format!("scan: {e}"));
    }
    let since = st.engine.index().sequence();
    let now = now_ns();
    let mut changed = 0;
    for (p, obs) in observed {
        if st.applying.contains(&p) {
            st.rescan_after_apply.push(p);
            continue;
        }
        if let Some(r) = st.engine.observe(&p, obs, now) {
            tracing::debug!(path = %p, deleted = r.deleted, "local change");
            changed += 1;
        }
    }
    if changed > 0 {
        tracing::info!(changed, "local changes");
    }
    st.commit(since, shared);
    drop(st);
    if changed > 0 {
        shared.pull.notify_one();
        shared.bump_progress();
    }
}

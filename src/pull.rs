//! The puller: a pipeline. It takes needs from the plan, fetches missing content by
//! hash from a peer that has it (verified with BLAKE3 while it streams into staging),
//! and applies whatever is ready as one unit, while the next fetches keep running.
//! A slow or hostile source holds up only its own files; a symlink is applied only in
//! the same unit as the last of the files its target still needs. Results are
//! recorded in the index and told to the peers. Failures are retried with backoff;
//! nothing is ever half-written.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::apply::{Item, Outcome};
use crate::identity::DeviceId;
use crate::index::{ContentHash, Kind, LocalStat};
use crate::node::Shared;
use crate::paths::RelPath;
use crate::plan::Need;
use crate::wire::{self, pb, MAX_HEADER};

/// Most records in flight (queued, fetching, ready or being applied).
const MAX_IN_FLIGHT: usize = 8192;
/// Most records applied as one unit.
const BATCH_ITEMS: usize = 4096;
/// While fetches are still running, ready work is applied once there is this much of
/// it, or once the oldest has waited APPLY_DELAY: fewer, larger units (one syncfs
/// each) during a bulk transfer; a lone change is applied as soon as it is ready.
const APPLY_ITEMS: usize = 1024;
const APPLY_BYTES: u64 = 64 << 20;
const APPLY_DELAY: Duration = Duration::from_millis(200);
/// Concurrent fetches.
const PARALLEL_FETCHES: usize = 32;
/// Received content is written to staging in pieces of about this size.
const WRITE_CHUNK: usize = 4 << 20;
/// A fetch must move at least `MIN_PROGRESS` bytes (or finish) in every `WINDOW`.
const WINDOW: Duration = Duration::from_secs(10);
const MIN_PROGRESS: u64 = 64 << 10;

struct Work {
    need: Need,
    expect: Option<LocalStat>,
    /// Peers to fetch from, in order; empty when no content is needed.
    sources: Vec<(DeviceId, quinn::Connection)>,
    /// The content, when it came inline with the record.
    inline: Option<Arc<Vec<u8>>>,
    /// Fetched content waiting in staging.
    staged: Option<PathBuf>,
}

impl Work {
    fn path(&self) -> &RelPath {
        &self.need.target.path
    }

    /// A symlink to a directory whose content still has to arrive.
    fn link_target(&self) -> Option<RelPath> {
        let r = &self.need.target;
        if r.kind != Kind::Symlink || r.deleted {
            return None;
        }
        r.path.resolve_symlink_target(&r.target).ok()
    }
}

#[derive(Default)]
struct Retry {
    at: HashMap<RelPath, (Instant, u32)>,
}

impl Retry {
    fn later(&mut self, p: &RelPath) {
        let e = self.at.entry(p.clone()).or_insert((Instant::now(), 0));
        e.1 = (e.1 + 1).min(7);
        e.0 = Instant::now() + Duration::from_millis(250 << e.1);
    }

    fn next(&self) -> Option<Instant> {
        self.at.values().map(|(t, _)| *t).min()
    }
}

type FetchResult = (Work, Result<PathBuf, (bool, String)>);
type Applied = (Vec<Work>, Vec<Outcome>);

/// Runs until shutdown; then lets an apply in progress finish and records it.
pub async fn run(shared: Arc<Shared>) {
    let mut retry = Retry::default();
    let mut stopping = shared.stopping.subscribe();
    let mut queued: VecDeque<Work> = VecDeque::new();
    let mut ready: Vec<Work> = Vec::new();
    let mut fetches: JoinSet<FetchResult> = JoinSet::new();
    let mut applying: Option<tokio::task::JoinHandle<Applied>> = None;
    let mut dirty = true;
    let mut ready_bytes = 0u64;
    let mut ready_since: Option<tokio::time::Instant> = None;
    loop {
        if *stopping.borrow() {
            fetches.abort_all();
            while let Some(r) = fetches.join_next().await {
                if let Ok((_, Ok(staged))) = r {
                    let _ = std::fs::remove_file(staged);
                }
            }
            if let Some(h) = applying.take() {
                if let Ok(done) = h.await {
                    record(&shared, &mut retry, done);
                }
            }
            return;
        }
        let in_flight = queued.len() + ready.len() + fetches.len();
        if dirty && queued.len() < PARALLEL_FETCHES && in_flight < MAX_IN_FLIGHT {
            dirty = false;
            for w in take(&shared, &mut retry, MAX_IN_FLIGHT - in_flight) {
                if w.sources.is_empty() {
                    ready_since.get_or_insert_with(tokio::time::Instant::now);
                    ready.push(w);
                } else {
                    queued.push_back(w);
                }
            }
        }
        while fetches.len() < PARALLEL_FETCHES {
            let Some(w) = queued.pop_front() else { break };
            fetches.spawn(fetch_work(shared.tree.staging_path(), w));
        }
        let due = ready_since.map(|t| t + APPLY_DELAY);
        if applying.is_none()
            && !ready.is_empty()
            && ((fetches.is_empty() && queued.is_empty())
                || ready.len() >= APPLY_ITEMS
                || ready_bytes >= APPLY_BYTES
                || due.is_some_and(|t| t <= tokio::time::Instant::now()))
        {
            let batch = form_batch(&shared, &mut ready);
            ready_bytes = ready.iter().map(|w| w.need.target.size).sum();
            // What stays (links waiting for their targets) waits for the next round.
            ready_since = (!ready.is_empty()).then(tokio::time::Instant::now);
            if !batch.is_empty() {
                applying = Some(start_apply(&shared, batch));
            }
        }
        let due = ready_since
            .filter(|_| applying.is_none())
            .map(|t| t + APPLY_DELAY);
        let wake = retry.next().map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(r) = fetches.join_next(), if !fetches.is_empty() => match r {
                Ok((mut w, Ok(staged))) => {
                    w.staged = Some(staged);
                    ready_bytes += w.need.target.size;
                    ready_since.get_or_insert_with(tokio::time::Instant::now);
                    ready.push(w);
                }
                Ok((w, Err((local, e)))) => {
                    if local {
                        shared.lock().error(e);
                    } else {
                        tracing::debug!("{e}");
                    }
                    retry.later(w.path());
                    shared.lock().applying.remove(w.path());
                    dirty = true;
                }
                Err(e) => tracing::error!(error = %e, "fetch task failed"),
            },
            r = async { applying.as_mut().expect("guarded").await }, if applying.is_some() => {
                applying = None;
                match r {
                    Ok(done) => record(&shared, &mut retry, done),
                    Err(e) => tracing::error!(error = %e, "apply task failed"),
                }
                dirty = true;
            }
            _ = shared.pull.notified() => dirty = true,
            _ = async { match due { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
            _ = async { match wake { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => dirty = true,
            _ = stopping.changed() => {}
        }
    }
}

/// Takes up to `room` needs that are not in flight, not waiting for a retry, and
/// fetchable from a connected peer (or needing no content), marking them in flight.
fn take(shared: &Shared, retry: &mut Retry, room: usize) -> Vec<Work> {
    let now = Instant::now();
    let mut guard = shared.lock();
    let inline_cache = shared.inline(); // lock order: state, then inline cache
    let crate::node::State {
        engine,
        peers,
        applying,
        ..
    } = &mut *guard;
    let (plan, index) = (engine.plan(), engine.index());
    let mut out = Vec::new();
    for need in plan.needs() {
        if out.len() >= room {
            break;
        }
        let p = &need.target.path;
        if applying.contains(p) || retry.at.get(p).is_some_and(|(t, _)| *t > now) {
            continue;
        }
        let local = index.get(p);
        let expect = local.filter(|e| !e.record.deleted).and_then(|e| e.stat);
        let have_content = local.is_some_and(|e| {
            !e.record.deleted && e.record.kind == Kind::File && e.record.hash == need.target.hash
        });
        let wants_content = need.target.kind == Kind::File && !need.target.deleted && !have_content;
        let inline = if wants_content {
            inline_cache.get(&need.target.hash)
        } else {
            None
        };
        let mut sources = Vec::new();
        if wants_content && inline.is_none() {
            for id in plan.sources(need) {
                if let Some(s) = peers.get(&id).and_then(|s| s.session.as_ref()) {
                    sources.push((id, s.conn.clone()));
                }
            }
            if sources.is_empty() {
                continue; // no connected peer has it; re-evaluated when one connects
            }
        }
        out.push(Work {
            need: need.clone(),
            expect,
            sources,
            inline,
            staged: None,
        });
    }
    for w in &out {
        applying.insert(w.path().clone());
    }
    out
}

/// Picks the ready work to apply as one unit. A symlink goes only with the last of
/// what its target still needs; it keeps waiting while that is still being fetched,
/// and is released (retaken later) when some of it is not in flight at all.
fn form_batch(shared: &Shared, ready: &mut Vec<Work>) -> Vec<Work> {
    let take_n = ready.len().min(BATCH_ITEMS);
    let mut batch: Vec<Work> = ready.drain(..take_n).collect();
    let in_batch: HashSet<RelPath> = batch.iter().map(|w| w.path().clone()).collect();
    let mut st = shared.lock();
    let mut keep = Vec::new();
    let mut release = Vec::new();
    let mut i = 0;
    while i < batch.len() {
        let Some(target) = batch[i].link_target() else {
            i += 1;
            continue;
        };
        let missing: Vec<RelPath> = st
            .engine
            .plan()
            .needs_within(&target)
            .filter(|p| !in_batch.contains(*p))
            .cloned()
            .collect();
        if missing.is_empty() {
            i += 1;
        } else if missing.iter().all(|p| st.applying.contains(p)) {
            keep.push(batch.swap_remove(i));
        } else {
            release.push(batch.swap_remove(i));
        }
    }
    for w in release {
        st.applying.remove(w.path());
    }
    ready.extend(keep);
    batch
}

async fn fetch_work(dest: PathBuf, w: Work) -> FetchResult {
    let path = w.path().clone();
    let (hash, size) = (w.need.target.hash, w.need.target.size);
    let mut last = String::new();
    for (peer, conn) in &w.sources {
        let result = fetch(conn, &path, hash, size, &dest).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&dest).await;
        }
        match result {
            Ok(()) => return (w, Ok(dest)),
            Err(FetchError::Hostile(why)) => {
                tracing::warn!(peer = %peer, path = %path, why = %why, "peer sent bad content; disconnecting it");
                conn.close(crate::peer::CLOSE_PROTOCOL.into(), b"bad content");
                last = why;
            }
            Err(FetchError::Retry(why)) => last = why,
            Err(FetchError::Local(why)) => {
                return (w, Err((true, format!("staging {path}: {why}"))));
            }
        }
    }
    (w, Err((false, format!("fetching {path}: {last}"))))
}

/// Applies a unit on a blocking thread; inline content is staged in the same call.
fn start_apply(shared: &Shared, batch: Vec<Work>) -> tokio::task::JoinHandle<Applied> {
    tracing::trace!(n = batch.len(), "apply start");
    let tree = shared.tree.clone();
    tokio::task::spawn_blocking(move || {
        let mut ready = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        for mut w in batch {
            if let Some(d) = &w.inline {
                match tree.stage_bytes(d) {
                    Ok(p) => w.staged = Some(p),
                    Err(e) => {
                        failed.push((w, Outcome::Failed(format!("staging: {e}"))));
                        continue;
                    }
                }
            }
            items.push(Item {
                record: w.need.target.clone(),
                staged: w.staged.take(),
                expect: w.expect,
                conflict: w.need.conflict,
            });
            ready.push(w);
        }
        let mut outcomes = tree.apply(&items);
        for (w, o) in failed {
            ready.push(w);
            outcomes.push(o);
        }
        (ready, outcomes)
    })
}

/// Records a finished unit in the index and tells the peers.
fn record(shared: &Shared, retry: &mut Retry, (done, outcomes): Applied) {
    tracing::trace!(n = done.len(), "applied to disk");
    let mut rescan = Vec::new();
    let mut applied = 0usize;
    let mut touched = Vec::new(); // for certificate repair
    {
        let mut st = shared.lock();
        let since = st.engine.index().sequence();
        for (w, outcome) in done.into_iter().zip(outcomes) {
            let p = w.need.target.path.clone();
            st.applying.remove(&p);
            match outcome {
                Outcome::Applied(stat) => {
                    retry.at.remove(&p);
                    applied += 1;
                    tracing::debug!(path = %p, deleted = w.need.target.deleted, "applied");
                    touched.push(p.clone());
                    st.engine.applied(w.need.target, stat);
                }
                Outcome::Deferred(why) => {
                    tracing::debug!(path = %p, %why, "deferred");
                    retry.later(&p);
                    rescan.push(p);
                }
                Outcome::Failed(why) => {
                    st.error(format!("applying {p}: {why}"));
                    retry.later(&p);
                }
            }
        }
        rescan.append(&mut st.rescan_after_apply);
        st.commit(since, shared);
    }
    // Something applied: deferred items (links waiting for targets) may go now.
    if applied > 0 {
        let now = Instant::now();
        for (t, _) in retry.at.values_mut() {
            *t = now;
        }
    }
    if !rescan.is_empty() {
        let _ = shared.rescan.send(rescan);
    }
    let certs = crate::repair::names(shared);
    shared.repairs.touched(&certs, &touched);
    shared.bump_progress();
}

enum FetchError {
    /// The peer broke the protocol (wrong size, wrong hash, too many bytes).
    Hostile(String),
    /// Try another source or later (not found, changed meanwhile, network).
    Retry(String),
    /// Writing here failed (disk full, permissions): reported, retried later.
    Local(String),
}

/// Appends `buf` to the staging file (created on first use), off the async threads.
async fn write_staged(
    file: Option<std::fs::File>,
    dest: &std::path::Path,
    buf: Vec<u8>,
) -> Result<std::fs::File, FetchError> {
    let dest = dest.to_path_buf();
    // Creating files in one staging directory from many threads at once only makes
    // them spin on its lock: two writers at a time are as fast and cost less CPU.
    static WRITERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let _permit = WRITERS
        .acquire()
        .await
        .map_err(|e| FetchError::Local(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = match file {
            Some(f) => f,
            None => std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dest)?,
        };
        f.write_all(&buf)?;
        Ok(f)
    })
    .await
    .map_err(|e| FetchError::Local(e.to_string()))?
    .map_err(|e: std::io::Error| FetchError::Local(e.to_string()))
}

/// Streams one file's content from a peer into `dest`, verifying size and BLAKE3.
async fn fetch(
    conn: &quinn::Connection,
    path: &RelPath,
    hash: ContentHash,
    size: u64,
    dest: &std::path::Path,
) -> Result<(), FetchError> {
    let retry = |e: &dyn std::fmt::Display| FetchError::Retry(e.to_string());
    let stalled = || {
        FetchError::Retry(format!(
            "stalled: less than {} KiB in {WINDOW:?}",
            MIN_PROGRESS >> 10
        ))
    };
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| retry(&e))?;
        let req = pb::Request {
            path: path.as_str().to_string(),
            hash: hash.0.to_vec(),
        };
        wire::write_msg(&mut send, &req)
            .await
            .map_err(|e| retry(&e))?;
        let _ = send.finish();
        let resp: pb::Response = wire::read_msg(&mut recv, MAX_HEADER)
            .await
            .map_err(|e| match e {
                // A lost connection or reset stream is not the peer's fault.
                wire::WireError::Io(_) => retry(&e),
                e => FetchError::Hostile(format!("bad response header: {e}")),
            })?
            .ok_or_else(|| retry(&"stream ended"))?;
        Ok::<_, FetchError>((recv, resp))
    };
    let (mut recv, resp) = tokio::time::timeout(WINDOW, ask)
        .await
        .map_err(|_| retry(&format!("no answer within {WINDOW:?}")))??;
    if resp.status != pb::response::Status::Ok as i32 {
        return Err(retry(&"not found at peer"));
    }
    if resp.size != size {
        return Err(FetchError::Hostile(format!(
            "announced {size} bytes, sends {}",
            resp.size
        )));
    }
    // Gathered and written with one blocking call per WRITE_CHUNK (one for a typical
    // certificate-tree file), not one thread hand-off per network read. No total
    // deadline: every WINDOW must bring MIN_PROGRESS bytes (or the rest), so a big
    // file on a slow link goes on while a trickling source is cut off.
    let mut file = None;
    let cap = (size as usize).min(WRITE_CHUNK);
    let mut pending: Vec<u8> = Vec::with_capacity(cap);
    let mut hasher = blake3::Hasher::new();
    let mut got = 0u64;
    let mut window_end = tokio::time::Instant::now() + WINDOW;
    let mut window_need = MIN_PROGRESS.min(size);
    loop {
        let next = tokio::time::timeout_at(window_end, recv.read_chunk(usize::MAX, true))
            .await
            .map_err(|_| stalled())?;
        match next {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len() as u64;
                got += n;
                if got > size {
                    return Err(FetchError::Hostile(format!("sent more than {size} bytes")));
                }
                pending.extend_from_slice(&chunk.bytes);
                if pending.len() >= WRITE_CHUNK {
                    let full = std::mem::replace(&mut pending, Vec::with_capacity(cap));
                    hasher.update(&full); // whole buffers: BLAKE3's SIMD path
                    file = Some(write_staged(file, dest, full).await?);
                }
                window_need = window_need.saturating_sub(n);
                if window_need == 0 {
                    window_end = tokio::time::Instant::now() + WINDOW;
                    window_need = MIN_PROGRESS.min(size - got);
                }
            }
            Ok(None) => break,
            Err(e) => return Err(retry(&e)),
        }
    }
    if got != size {
        return Err(retry(&format!("stream ended after {got} of {size} bytes")));
    }
    hasher.update(&pending);
    if hasher.finalize().as_bytes() != &hash.0 {
        return Err(FetchError::Hostile(
            "content does not match its BLAKE3 hash".into(),
        ));
    }
    write_staged(file, dest, pending).await?;
    Ok(())
}

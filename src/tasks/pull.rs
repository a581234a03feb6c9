//! The puller's I/O: it runs the [`Pipeline`]'s decisions. Missing content is
//! fetched by hash from a peer that has it (verified with BLAKE3 while it streams into
//! staging) and whatever is ready is applied as one unit, while the next fetches keep
//! running. A slow or hostile source holds up only its own files. Results are
//! recorded in the index and told to the peers. Nothing is ever half-written.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::core::codec::{pb, WireError};
use crate::core::device::DeviceId;
use crate::core::paths::RelPath;
use crate::core::pipeline::{Limits, Outcome, Pipeline, Work};
use crate::core::record::{ContentHash, FileRecord};
use crate::disk::apply::Item;
use crate::handles::sync::SyncHandle;
use crate::net::wire::{self, MAX_HEADER};

/// Received content is written to staging in pieces of about this size.
const WRITE_CHUNK: usize = 4 << 20;
/// A fetch must move at least `MIN_PROGRESS` bytes (or finish) in every `WINDOW`.
const WINDOW: Duration = Duration::from_secs(10);
const MIN_PROGRESS: u64 = 64 << 10;

/// Why a fetch from every source failed.
enum FetchFailure {
    /// Writing here failed (disk full, permissions): an error for the operator.
    Local(String),
    /// The sources did not deliver (gone, changed, network): logged, retried.
    Remote(String),
}

type FetchResult = (Work, Result<PathBuf, FetchFailure>);
type Applied = Vec<(Work, Outcome)>;

/// Runs until shutdown; then lets an apply in progress finish and records it.
pub async fn run(sync: SyncHandle) {
    let mut pipe = Pipeline::new(Limits::DEFAULT);
    let mut stopping = sync.stopping();
    let mut fetches: JoinSet<FetchResult> = JoinSet::new();
    let mut applying: Option<tokio::task::JoinHandle<Applied>> = None;
    loop {
        if *stopping.borrow() {
            fetches.abort_all();
            while let Some(r) = fetches.join_next().await {
                if let Ok((_, Ok(staged))) = r {
                    let _ = std::fs::remove_file(staged);
                }
            }
            for staged in pipe.drain_staged() {
                let _ = std::fs::remove_file(staged);
            }
            if let Some(h) = applying.take() {
                if let Ok(done) = h.await {
                    sync.record_applied(&mut pipe, done);
                }
            }
            return;
        }
        let turn = sync.pull_turn(&mut pipe, applying.is_none(), Instant::now());
        for (w, conns) in turn.fetches {
            fetches.spawn(fetch_work(sync.staging_path(), w, conns));
        }
        if let Some(unit) = turn.apply {
            applying = Some(start_apply(sync.tree(), unit));
        }
        let wake = pipe.next_wake().map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(r) = fetches.join_next(), if !fetches.is_empty() => match r {
                Ok((w, Ok(staged))) => {
                    tracing::trace!(target: crate::clock::STAGE, stage = "fetched", t_us = crate::clock::mono_us());
                    pipe.fetched(w, staged, Instant::now())
                }
                Ok((w, Err(FetchFailure::Local(e)))) => sync.fetch_failed(&mut pipe, w, Some(e)),
                Ok((w, Err(FetchFailure::Remote(e)))) => {
                    tracing::debug!("{e}");
                    sync.fetch_failed(&mut pipe, w, None);
                }
                Err(e) => tracing::error!(error = %e, "fetch task failed"),
            },
            r = async { applying.as_mut().expect("guarded").await }, if applying.is_some() => {
                applying = None;
                match r {
                    Ok(done) => sync.record_applied(&mut pipe, done),
                    Err(e) => {
                        tracing::error!(error = %e, "apply task failed");
                        sync.apply_lost(&mut pipe);
                    }
                }
            }
            _ = sync.pull_requested() => pipe.wake(),
            _ = async { match wake { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => pipe.wake(),
            _ = stopping.changed() => {}
        }
    }
}

async fn fetch_work(
    dest: PathBuf,
    w: Work,
    sources: Vec<(DeviceId, quinn::Connection)>,
) -> FetchResult {
    let path = w.path().clone();
    let (hash, size): (ContentHash, u64) = (w.need.target.hash, w.need.target.size);
    let mut last = String::from("no connected source");
    for (peer, conn) in &sources {
        let result = fetch(conn, &path, hash, size, &dest).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&dest).await;
        }
        match result {
            Ok(()) => return (w, Ok(dest)),
            Err(FetchError::Hostile(why)) => {
                tracing::warn!(peer = %peer, path = %path, why = %why, "peer sent bad content; disconnecting it");
                conn.close(crate::tasks::peer::CLOSE_PROTOCOL.into(), b"bad content");
                last = why;
            }
            Err(FetchError::Retry(why)) => last = why,
            Err(FetchError::Local(why)) => {
                return (
                    w,
                    Err(FetchFailure::Local(format!("staging {path}: {why}"))),
                );
            }
        }
    }
    (
        w,
        Err(FetchFailure::Remote(format!("fetching {path}: {last}"))),
    )
}

/// Applies a unit on a blocking thread; inline content is staged in the same call.
fn start_apply(
    tree: &crate::disk::apply::Tree,
    unit: Vec<Work>,
) -> tokio::task::JoinHandle<Applied> {
    tracing::trace!(n = unit.len(), "apply start");
    tracing::trace!(target: crate::clock::STAGE, stage = "apply_start", t_us = crate::clock::mono_us());
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || {
        tracing::trace!(target: crate::clock::STAGE, stage = "apply_thread", t_us = crate::clock::mono_us());
        let mut ready = Vec::with_capacity(unit.len());
        let mut items = Vec::with_capacity(unit.len());
        let mut failed = Vec::new();
        for mut w in unit {
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
                record: FileRecord::clone(&w.need.target),
                staged: w.staged.take(),
                expect: w.expect,
                conflict: w.need.conflict,
                replaces_author: w.replaces_author,
            });
            ready.push(w);
        }
        tracing::trace!(target: crate::clock::STAGE, stage = "written", t_us = crate::clock::mono_us());
        let batch = tree.apply(&items);
        let count = |f: fn(&Outcome) -> bool| batch.outcomes.iter().filter(|o| f(o)).count();
        crate::telemetry::applied(
            count(|o| matches!(o, Outcome::Applied(_))),
            count(|o| matches!(o, Outcome::Failed(_))),
        );
        crate::telemetry::conflict_kept(batch.conflicts_kept);
        let mut done: Applied = ready.into_iter().zip(batch.outcomes).collect();
        done.extend(failed);
        done
    })
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
/// A small change (`small`) has writers of its own: it never waits behind a bulk
/// transfer's writes.
async fn write_staged(
    file: Option<std::fs::File>,
    dest: &std::path::Path,
    buf: Vec<u8>,
    small: bool,
) -> Result<std::fs::File, FetchError> {
    let dest = dest.to_path_buf();
    // Creating files in one staging directory from many threads at once only makes
    // them spin on its lock: two writers at a time are as fast and cost less CPU.
    static WRITERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    static SMALL_WRITERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let writers = if small { &SMALL_WRITERS } else { &WRITERS };
    let _permit = writers
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
    let small = crate::core::pipeline::is_small_file(path, size);
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
                WireError::Io(_) => retry(&e),
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
                    file = Some(write_staged(file, dest, full, small).await?);
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
    write_staged(file, dest, pending, small).await?;
    Ok(())
}

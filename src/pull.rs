//! The puller: takes the current needs from the plan, fetches missing content by hash
//! from a peer that has it (verified with BLAKE3 while it streams into staging),
//! applies the whole batch as a unit, then records the results in the index and
//! tells the peers. Failures are retried with backoff; nothing is ever half-written.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::apply::{Item, Outcome};
use crate::identity::DeviceId;
use crate::index::{ContentHash, Kind, LocalStat};
use crate::node::Shared;
use crate::paths::RelPath;
use crate::plan::Need;
use crate::wire::{self, pb, MAX_HEADER};

/// Most records per batch.
const BATCH_ITEMS: usize = 4096;
/// Most bytes fetched per batch.
const BATCH_BYTES: u64 = 256 << 20;
/// Concurrent fetches.
const PARALLEL_FETCHES: usize = 32;

struct Work {
    need: Need,
    expect: Option<LocalStat>,
    /// Peers to fetch from, in order; empty when no content is needed.
    sources: Vec<(DeviceId, quinn::Connection)>,
    /// The content, when it came inline with the record.
    inline: Option<Arc<Vec<u8>>>,
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

/// Runs until shutdown.
pub async fn run(shared: Arc<Shared>) {
    let mut retry = Retry::default();
    let mut stopping = shared.stopping.subscribe();
    loop {
        if *stopping.borrow() {
            return;
        }
        let batch = take_batch(&shared, &mut retry);
        if batch.is_empty() {
            let wake = retry.next().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = shared.pull.notified() => {}
                _ = async { match wake { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
                _ = stopping.changed() => {}
            }
            continue;
        }
        run_batch(&shared, batch, &mut retry).await;
    }
}

fn take_batch(shared: &Shared, retry: &mut Retry) -> Vec<Work> {
    let now = Instant::now();
    let mut st = shared.lock();
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let needs: Vec<Need> = st.plan.needs().cloned().collect();
    for need in needs {
        let p = &need.target.path;
        if retry.at.get(p).is_some_and(|(t, _)| *t > now) || st.applying.contains(p) {
            continue;
        }
        let local = st.index.get(p);
        let expect = local.filter(|e| !e.record.deleted).and_then(|e| e.stat);
        let have_content = local.is_some_and(|e| {
            !e.record.deleted && e.record.kind == Kind::File && e.record.hash == need.target.hash
        });
        let mut sources = Vec::new();
        let mut inline = None;
        if need.target.kind == Kind::File && !need.target.deleted && !have_content {
            inline = shared.inline().get(&need.target.hash);
        }
        if need.target.kind == Kind::File
            && !need.target.deleted
            && !have_content
            && inline.is_none()
        {
            for id in st.plan.sources(&need) {
                if let Some(s) = st.peers.get(&id).and_then(|s| s.session.as_ref()) {
                    sources.push((id, s.conn.clone()));
                }
            }
            if sources.is_empty() {
                continue; // no connected peer has it; re-evaluated when one connects
            }
            if bytes > 0 && bytes + need.target.size > BATCH_BYTES {
                continue;
            }
            bytes += need.target.size;
        }
        st.applying.insert(p.clone());
        out.push(Work {
            need,
            expect,
            sources,
            inline,
        });
        if out.len() >= BATCH_ITEMS {
            break;
        }
    }
    // A symlink waits until everything its target still needs is in the same batch.
    let taken: std::collections::HashSet<RelPath> =
        out.iter().map(|w| w.need.target.path.clone()).collect();
    let plan = &st.plan;
    let (keep, wait): (Vec<Work>, Vec<Work>) = out.into_iter().partition(|w| {
        let r = &w.need.target;
        if r.kind != Kind::Symlink || r.deleted {
            return true;
        }
        match r.path.resolve_symlink_target(&r.target) {
            Ok(t) => plan.needs_within(&t).all(|p| taken.contains(p)),
            Err(_) => true,
        }
    });
    for w in wait {
        st.applying.remove(&w.need.target.path);
    }
    keep
}

async fn run_batch(shared: &Arc<Shared>, batch: Vec<Work>, retry: &mut Retry) {
    tracing::trace!(n = batch.len(), "batch start");
    // 1. Fetch what is missing, in parallel.
    let mut staged: Vec<Option<PathBuf>> = vec![None; batch.len()];
    let mut fetch_failed = vec![false; batch.len()];
    let mut set = JoinSet::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL_FETCHES));
    for (i, w) in batch.iter().enumerate() {
        if w.sources.is_empty() {
            continue;
        }
        let dest = shared.tree.staging_path();
        let sources = w.sources.clone();
        let (path, hash, size) = (
            w.need.target.path.clone(),
            w.need.target.hash,
            w.need.target.size,
        );
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let mut last = String::new();
            for (peer, conn) in sources {
                let result = fetch(&conn, &path, hash, size, &dest).await;
                if result.is_err() {
                    let _ = tokio::fs::remove_file(&dest).await;
                }
                match result {
                    Ok(()) => return (i, Ok(dest)),
                    Err(FetchError::Hostile(why)) => {
                        tracing::warn!(peer = %peer, path = %path, why = %why, "peer sent bad content; disconnecting it");
                        conn.close(crate::peer::CLOSE_PROTOCOL.into(), b"bad content");
                        last = why;
                    }
                    Err(FetchError::Retry(why)) => last = why,
                    Err(FetchError::Local(why)) => {
                        return (i, Err((true, format!("staging {path}: {why}"))));
                    }
                }
            }
            (i, Err((false, format!("fetching {path}: {last}"))))
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok((i, Ok(dest))) => staged[i] = Some(dest),
            Ok((i, Err((local, e)))) => {
                if local {
                    shared.lock().error(e);
                } else {
                    tracing::debug!("{e}");
                }
                fetch_failed[i] = true;
            }
            Err(e) => tracing::error!(error = %e, "fetch task failed"),
        }
    }
    // 2. Apply everything that is ready, as one unit.
    tracing::trace!("fetched");
    let mut items = Vec::new();
    let mut inline = Vec::new();
    for (i, w) in batch.iter().enumerate() {
        if fetch_failed[i] || (!w.sources.is_empty() && staged[i].is_none()) {
            continue;
        }
        items.push(Item {
            record: w.need.target.clone(),
            staged: staged[i].take(),
            expect: w.expect,
            conflict: w.need.conflict,
        });
        inline.push(w.inline.clone());
    }
    let tree = shared.tree.clone();
    let (items, outcomes) = tokio::task::spawn_blocking(move || {
        // Inline content is staged here, in the same blocking call as the apply.
        let mut ready = Vec::with_capacity(items.len());
        let mut failed = Vec::new();
        for (mut item, data) in items.into_iter().zip(inline) {
            if let Some(d) = data {
                match tree.stage_bytes(&d) {
                    Ok(p) => item.staged = Some(p),
                    Err(e) => {
                        failed.push((item, Outcome::Failed(format!("staging: {e}"))));
                        continue;
                    }
                }
            }
            ready.push(item);
        }
        let mut o = tree.apply(&ready);
        for (item, outcome) in failed {
            ready.push(item);
            o.push(outcome);
        }
        (ready, o)
    })
    .await
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, "apply task failed");
        (Vec::new(), Vec::new())
    });
    // 3. Record results.
    tracing::trace!("applied to disk");
    let mut rescan = Vec::new();
    let mut applied = 0usize;
    {
        let mut st = shared.lock();
        let since = st.index.sequence();
        for (item, outcome) in items.into_iter().zip(outcomes) {
            let p = item.record.path.clone();
            match outcome {
                Outcome::Applied(stat) => {
                    retry.at.remove(&p);
                    applied += 1;
                    tracing::debug!(path = %p, deleted = item.record.deleted, "applied");
                    st.index.put(item.record, stat);
                    let crate::node::State { plan, index, .. } = &mut *st;
                    plan.evaluate(&p, index);
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
        for (i, w) in batch.iter().enumerate() {
            if fetch_failed[i] {
                retry.later(&w.need.target.path);
            }
            st.applying.remove(&w.need.target.path);
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

/// Streams one file's content from a peer into `dest`, verifying size and BLAKE3.
async fn fetch(
    conn: &quinn::Connection,
    path: &RelPath,
    hash: ContentHash,
    size: u64,
    dest: &std::path::Path,
) -> Result<(), FetchError> {
    let retry = |e: &dyn std::fmt::Display| FetchError::Retry(e.to_string());
    let deadline = Duration::from_secs(30) + Duration::from_millis(size / 1000); // ≥ 1 MB/s
    let work = async {
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
            .map_err(|e| FetchError::Hostile(format!("bad response header: {e}")))?
            .ok_or_else(|| retry(&"stream ended"))?;
        if resp.status != pb::response::Status::Ok as i32 {
            return Err(retry(&"not found at peer"));
        }
        if resp.size != size {
            return Err(FetchError::Hostile(format!(
                "announced {size} bytes, sends {}",
                resp.size
            )));
        }
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .await
            .map_err(|e| FetchError::Local(e.to_string()))?;
        let mut hasher = blake3::Hasher::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    got += n as u64;
                    if got > size {
                        return Err(FetchError::Hostile(format!("sent more than {size} bytes")));
                    }
                    hasher.update(&buf[..n]);
                    f.write_all(&buf[..n])
                        .await
                        .map_err(|e| FetchError::Local(e.to_string()))?;
                }
                Ok(None) => break,
                Err(e) => return Err(retry(&e)),
            }
        }
        if got != size {
            return Err(retry(&format!("stream ended after {got} of {size} bytes")));
        }
        if hasher.finalize().as_bytes() != &hash.0 {
            return Err(FetchError::Hostile(
                "content does not match its BLAKE3 hash".into(),
            ));
        }
        f.flush()
            .await
            .map_err(|e| FetchError::Local(e.to_string()))?;
        Ok(())
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Retry(format!("timed out after {deadline:?}"))),
    }
}

//! One connection with a peer: hello, duplicate resolution, then three loops — send
//! what the engine's `poll_transmit` says (full index, increments, acks), adding
//! inline content from the cache; feed what arrives to `handle_index` / `handle_ack`;
//! serve content requests on the bidirectional streams they open. A peer that sends
//! anything invalid (on the wire or by the engine's rules) is disconnected and
//! logged; the rest of the node is unaffected.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::core::cluster::ClusterMsg;
use crate::core::engine::{EngineError, IndexSend, SendToken};
use crate::identity::DeviceId;
use crate::index::Kind;
use crate::node::{Session, Shared};
use crate::paths::RelPath;
use crate::plan::PlanEvent;
use crate::wire::cluster::{confirm_from_wire, confirm_to_wire, report_from_wire, report_to_wire};
use crate::wire::{
    self, pb, record_from_wire, record_to_wire, WireError, INDEX_BATCH, MAX_FRAME, MAX_HEADER,
};

/// Close codes.
pub const CLOSE_DUPLICATE: u32 = 1;
pub const CLOSE_PROTOCOL: u32 = 3;
pub use crate::core::engine::MAX_PEER_RECORDS;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent content requests served per connection.
const MAX_SERVING: usize = 64;
/// A served file is read in pieces of at most this size.
const READ_CHUNK: usize = 1 << 20;

/// Runs a session on an established connection.
pub async fn run_session(shared: Arc<Shared>, conn: quinn::Connection, dialed_by_me: bool) {
    run_session_with_ready(shared, conn, dialed_by_me, None).await
}

/// As `run_session`; `ready` fires once the session is registered or refused.
pub async fn run_session_with_ready(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    dialed_by_me: bool,
    ready: Option<oneshot::Sender<()>>,
) {
    let Some(peer) = crate::transport::peer_device(&conn) else {
        conn.close(CLOSE_PROTOCOL.into(), b"no certificate");
        return;
    };
    let remote = conn.remote_address();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, exchange_hello(&shared, &conn)).await;
    let (send, recv, hello) = match hello {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, %remote, error = %e, "hello failed");
            conn.close(CLOSE_PROTOCOL.into(), b"hello failed");
            return;
        }
        Err(_) => {
            tracing::warn!(peer = %peer, %remote, "no hello within 10s, closing");
            conn.close(CLOSE_PROTOCOL.into(), b"hello timeout");
            return;
        }
    };
    let session = Session {
        id: shared.next_session_id(),
        instance: hello.instance,
        dialed_by_me,
        conn: conn.clone(),
    };
    let Some(token) = register(&shared, peer, &session, hello.relays_confirm) else {
        conn.close(CLOSE_DUPLICATE.into(), b"duplicate connection");
        if let Some(r) = ready {
            let _ = r.send(());
        }
        return;
    };
    if let Some(r) = ready {
        let _ = r.send(());
    }
    tracing::info!(peer = %peer, name = %hello.name, %remote, dialed_by_me, "peer connected");
    let sender = tokio::spawn(send_loop(shared.clone(), peer, token, send));
    let server = tokio::spawn(serve_requests(shared.clone(), conn.clone()));
    let result = tokio::select! {
        r = recv_loop(&shared, peer, recv) => r,
        r = sender_result(sender) => r,
    };
    server.abort();
    match result {
        Ok(()) => tracing::info!(peer = %peer, "peer disconnected"),
        Err(e) => {
            let reason = conn.close_reason();
            if reason.is_none() {
                shared
                    .lock()
                    .error(format!("peer {peer} ({remote}): {e}; disconnecting"));
                conn.close(CLOSE_PROTOCOL.into(), b"protocol violation");
            } else {
                tracing::info!(peer = %peer, reason = ?reason, "peer connection closed");
            }
        }
    }
    unregister(&shared, peer, session.id);
}

async fn sender_result(h: tokio::task::JoinHandle<Result<(), WireError>>) -> Result<(), WireError> {
    match h.await {
        Ok(r) => r,
        Err(e) => Err(WireError::Io(std::io::Error::other(e.to_string()))),
    }
}

async fn exchange_hello(
    shared: &Shared,
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream, pb::Hello), WireError> {
    let mut send = conn.open_uni().await.map_err(io)?;
    let name = shared
        .config
        .lock()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let hello = pb::Frame {
        body: Some(pb::frame::Body::Hello(pb::Hello {
            name,
            instance: shared.instance,
            version: env!("CARGO_PKG_VERSION").into(),
            relays_confirm: true,
        })),
    };
    wire::write_msg(&mut send, &hello).await?;
    let mut recv = conn.accept_uni().await.map_err(io)?;
    match wire::read_msg::<_, pb::Frame>(&mut recv, MAX_HEADER).await? {
        Some(pb::Frame {
            body: Some(pb::frame::Body::Hello(h)),
        }) => Ok((send, recv, h)),
        _ => Err(WireError::Invalid {
            what: "hello",
            why: "first message is not a hello".into(),
        }),
    }
}

fn io(e: impl std::fmt::Display) -> WireError {
    WireError::Io(std::io::Error::other(e.to_string()))
}

/// Registers a session, resolving duplicates the same way on both sides: a restarted
/// peer (new instance) replaces the old session; between two live sessions of the
/// same instance, the one dialled by the lower device ID stays. Returns the new
/// session's send token, `None` when it is refused.
fn register(
    shared: &Shared,
    peer: DeviceId,
    session: &Session,
    relays_confirm: bool,
) -> Option<SendToken> {
    let me = shared.me();
    let mut st = shared.lock();
    let crate::node::State { peers, engine, .. } = &mut *st;
    let slot = peers.get_mut(&peer)?;
    if let Some(existing) = &slot.session {
        let preferred = |s: &Session| s.dialed_by_me == (me < peer);
        let existing_alive = existing.conn.close_reason().is_none();
        if existing_alive
            && existing.instance == session.instance
            && (preferred(existing) || !preferred(session))
        {
            return None;
        }
        existing.conn.close(CLOSE_DUPLICATE.into(), b"replaced");
        crate::metrics::session_ended(&slot.config.name, &existing.conn);
    }
    slot.session = Some(session.clone());
    slot.last_error = None;
    let token = engine.connected(peer);
    if relays_confirm {
        engine.peer_relays(peer);
    }
    Some(token)
}

fn unregister(shared: &Shared, peer: DeviceId, session_id: u64) {
    let mut st = shared.lock();
    let crate::node::State { peers, engine, .. } = &mut *st;
    if let Some(slot) = peers.get_mut(&peer) {
        if slot.session.as_ref().is_some_and(|s| s.id == session_id) {
            if let Some(s) = slot.session.take() {
                crate::metrics::session_ended(&slot.config.name, &s.conn);
            }
            engine.disconnected(peer);
            slot.gone.notify_waiters();
        }
    }
    drop(st);
    shared.bump_progress();
}

fn index_frame(
    files: Vec<pb::FileInfo>,
    last_sequence: u64,
    full: bool,
    full_done: bool,
) -> pb::Frame {
    pb::Frame {
        body: Some(pb::frame::Body::Index(pb::IndexUpdate {
            files,
            last_sequence,
            full,
            full_done,
        })),
    }
}

/// Most encoded bytes of records per index frame (well under `MAX_FRAME`).
const FRAME_BYTES: usize = 2 << 20;

/// Sends records in frames bounded in count and bytes; the last one of a full index
/// says so.
async fn send_records(
    send: &mut quinn::SendStream,
    files: Vec<pb::FileInfo>,
    upto: u64,
    full: bool,
) -> Result<(), WireError> {
    use prost::Message;
    let mut batch = Vec::new();
    let mut bytes = 0;
    let total = files.len();
    for (i, f) in files.into_iter().enumerate() {
        bytes += f.encoded_len() + 8;
        batch.push(f);
        let last = i + 1 == total;
        if last || batch.len() >= INDEX_BATCH || bytes >= FRAME_BYTES {
            let frame = index_frame(std::mem::take(&mut batch), upto, full, full && last);
            wire::write_msg(send, &frame).await?;
            bytes = 0;
        }
    }
    if total == 0 {
        wire::write_msg(send, &index_frame(Vec::new(), upto, full, full)).await?;
    }
    Ok(())
}

/// Sends what the engine says to send: the full index, then increments and acks as
/// they happen. Ends when the session's send state is gone (replaced or ended).
async fn send_loop(
    shared: Arc<Shared>,
    peer: DeviceId,
    token: SendToken,
    mut send: quinn::SendStream,
) -> Result<(), WireError> {
    let mut changed = shared.changed.subscribe();
    let mut progress = shared.progress.subscribe();
    loop {
        changed.borrow_and_update();
        progress.borrow_and_update();
        let transmit = {
            let mut st = shared.lock();
            if !st.engine.is_current(&peer, token) {
                return Ok(());
            }
            st.engine.poll_transmit(peer, token)
        };
        if let Some(t) = transmit {
            if let Some(ix) = t.index {
                let (full, upto) = (ix.full, ix.upto);
                let files = to_frames(&shared, ix);
                send_records(&mut send, files, upto, full).await?;
                tracing::trace!(peer = %peer, upto, full, "sent index");
            }
            if let Some(ack) = t.ack {
                let f = pb::Frame {
                    body: Some(pb::frame::Body::Ack(pb::Ack { sequence: ack })),
                };
                wire::write_msg(&mut send, &f).await?;
            }
            for m in t.cluster {
                let body = match m {
                    ClusterMsg::Confirm(c) => pb::frame::Body::Confirm(confirm_to_wire(&c)),
                    ClusterMsg::Report(r) => pb::frame::Body::Report(report_to_wire(&r)),
                };
                wire::write_msg(&mut send, &pb::Frame { body: Some(body) }).await?;
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Ok(()) },
            r = progress.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// Our records as wire records. In increments, small content the peer does not
/// already have goes inline when the cache holds it; the full index goes without.
fn to_frames(shared: &Shared, ix: IndexSend) -> Vec<pb::FileInfo> {
    let cache = shared.inline();
    ix.records
        .into_iter()
        .map(|o| {
            let mut f = record_to_wire(&o.record, o.sequence);
            if o.send_inline {
                if let Some(d) = cache.get(&o.record.hash) {
                    f.data = d.as_ref().clone();
                }
            }
            f
        })
        .collect()
}

/// Reads the peer's index and acks; anything invalid ends the session.
async fn recv_loop(
    shared: &Shared,
    peer: DeviceId,
    mut recv: quinn::RecvStream,
) -> Result<(), WireError> {
    loop {
        let Some(frame) = wire::read_msg::<_, pb::Frame>(&mut recv, MAX_FRAME).await? else {
            return Ok(());
        };
        match frame.body {
            Some(pb::frame::Body::Index(ix)) => {
                tracing::trace!(peer = %peer, n = ix.files.len(), "received index");
                wire::check_last_sequence(ix.last_sequence)?;
                let now = wire::now_us();
                let mut records = Vec::with_capacity(ix.files.len());
                for mut f in ix.files {
                    let data = std::mem::take(&mut f.data);
                    let (r, seq) = record_from_wire(f, now)?;
                    if !data.is_empty() {
                        wire::check_inline(&r, &data)?;
                        shared.inline().insert(r.hash, Arc::new(data));
                    }
                    records.push((r, seq));
                }
                {
                    let mut st = shared.lock();
                    st.engine
                        .handle_index(peer, records, ix.last_sequence)
                        .map_err(refused)?;
                    report_plan_events(&mut st, peer);
                }
                shared.pull.notify_one();
                shared.bump_progress();
            }
            Some(pb::frame::Body::Ack(a)) => {
                shared.lock().acked(peer, a.sequence).map_err(refused)?;
                shared.bump_progress();
            }
            Some(pb::frame::Body::Confirm(c)) => {
                let c = confirm_from_wire(c)?;
                tracing::trace!(peer = %peer, id = c.id, path = %c.path, "barrier request");
                let now = crate::node::now_ns();
                shared.lock().engine.handle_confirm(peer, c, now);
                shared.bump_progress();
            }
            Some(pb::frame::Body::Report(r)) => {
                let r = report_from_wire(r)?;
                shared.lock().engine.handle_report(peer, r);
                shared.bump_progress();
            }
            Some(pb::frame::Body::Hello(_)) | None => {
                return Err(WireError::Invalid {
                    what: "frame",
                    why: "unexpected or empty frame".into(),
                })
            }
        }
    }
}

/// A rule the engine enforces, as the wire error that ends the session.
fn refused(e: EngineError) -> WireError {
    WireError::Invalid {
        what: e.what(),
        why: e.to_string(),
    }
}

/// Logs what the plan decided about a peer's records: each file too large once per
/// content, a full index once.
fn report_plan_events(st: &mut crate::node::State, peer: DeviceId) {
    for e in st.engine.take_events() {
        match e {
            PlanEvent::TooLarge { path, size, max } => tracing::warn!(
                peer = %peer, path = %path, size, max_file_size = max,
                "file larger than max_file_size: not fetched (acknowledged as refused)"
            ),
            PlanEvent::NotAuthorized {
                path,
                author,
                why,
                count,
            } => {
                let author = author.map_or_else(|| "nobody".to_string(), |a| a.to_string());
                st.error(format!(
                    "peer {} sent {count} record(s) not taken in for their authorship \
                     (first: {path}, claiming {author}: {why})",
                    st.peers.get(&peer).map_or_else(
                        || peer.to_string(),
                        |s| format!("{} ({peer})", s.config.name)
                    )
                ));
            }
            PlanEvent::IndexFull { path } => st.error(format!(
                "the index holds {} records: new paths from peers are not taken in \
                 (first: {path} from {peer})",
                crate::index::MAX_INDEX_RECORDS
            )),
        }
    }
}

/// Serves content requests on the bidirectional streams the peer opens.
async fn serve_requests(shared: Arc<Shared>, conn: quinn::Connection) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_SERVING));
    while let Ok((send, recv)) = conn.accept_bi().await {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(&shared, send, recv).await {
                tracing::debug!(error = %e, "serving a request failed");
            }
            drop(permit);
        });
    }
}

async fn serve_one(
    shared: &Shared,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), WireError> {
    let req: pb::Request =
        tokio::time::timeout(HELLO_TIMEOUT, wire::read_msg(&mut recv, MAX_HEADER))
            .await
            .map_err(|_| io("request timeout"))??
            .ok_or_else(|| io("empty request"))?;
    let path = RelPath::parse_shared(&req.path)?;
    let size = {
        let st = shared.lock();
        st.engine
            .index()
            .get(&path)
            .filter(|e| {
                !e.record.deleted
                    && e.record.kind == Kind::File
                    && e.record.hash.0.as_slice() == req.hash.as_slice()
            })
            .map(|e| e.record.size)
    };
    let file = match size {
        Some(_) => {
            let p = path.under(&shared.tree.root);
            tokio::task::spawn_blocking(move || std::fs::File::open(p).ok())
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    let (Some(size), Some(mut file)) = (size, file) else {
        let resp = pb::Response {
            status: pb::response::Status::NotFound as i32,
            size: 0,
        };
        wire::write_msg(&mut send, &resp).await?;
        let _ = send.finish();
        return Ok(());
    };
    wire::write_msg(
        &mut send,
        &pb::Response {
            status: pb::response::Status::Ok as i32,
            size,
        },
    )
    .await?;
    // Hash while sending: if the file changed under us, reset instead of finishing,
    // so the requester retries rather than taking us for a liar. Read in pieces of
    // READ_CHUNK with one blocking call each; quinn takes the buffers without a copy.
    let mut hasher = blake3::Hasher::new();
    let mut left = size;
    while left > 0 {
        let want = READ_CHUNK.min(left as usize);
        let (f, buf) = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = vec![0u8; want];
            let mut n = 0;
            while n < want {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(n);
            Ok((file, buf))
        })
        .await
        .map_err(|e| io(e.to_string()))??;
        file = f;
        if buf.is_empty() {
            break;
        }
        hasher.update(&buf);
        left -= buf.len() as u64;
        send.write_chunk(bytes::Bytes::from(buf))
            .await
            .map_err(io)?;
    }
    if left != 0 || hasher.finalize().as_bytes().as_slice() != req.hash.as_slice() {
        let _ = send.reset(quinn::VarInt::from_u32(1));
        return Ok(());
    }
    let _ = send.finish();
    Ok(())
}

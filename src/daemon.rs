//! The daemon's wiring: loads identity, index and tree, builds the shared state,
//! starts every task (watcher, puller, persister, QUIC accept + one dialler per peer,
//! control socket, metrics, ACME, hooks, dhparam, repairs) and stops them on
//! shutdown. The only module that imports every feature; the features take the
//! shared state (`node`) and never import this one.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::{mpsc, watch, Notify};

use crate::acme::handle::AcmeSlot;
use crate::clock::now_ns;
use crate::config::{peer::PeerConfig, Config};
use crate::core::device::DeviceId;
use crate::core::engine::Engine;
use crate::core::index::Index;
use crate::disk::apply::Tree;
use crate::disk::store::{Store, StoreFile};
use crate::handles::sync::SyncHandle;
use crate::handles::{Mesh, Reports, Settings, TreeWriter};
use crate::identity::Identity;
use crate::net::transport::{Allowed, Transport};
use crate::node::{PeerSlot, PersistMsg, Shared, State};
use crate::ops::observe::StatusSource;

/// A handshake on the backnet takes milliseconds; one that has not completed by then
/// went to a peer that was not listening yet: try again rather than wait.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping node waits at most for its peers' CONNECTION_CLOSE packets to
/// go out (DESIGN §6: an idle node stops in ≤ 100 ms).
const CLOSE_LINGER: Duration = Duration::from_millis(30);

/// Writes the index file on its own thread, in the order commits were made, with
/// one fdatasync per run of commits; then marks them durable in the engine and wakes
/// the senders. A slow disk holds up announcements, never the state lock.
fn persister(shared: Arc<Shared>, mut file: StoreFile, rx: std::sync::mpsc::Receiver<PersistMsg>) {
    while let Ok(first) = rx.recv() {
        let mut upto = None;
        let mut writes = Vec::new();
        let mut stop = false;
        for m in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match m {
                PersistMsg::Write(seq, p) => {
                    upto = Some(upto.unwrap_or(0).max(seq));
                    writes.push(p);
                }
                PersistMsg::Stop => stop = true,
            }
        }
        let written = file.write(writes);
        if let Some(seq) = upto {
            tracing::trace!(target: crate::clock::STAGE, stage = "persisted", t_us = crate::clock::mono_us());
            let mut st = shared.lock();
            if let Err(e) = written {
                // Reported, and the change still goes out
                // (the tree holds it; a restart rescans).
                st.error(format!("writing the index: {e}"));
            }
            st.engine.persisted(seq);
            drop(st);
            shared.changed.send_replace(seq);
        }
        if stop {
            return;
        }
    }
}

/// The bounds on kept versions: `[tree] kept_max_size` bytes, and as many versions
/// as the default allows.
fn kept_budget(config: &Config) -> crate::disk::keep::Budget {
    crate::disk::keep::Budget {
        max_bytes: config.kept_max_size,
        ..crate::disk::keep::Budget::default()
    }
}

/// Runs the daemon until `shutdown` resolves; in-flight writes finish first.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tune_allocator();
    let opened = open(&config)?;
    let running = spawn(&config, opened).await?;
    shutdown.await;
    stop(&config, running).await;
    Ok(())
}

/// What `open` takes from the state dir and the tree before anything runs.
struct Opened {
    /// Held until the daemon has stopped: one daemon per state dir.
    lock: crate::disk::lock::StateLock,
    /// `[http] listen`, from systemd or bound by `open`.
    http: Option<std::net::TcpListener>,
    identity: Arc<Identity>,
    tree: Tree,
    index: Index,
    store: Store,
    /// What was wrong with the index file, shown in `status` from the start.
    errors: crate::telemetry::RecentErrors,
}

/// The running daemon: what `stop` stops, in its order.
struct Running {
    lock: crate::disk::lock::StateLock,
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    watcher: crate::tasks::watch::Watch,
    puller: tokio::task::JoinHandle<()>,
    persist_thread: std::thread::JoinHandle<()>,
    control: tokio::task::JoinHandle<()>,
    /// Every other task: aborted, then awaited.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The state dir lock, the `[http]` port, the identity, the checks against them, the
/// tree and the index, in that order.
fn open(config: &Config) -> anyhow::Result<Opened> {
    // First, one daemon per state dir: a second `run` of a live node stops here,
    // naming the holder's pid (it would otherwise fail on the port below with a
    // less telling error), before anything in the state dir is read or written.
    let lock = crate::disk::lock::StateLock::acquire(&config.state_dir)?;
    // Then, before any slow start-up work, the `[http] listen` port: from systemd
    // socket activation or bound now, so no other local user can take it while we
    // start.
    let http = crate::net::activation::http_listener(config.http_listen)?;
    let identity = Arc::new(Identity::load(&config.state_dir)?);
    config.check_not_own_peer(identity.id)?;
    config.check_tree_exists()?;
    let mut tree = Tree::new(config.tree.clone());
    tree.kept = kept_budget(config);
    tree.prepare()
        .with_context(|| format!("preparing tree {}", config.tree.display()))?;
    let (index, store, errors) = open_index(config, &identity)?;
    Ok(Opened {
        lock,
        http,
        identity,
        tree,
        index,
        store,
        errors,
    })
}

/// Loads the index file; what was damaged or refused in it becomes a recent error.
fn open_index(
    config: &Config,
    identity: &Identity,
) -> anyhow::Result<(Index, Store, crate::telemetry::RecentErrors)> {
    let mut index = Index::new(identity.id.short());
    let (store, report) = Store::open(&config.state_dir, &mut index)
        .with_context(|| format!("opening the index in {}", config.state_dir.display()))?;
    let mut errors = crate::telemetry::RecentErrors::default();
    let started_unix = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or(i64::MAX);
    if let Some(why) = &report.damaged {
        let msg = format!(
            "index file was damaged ({why}); kept {} entries, rebuilding the rest from a rescan and the peers",
            report.entries
        );
        tracing::warn!("{msg}");
        errors.push(started_unix, msg);
    }
    if report.skipped_count > 0 {
        let msg = format!(
            "index file: skipped {} entries that were intact but not acceptable (first: {})",
            report.skipped_count,
            report.skipped.first().map_or("", String::as_str)
        );
        tracing::warn!("{msg}");
        errors.push(started_unix, msg);
    }
    tracing::info!(node = %config.name, id = %identity.id, entries = report.entries, "index loaded");
    Ok((index, store, errors))
}

/// The QUIC endpoint, the shared state and the persister, then the watcher's first
/// scan and the puller, then every other task.
async fn spawn(config: &Config, opened: Opened) -> anyhow::Result<Running> {
    let Opened {
        lock,
        http,
        identity,
        tree,
        index,
        store,
        errors,
    } = opened;
    // The config channel is the one peer registry: the transport's allow-list asks it
    // at every handshake, the peer slots and the engine's roster follow it (reload).
    let (config_tx, registry) = watch::channel(Arc::new(config.clone()));
    let allowed: Allowed =
        Arc::new(move |id: &DeviceId| registry.borrow().peers.iter().any(|p| p.id == *id));
    let transport = Arc::new(Transport::bind(identity.clone(), config.listen, allowed)?);
    let (rescan_tx, rescan_rx) = mpsc::unbounded_channel();
    let (journal, store_file) = store.split();
    let (persist_tx, persist_rx) = std::sync::mpsc::channel();
    let parts = Parts {
        identity,
        tree,
        index,
        journal,
        errors,
    };
    let shared = share(config, config_tx, parts, rescan_tx, persist_tx)?;
    let persist_thread = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("certmesh-persist".into())
            .spawn(move || persister(s, store_file, persist_rx))?
    };

    // Watch first, then scan: nothing changed in between is missed.
    let sync = SyncHandle::new(&shared);
    let watcher = crate::tasks::watch::start(sync.clone(), rescan_rx)?;
    watcher.full_rescan(&sync).await;
    let puller = tokio::spawn(crate::tasks::pull::run(sync.clone()));
    // The tree's certificate entries join the config's before anything reads them.
    let mut entries = crate::certs::Cache::default();
    crate::certs::load(&Settings::new(&shared), &shared.tree.root, &mut entries);
    release_freed_memory();
    // One status source: the control socket, /metrics and systemd share its cache.
    let acme = AcmeSlot::default();
    let status = StatusSource::new(crate::handles::Observer::new(&shared), acme.clone());
    let (control, mut tasks) = spawn_features(config, &shared, http, &status, &acme, entries)?;
    tasks.extend(spawn_sync(
        config, &shared, &transport, &sync, &watcher, &status,
    ));
    Ok(Running {
        lock,
        shared,
        transport,
        watcher,
        puller,
        persist_thread,
        control,
        tasks,
    })
}

/// What `open` read that the shared state holds.
struct Parts {
    identity: Arc<Identity>,
    tree: Tree,
    index: Index,
    journal: crate::disk::store::Journal,
    errors: crate::telemetry::RecentErrors,
}

/// The shared state: the engine over the index (signing what this node authors,
/// taking in only what `writers` allows), the peer slots and the channels.
fn share(
    config: &Config,
    config_tx: watch::Sender<Arc<Config>>,
    parts: Parts,
    rescan: mpsc::UnboundedSender<Vec<crate::core::paths::RelPath>>,
    persist: std::sync::mpsc::Sender<PersistMsg>,
) -> anyhow::Result<Arc<Shared>> {
    let Parts {
        identity,
        tree,
        index,
        journal,
        errors,
    } = parts;
    let peers = config
        .peers
        .iter()
        .map(|p| (p.id, new_slot(p.clone())))
        .collect();
    let (changed, _) = watch::channel(index.sequence());
    let signer = Arc::new(identity.signer()?);
    let writers = crate::writers::policy(config, identity.id)?;
    let checker = writers.clone();
    let mut engine = Engine::new(index, config.max_file_size)
        .with_budget(config.budget)
        .with_retention(config.tombstone_retention)
        .with_authorship(Some(signer), writers, now_ns());
    engine.track_durability();
    engine.set_roster(identity.id, config.name.clone(), roster(&config.peers));
    Ok(Arc::new(Shared {
        config: config_tx,
        identity,
        tree,
        state: Mutex::new(State {
            engine,
            journal,
            peers,
            errors,
        }),
        changed,
        progress: watch::channel(0).0,
        pull: Notify::new(),
        rescan,
        started: Instant::now(),
        instance: rand::random(),
        session_ids: AtomicU64::new(1),
        scans: AtomicU64::new(0),
        stopping: watch::channel(false).0,
        inline: Mutex::new(Default::default()),
        hook_failures: AtomicU64::new(0),
        repairs: Default::default(),
        probes: Default::default(),
        persist: Mutex::new(persist),
        writers: Mutex::new(checker),
    }))
}

/// The features over the shared state: metrics, the control socket (returned apart:
/// it stops before the rest), certificates from the tree, ACME, hooks, probes,
/// dhparam and repairs.
fn spawn_features(
    config: &Config,
    shared: &Arc<Shared>,
    http: Option<std::net::TcpListener>,
    status: &StatusSource,
    acme: &AcmeSlot,
    entries: crate::certs::Cache,
) -> anyhow::Result<(
    tokio::task::JoinHandle<()>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    tasks.extend(crate::ops::metrics::start(
        crate::handles::Settings::new(shared),
        status.clone(),
    )?);
    let control = crate::ops::control::start(
        crate::ops::control::ControlHandles {
            status: status.clone(),
            acme: acme.clone(),
            barrier: crate::handles::acme::Barrier::new(shared),
        },
        &config.control_socket(),
    )?;
    tasks.push(tokio::spawn(crate::certs::follow(
        crate::handles::Changes::new(shared),
        Settings::new(shared),
        Reports::new(shared),
        entries,
    )));
    tasks.extend(crate::acme::start(
        &crate::acme::acme_handles(shared, acme.clone()),
        http,
    )?);
    tasks.extend(crate::ops::hooks::start(crate::ops::hooks::Hooks {
        changes: crate::handles::Changes::new(shared),
        settings: crate::handles::Settings::new(shared),
        reports: crate::handles::Reports::new(shared),
        probes: Some(shared.probes.clone()),
    }));
    tasks.push(crate::probe::start(crate::probe::ProbeHandles {
        settings: Settings::new(shared),
        reports: Reports::new(shared),
        served: crate::handles::served::ServedReports::new(shared),
        acme: acme.clone(),
    }));
    tasks.extend(crate::dhparam::start(
        &Settings::new(shared),
        Mesh::new(shared),
        TreeWriter::new(shared),
        Reports::new(shared),
    ));
    if let Err(e) = crate::disk::keep::prune_all(&shared.tree.root, now_ns(), shared.tree.kept) {
        tracing::warn!(error = %e, "pruning kept versions");
    }
    tasks.push(crate::repair::start(crate::repair::RepairHandles {
        settings: Settings::new(shared),
        mesh: Mesh::new(shared),
        writer: TreeWriter::new(shared),
        reports: Reports::new(shared),
    }));
    Ok((control, tasks))
}

/// The sync tasks: accepting peers, dialling them and reloading the list on SIGHUP,
/// the periodic rescan, tombstone collection and the disk measure; then READY=1.
fn spawn_sync(
    config: &Config,
    shared: &Arc<Shared>,
    transport: &Arc<Transport>,
    sync: &SyncHandle,
    watcher: &crate::tasks::watch::Watch,
    status: &StatusSource,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(accept_loop(shared.clone(), transport.clone()))];
    // Installed before READY=1: a `systemctl reload` right after start must not kill us.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    tasks.push(tokio::spawn(peers_and_reloads(
        shared.clone(),
        transport.clone(),
        config.peers.iter().map(|p| p.id).collect(),
        hup,
        status.clone(),
    )));
    tasks.push(tokio::spawn(periodic_rescan(
        Settings::new(shared),
        sync.clone(),
        watcher.clone(),
    )));
    tasks.push(tokio::spawn(collect_tombstones(shared.clone())));
    tasks.push(tokio::spawn(measure_disk(sync.clone())));
    tracing::info!(listen = %config.listen, tree = %config.tree.display(), peers = config.peers.len(), "certmesh running");
    tasks.extend(crate::ops::systemd::ready(status));
    // Fill the certificates' cache now, not in the first `status` or scrape.
    let warm = status.clone();
    tasks.push(tokio::spawn(async move {
        let _ = tokio::task::spawn_blocking(move || warm.status()).await;
    }));
    tasks
}

/// Stops in this order: the puller finishes its writes, the persister writes what
/// was committed, connections close, the control socket and every task stop, and
/// the state dir lock goes last.
async fn stop(config: &Config, running: Running) {
    let Running {
        lock,
        shared,
        transport,
        watcher,
        puller,
        persist_thread,
        control,
        tasks,
    } = running;
    crate::ops::systemd::stopping();
    tracing::info!("shutting down: finishing in-flight writes");
    shared.stopping.send_replace(true);
    shared.pull.notify_one();
    // Its inotify teardown (~20 ms in the kernel) runs beside the rest of the stop.
    watcher.stop();
    let _ = tokio::time::timeout(Duration::from_secs(30), puller).await;
    // What the last apply and scan committed reaches the disk before we exit.
    if let Ok(tx) = shared.persist.lock() {
        let _ = tx.send(PersistMsg::Stop);
    }
    let _ = tokio::task::spawn_blocking(move || persist_thread.join()).await;
    let sessions = shared
        .lock()
        .peers
        .values()
        .filter_map(|s| Some(s.session.as_ref()?.conn.clone()))
        .collect();
    let closing = crate::net::transport::Closing::start(&transport.endpoint, sessions);
    control.abort();
    tasks.iter().for_each(|t| t.abort());
    let _ = tokio::time::timeout(Duration::from_secs(2), futures_join(tasks)).await;
    let _ = std::fs::remove_file(config.control_socket());
    closing.sent(CLOSE_LINGER).await;
    tracing::info!("stopped");
    drop(shared);
    drop(transport);
    drop(lock);
}

fn new_slot(config: PeerConfig) -> PeerSlot {
    PeerSlot {
        config,
        session: None,
        gone: Arc::new(Notify::new()),
        last_error: None,
        last_sync: None,
        penalty: None,
    }
}

/// The configured peers, as cluster-wide barriers name them.
fn roster(peers: &[PeerConfig]) -> Vec<crate::core::cluster::Member> {
    peers
        .iter()
        .map(|p| crate::core::cluster::Member {
            device: p.id,
            name: p.name.clone(),
        })
        .collect()
}

/// Re-reads the peer list (SIGHUP): new peers are dialled, removed ones dropped.
/// Applies a re-read config's peer list; returns the peers added (to dial).
pub fn reload(shared: &Arc<Shared>, new: Config) -> Vec<DeviceId> {
    // The registry first: from here on the transport admits exactly the new list.
    // Only what is reloaded live changes; the rest keeps the running values
    // (Config::needs_restart names them).
    shared.config.send_modify(|c| {
        let c = Arc::make_mut(c);
        c.peers = new.peers.clone();
        c.rescan_interval = new.rescan_interval;
    });
    let added = {
        let mut st = shared.lock();
        let me = shared.me();
        let change = st
            .engine
            .set_roster(me, new.name.clone(), roster(&new.peers));
        for id in &change.removed {
            if let Some(slot) = st.peers.remove(id) {
                if let Some(s) = slot.session {
                    s.conn
                        .close(quinn::VarInt::from_u32(2), b"removed from config");
                }
                slot.gone.notify_waiters();
            }
            tracing::info!(peer = %id, "peer removed from config");
        }
        for p in &new.peers {
            match st.peers.get_mut(&p.id) {
                Some(slot) => slot.config = p.clone(),
                None => {
                    st.peers.insert(p.id, new_slot(p.clone()));
                }
            }
        }
        change.added
    };
    for id in &added {
        tracing::info!(peer = %id, "peer added to config");
    }
    added
}

/// Accepts sessions; they end with this task (their set is dropped with it).
async fn accept_loop(shared: Arc<Shared>, transport: Arc<Transport>) {
    let mut sessions = tokio::task::JoinSet::new();
    // Handshakes in flight: past a threshold a client proves its address (Retry),
    // at the cap new ones are turned away (unauthenticated load).
    let handshakes = crate::net::admission::Handshakes::default();
    // Addresses whose handshakes keep failing: their Initials are dropped a while.
    let strangers = crate::net::admission::Strangers::default();
    loop {
        let incoming = tokio::select! {
            i = transport.endpoint.accept() => match i { Some(i) => i, None => return },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let Some((incoming, in_flight)) = handshakes.admit(incoming, &strangers) else {
            continue;
        };
        let (shared, strangers) = (shared.clone(), strangers.clone());
        sessions.spawn(async move {
            let remote = incoming.remote_address();
            let done = tokio::time::timeout(crate::net::admission::HANDSHAKE_TIMEOUT, incoming);
            let handshake = done.await;
            drop(in_flight);
            let why = match handshake {
                Ok(Ok(conn)) => {
                    return crate::tasks::peer::run_session(SyncHandle::new(&shared), conn, false)
                        .await;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            tracing::debug!(%remote, error = %why, "incoming handshake failed");
            let a_peer = shared
                .config()
                .peers
                .iter()
                .any(|p| p.address.ip() == remote.ip());
            if !a_peer && strangers.failed(remote.ip(), std::time::Instant::now()) {
                tracing::warn!(
                    %remote,
                    "handshakes from {} failed {} times in {:?} ({why}): its handshakes are dropped for {:?}",
                    remote.ip(),
                    crate::net::admission::FAILS_TO_SHUN,
                    crate::net::admission::SHUN_WINDOW,
                    crate::net::admission::SHUN_FOR,
                );
            }
        });
    }
}

/// Aborts the task when dropped: a session a dial loop started ends with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps one connection to a peer: dials with backoff while there is none.
async fn dial_loop(shared: Arc<Shared>, transport: Arc<Transport>, peer: DeviceId) {
    let mut backoff = Duration::from_millis(50);
    // Held, never read: dropping it (loop ends or aborted) ends the session.
    let mut _session: Option<AbortOnDrop> = None;
    loop {
        if *shared.stopping.borrow() {
            return;
        }
        let (addr, gone, connected) = {
            let st = shared.lock();
            let Some(slot) = st.peers.get(&peer) else {
                return; // removed from config
            };
            (
                slot.config.address,
                slot.gone.clone(),
                slot.session.is_some(),
            )
        };
        let penalty = shared
            .lock()
            .peers
            .get(&peer)
            .and_then(|s| s.penalty)
            .map(|p| p.left(Instant::now()))
            .filter(|w| !w.is_zero());
        if let (false, Some(wait)) = (connected, penalty) {
            tracing::debug!(peer = %peer, ?wait, "backing off from a misbehaving peer");
            tokio::time::sleep(wait).await;
            continue;
        }
        if connected {
            let notified = gone.notified();
            // Re-check after registering, so a wakeup between the two is not lost.
            if shared
                .lock()
                .peers
                .get(&peer)
                .is_some_and(|s| s.session.is_some())
            {
                notified.await;
            }
            backoff = Duration::from_millis(50);
            continue;
        }
        match tokio::time::timeout(DIAL_TIMEOUT, transport.connect(peer, addr)).await {
            Ok(Ok(conn)) => {
                let probe = conn.clone();
                let shared2 = shared.clone();
                // The session runs on; this loop waits for it to end via `gone`.
                let (tx, rx) = tokio::sync::oneshot::channel();
                _session = Some(AbortOnDrop(tokio::spawn(async move {
                    crate::tasks::peer::run_session_with_ready(
                        SyncHandle::new(&shared2),
                        conn,
                        true,
                        Some(tx),
                    )
                    .await;
                })));
                if rx.await.is_ok() {
                    backoff = Duration::from_millis(50);
                    continue;
                }
                // Ended before the hello: typically the peer refused our certificate
                // because it does not list this node (yet). Back off like a failed
                // dial instead of redialling at once, and show why in `status`.
                let why = probe
                    .close_reason()
                    .map_or_else(|| "no reason".to_string(), |r| r.to_string());
                let msg = format!("closed before hello ({why}); does the peer list this node?");
                if let Some(slot) = shared.lock().peers.get_mut(&peer) {
                    slot.last_error = Some(msg.clone());
                }
                tracing::debug!(peer = %peer, %addr, error = %msg, "session refused");
            }
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                if let Some(slot) = shared.lock().peers.get_mut(&peer) {
                    slot.last_error = Some(msg.clone());
                }
                tracing::debug!(peer = %peer, %addr, error = %msg, "dial failed");
            }
            Err(_) => tracing::debug!(peer = %peer, %addr, "dial timed out"),
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 50);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = gone.notified() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One dial loop per configured peer (they end with this task), and SIGHUP: the
/// config is re-read and new peers get a dial loop.
async fn peers_and_reloads(
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    peers: Vec<DeviceId>,
    hup: std::io::Result<tokio::signal::unix::Signal>,
    status: StatusSource,
) {
    let mut dialers = tokio::task::JoinSet::new();
    for id in peers {
        dialers.spawn(dial_loop(shared.clone(), transport.clone(), id));
    }
    let mut hup = match hup {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; reload needs a restart");
            None
        }
    };
    loop {
        let got = tokio::select! {
            g = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => g,
            Some(_) = dialers.join_next(), if !dialers.is_empty() => continue,
        };
        if got.is_none() {
            return;
        }
        crate::ops::systemd::reloading();
        let old = shared.config();
        let file = old.file.clone();
        match Config::load(&file) {
            Ok(new) => {
                tracing::info!(file = %file.display(), peers = new.peers.len(), "SIGHUP: peer list reloaded");
                let restart = old.needs_restart(&new);
                if !restart.is_empty() {
                    shared.lock().error(format!(
                        "SIGHUP: changed {} (kept the running values; restart certmesh to apply them)",
                        restart.join(", ")
                    ));
                }
                for id in reload(&shared, new) {
                    dialers.spawn(dial_loop(shared.clone(), transport.clone(), id));
                }
            }
            Err(e) => shared
                .lock()
                .error(format!("SIGHUP: config not reloaded: {e}")),
        }
        crate::ops::systemd::reloaded(&status);
    }
}

/// How often, at most, tombstones are looked at for collection and attestations
/// for renewal (more often with a `[tree] tombstone_retention` under 8 h: an eighth
/// of it).
const TOMBSTONE_SWEEP: Duration = Duration::from_secs(3600);

/// Most attestations renewed per sweep: 40,000 records renew over four sweeps.
const REATTEST_PER_SWEEP: usize = 10_000;

/// How often the tree's filesystem is measured besides each index frame.
const DISK_MEASURE: Duration = Duration::from_secs(5);

/// Measures free disk every [`DISK_MEASURE`]: paths `[tree] min_disk_free` refused
/// are fetched once space returns, even when no peer sends anything.
async fn measure_disk(sync: SyncHandle) {
    loop {
        tokio::time::sleep(DISK_MEASURE).await;
        let s = sync.clone();
        let _ = tokio::task::spawn_blocking(move || s.disk_measured()).await;
    }
}

/// Drops tombstones every configured peer has acknowledged and that this node
/// learned of longer than `[tree] tombstone_retention` ago, so deletions (and a
/// peer's floods of them) do not grow the index forever; and renews the attestations
/// of this writer's live records before they are half of it old (issue 25 item 9), so
/// they keep reaching new nodes while a deleted file's last record ages out, and
/// those of a silent writer once they are 3/4 of it old (in this writer's name). The
/// first sweep runs at start (a node back from a long stop renews at once).
async fn collect_tombstones(shared: Arc<Shared>) {
    let every = TOMBSTONE_SWEEP.min(shared.lock().engine.retention() / 8);
    loop {
        sweep(&shared);
        tokio::time::sleep(every).await;
    }
}

/// One round of [`collect_tombstones`].
fn sweep(shared: &Shared) {
    let mut st = shared.lock();
    let since = st.engine.index().sequence();
    let renewed = st.engine.reattest_due(now_ns(), REATTEST_PER_SWEEP);
    if renewed > 0 {
        tracing::debug!(
            n = renewed,
            "renewed attestations (ours, or of a silent writer)"
        );
        st.commit(since, shared);
    }
    let gone = st.engine.collect_tombstones(now_ns());
    if gone.is_empty() {
        return;
    }
    tracing::info!(
        n = gone.len(),
        "collected tombstones acknowledged by every peer"
    );
    let State {
        journal, engine, ..
    } = &mut *st;
    let p = journal.prepare_rewrite(engine.index());
    shared.persist(engine.index().sequence(), p);
}

/// Gives memory freed so far back to the system: glibc keeps freed heap for reuse,
/// and the index load and first scan peak far above what stays (issue 29: a 161 MB
/// heap peak for 112 MB kept at 10,000 certificates, RSS 170 MB).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free pages back to the kernel; it reads or moves
    // no memory of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sets glibc's allocator for a long-running daemon holding a large index (issue 29:
/// RSS); call it before the runtime's threads start.
///
/// Buffers of 1 MiB and more (a `status --json` of 10,000 certificates is 8.8 MB, a
/// scan's batch of records, the persister's run) come from their own mapping and go
/// back to the system when freed. glibc's default raises that bound to the size of
/// each such buffer freed, so after the first status they stayed in the heap.
///
/// One arena (`M_ARENA_MAX` 1) saved another 15 MB at 10,000 certificates but
/// stalled a node digesting an index flood: with every thread on one arena, a small
/// file waited 90 s (`security::an_index_flood_past_the_cap_is_refused_within_the_memory_bound`).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it reads or moves no memory.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// A full rescan every `rescan_interval`; a SIGHUP that changes the interval starts
/// the wait again with the new one.
async fn periodic_rescan(
    settings: Settings,
    sync: SyncHandle,
    watcher: crate::tasks::watch::Watch,
) {
    let mut config = settings.subscribe();
    loop {
        let every = config.borrow_and_update().rescan_interval;
        tokio::select! {
            _ = tokio::time::sleep(every) => watcher.full_rescan(&sync).await,
            r = config.changed() => if r.is_err() { return },
        }
    }
}

/// Awaits every task (each aborted or finished).
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

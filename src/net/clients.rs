//! Admission for the local services reachable by others (the http-01 responder,
//! `/metrics`, the control socket): a cap on clients served at once — over it a new
//! connection is closed at once, or, for a service that must answer a newcomer (the
//! http-01 responder: the CA comes last, after any slowloris), the oldest client is
//! dropped to make room — and accept errors (EMFILE under a flood) that pause the
//! loop briefly instead of ending it, warned about at most every 10 s.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

/// Pause after a failed accept: the descriptors a flood holds need time to close.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Least time between two warnings of one service.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long a newcomer waits for the slot of the client dropped for it (the dropped
/// task releases it as soon as the runtime cancels it: microseconds).
const EVICT_WAIT: Duration = Duration::from_secs(1);

/// The clients of one service.
#[derive(Debug)]
pub struct Clients {
    what: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    last_warn: Option<Instant>,
    /// Over the cap, drop the oldest client instead of the new one.
    evict_oldest: bool,
}

impl Clients {
    /// At most `max` clients of the service named `what` (in logs) at once.
    pub fn new(what: &'static str, max: usize) -> Self {
        Clients {
            what,
            max,
            slots: Arc::new(Semaphore::new(max)),
            last_warn: None,
            evict_oldest: false,
        }
    }

    /// Over the cap, the oldest client is dropped to make room for the new one: a
    /// flood of slow clients (slowloris) then cannot keep out a client that asks and
    /// goes, such as the CA validating a challenge; to drop it a flood would have to
    /// open `max` connections in the milliseconds it is served.
    pub fn evicting_oldest(mut self) -> Self {
        self.evict_oldest = true;
        self
    }

    /// A slot for a new client, held until the permit drops; `None` (and a throttled
    /// warning) when `max` are being served: the caller closes the connection.
    pub fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            let (max, whom) = match self.evict_oldest {
                true => (self.max, "dropping the oldest"),
                false => (self.max, "closing a new one"),
            };
            self.warn(format_args!("{max} clients already, {whom}"));
        }
        slot
    }

    /// After a failed accept: warn (throttled) and pause, then the loop goes on.
    pub async fn accept_failed(&mut self, e: &std::io::Error) {
        self.warn(format_args!("accept failed: {e}"));
        tokio::time::sleep(ACCEPT_RETRY).await;
    }

    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.last_warn.is_none_or(|t| t.elapsed() > WARN_EVERY) {
            tracing::warn!(service = self.what, "{}: {msg}", self.what);
            self.last_warn = Some(Instant::now());
        }
    }
}

/// A listener of a local service: TCP (http-01, `/metrics`) or Unix (control).
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> std::io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> std::io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// The one accept loop of the local services: each admitted connection is served by
/// `serve` on its own task (stopped with the loop), bounded by `limit` when given; over the cap a connection
/// is closed at once; accept errors pause the loop instead of ending it. Errors of a
/// client are logged at debug level (a client that went away is not news).
pub fn serve_forever<L, F, Fut, E>(
    listener: L,
    mut clients: Clients,
    limit: Option<Duration>,
    serve: F,
) -> JoinHandle<()>
where
    L: Listener,
    F: Fn(L::Stream) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        // The connections' tasks belong to this one: aborting the loop at shutdown
        // drops the set, which aborts them too.
        let mut serving = tokio::task::JoinSet::new();
        // Clients in the order they came (with `evict_oldest`): finished ones are
        // skipped when the oldest is dropped, and pruned once they pile up.
        let mut arrived: VecDeque<AbortHandle> = VecDeque::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(_) = serving.join_next(), if !serving.is_empty() => continue,
            };
            match accepted {
                Ok(stream) => {
                    let slot = match clients.admit() {
                        Some(slot) => Some(slot),
                        None if clients.evict_oldest && evict(&mut arrived) => None,
                        None => continue,
                    };
                    let what = clients.what;
                    let slots = clients.slots.clone();
                    let work = serve(stream);
                    let task = serving.spawn(async move {
                        let slot = match slot {
                            Some(s) => s,
                            None => match tokio::time::timeout(EVICT_WAIT, slots.acquire_owned())
                                .await
                            {
                                Ok(Ok(s)) => s,
                                _ => return,
                            },
                        };
                        let result = match limit {
                            Some(l) => tokio::time::timeout(l, work)
                                .await
                                .unwrap_or_else(|_| Ok(())),
                            None => work.await,
                        };
                        if let Err(e) = result {
                            tracing::debug!(error = %e, service = what, "client");
                        }
                        drop(slot);
                    });
                    if clients.evict_oldest {
                        if arrived.len() >= 2 * clients.max {
                            arrived.retain(|t| !t.is_finished());
                        }
                        arrived.push_back(task);
                    }
                }
                Err(e) => clients.accept_failed(&e).await,
            }
        }
    })
}

/// Drops the oldest client still being served; false if there is none.
fn evict(arrived: &mut VecDeque<AbortHandle>) -> bool {
    while let Some(t) = arrived.pop_front() {
        if !t.is_finished() {
            t.abort();
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_up_to_the_cap_and_again_once_a_slot_frees() {
        let mut c = Clients::new("test", 2);
        let a = c.admit().expect("first");
        let _b = c.admit().expect("second");
        assert!(c.admit().is_none(), "a third client got in");
        drop(a);
        assert!(c.admit().is_some(), "a freed slot was not reused");
    }

    #[tokio::test]
    async fn over_the_cap_the_oldest_client_is_dropped_for_a_newcomer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = Clients::new("test", 2).evicting_oldest();
        // Each client gets "hi" once it has sent a line (slow ones never do).
        let server = serve_forever(listener, clients, None, |mut s: TcpStream| async move {
            let mut b = [0u8; 1];
            while s.read(&mut b).await? == 1 && b[0] != b'\n' {}
            s.write_all(b"hi").await
        });
        let mut slow1 = TcpStream::connect(addr).await.unwrap();
        let _slow2 = TcpStream::connect(addr).await.unwrap();
        let mut fresh = TcpStream::connect(addr).await.unwrap();
        fresh.write_all(b"GET\n").await.unwrap();
        let mut reply = String::new();
        fresh.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "hi");
        // The oldest was dropped to make room: its connection is closed.
        assert_eq!(slow1.read(&mut [0u8; 1]).await.unwrap(), 0);
        server.abort();
    }
}

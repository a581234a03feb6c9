//! Admission for the local services reachable by others (the http-01 responder,
//! `/metrics`, the control socket): a cap on clients served at once — over it a new
//! connection is closed at once — and accept errors (EMFILE under a flood) that pause
//! the loop briefly instead of ending it, warned about at most every 10 s.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Pause after a failed accept: the descriptors a flood holds need time to close.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Least time between two warnings of one service.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The clients of one service.
#[derive(Debug)]
pub struct Clients {
    what: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    last_warn: Option<Instant>,
}

impl Clients {
    /// At most `max` clients of the service named `what` (in logs) at once.
    pub fn new(what: &'static str, max: usize) -> Self {
        Clients {
            what,
            max,
            slots: Arc::new(Semaphore::new(max)),
            last_warn: None,
        }
    }

    /// A slot for a new client, held until the permit drops; `None` (and a throttled
    /// warning) when `max` are being served: the caller closes the connection.
    pub fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            let max = self.max;
            self.warn(format_args!("{max} clients already, closing a new one"));
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
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(_) = serving.join_next(), if !serving.is_empty() => continue,
            };
            match accepted {
                Ok(stream) => {
                    let Some(slot) = clients.admit() else {
                        continue;
                    };
                    let what = clients.what;
                    let work = serve(stream);
                    serving.spawn(async move {
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
                }
                Err(e) => clients.accept_failed(&e).await,
            }
        }
    })
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
}

//! A tap in front of the target edge's built-in http-01 responder. The CA's
//! validator connects here; for each request the tap notes whether the token file
//! was already in that edge's tree at that instant, then passes the request to the
//! responder and its answer back. The responder answers a token it does not have
//! yet from the shared account (`<token>.<thumbprint>`), so a validation that
//! succeeds says nothing about the cluster-wide barrier; the tap's note does.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use certmesh::acme::order::CHALLENGE_DIR;

/// One request of the validator.
#[derive(Clone, Debug)]
pub struct Asked {
    pub token: String,
    /// The token file was in the edge's tree when the request came.
    pub had_token: bool,
    /// The responder's status line, or why it could not be asked.
    pub answer: String,
}

/// The tap's listener thread; stopped on drop.
pub struct Tap {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    /// Listens on `listen`, passes each request to `upstream`, looks for the token
    /// under `tree`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr, tree: PathBuf) -> Result<Tap> {
        let l = TcpListener::bind(listen).with_context(|| format!("tap on {listen}"))?;
        let asked: Arc<Mutex<Vec<Asked>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let thread = std::thread::spawn({
            let (asked, stop) = (asked.clone(), stop.clone());
            move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (asked, tree) = (asked.clone(), tree.clone());
                    std::thread::spawn(move || {
                        if let Some(a) = pass(conn, upstream, &tree) {
                            if let Ok(mut v) = asked.lock() {
                                v.push(a);
                            }
                        }
                    });
                }
            }
        });
        Ok(Tap {
            addr: listen,
            asked,
            stop,
            thread: Some(thread),
        })
    }

    /// The requests so far, oldest first.
    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request: the head read, the token looked up, the rest passed on.
fn pass(mut conn: TcpStream, upstream: SocketAddr, tree: &Path) -> Option<Asked> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 || head.len() > 8192 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let target = text.split(' ').nth(1).unwrap_or("");
    let token = target.rsplit('/').next().unwrap_or("").to_string();
    let sane = !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let had_token = sane && tree.join(CHALLENGE_DIR).join(&token).is_file();
    let answer = match forward(&head, upstream) {
        Ok(resp) => {
            let _ = conn.write_all(&resp);
            String::from_utf8_lossy(&resp)
                .lines()
                .next()
                .unwrap_or("(empty answer)")
                .to_string()
        }
        Err(e) => format!("responder at {upstream} not reached: {e}"),
    };
    let _ = conn.shutdown(Shutdown::Both);
    Some(Asked {
        token,
        had_token,
        answer,
    })
}

/// The responder's whole answer (it closes the connection after one).
fn forward(req: &[u8], upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(req)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

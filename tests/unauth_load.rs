//! Unauthenticated load (issue 25 item 7): what anyone who reaches a port can send
//! must not keep the CA out or the fleet from syncing. The http-01 responder answers
//! real Pebble while 300 slow clients hold connections to it; a flood of QUIC
//! handshakes from devices that are not configured does not stop small files from
//! syncing between two real nodes.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::acme::{enable_acme_with, tools_present, wait_version, Pebble, DOMAIN};
use crate::util::{certmesh, free_tcp, wait_until, Node};

/// Slow clients holding connections to a responder: each sends its request head one
/// header line at a time and never finishes it; one that is closed is reopened.
struct Slowloris {
    stop: Arc<AtomicBool>,
    /// Connections still open after the last round of writes.
    held: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Slowloris {
    fn start(addr: &str, clients: usize) -> Slowloris {
        let (stop, held) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, h, addr) = (stop.clone(), held.clone(), addr.to_string());
        let open = move || {
            let mut c = TcpStream::connect(&addr).ok()?;
            c.write_all(b"GET /.well-known/acme-challenge/slow HTTP/1.1\r\n")
                .ok()?;
            Some(c)
        };
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<Option<TcpStream>> = (0..clients).map(|_| open()).collect();
            while !s.load(Ordering::Relaxed) {
                for c in conns.iter_mut() {
                    let alive = c
                        .as_mut()
                        .is_some_and(|c| c.write_all(b"X-a: b\r\n").is_ok());
                    if !alive {
                        *c = open();
                    }
                }
                h.store(conns.iter().flatten().count(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Slowloris {
            stop,
            held,
            thread: Some(thread),
        }
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn the_responder_answers_the_ca_under_a_slowloris_of_300_clients() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.7.10";
    let mut n = Node::new(dir.path(), "solo", ip);
    n.configure(&[]);
    let http_port = free_tcp(ip);
    let pebble = Pebble::start_on(&dir.path().join("pebble"), ip, http_port, false);
    pebble.set_a(DOMAIN, ip);
    enable_acme_with(&n, &pebble, "");
    let listen = format!("{ip}:{http_port}");
    let cfg = std::fs::read_to_string(&n.config).unwrap();
    std::fs::write(&n.config, format!("{cfg}\n[http]\nlisten = \"{listen}\"\n")).unwrap();
    n.start();
    wait_version(&[&n], 1, "the first certificate, without load");

    let slow = Slowloris::start(&listen, 300);
    wait_until("the slow clients connected", || {
        slow.held.load(Ordering::Relaxed) >= 256
    });
    let started = Instant::now();
    let out = certmesh(&["renew", "--config", n.config.to_str().unwrap(), "--force"]);
    let took = started.elapsed();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("renewed: version 2"),
        "{out:?}\n{}",
        n.log()
    );
    assert!(
        slow.held.load(Ordering::Relaxed) >= 256,
        "the slow clients were not holding connections during the renewal"
    );
    eprintln!("renewal validated through the responder under a 300-client slowloris in {took:?}");
    n.stop();
}

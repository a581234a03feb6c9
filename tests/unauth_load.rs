//! Unauthenticated load (issue 25 item 7): what anyone who reaches a port can send
//! must not keep the CA out or the fleet from syncing. The http-01 responder answers
//! real Pebble while 300 slow clients hold connections to it; a flood of QUIC
//! handshakes from devices that are not configured does not stop small files from
//! syncing between two real nodes, and the address they come from is shunned.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use certmesh::core::device::DeviceId;
use certmesh::identity::Identity;
use certmesh::net::transport::Transport;

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

/// Strangers (devices no node has configured, each on its own endpoint) dialling
/// `target` over and over, `concurrent` at a time, with the crate's own transport:
/// every attempt is a real QUIC Initial and, if admitted, a full TLS handshake.
struct Flood {
    runtime: Option<tokio::runtime::Runtime>,
    attempts: Arc<AtomicUsize>,
}

impl Flood {
    /// `concurrent` strangers dialling `target` in a loop, the i-th from `ips[i % len]`.
    fn start(dir: &std::path::Path, ips: &[String], target: &Node, concurrent: usize) -> Flood {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let attempts = Arc::new(AtomicUsize::new(0));
        let victim: DeviceId = target.id.parse().unwrap();
        let addr: std::net::SocketAddr = target.addr.parse().unwrap();
        for i in 0..concurrent {
            let me = Arc::new(Identity::init(&dir.join(format!("stranger{i}"))).unwrap());
            let attempts = attempts.clone();
            let bind = format!("{}:0", ips[i % ips.len()]).parse().unwrap();
            let _enter = runtime.enter();
            let t =
                Transport::bind(me, bind, certmesh::net::transport::allow_only([victim])).unwrap();
            runtime.spawn(async move {
                loop {
                    let dial = t.connect(victim, addr);
                    let _ = tokio::time::timeout(Duration::from_secs(1), dial).await;
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        Flood {
            runtime: Some(runtime),
            attempts,
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Writes `count` small files on `from` one after another and returns how long each
/// took to reach `to`.
fn small_file_times(from: &Node, to: &Node, tag: &str, count: usize) -> Vec<Duration> {
    (0..count)
        .map(|i| {
            let rel = format!("small/{tag}-{i}.pem");
            let started = Instant::now();
            from.write(&rel, "small");
            wait_until(&format!("{rel} reaches {}", to.name), || {
                to.read(&rel).is_some()
            });
            started.elapsed()
        })
        .collect()
}

#[test]
fn a_handshake_flood_from_strangers_does_not_stop_small_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = crate::util::pair(dir.path(), ["127.0.7.20", "127.0.7.21"]);
    let calm = small_file_times(&a, &b, "calm", 10);

    // 64 strangers on 64 addresses: enough at once for b to ask for Retries, and
    // each address shunned after its third failed handshake.
    let ips: Vec<String> = (100..164).map(|i| format!("127.0.7.{i}")).collect();
    let flood = Flood::start(dir.path(), &ips, &b, 64);
    wait_until("the flood is under way", || {
        flood.attempts.load(Ordering::Relaxed) >= 200
    });
    let flooded = small_file_times(&a, &b, "flood", 10);
    let attempts = flood.attempts.load(Ordering::Relaxed);
    drop(flood);
    assert!(
        b.log().contains("handshake: Retry"),
        "b never asked the flood to prove its address:\n{}",
        b.log()
    );
    assert!(
        b.log().contains("its handshakes are dropped for"),
        "b never shunned the address whose handshakes kept failing:\n{}",
        b.log()
    );
    assert!(a.all_connected(), "the flood broke the a-b session");
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    eprintln!(
        "small file a->b: slowest of 10 {:?} calm, {:?} during a flood of {attempts} handshakes",
        max(&calm),
        max(&flooded)
    );
}

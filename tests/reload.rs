//! Zero-downtime reloads with real servers: a certificate bundle published on one
//! node reaches another node, whose `[[hook]]` swaps it into a real HAProxy (runtime
//! API, no reload) or reloads a real nginx, while a TLS client loop keeps making
//! fresh handshakes: none fails, and the served serial changes to the new one.
//! Nodes and servers live on 127.0.0.60-63.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{wait_listening, wait_until, Node};

pub(crate) const NAME: &str = "www";
pub(crate) const HOST: &str = "www.reload.test";

/// A server stopped (and reaped) on drop: SIGTERM first, so nginx's master takes its
/// workers with it (a SIGKILLed master leaves them running), SIGKILL if it lingers.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn have(bin: &str) -> bool {
    let ok = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists());
    if !ok {
        // CI installs it (.ci/run); a developer machine without it skips loudly.
        eprintln!("SKIPPED: {bin} is needed (apt-get install {bin})");
    }
    ok
}

/// A test CA and certificates for [`HOST`] with chosen serial numbers.
pub(crate) struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
    der: Vec<u8>,
}

/// One version's files, as the ACME client writes them.
pub(crate) struct Bundle {
    pub(crate) cert: String,
    chain: String,
    pub(crate) key: String,
    serial: Vec<u8>,
}

impl Ca {
    pub(crate) fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "certmesh reload test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    pub(crate) fn bundle(&self, serial: u64) -> Bundle {
        self.bundle_with_key(serial, rcgen::KeyPair::generate().unwrap())
    }

    /// A bundle whose leaf has `key` (e.g. RSA, where [`Ca::bundle`] makes ECDSA).
    pub(crate) fn bundle_with_key(&self, serial: u64, key: rcgen::KeyPair) -> Bundle {
        let mut params = rcgen::CertificateParams::new(vec![HOST.to_string()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        Bundle {
            cert: leaf.pem(),
            chain: self.pem.clone(),
            key: key.serialize_pem(),
            serial: serial_of(leaf.der()),
        }
    }
}

fn serial_of(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.tbs_certificate.raw_serial().to_vec()
}

impl Bundle {
    fn combined(&self) -> String {
        format!("{}{}{}", self.cert, self.chain, self.key)
    }

    /// Publishes version `n` into `tree` the way the ACME client does: the five
    /// files staged under `.certmesh/tmp/` and renamed into `archive/<name>/<n>/`,
    /// then `live/<name>` flipped by renaming a new symlink over it.
    pub(crate) fn publish(&self, tree: &Path, n: u32) {
        let tmp = tree.join(".certmesh/tmp");
        let dir = tree.join(format!("archive/{NAME}/{n}"));
        fs::create_dir_all(&tmp).unwrap();
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(tree.join("live")).unwrap();
        let fullchain = format!("{}{}", self.cert, self.chain);
        let combined = self.combined();
        for (file, data) in [
            ("cert.pem", &self.cert),
            ("chain.pem", &self.chain),
            ("fullchain.pem", &fullchain),
            ("privkey.pem", &self.key),
            ("combined.pem", &combined),
        ] {
            let t = tmp.join(format!("test-{n}-{file}"));
            fs::write(&t, data).unwrap();
            fs::rename(&t, dir.join(file)).unwrap();
        }
        let link = tmp.join(format!("test-{n}-link"));
        std::os::unix::fs::symlink(format!("../archive/{NAME}/{n}"), &link).unwrap();
        fs::rename(&link, tree.join("live").join(NAME)).unwrap();
    }
}

/// Two nodes that list each other; `tree_extra` goes under `[tree]` of both,
/// `b_hooks` at the end of `b`'s config.
fn pair(dir: &Path, ips: (&str, &str), tree_extra: &str, b_hooks: &str) -> (Node, Node) {
    let a = Node::new(dir, "a", ips.0);
    let b = Node::new(dir, "b", ips.1);
    a.configure(&[&b]);
    b.configure(&[&a]);
    for n in [&a, &b] {
        let cfg = fs::read_to_string(&n.config).unwrap();
        let path_line = format!("path = \"{}\"\n", n.tree.display());
        let mut cfg = cfg.replacen(&path_line, &format!("{path_line}{tree_extra}"), 1);
        if n.name == "b" {
            cfg.push_str(b_hooks);
        }
        fs::write(&n.config, cfg).unwrap();
    }
    (a, b)
}

/// What the client loop saw.
#[derive(Default)]
struct Seen {
    /// (when, serial of the served leaf) per successful request.
    ok: Vec<(Instant, Vec<u8>)>,
    /// (when, what went wrong) per failed connection, handshake or request.
    failed: Vec<(Instant, String)>,
}

/// A thread making one fresh TLS connection (full handshake, no resumption) and
/// one HTTPS request after another until dropped.
struct Probe {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(addr: &str, ca_der: &[u8]) -> Probe {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, addr) = (seen.clone(), stop.clone(), addr.to_string());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let r = request(&addr, &config);
                let mut s = s.lock().unwrap();
                match r {
                    Ok(serial) => s.ok.push((Instant::now(), serial)),
                    Err(e) => s.failed.push((Instant::now(), e)),
                }
            }
        });
        Probe {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self, serial: &[u8]) -> usize {
        let s = self.seen.lock().unwrap();
        s.ok.iter().filter(|(_, x)| x == serial).count()
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTPS GET on a new connection; the serial of the certificate served.
fn request(addr: &str, config: &Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok();
    tcp.set_write_timeout(Some(Duration::from_secs(5))).ok();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("handshake or request: {e}"))?;
    let mut answer = Vec::new();
    let read = tls.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    if !answer.starts_with("HTTP/1.1 200") {
        return Err(format!("answer {answer:?} ({read:?})"));
    }
    let certs = tls
        .conn
        .peer_certificates()
        .ok_or("no server certificate")?;
    Ok(serial_of(&certs[0]))
}

/// Runs the swap: publishes `v2` on `a` while the probe runs against the server
/// `b`'s hook reloads; returns what the probe saw, after `v2` is served steadily.
fn swap_under_load(a: &Node, probe: Probe, v1: &Bundle, v2: &Bundle) -> (Seen, Instant) {
    // Traffic before the swap, so the loop is known to be running.
    wait_until("the client loop served by v1", || {
        probe.count(&v1.serial) >= 10
    });
    let published = Instant::now();
    v2.publish(&a.tree, 2);
    wait_until("the new certificate served", || {
        probe.count(&v2.serial) >= 1
    });
    wait_until("the new certificate served steadily", || {
        probe.count(&v2.serial) >= 20
    });
    (probe.finish(), published)
}

fn assert_no_failures(seen: &Seen, published: Instant, v1: &Bundle, v2: &Bundle) {
    assert!(
        seen.failed.is_empty(),
        "{} failed requests (of {}), first: {:?}",
        seen.failed.len(),
        seen.failed.len() + seen.ok.len(),
        seen.failed
            .first()
            .map(|(t, e)| (t.duration_since(published), e))
    );
    let first_v2 = seen
        .ok
        .iter()
        .find(|(_, s)| *s == v2.serial)
        .map(|(t, _)| *t)
        .expect("v2 served");
    // The loop was really running across the swap: requests answered with the old
    // certificate after v2 was published, then with the new one.
    let during = seen
        .ok
        .iter()
        .filter(|(t, s)| *t >= published && *t < first_v2 && *s == v1.serial)
        .count();
    assert!(
        during >= 1,
        "no request between publishing v2 and v2 being served"
    );
    eprintln!(
        "swap: {} requests, {during} answered with v1 after publishing, v2 after {:?}",
        seen.ok.len(),
        first_v2.duration_since(published)
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-reload-")
        .tempdir()
        .unwrap()
}

#[test]
fn haproxy_hot_swap_through_the_runtime_api() {
    if !have("haproxy") {
        return;
    }
    let dir = tempdir();
    let hdir = dir.path().join("haproxy");
    fs::create_dir_all(&hdir).unwrap();
    let socket = hdir.join("admin.sock");
    // The crt path as HAProxy knows it: the tree's live combined.pem on node b.
    let b_tree = dir.path().join("b").join("tree");
    let crt = b_tree.join("live").join(NAME).join("combined.pem");
    let hooks = format!(
        "\n[[hook]]\npaths = [\"live/{NAME}/**\"]\nhaproxy_socket = \"{}\"\nhaproxy_crt = \"{}\"\ntimeout = \"10s\"\n\
         \n[[hook]]\npaths = [\"live/{NAME}/**\"]\nhaproxy_socket = \"{}\"\nhaproxy_crt = \"/not/in/haproxy.cfg.pem\"\n",
        socket.display(),
        crt.display(),
        socket.display(),
    );
    let (mut a, mut b) = pair(dir.path(), ("127.0.0.60", "127.0.0.61"), "", &hooks);
    assert_eq!(b.tree, b_tree);
    let ca = Ca::new();
    let (v1, v2) = (ca.bundle(0x1001), ca.bundle(0x2002));
    v1.publish(&a.tree, 1);
    a.start();
    b.start();
    wait_until("b has v1", || {
        b.read(&format!("live/{NAME}/combined.pem")) == Some(v1.combined())
    });

    let port = crate::util::free_tcp("127.0.0.61");
    let addr = format!("127.0.0.61:{port}");
    let cfg = format!(
        "global\n  stats socket {} level admin\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
         frontend fe\n  bind {addr} ssl crt {}\n  http-request return status 200 content-type text/plain string ok\n",
        socket.display(),
        crt.display()
    );
    let cfg_path = hdir.join("haproxy.cfg");
    fs::write(&cfg_path, cfg).unwrap();
    let log = hdir.join("haproxy.log");
    let mut child = Command::new("haproxy")
        .args(["-f", cfg_path.to_str().unwrap(), "-db"])
        .stdout(fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            fs::File::create(hdir.join("stderr.log")).unwrap(),
        ))
        .spawn()
        .expect("starting haproxy");
    wait_listening(&addr, "haproxy", &mut child, &hdir.join("stderr.log"));
    let haproxy = Proc { child };
    wait_until("haproxy's stats socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });

    let probe = Probe::start(&addr, &ca.der);
    let (seen, published) = swap_under_load(&a, probe, &v1, &v2);
    assert_no_failures(&seen, published, &v1, &v2);
    // A runtime swap is atomic for new handshakes: once v2 is served, v1 never again.
    let first_v2 = seen.ok.iter().position(|(_, s)| *s == v2.serial).unwrap();
    assert!(
        seen.ok[first_v2..].iter().all(|(_, s)| *s == v2.serial),
        "v1 served again after v2"
    );
    // Same HAProxy process throughout: swapped, not restarted.
    let mut haproxy = haproxy;
    assert!(matches!(haproxy.child.try_wait(), Ok(None)));

    // The second hook names a crt HAProxy does not have: reported clearly, counted,
    // and sync went on (b has v2 in its tree).
    wait_until("the unknown-certificate report in b's log", || {
        b.log()
            .contains("does not know the certificate \"/not/in/haproxy.cfg.pem\"")
    });
    assert!(b.log().contains("now served by HAProxy"), "{}", b.log());
    let failures = b.status()["counters"]["hook_failures"].as_u64();
    assert!(
        failures.is_some_and(|n| n >= 1),
        "hook_failures: {failures:?}"
    );
    assert!(
        b.status()["errors"]
            .to_string()
            .contains("does not know the certificate"),
        "{}",
        b.status()
    );
    assert_eq!(
        b.read(&format!("live/{NAME}/combined.pem")),
        Some(v2.combined())
    );
    a.stop();
    b.stop();
}

#[test]
fn nginx_reload_hook_serves_the_new_certificate() {
    if !have("nginx") {
        return;
    }
    let dir = tempdir();
    let d = dir.path().join("nginx");
    fs::create_dir_all(&d).unwrap();
    let b_tree = dir.path().join("b").join("tree");
    let port = crate::util::free_tcp("127.0.0.63");
    let addr = format!("127.0.0.63:{port}");
    // docs/acme.md's nginx snippet, pointed at node b's tree.
    let conf = format!(
        "user root;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen {addr} ssl;\n    server_name {HOST};\n\
         ssl_certificate     {t}/live/{NAME}/fullchain.pem;\n\
         ssl_certificate_key {t}/live/{NAME}/privkey.pem;\n\
         ssl_dhparam         {t}/dhparam.pem;\n\
         location /.well-known/acme-challenge/ {{ root {t}/acme; }}\n\
         location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        d = d.display(),
        t = b_tree.display(),
    );
    let conf_path = d.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let err_log = d.join("error.log");
    let hooks = format!(
        "\n[[hook]]\npaths = [\"live/{NAME}/**\"]\nrun = [\"nginx\", \"-p\", \"{d}\", \"-e\", \"{e}\", \"-c\", \"{c}\", \"-s\", \"reload\"]\n",
        d = d.display(),
        e = err_log.display(),
        c = conf_path.display(),
    );
    let (mut a, mut b) = pair(
        dir.path(),
        ("127.0.0.62", "127.0.0.63"),
        "dhparam = \"ffdhe2048\"\n",
        &hooks,
    );
    let ca = Ca::new();
    let (v1, v2) = (ca.bundle(0x1111), ca.bundle(0x2222));
    v1.publish(&a.tree, 1);
    a.start();
    b.start();
    wait_until("b has v1 and dhparam.pem", || {
        b.read(&format!("live/{NAME}/privkey.pem")) == Some(v1.key.clone())
            && b.read("dhparam.pem").is_some()
    });
    let mut child = Command::new("nginx")
        .args([
            "-p",
            d.to_str().unwrap(),
            "-e",
            err_log.to_str().unwrap(),
            "-c",
        ])
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(fs::File::create(d.join("stderr.log")).unwrap())
        .spawn()
        .expect("starting nginx");
    wait_listening(&addr, "nginx", &mut child, &d.join("stderr.log"));
    let nginx = Proc { child };

    let probe = Probe::start(&addr, &ca.der);
    let (seen, published) = swap_under_load(&a, probe, &v1, &v2);
    assert_no_failures(&seen, published, &v1, &v2);
    let mut nginx = nginx;
    assert!(matches!(nginx.child.try_wait(), Ok(None)), "nginx exited");
    assert!(b.log().contains("hook ran"), "{}", b.log());
    a.stop();
    b.stop();
}

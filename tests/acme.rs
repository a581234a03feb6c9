//! Cluster ACME end to end against real components: Debian's `pebble` (ACME test
//! CA, VA sleep off) with `pebble-challtestsrv` as its DNS, one real nginx per node
//! serving `<tree>/acme`, and real `certmesh` processes. DNS for the name points at a
//! node that did not place the order, so the challenge barrier is what makes it pass.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use certmesh::core::device::DeviceId;

use crate::util::free_tcp;
use crate::util::{certmesh, wait_listening, Cluster, Node};

pub(crate) const DOMAIN: &str = "www.certmesh.test";
/// An external account binding key (Pebble's documented example).
const EAB: (&str, &str) = (
    "kid-1",
    "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
);
/// Issuance involves key generation and several CA round trips: a generous bound.
pub(crate) const ISSUE_DEADLINE: Duration = Duration::from_secs(90);

/// A child process killed (and reaped) on drop.
pub(crate) struct Proc {
    child: Child,
}

impl Proc {
    pub(crate) fn new(child: Child) -> Proc {
        Proc { child }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn tools_present() -> bool {
    let ok = [
        "/usr/bin/pebble",
        "/usr/bin/pebble-challtestsrv",
        "/usr/sbin/nginx",
    ]
    .iter()
    .all(|p| Path::new(p).exists());
    if !ok {
        // CI installs them (.ci/run); a developer machine without them skips loudly.
        eprintln!("SKIPPED: pebble, pebble-challtestsrv and nginx are needed (apt-get install pebble nginx)");
    }
    ok
}

/// The crate's Pebble launcher (Pebble + its DNS) with this suite's ports; panics
/// where the launcher returns an error.
pub(crate) struct Pebble(certmesh::demo_pebble::Pebble);

impl std::ops::Deref for Pebble {
    type Target = certmesh::demo_pebble::Pebble;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Pebble {
    pub(crate) fn start(dir: &Path, http_port: u16) -> Pebble {
        Self::start_with(dir, http_port, false)
    }

    /// `eab`: Pebble requires external account binding with [`EAB`]'s key.
    fn start_with(dir: &Path, http_port: u16, eab: bool) -> Pebble {
        Self::start_on(&dir.join("pebble"), "127.0.0.1", http_port, eab)
    }

    /// Pebble and its DNS on `ip`, files in `dir` (several may run side by side).
    pub(crate) fn start_on(dir: &Path, ip: &str, http_port: u16, eab: bool) -> Pebble {
        let options = certmesh::demo_pebble::Options {
            http_port: Some(http_port),
            eab: eab.then_some(EAB),
            ..crate::util::pebble_options(ip)
        };
        Pebble(certmesh::demo_pebble::Pebble::start(dir, &options).expect("starting pebble"))
    }

    /// Stops the CA itself (its DNS keeps running): its port refuses connections.
    pub(crate) fn stop_ca(&mut self) {
        self.0.stop_ca();
    }

    /// Starts (or restarts) the CA itself: a restarted Pebble has a new root and
    /// has forgotten every account.
    pub(crate) fn start_ca(&mut self) {
        self.0.start_ca().expect("restarting pebble");
    }

    /// Points `host` at `ip` in Pebble's DNS.
    pub(crate) fn set_a(&self, host: &str, ip: &str) {
        self.0.set_a(host, ip).expect("add-a");
    }

    /// Pebble's root (regenerated at every Pebble start), PEM.
    pub(crate) fn root(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", "--cacert", self.ca_roots.to_str().unwrap()])
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .expect("curl");
        assert!(out.status.success(), "GET /roots/0: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

/// One nginx serving `<tree>/acme` on `ip:port`, as in docs/acme.md's nginx snippet.
pub(crate) fn nginx(dir: &Path, ip: &str, port: u16, tree: &Path) -> Proc {
    let body = format!(
        "location /.well-known/acme-challenge/ {{ root {}/acme; }}",
        tree.display()
    );
    nginx_with(dir, ip, port, "", &body)
}

/// A round-robin front: each request may land on any of `backends`.
fn nginx_front(dir: &Path, ip: &str, port: u16, backends: &[String]) -> Proc {
    let servers: String = backends
        .iter()
        .map(|b| format!("server {b}:{port}; "))
        .collect();
    nginx_with(
        dir,
        ip,
        port,
        &format!("upstream nodes {{ {servers}}}"),
        "location / { proxy_pass http://nodes; }",
    )
}

fn nginx_with(dir: &Path, ip: &str, port: u16, http_extra: &str, location: &str) -> Proc {
    let d = dir.join(format!("nginx-{ip}"));
    fs::create_dir_all(d.join("logs")).unwrap();
    let conf = format!(
        "user root;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         {http_extra}\n  server {{\n    listen {ip}:{port};\n    {location}\n  }}\n}}\n",
        d = d.display(),
    );
    let conf_path = d.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let log = d.join("error.log");
    let mut child = Command::new("nginx")
        .args(["-p", d.to_str().unwrap(), "-e", log.to_str().unwrap(), "-c"])
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(fs::File::create(d.join("stderr.log")).unwrap())
        .spawn()
        .expect("starting nginx");
    wait_listening(
        &format!("{ip}:{port}"),
        "nginx",
        &mut child,
        &d.join("stderr.log"),
    );
    Proc { child }
}

/// Appends `[acme]` + one `[[certificate]]` + a hook logging its environment.
fn enable_acme(node: &Node, pebble: &Pebble) {
    enable_acme_with(node, pebble, "")
}

pub(crate) fn enable_acme_with(node: &Node, pebble: &Pebble, acme_extra: &str) {
    let hook_log = node.dir.join("hook.log");
    let mut cfg = fs::read_to_string(&node.config).unwrap();
    cfg.push_str(&format!(
        "\n[acme]\ndirectory = \"{}\"\ncontact = [\"mailto:ops@certmesh.test\"]\nca_roots = \"{}\"\n{acme_extra}\
         \n[[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\nkey = \"ecdsa-p256\"\n\
         \n[[hook]]\npaths = [\"live/www/**\"]\nrun = [\"sh\", \"-c\", \"echo \\\"$CERTMESH_CHANGED\\\" >> {}\"]\ntimeout = \"5s\"\n",
        pebble.directory,
        pebble.ca_roots.display(),
        hook_log.display()
    ));
    fs::write(&node.config, cfg).unwrap();
}

pub(crate) fn live_version(node: &Node) -> Option<u32> {
    fs::read_link(node.tree.join("live/www"))
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

pub(crate) fn wait_version(nodes: &[&Node], at_least: u32, what: &str) -> Duration {
    let start = Instant::now();
    while start.elapsed() < ISSUE_DEADLINE {
        if nodes.iter().all(|n| {
            live_version(n).is_some_and(|v| v >= at_least)
                && n.tree.join("live/www/combined.pem").exists()
        }) {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let logs: String = nodes
        .iter()
        .map(|n| format!("--- {}\n{}", n.name, n.log()))
        .collect();
    panic!("timed out waiting for {what}\n{logs}");
}

fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

/// On one node: the live key belongs to the live cert, the cert names DOMAIN, the
/// chain goes leaf → intermediate → Pebble's root, modes are private.
pub(crate) fn check_bundle(node: &Node, root_pem: &str) {
    let dir = node.tree.join("live/www");
    let full = fs::read_to_string(dir.join("fullchain.pem")).unwrap();
    let key = fs::read_to_string(dir.join("privkey.pem")).unwrap();
    let ders = pem_ders(&full);
    assert!(
        ders.len() >= 2,
        "{}: fullchain has {} certs",
        node.name,
        ders.len()
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
    let kp = rcgen::KeyPair::from_pem(&key).unwrap();
    use rcgen::PublicKeyData;
    assert_eq!(
        leaf.public_key().raw,
        kp.subject_public_key_info().as_slice(),
        "{}: live key does not match live cert",
        node.name
    );
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert!(sans.iter().any(|s| s.contains(DOMAIN)), "{sans:?}");
    // The chain verifies: each signature checks against the next certificate's key,
    // ending at Pebble's root.
    let root_der = pem_ders(root_pem).remove(0);
    let mut chain = ders.clone();
    chain.push(root_der);
    for w in chain.windows(2) {
        let (_, c) = x509_parser::parse_x509_certificate(&w[0]).unwrap();
        let (_, issuer) = x509_parser::parse_x509_certificate(&w[1]).unwrap();
        assert_eq!(c.issuer(), issuer.subject(), "{}: chain order", node.name);
        c.verify_signature(Some(issuer.public_key()))
            .unwrap_or_else(|e| {
                panic!(
                    "{}: signature of {} does not verify: {e}",
                    node.name,
                    c.subject()
                )
            });
    }
    for f in ["privkey.pem", "combined.pem"] {
        let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o007,
            0,
            "{}: {f} readable by others ({mode:o})",
            node.name
        );
    }
    let combined = fs::read_to_string(dir.join("combined.pem")).unwrap();
    assert!(combined.starts_with(&full) && combined.ends_with(&key));
}

fn renewer_index(nodes: &[Node]) -> usize {
    let ids: Vec<DeviceId> = nodes.iter().map(|n| n.id.parse().unwrap()).collect();
    (0..ids.len()).min_by_key(|&i| ids[i]).unwrap()
}

#[test]
fn three_nodes_issue_with_the_validator_hitting_another_node() {
    if !tools_present() {
        return;
    }
    let mut c = Cluster::new(3, None);
    let http_port = free_tcp("127.0.0.2");
    let pebble = Pebble::start(c.dir.path(), http_port);
    let renewer = renewer_index(&c.nodes);
    let target = (renewer + 1) % 3;
    pebble.set_a(DOMAIN, &format!("127.0.0.{}", target + 2));
    let _nginx: Vec<Proc> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            fs::create_dir_all(n.tree.join("acme")).unwrap();
            nginx(
                c.dir.path(),
                &format!("127.0.0.{}", i + 2),
                pebble.http_port,
                &n.tree,
            )
        })
        .collect();
    for n in &c.nodes {
        enable_acme(n, &pebble);
    }
    c.start_all();

    // The daemons order the missing certificate on their own; the renewer does.
    let nodes: Vec<&Node> = c.nodes.iter().collect();
    let auto = wait_version(&nodes, 1, "the first certificate on all 3 nodes");
    eprintln!(
        "TIMING: automatic first issuance visible on all 3 nodes {auto:?} after the mesh formed"
    );
    let root = pebble.root();
    for n in &c.nodes {
        check_bundle(n, &root);
    }
    let r = &c.nodes[renewer];
    assert!(r.log().contains("challenge acknowledged"), "{}", r.log());
    for (i, n) in c.nodes.iter().enumerate() {
        if i != renewer {
            assert!(
                !n.log().contains("ordering"),
                "{} ordered too:\n{}",
                n.name,
                n.log()
            );
        }
        let acct = n.tree.join(".certmesh/acme/account.json");
        crate::util::wait_until("account.json everywhere", || acct.exists());
        let mode = fs::metadata(&acct).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{}: account.json is {mode:o}", n.name);
    }

    // `certmesh issue` on the renewer: time until the new version is live everywhere.
    let t = Instant::now();
    let out = certmesh(&["issue", "--config", r.config.to_str().unwrap(), "www"]);
    let cli = t.elapsed();
    assert!(out.status.success(), "issue: {out:?}\n{}", r.log());
    let all = wait_version(&nodes, 2, "the re-issued certificate on all 3 nodes");
    eprintln!(
        "TIMING: `certmesh issue` to the new certificate live on all 3 nodes: {:?} (CLI returned after {cli:?}); {}",
        t.elapsed().max(all),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    for n in &c.nodes {
        check_bundle(n, &root);
    }
    if std::env::var_os("CERTMESH_ACME_LOG").is_some() {
        eprintln!("--- renewer log\n{}", r.log());
    }

    // Tokens are gone everywhere; status has the certificate on every node.
    crate::util::wait_until("tokens removed on every node", || {
        c.nodes.iter().all(|n| {
            fs::read_dir(n.tree.join("acme/.well-known/acme-challenge"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
        })
    });
    let renewer_name = r.name.clone();
    for n in &c.nodes {
        let s = n.status();
        let cert = &s["certificates"][0];
        assert_eq!(cert["name"], "www", "{s}");
        assert!(
            cert["not_after"].as_str().is_some_and(|t| t.len() >= 20),
            "{s}"
        );
        assert_eq!(cert["version"], 2, "{s}");
        assert_eq!(cert["renewer"], renewer_name.as_str(), "{s}");
        assert!(cert["next_renewal"].is_string(), "{s}");
        // The hook ran on every node, with the certificate name.
        crate::util::wait_until("hook ran", || {
            fs::read_to_string(n.dir.join("hook.log"))
                .is_ok_and(|l| l.lines().filter(|l| l.trim() == "www").count() >= 2)
        });
    }
    let table = certmesh(&["status", "--config", r.config.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&table.stdout);
    if std::env::var_os("CERTMESH_ACME_LOG").is_some() {
        eprintln!("--- status\n{table}");
    }
    assert!(
        table.contains("CERTIFICATE") && table.contains("www"),
        "{table}"
    );

    // A node that is not the renewer does not order on `renew` unless forced.
    let other = &c.nodes[target];
    let out = certmesh(&[
        "renew",
        "--config",
        other.config.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not due"),
        "{out:?}"
    );
    let out = certmesh(&["renew", "--config", other.config.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not due"));
    assert_eq!(live_version(other), Some(2));
    // `renew --force` orders even there (the operator asked), and it lands everywhere.
    let out = certmesh(&[
        "renew",
        "--config",
        other.config.to_str().unwrap(),
        "--force",
    ]);
    assert!(out.status.success(), "{out:?}\n{}", other.log());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("renewed: version 3"),
        "{out:?}"
    );
    wait_version(&nodes, 3, "the forced renewal on all 3 nodes");
    for n in &c.nodes {
        check_bundle(n, &root);
    }

    // Pebble down: issue fails, status shows it, the live certificate is untouched.
    let before = fs::read(r.tree.join("live/www/fullchain.pem")).unwrap();
    let mut pebble = pebble;
    pebble.stop_ca();
    let out = certmesh(&["issue", "--config", r.config.to_str().unwrap(), "www"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let s = r.status();
    assert!(s["certificates"][0]["last_error"].is_string(), "{s}");
    assert_eq!(s["certificates"][0]["state"], "backoff", "{s}");
    for n in &c.nodes {
        assert_eq!(live_version(n), Some(3));
        assert_eq!(
            fs::read(n.tree.join("live/www/fullchain.pem")).unwrap(),
            before
        );
    }

    // Pebble back (new root, accounts forgotten), behind a round-robin front: each
    // validation may land on any node. The account is re-created and shared.
    pebble.start_ca();
    let backends: Vec<String> = (2..5).map(|i| format!("127.0.0.{i}")).collect();
    let _front = nginx_front(c.dir.path(), "127.0.0.6", pebble.http_port, &backends);
    pebble.set_a(DOMAIN, "127.0.0.6");
    let t = Instant::now();
    let out = certmesh(&["issue", "--config", r.config.to_str().unwrap(), "www"]);
    assert!(
        out.status.success(),
        "issue after Pebble came back: {out:?}\n{}",
        r.log()
    );
    let all = wait_version(
        &nodes,
        4,
        "the certificate from the restarted CA on all 3 nodes",
    );
    eprintln!(
        "TIMING: through a round-robin front, after re-creating the account: {:?}",
        t.elapsed().max(all)
    );
    let root = pebble.root();
    for n in &c.nodes {
        check_bundle(n, &root);
    }
    assert!(r.log().contains("creating a new one"), "{}", r.log());
    let s = r.status();
    assert_eq!(s["certificates"][0]["state"], "idle", "{s}");
    assert!(s["certificates"][0]["last_error"].is_null(), "{s}");
    for n in &mut c.nodes {
        n.stop();
    }
}

#[test]
fn one_node_issues_alone() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("certmesh-acme-")
        .tempdir()
        .unwrap();
    let mut n = Node::new(dir.path(), "solo", "127.0.0.5");
    n.configure(&[]);
    let http_port = free_tcp("127.0.0.5");
    let pebble = Pebble::start(dir.path(), http_port);
    pebble.set_a(DOMAIN, "127.0.0.5");
    fs::create_dir_all(n.tree.join("acme")).unwrap();
    let _web = nginx(dir.path(), "127.0.0.5", http_port, &n.tree);
    enable_acme(&n, &pebble);
    n.start();
    wait_version(&[&n], 1, "the first certificate");
    let t = Instant::now();
    let out = certmesh(&["issue", "--config", n.config.to_str().unwrap(), "www"]);
    assert!(out.status.success(), "issue: {out:?}\n{}", n.log());
    let took = wait_version(&[&n], 2, "the re-issued certificate").max(t.elapsed());
    eprintln!("TIMING: `certmesh issue` to the new certificate live on a single node: {took:?}");
    if std::env::var_os("CERTMESH_ACME_LOG").is_some() {
        eprintln!("--- node log\n{}", n.log());
    }
    check_bundle(&n, &pebble.root());
    n.stop();
}

#[test]
fn check_names_acme_config_problems() {
    let d = tempfile::tempdir().unwrap();
    let base = &crate::util::localized_config("[node]\nname = \"lb0\"\nstate_dir = \"/var/lib/certmesh\"\nlisten = \"127.0.0.1:22000\"\n[tree]\npath = \"/etc/nginx/certs\"\n[acme]\ndirectory = \"https://acme.example/dir\"\n", d.path());
    let cert = |body: &str| format!("{base}[[certificate]]\n{body}");
    let cases = [
        (cert("name = \"www\"\ndomains = [\"www.example.com\"]\nkey = \"rsa1024\"\n"), "certificate.key"),
        (cert("name = \"www\"\ndomains = []\n"), "certificate.domains"),
        (cert("name = \"www\"\ndomains = [\"a.example.com\"]\n[[certificate]]\nname = \"www\"\ndomains = [\"b.example.com\"]\n"), "duplicate certificate name"),
        (format!("{base}[[hook]]\npaths = [\"live/**\"]\nrun = []\n"), "hook.run"),
        (format!("{base}profile = 1\n"), "profile"),
        (format!("{base}ca_roots = \"/nonexistent/roots.pem\"\n"), "acme.ca_roots"),
    ];
    for (text, needle) in cases {
        let f = d.path().join("c.toml");
        fs::write(&f, &text).unwrap();
        let out = certmesh(&["check", "--config", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}\n{err}");
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
    let ok = d.path().join("ok.toml");
    fs::write(
        &ok,
        cert("name = \"www\"\ndomains = [\"www.example.com\"]\nkey = \"rsa4096\"\n"),
    )
    .unwrap();
    let out = certmesh(&["check", "--config", ok.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 certificates"));
}

/// The renewer is killed (kill -9) right after it took the lease: the next node in
/// line waits for the lease to lapse, then orders; no node ever exposes a
/// `live/www` whose key does not match its certificate (sampled throughout).
#[test]
fn a_renewer_killed_mid_order_is_taken_over() {
    if !tools_present() {
        return;
    }
    let mut c = Cluster::new(3, None);
    let http_port = free_tcp("127.0.0.2");
    let pebble = Pebble::start(c.dir.path(), http_port);
    let ids: Vec<DeviceId> = c.nodes.iter().map(|n| n.id.parse().unwrap()).collect();
    let mut line: Vec<usize> = (0..3).collect();
    line.sort_by_key(|&i| ids[i]);
    let (first, second, third) = (line[0], line[1], line[2]);
    pebble.set_a(DOMAIN, &format!("127.0.0.{}", third + 2));
    let _nginx: Vec<Proc> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            fs::create_dir_all(n.tree.join("acme")).unwrap();
            nginx(
                c.dir.path(),
                &format!("127.0.0.{}", i + 2),
                pebble.http_port,
                &n.tree,
            )
        })
        .collect();
    for n in &c.nodes {
        enable_acme_with(n, &pebble, "lease = \"3s\"\n");
    }

    // The invariant, sampled on every node until the end of the test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trees: Vec<PathBuf> = c.nodes.iter().map(|n| n.tree.clone()).collect();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut checked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for t in &trees {
                    // Resolve the link once: archive versions are immutable.
                    let Ok(target) = fs::read_link(t.join("live/www")) else {
                        continue;
                    };
                    let dir = t.join("live").join(target);
                    let (Ok(full), Ok(key)) = (
                        fs::read_to_string(dir.join("fullchain.pem")),
                        fs::read_to_string(dir.join("privkey.pem")),
                    ) else {
                        panic!(
                            "live/www points at an incomplete version in {}",
                            t.display()
                        );
                    };
                    let der = pem_ders(&full).remove(0);
                    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
                    let kp = rcgen::KeyPair::from_pem(&key).unwrap();
                    use rcgen::PublicKeyData;
                    assert_eq!(
                        leaf.public_key().raw,
                        kp.subject_public_key_info().as_slice(),
                        "mismatched key and cert in {}",
                        t.display()
                    );
                    checked += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            checked
        })
    };

    for n in &mut c.nodes {
        n.start();
    }
    // Kill the renewer as soon as its lease reached the others: mid-order.
    let lease = c.nodes[third].tree.join(".certmesh/leases/www");
    let start = Instant::now();
    while !lease.exists() {
        assert!(
            start.elapsed() < ISSUE_DEADLINE,
            "no lease appeared\n{}",
            c.nodes[first].log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    c.nodes[first].kill9();
    let killed = Instant::now();
    assert!(
        live_version(&c.nodes[first]).is_none(),
        "the renewer finished before it was killed; the takeover was not exercised"
    );
    let survivors = [&c.nodes[second], &c.nodes[third]];
    wait_version(
        &survivors,
        1,
        "the certificate from the node that took over",
    );
    eprintln!(
        "TIMING: takeover after the renewer was killed (lease 3s): {:?}",
        killed.elapsed()
    );
    // The publisher logs once its order has finished, a moment after the files it
    // published are visible (here or on the peer).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.nodes[second]
        .log()
        .contains("certificate issued and published")
    {
        assert!(Instant::now() < deadline, "{}", c.nodes[second].log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !c.nodes[third].log().contains("ordering"),
        "{}",
        c.nodes[third].log()
    );
    check_bundle(&c.nodes[second], &pebble.root());
    check_bundle(&c.nodes[third], &pebble.root());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let checked = sampler.join().expect("the invariant held");
    assert!(checked > 0);
    eprintln!("invariant samples with a live certificate: {checked}");
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

/// No web server at all: the CA validates against certmesh's own http-01 responder
/// (`[http] listen`), with an RSA key and a CA that requires external account
/// binding. A token the node does not have is answered statelessly from the shared
/// account's thumbprint, exactly as the CA expects.
#[test]
fn builtin_responder_with_an_rsa_certificate() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("certmesh-acme-")
        .tempdir()
        .unwrap();
    let mut n = Node::new(dir.path(), "solo", "127.0.0.7");
    n.configure(&[]);
    let http_port = free_tcp("127.0.0.7");
    let pebble = Pebble::start_with(dir.path(), http_port, true);
    pebble.set_a(DOMAIN, "127.0.0.7");
    enable_acme_with(
        &n,
        &pebble,
        &format!("eab_kid = \"{}\"\neab_hmac = \"{}\"\n", EAB.0, EAB.1),
    );
    let listen = format!("127.0.0.7:{http_port}");
    let cfg = fs::read_to_string(&n.config)
        .unwrap()
        .replace("key = \"ecdsa-p256\"", "key = \"rsa2048\"");
    fs::write(&n.config, format!("{cfg}\n[http]\nlisten = \"{listen}\"\n")).unwrap();
    // Catch a key authorization while an order is in flight.
    let challenges = n.tree.join("acme/.well-known/acme-challenge");
    let seen = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < ISSUE_DEADLINE {
            for e in fs::read_dir(&challenges).into_iter().flatten().flatten() {
                if let Ok(ka) = fs::read_to_string(e.path()) {
                    if !ka.is_empty() {
                        return Some(ka);
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    });
    n.start();
    wait_version(
        &[&n],
        1,
        "the first certificate, validated through the built-in responder",
    );
    check_bundle(&n, &pebble.root());
    let key = fs::read_to_string(n.tree.join("live/www/privkey.pem")).unwrap();
    let kp = rcgen::KeyPair::from_pem(&key).unwrap();
    assert!(kp.is_compatible(&rcgen::PKCS_RSA_SHA256), "not an RSA key");
    let ka = seen
        .join()
        .unwrap()
        .expect("saw a key authorization in the tree");
    let thumb = ka.split_once('.').expect("token.thumbprint").1;
    let (code, body) = http_get(&listen, "/.well-known/acme-challenge/not-placed-yet_123");
    assert_eq!(
        (code, body.as_str()),
        (200, format!("not-placed-yet_123.{thumb}").as_str())
    );
    let (code, _) = http_get(&listen, "/.well-known/acme-challenge/../../etc/passwd");
    assert_eq!(code, 404);
    let (code, _) = http_get(&listen, "/elsewhere");
    assert_eq!(code, 404);
    n.stop();
}

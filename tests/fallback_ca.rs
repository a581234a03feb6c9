//! A fallback CA (issue #15 item 6): `acme.directory` lists two real Pebble
//! instances; with the first stopped, orders go to the second (each CA with its own
//! shared account) and `status` names the CA of the live certificate; with the first
//! up, it is used. Everything binds on 127.0.8.x; the built-in http-01 responder
//! answers the validator.

use std::fs;
use std::path::Path;

use certmesh::acme::ca::{other_account_file, ACCOUNTS_DIR};
use certmesh::ops::status::Status;

use crate::acme::{check_bundle, tools_present, wait_version, Pebble, Proc, DOMAIN};
use crate::util::{certmesh, free_tcp, others, wait_listening, wait_until, Node};

/// The CAs' address; nodes are on .2, .3.
const CA_IP: &str = "127.0.8.1";

/// Two Pebbles side by side (each with its own DNS answering `DOMAIN` with
/// `target`), and one `ca_roots` file trusting both.
struct TwoCas {
    first: Pebble,
    second: Pebble,
    roots: std::path::PathBuf,
}

impl TwoCas {
    fn start(dir: &Path, http_port: u16, target: &str) -> TwoCas {
        Self::start_with(dir, http_port, target, false)
    }

    /// `eab`: the first CA requires external account binding (not configured).
    fn start_with(dir: &Path, http_port: u16, target: &str, eab: bool) -> TwoCas {
        let first = Pebble::start_on(&dir.join("ca-first"), CA_IP, http_port, eab);
        let second = Pebble::start_on(&dir.join("ca-second"), CA_IP, http_port, false);
        for ca in [&first, &second] {
            ca.set_a(DOMAIN, target);
        }
        let roots = dir.join("ca-roots.pem");
        let pem = [&first.ca_roots, &second.ca_roots]
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect::<String>();
        fs::write(&roots, pem).unwrap();
        TwoCas {
            first,
            second,
            roots,
        }
    }
}

/// `[acme]` with both CAs (first, then second), one certificate, and the built-in
/// http-01 responder on the node's address.
fn enable_fallback(node: &Node, cas: &TwoCas, http_port: u16) {
    let dirs = [cas.first.directory.as_str(), cas.second.directory.as_str()];
    enable_cas(node, &dirs, &cas.roots, http_port)
}

fn enable_cas(node: &Node, directories: &[&str], roots: &Path, http_port: u16) {
    let ip = node.addr.split(':').next().unwrap();
    let list: Vec<String> = directories.iter().map(|d| format!("\"{d}\"")).collect();
    let mut cfg = fs::read_to_string(&node.config).unwrap();
    cfg.push_str(&format!(
        "\n[acme]\ndirectory = [{}]\ncontact = [\"mailto:ops@certmesh.test\"]\nca_roots = \"{}\"\n\
         request_timeout = \"5s\"\n\
         \n[[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\nkey = \"ecdsa-p256\"\n\
         \n[http]\nlisten = \"{ip}:{http_port}\"\n",
        list.join(", "),
        roots.display(),
    ));
    fs::write(&node.config, cfg).unwrap();
}

fn status(n: &Node) -> Status {
    serde_json::from_value(n.status()).expect("status --json as certmesh's Status")
}

/// The CA `status` names for the live `www`, once it names one.
fn wait_ca(n: &Node, want: &str) {
    wait_until(&format!("{} status naming CA {want}", n.name), || {
        status(n)
            .certificates
            .first()
            .and_then(|c| c.ca.clone())
            .as_deref()
            == Some(want)
    });
}

/// One node ("solo" on 127.0.8.2, no peers) and two CAs whose http-01 validators
/// reach it; the node is configured but not started.
fn solo(dir: &Path, eab_first: bool) -> (Node, TwoCas, u16) {
    let n = Node::new(dir, "solo", "127.0.8.2");
    n.configure(&[]);
    let http_port = free_tcp("127.0.8.2");
    let cas = TwoCas::start_with(dir, http_port, "127.0.8.2", eab_first);
    (n, cas, http_port)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-fallback-")
        .tempdir()
        .unwrap()
}

#[test]
fn with_the_first_ca_down_one_node_issues_from_the_second() {
    if !tools_present() {
        return;
    }
    let dir = tempdir();
    let (mut n, mut cas, http_port) = solo(dir.path(), false);
    cas.first.stop_ca();
    enable_fallback(&n, &cas, http_port);
    n.start();

    wait_version(&[&n], 1, "a certificate from the second CA");
    check_bundle(&n, &cas.second.root());
    wait_ca(&n, &cas.second.directory);
    let s = status(&n);
    let fell_over = s.errors.iter().any(|e| {
        e.message.contains(&cas.first.directory)
            && e.message
                .contains(&format!("fell over to {}", cas.second.directory))
    });
    assert!(fell_over, "no error naming the first CA: {:?}", s.errors);
    // The second CA's account is its own; the first CA never got one.
    let second_account = n.tree.join(other_account_file(&cas.second.directory));
    assert!(second_account.exists(), "{}", second_account.display());
    assert!(!n.tree.join(".certmesh/acme/account.json").exists());
    let human = certmesh(&["status", "--config", n.config.to_str().unwrap()]);
    if std::env::var_os("CERTMESH_ACME_LOG").is_some() {
        eprintln!(
            "--- status\n{}--- node log\n{}",
            String::from_utf8_lossy(&human.stdout),
            n.log()
        );
    }
    let label = cas.second.directory.trim_start_matches("https://");
    let label = label.trim_end_matches("/dir");
    assert!(
        String::from_utf8_lossy(&human.stdout).contains(label),
        "status table without the CA {label}:\n{}",
        String::from_utf8_lossy(&human.stdout)
    );
    n.stop();
}

#[test]
fn with_the_first_ca_up_it_is_used() {
    if !tools_present() {
        return;
    }
    let dir = tempdir();
    let (mut n, cas, http_port) = solo(dir.path(), false);
    enable_fallback(&n, &cas, http_port);
    n.start();

    wait_version(&[&n], 1, "a certificate from the first CA");
    check_bundle(&n, &cas.first.root());
    wait_ca(&n, &cas.first.directory);
    // The first CA keeps the account file of a single `directory`.
    let account = fs::read_to_string(n.tree.join(".certmesh/acme/account.json")).unwrap();
    assert!(account.contains(&cas.first.directory), "{account}");
    assert!(!n.tree.join(ACCOUNTS_DIR).exists());
    n.stop();
}

/// Two nodes, the first CA down: the renewer orders from the second, the validator
/// asks the other node, both show the second CA. Then the first CA comes back: the
/// next order starts at it again.
#[test]
fn two_nodes_fall_over_and_come_back_to_the_first_ca() {
    if !tools_present() {
        return;
    }
    let dir = tempdir();
    let mut nodes: Vec<Node> = ["127.0.8.2", "127.0.8.3"]
        .iter()
        .enumerate()
        .map(|(i, ip)| Node::new(dir.path(), &format!("n{}", i + 1), ip))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        n.configure(&others(&nodes, i));
    }
    let http_port = free_tcp("127.0.8.2");
    // The validator asks the node that does not order.
    let ids: Vec<certmesh::core::device::DeviceId> =
        nodes.iter().map(|n| n.id.parse().unwrap()).collect();
    let renewer = usize::from(ids[1] < ids[0]);
    let target = format!("127.0.8.{}", 3 - renewer);
    let mut cas = TwoCas::start(dir.path(), http_port, &target);
    cas.first.stop_ca();
    for n in &nodes {
        enable_fallback(n, &cas, http_port);
    }
    for n in &mut nodes {
        n.start();
    }
    let all: Vec<&Node> = nodes.iter().collect();
    wait_version(&all, 1, "a certificate from the second CA on both nodes");
    for n in &nodes {
        check_bundle(n, &cas.second.root());
        wait_ca(n, &cas.second.directory);
    }

    cas.first.start_ca();
    let r = &nodes[renewer];
    let out = certmesh(&[
        "renew",
        "--config",
        r.config.to_str().unwrap(),
        "--force",
        "--json",
    ]);
    assert!(out.status.success(), "renew: {out:?}\n{}", r.log());
    wait_version(&all, 2, "a certificate from the first CA on both nodes");
    for n in &nodes {
        check_bundle(n, &cas.first.root());
        wait_ca(n, &cas.first.directory);
    }
    for n in &mut nodes {
        n.stop();
    }
}

/// A real HTTPS server on `CA_IP` answering every request with 503 (a CA in an
/// outage behind its load balancer), with the first Pebble's TLS identity.
fn unavailable_ca(dir: &Path, tls: &Path) -> (Proc, String) {
    let d = dir.join("nginx-503");
    fs::create_dir_all(&d).unwrap();
    let port = free_tcp(CA_IP);
    let conf = format!(
        "user root;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen {CA_IP}:{port} ssl;\n    ssl_certificate {t}/cert.pem;\n    ssl_certificate_key {t}/key.pem;\n\
         location / {{ return 503 \"down for maintenance\"; }}\n  }}\n}}\n",
        d = d.display(),
        t = tls.display(),
    );
    let conf_path = d.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let log = d.join("stderr.log");
    let mut child = std::process::Command::new("nginx")
        .args(["-p", d.to_str().unwrap(), "-e"])
        .arg(d.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting nginx");
    wait_listening(&format!("{CA_IP}:{port}"), "nginx", &mut child, &log);
    (Proc::new(child), format!("https://{CA_IP}:{port}/dir"))
}

/// The first CA answers HTTP 503: the order goes to the second, and the error
/// names the 503.
#[test]
fn a_first_ca_answering_503_falls_over() {
    if !tools_present() {
        return;
    }
    let dir = tempdir();
    let (mut n, cas, http_port) = solo(dir.path(), false);
    let (_down, first) = unavailable_ca(dir.path(), &dir.path().join("ca-first"));
    let dirs = [first.as_str(), cas.second.directory.as_str()];
    enable_cas(&n, &dirs, &cas.roots, http_port);
    n.start();

    wait_version(&[&n], 1, "a certificate from the second CA");
    wait_ca(&n, &cas.second.directory);
    let s = status(&n);
    let named = s.errors.iter().any(|e| {
        e.message.contains(&first)
            && e.message.contains("HTTP 503")
            && e.message.contains("down for maintenance")
    });
    assert!(named, "no error naming the 503: {:?}", s.errors);
    n.stop();
}

/// An error that is not an outage or a rate limit (here the first CA wants external
/// account binding) does not move the order to the next CA: it backs off, and says
/// which CA refused.
#[test]
fn a_refusal_at_the_first_ca_does_not_fall_over() {
    if !tools_present() {
        return;
    }
    let dir = tempdir();
    let (mut n, cas, http_port) = solo(dir.path(), true);
    enable_fallback(&n, &cas, http_port);
    n.start();

    wait_until("the order backing off", || {
        let s = status(&n);
        s.certificates.first().is_some_and(|c| {
            c.state == Some(certmesh::acme::handle::AcmeState::Backoff) && c.last_error.is_some()
        })
    });
    let s = status(&n);
    let c = &s.certificates[0];
    let e = c.last_error.as_deref().unwrap_or_default();
    assert!(
        e.contains(&format!("CA {}", cas.first.directory)) && e.contains("externalAccount"),
        "{e}"
    );
    assert_eq!(c.version, None);
    assert!(
        !n.tree.join(ACCOUNTS_DIR).exists(),
        "the second CA was asked"
    );
    n.stop();
}

/// Swapping the two CAs in the list keeps both accounts: the new first CA's account
/// goes into `account.json` only after the old one there moved to its own file.
#[test]
fn reordering_the_cas_keeps_every_account() {
    if !tools_present() {
        return;
    }
    let dir = tempdir();
    let (mut n, cas, http_port) = solo(dir.path(), false);
    enable_fallback(&n, &cas, http_port);
    n.start();
    wait_version(&[&n], 1, "a certificate from the first CA");
    let first_account = fs::read(n.tree.join(".certmesh/acme/account.json")).unwrap();
    n.stop();

    n.configure(&[]);
    let swapped = [cas.second.directory.as_str(), cas.first.directory.as_str()];
    enable_cas(&n, &swapped, &cas.roots, http_port);
    n.start();
    let out = certmesh(&["issue", "--config", n.config.to_str().unwrap(), "www"]);
    assert!(out.status.success(), "issue: {out:?}\n{}", n.log());
    wait_version(&[&n], 2, "a certificate from the CA now first");
    wait_ca(&n, &cas.second.directory);
    let moved = fs::read(n.tree.join(other_account_file(&cas.first.directory))).unwrap();
    assert_eq!(moved, first_account, "the first CA's account was not kept");
    let now_first = fs::read_to_string(n.tree.join(".certmesh/acme/account.json")).unwrap();
    assert!(now_first.contains(&cas.second.directory), "{now_first}");
    n.stop();
}

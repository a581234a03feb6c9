//! Migrating from certbot and lego (issue #14 item 4), end to end with real
//! components: REAL certbot and lego obtain a certificate from a local Pebble, nginx
//! serves it from the paths those clients made, `certmesh import` adopts it, the
//! daemon renews it (one order), and nginx — config untouched — serves the new one.
//! Only loopback addresses 127.0.2.1–127.0.2.60 are used.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use certmesh::demo_pebble::Pebble;

use crate::util::{certmesh, free_tcp, wait_listening, Node};

const DOMAIN: &str = "www.import.test";
const RENEW_DEADLINE: Duration = Duration::from_secs(90);

/// A child process killed (and reaped) on drop.
struct Proc(std::process::Child);

impl Proc {
    fn new(c: std::process::Child) -> Proc {
        Proc(c)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tools_present(extra: &str) -> bool {
    let ok = [
        "/usr/bin/pebble",
        "/usr/bin/pebble-challtestsrv",
        "/usr/sbin/nginx",
        "/usr/bin/openssl",
        extra,
    ]
    .iter()
    .all(|p| Path::new(p).exists());
    if !ok {
        eprintln!("SKIPPED: pebble, nginx, openssl and {extra} are needed (apt-get install pebble nginx certbot lego)");
    }
    ok
}

/// Pebble + pebble-challtestsrv on `ip` (every name resolves to `ip`).
fn start_pebble(dir: &Path, ip: &str) -> Pebble {
    let options = certmesh::demo_pebble::Options {
        default_ipv4: Some(ip),
        ..crate::util::pebble_options(ip)
    };
    Pebble::start(&dir.join("pebble"), &options).expect("starting pebble")
}

/// nginx on `ip:port` with TLS from `cert` + `key` (the paths an operator's config
/// already has), unchanged for the whole test. Returns the process and its reload argv.
fn nginx_tls(dir: &Path, ip: &str, port: u16, cert: &Path, key: &Path) -> (Proc, Vec<String>) {
    let d = dir.join("nginx");
    fs::create_dir_all(d.join("logs")).unwrap();
    let conf = format!(
        "user root;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen {ip}:{port} ssl;\n    server_name {DOMAIN};\n    ssl_certificate {c};\n    ssl_certificate_key {k};\n    return 200 \"ok\";\n  }}\n}}\n",
        d = d.display(),
        c = cert.display(),
        k = key.display(),
    );
    let conf_path = d.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let base = vec![
        "nginx".to_string(),
        "-p".into(),
        d.display().to_string(),
        "-e".into(),
        d.join("error.log").display().to_string(),
        "-c".into(),
        conf_path.display().to_string(),
    ];
    let mut child = Command::new(&base[0])
        .args(&base[1..])
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
    let mut reload = base;
    reload.extend(["-s".to_string(), "reload".to_string()]);
    (Proc::new(child), reload)
}

/// The serial (hex, lowercase, no separators) of the certificate nginx serves.
fn served_serial(addr: &str) -> Option<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-servername", DOMAIN])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ders: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .filter_map(|p| p.ok())
        .map(|p| p.contents)
        .collect();
    serial_of(ders.first()?)
}

fn serial_of(der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(c.raw_serial_as_string().replace(':', "").to_lowercase())
}

fn file_serial(p: &Path) -> String {
    let pem = fs::read(p).unwrap();
    let der = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .next()
        .unwrap()
        .unwrap()
        .contents;
    serial_of(&der).unwrap()
}

/// A single node whose tree is `tree`, ordering from `pebble` over its built-in
/// http-01 responder, with a hook that reloads nginx and records certbot's and lego's
/// variables.
fn node(dir: &Path, ip: &str, tree: &Path, pebble: &Pebble, reload: &[String]) -> Node {
    let mut n = Node::new(dir, "lb0", ip);
    n.tree = tree.to_path_buf();
    n.configure(&[]);
    let env_log = n.dir.join("hook-env.log");
    let argv: Vec<String> = reload.iter().map(|a| format!("{a:?}")).collect();
    let mut cfg = fs::read_to_string(&n.config).unwrap();
    cfg.push_str(&format!(
        "\n[acme]\ndirectory = \"{}\"\ncontact = [\"mailto:ops@import.test\"]\nca_roots = \"{}\"\n\
         \n[[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\nkey = \"ecdsa-p256\"\n\
         \n[[hook]]\npaths = [\"live/www/**\"]\nrun = [{}]\ntimeout = \"10s\"\n\
         \n[[hook]]\npaths = [\"live/www/**\"]\nrun = [\"sh\", \"-c\", \"env | grep -E '^(RENEWED|LEGO)_' >> {}\"]\ntimeout = \"5s\"\n\
         \n[http]\nlisten = \"{ip}:{}\"\n",
        pebble.directory,
        pebble.ca_roots.display(),
        argv.join(", "),
        env_log.display(),
        pebble.http_port,
    ));
    fs::write(&n.config, cfg).unwrap();
    n
}

fn wait_for(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {deadline:?} waiting for: {what}");
}

/// Real certbot, standalone http-01 on `ip`, into `dir` (config, work and logs).
fn certbot(dir: &Path, ip: &str, pebble: &Pebble) {
    let (cfg, work, logs) = (dir.join("etc"), dir.join("work"), dir.join("logs"));
    let out = Command::new("certbot")
        .args([
            "certonly",
            "--standalone",
            "--non-interactive",
            "--agree-tos",
        ])
        .args(["-m", "ops@import.test", "--cert-name", "www", "-d", DOMAIN])
        .args(["--http-01-address", ip])
        .args(["--http-01-port", &pebble.http_port.to_string()])
        .args(["--server", &pebble.directory])
        .args(["--config-dir", cfg.to_str().unwrap()])
        .args(["--work-dir", work.to_str().unwrap()])
        .args(["--logs-dir", logs.to_str().unwrap()])
        .env("REQUESTS_CA_BUNDLE", &pebble.ca_roots)
        .output()
        .expect("running certbot");
    assert!(out.status.success(), "certbot: {out:?}");
}

#[test]
fn certbot_tree_imported_renews_once_and_nginx_keeps_its_paths() {
    if !tools_present("/usr/bin/certbot") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("certmesh-import-")
        .tempdir()
        .unwrap();
    let (ca_ip, web_ip) = ("127.0.2.11", "127.0.2.13");
    let pebble = start_pebble(dir.path(), ca_ip);
    // DNS answers ca_ip for every name: certbot's standalone server and, later,
    // certmesh's built-in responder listen there.
    let certbot_dir = dir.path().join("certbot");
    certbot(&certbot_dir, ca_ip, &pebble);
    let le = certbot_dir.join("etc");
    let live = le.join("live/www");
    assert!(fs::symlink_metadata(&live).unwrap().is_dir());
    assert_eq!(pebble.issued(), 1);
    let first = file_serial(&live.join("cert.pem"));

    let web = format!("{web_ip}:{}", free_tcp(web_ip));
    let port: u16 = web.rsplit(':').next().unwrap().parse().unwrap();
    let (_nginx, reload) = nginx_tls(
        dir.path(),
        web_ip,
        port,
        &live.join("fullchain.pem"),
        &live.join("privkey.pem"),
    );
    assert_eq!(served_serial(&web).as_deref(), Some(first.as_str()));

    let mut n = node(dir.path(), ca_ip, &le, &pebble, &reload);
    let cfg = n.config.to_str().unwrap().to_string();

    // Not imported yet: check names the directory and the fix; the daemon refuses to
    // order (no EISDIR after issuance, no order spent).
    let out = certmesh(&["check", "--config", &cfg]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(err.contains(&live.display().to_string()), "{err}");
    assert!(err.contains("certmesh import"), "{err}");
    n.start();
    let out = certmesh(&["renew", "--config", &cfg, "--force"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text.contains("certmesh import"), "{text}");
    assert!(!n.log().contains("Is a directory"), "{}", n.log());
    assert_eq!(
        pebble.issued(),
        1,
        "an order was spent on a tree it cannot publish into"
    );
    n.stop();

    // Import: no order, same certificate, nginx's paths resolve through certmesh's link.
    let out = certmesh(&[
        "import",
        "--config",
        &cfg,
        "--from",
        "certbot",
        le.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("certmesh import --from certbot:\n{report}");
    // certbot's account key is RSA, which instant-acme cannot sign with: said so.
    assert!(
        report.contains("account: ") && report.contains("RSA"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "still valid: {}",
            live.join("fullchain.pem").display()
        )),
        "{report}"
    );
    assert_eq!(pebble.issued(), 1);
    assert_eq!(fs::read_link(&live).unwrap(), Path::new("../archive/www/1"));
    assert_eq!(file_serial(&live.join("cert.pem")), first);
    assert!(le.join("renewal/www.conf.certmesh-imported").exists());
    assert!(!le.join("renewal/www.conf").exists());
    let out = certmesh(&["check", "--config", &cfg]);
    assert!(out.status.success(), "{out:?}");

    // The daemon does not order a valid imported certificate; a forced renewal is
    // exactly one order, and nginx (reloaded by the hook) serves the new certificate
    // from the very same paths.
    n.start();
    let out = certmesh(&["renew", "--config", &cfg, "--force"]);
    assert!(out.status.success(), "{out:?}\n{}", n.log());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("renewed: version 2"),
        "{out:?}"
    );
    assert_eq!(pebble.issued(), 2, "{}", n.log());
    let second = file_serial(&live.join("fullchain.pem"));
    assert_ne!(second, first);
    wait_for(
        "nginx serving the renewed certificate",
        RENEW_DEADLINE,
        || served_serial(&web).as_deref() == Some(second.as_str()),
    );
    let env = n.dir.join("hook-env.log");
    wait_for("the hook saw certbot's variables", RENEW_DEADLINE, || {
        fs::read_to_string(&env).is_ok_and(|e| {
            e.contains(&format!("RENEWED_LINEAGE={}", live.display()))
                && e.contains(&format!("RENEWED_DOMAINS={DOMAIN}"))
        })
    });
    assert!(!n.log().contains("Is a directory"), "{}", n.log());
    assert_eq!(
        n.log().matches("certificate issued and published").count(),
        1
    );
}

#[test]
fn lego_tree_imported_with_its_account_renews_once() {
    if !tools_present("/usr/bin/lego") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("certmesh-import-")
        .tempdir()
        .unwrap();
    let (ca_ip, web_ip) = ("127.0.2.21", "127.0.2.23");
    let pebble = start_pebble(dir.path(), ca_ip);
    let lego = dir.path().join("lego");
    let out = Command::new("lego")
        .args(["--server", &pebble.directory, "--accept-tos"])
        .args(["--email", "ops@import.test", "--domains", DOMAIN])
        .args([
            "--http",
            "--http.port",
            &format!("{ca_ip}:{}", pebble.http_port),
        ])
        .args(["--path", lego.to_str().unwrap(), "run"])
        .env("LEGO_CA_CERTIFICATES", &pebble.ca_roots)
        .output()
        .expect("running lego");
    assert!(out.status.success(), "lego: {out:?}");
    assert_eq!(pebble.issued(), 1);
    let crt = lego.join(format!("certificates/{DOMAIN}.crt"));
    let key = lego.join(format!("certificates/{DOMAIN}.key"));
    let first = file_serial(&crt);
    let web = format!("{web_ip}:{}", free_tcp(web_ip));
    let port: u16 = web.rsplit(':').next().unwrap().parse().unwrap();
    let (_nginx, reload) = nginx_tls(dir.path(), web_ip, port, &crt, &key);
    assert_eq!(served_serial(&web).as_deref(), Some(first.as_str()));

    let tree = dir.path().join("tree");
    let mut n = node(dir.path(), ca_ip, &tree, &pebble, &reload);
    let cfg = n.config.to_str().unwrap().to_string();
    let out = certmesh(&[
        "import",
        "--config",
        &cfg,
        "--from",
        "lego",
        lego.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("certmesh import --from lego:\n{report}");
    assert!(report.contains("account: imported"), "{report}");
    let lego_account = fs::read_dir(lego.join("accounts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let lego_account = lego_account.join("ops@import.test/account.json");
    let lego_account: serde_json::Value =
        serde_json::from_slice(&fs::read(&lego_account).unwrap()).unwrap();
    let uri = lego_account["registration"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(pebble.issued(), 1);
    assert_eq!(
        fs::read_link(&crt).unwrap(),
        tree.join("live/www/fullchain.pem")
    );
    assert_eq!(file_serial(&crt), first);

    n.start();
    let out = certmesh(&["renew", "--config", &cfg, "--force"]);
    assert!(out.status.success(), "{out:?}\n{}", n.log());
    assert_eq!(pebble.issued(), 2, "{}", n.log());
    // The imported account was used: no new registration.
    assert!(!n.log().contains("account created"), "{}", n.log());
    let ours = fs::read_to_string(tree.join(".certmesh/acme/account.json")).unwrap();
    assert!(ours.contains(&uri), "{ours}");
    let second = file_serial(&crt);
    assert_ne!(second, first);
    wait_for(
        "nginx serving the renewed certificate",
        RENEW_DEADLINE,
        || served_serial(&web).as_deref() == Some(second.as_str()),
    );
    let env = n.dir.join("hook-env.log");
    wait_for("the hook saw lego's variables", RENEW_DEADLINE, || {
        fs::read_to_string(&env).is_ok_and(|e| {
            e.contains(&format!("LEGO_CERT_DOMAIN={DOMAIN}"))
                && e.contains(&format!(
                    "LEGO_CERT_PATH={}",
                    tree.join("live/www/fullchain.pem").display()
                ))
        })
    });
}

/// A certbot-shaped tree made by hand (as certbot lays it out), for `check`.
fn certbot_shaped(le: &Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![DOMAIN.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    fs::create_dir_all(le.join("archive/www")).unwrap();
    fs::create_dir_all(le.join("live/www")).unwrap();
    fs::create_dir_all(le.join("renewal")).unwrap();
    for (f, data) in [
        ("cert", cert.pem()),
        ("chain", cert.pem()),
        ("fullchain", format!("{}{}", cert.pem(), cert.pem())),
        ("privkey", key.serialize_pem()),
    ] {
        fs::write(le.join(format!("archive/www/{f}1.pem")), data).unwrap();
        std::os::unix::fs::symlink(
            format!("../../archive/www/{f}1.pem"),
            le.join(format!("live/www/{f}.pem")),
        )
        .unwrap();
    }
    fs::write(le.join("renewal/www.conf"), "version = 2.1.0\n").unwrap();
}

#[test]
fn check_names_an_unimported_certbot_live_dir_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let le = dir.path().join("letsencrypt");
    certbot_shaped(&le);
    let mut n = Node::new(dir.path(), "lb0", "127.0.2.31");
    n.tree = le.clone();
    n.configure(&[]);
    let mut cfg = fs::read_to_string(&n.config).unwrap();
    cfg.push_str(&format!(
        "\n[[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\n"
    ));
    fs::write(&n.config, cfg).unwrap();
    let out = certmesh(&["check", "--config", n.config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains(&le.join("live/www").display().to_string()),
        "{err}"
    );
    assert!(err.contains("--from certbot"), "{err}");

    // A lego import of a certbot tree is refused with a clear error, nothing written.
    let before = crate::util::snapshot(&le);
    let out = certmesh(&[
        "import",
        "--config",
        n.config.to_str().unwrap(),
        "--from",
        "lego",
        dir.path().join("nowhere").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nowhere"),
        "{out:?}"
    );
    assert_eq!(crate::util::snapshot(&le), before);
}

#[test]
fn a_key_that_does_not_match_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let le = dir.path().join("letsencrypt");
    certbot_shaped(&le);
    let other = rcgen::KeyPair::generate().unwrap();
    fs::write(le.join("archive/www/privkey1.pem"), other.serialize_pem()).unwrap();
    let mut n = Node::new(dir.path(), "lb0", "127.0.2.32");
    n.tree = le.clone();
    n.configure(&[]);
    let mut cfg = fs::read_to_string(&n.config).unwrap();
    cfg.push_str(&format!(
        "\n[[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\n"
    ));
    fs::write(&n.config, cfg).unwrap();
    let before = crate::util::snapshot(&le);
    let out = certmesh(&[
        "import",
        "--config",
        n.config.to_str().unwrap(),
        "--from",
        "certbot",
        le.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains("live/www/privkey.pem") && err.contains("does not belong"),
        "{err}"
    );
    assert_eq!(crate::util::snapshot(&le), before);
}

#[test]
fn certbot_tree_elsewhere_becomes_a_link_into_the_tree_and_a_second_import_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let le = dir.path().join("letsencrypt");
    certbot_shaped(&le);
    let served = fs::read(le.join("live/www/fullchain.pem")).unwrap();
    let n = Node::new(dir.path(), "lb0", "127.0.2.33");
    n.configure(&[]);
    let mut cfg = fs::read_to_string(&n.config).unwrap();
    cfg.push_str(&format!(
        "\n[[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\n"
    ));
    fs::write(&n.config, cfg).unwrap();
    let cfg = n.config.to_str().unwrap().to_string();
    let out = certmesh(&[
        "import",
        "--config",
        &cfg,
        "--from",
        "certbot",
        le.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    // nginx's path now goes through the tree's live/www, which holds the same chain.
    let tree = fs::canonicalize(&n.tree).unwrap();
    assert_eq!(
        fs::read_link(le.join("live/www")).unwrap(),
        tree.join("live/www")
    );
    assert_eq!(
        fs::read_link(n.tree.join("live/www")).unwrap(),
        Path::new("../archive/www/1")
    );
    assert_eq!(fs::read(le.join("live/www/fullchain.pem")).unwrap(), served);
    assert!(le.join("archive/www/fullchain1.pem").is_file());
    // certbot's links were kept, as they were, in the backup.
    let backup = fs::read_dir(n.state.join("import-backup"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        fs::read_link(backup.join("live/www/fullchain.pem")).unwrap(),
        Path::new("../../archive/www/fullchain1.pem")
    );
    // A second import is refused (exit 2, the path named), nothing changes.
    let before = (crate::util::snapshot(&le), crate::util::snapshot(&n.tree));
    let out = certmesh(&[
        "import",
        "--config",
        &cfg,
        "--from",
        "certbot",
        le.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("live/www") && err.contains("imported before"),
        "{err}"
    );
    assert_eq!(
        (crate::util::snapshot(&le), crate::util::snapshot(&n.tree)),
        before
    );
}

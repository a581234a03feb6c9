//! Running under systemd: `sd_notify` messages on a datagram socket the test owns
//! (`READY=1` only once the node is reachable, `STATUS=`, `WATCHDOG=1`, `RELOADING=1`
//! … `READY=1` around SIGHUP), the journal's `<N>` priority prefixes when stderr is
//! the journal stream but no journald listens, and `NO_COLOR` on a terminal.
//! Nodes use 127.0.1.1–127.0.1.60 only.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{wait_until, Node, BIN, DEADLINE};

/// The service manager's end: a datagram socket at a path the daemon is told about.
struct NotifySocket {
    path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("binding the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        NotifySocket { path, sock }
    }

    /// The next message for which `want` holds (earlier ones are dropped), as it
    /// arrived: one datagram, `KEY=value` lines.
    fn expect(&self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while start.elapsed() < DEADLINE {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                if want(&msg) {
                    return msg;
                }
                seen.push(msg);
            }
        }
        panic!("timed out waiting for {what}; got {seen:?}");
    }

    fn expect_line(&self, line: &str) -> String {
        self.expect(line, |m| m.lines().any(|l| l == line))
    }
}

fn status_line(msg: &str) -> Option<&str> {
    msg.lines().find_map(|l| l.strip_prefix("STATUS="))
}

/// Starts `certmesh run` with `env` and no wait at all: readiness is what is tested.
fn spawn(node: &mut Node, env: &[(&str, &str)]) {
    let log = fs::File::create(node.dir.join("node.log")).expect("log file");
    let child = Command::new(BIN)
        .args(["run", "--config", node.config.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "info,certmesh=debug,quinn=warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting certmesh run");
    node.child = Some(child);
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("certmesh-systemd-")
        .tempdir()
        .expect("temp dir")
}

#[test]
fn ready_only_once_control_socket_and_port_are_up() {
    let d = tempdir();
    let mut a = Node::new(d.path(), "a", "127.0.1.1");
    a.configure(&[]);
    let notify = NotifySocket::bind(d.path());
    spawn(&mut a, &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);

    let ready = notify.expect_line("READY=1");
    // At this instant, not later: `systemctl start certmesh && certmesh status`.
    assert!(UnixStream::connect(a.state.join("control.sock")).is_ok());
    assert_eq!(a.status()["node"]["name"], "a", "{}", a.log());
    let taken = std::net::UdpSocket::bind(&a.addr).expect_err("the QUIC port is bound");
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(
        status_line(&ready),
        Some("peers 0/0 connected, 0 in sync; 0 items out of sync; no certificates")
    );

    a.stop();
    notify.expect_line("STOPPING=1");
}

#[test]
fn status_line_follows_the_peers() {
    let d = tempdir();
    let mut a = Node::new(d.path(), "a", "127.0.1.2");
    let mut b = Node::new(d.path(), "b", "127.0.1.3");
    a.configure(&[&b]);
    b.configure(&[&a]);
    let notify = NotifySocket::bind(d.path());
    spawn(&mut a, &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    let ready = notify.expect_line("READY=1");
    assert!(
        status_line(&ready).is_some_and(|s| s.starts_with("peers 0/1 connected")),
        "{ready}"
    );

    b.start();
    notify.expect("STATUS= with b connected and in sync", |m| {
        status_line(m).is_some_and(|s| s.starts_with("peers 1/1 connected, 1 in sync"))
    });
    b.stop();
    notify.expect("STATUS= with b gone", |m| {
        status_line(m).is_some_and(|s| s.starts_with("peers 0/1 connected"))
    });
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    let d = tempdir();
    let mut a = Node::new(d.path(), "a", "127.0.1.4");
    a.configure(&[]);
    let notify = NotifySocket::bind(d.path());
    spawn(
        &mut a,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    notify.expect_line("READY=1");
    let first = Instant::now();
    notify.expect_line("WATCHDOG=1");
    for _ in 0..4 {
        notify.expect_line("WATCHDOG=1");
    }
    // Five pings 200 ms apart (half of 400 ms): never a flood of them.
    assert!(first.elapsed() >= Duration::from_millis(4 * 190));
}

#[test]
fn sighup_is_bracketed_by_reloading_and_ready() {
    let d = tempdir();
    let mut a = Node::new(d.path(), "a", "127.0.1.5");
    a.configure(&[]);
    let notify = NotifySocket::bind(d.path());
    spawn(&mut a, &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.expect_line("READY=1");

    a.signal(libc::SIGHUP);
    let reloading = notify.expect_line("RELOADING=1");
    // Type=notify-reload semantics: the monotonic time the reload started.
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading}"
    );
    notify.expect_line("READY=1");
    wait_until("reload logged", || a.log().contains("peer list reloaded"));

    a.stop();
    notify.expect_line("STOPPING=1");
}

#[test]
fn journal_stream_without_journald_gives_priority_prefixes() {
    if Path::new("/run/systemd/journal/socket").exists() {
        eprintln!("skipped: a journald listens here, entries would go to it");
        return;
    }
    let d = tempdir();
    let mut a = Node::new(d.path(), "a", "127.0.1.6");
    a.configure(&[]);
    // stderr is the log file, and JOURNAL_STREAM names it, as systemd would.
    fs::File::create(a.dir.join("node.log")).expect("log file");
    let m = fs::metadata(a.dir.join("node.log")).expect("stat log");
    let stream = format!("{}:{}", m.dev(), m.ino());
    let log = fs::OpenOptions::new()
        .append(true)
        .open(a.dir.join("node.log"))
        .expect("log file");
    let child = Command::new(BIN)
        .args(["run", "--config", a.config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env("JOURNAL_STREAM", &stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting certmesh run");
    a.child = Some(child);
    wait_until("certmesh running", || a.log().contains("certmesh running"));
    // A warning: a reload with a broken config.
    fs::write(&a.config, "[node]\nname = 1\n").unwrap();
    a.signal(libc::SIGHUP);
    wait_until("reload refused", || a.log().contains("config not reloaded"));
    a.stop();

    let log = a.log();
    for line in log.lines() {
        assert!(line.starts_with('<'), "no priority prefix: {line:?}");
    }
    let running = log
        .lines()
        .find(|l| l.contains("certmesh running"))
        .unwrap();
    assert!(running.starts_with("<5>"), "info is notice (5): {running}");
    let refused = log
        .lines()
        .find(|l| l.contains("config not reloaded"))
        .unwrap();
    assert!(refused.starts_with("<4>"), "warn is warning (4): {refused}");
    // No timestamp of our own: the journal adds one.
    assert!(!running.contains(" INFO "), "{running}");
    assert!(!running[3..].starts_with(char::is_numeric), "{running}");
}

#[test]
fn journal_stream_naming_another_file_is_ignored() {
    let d = tempdir();
    let mut a = Node::new(d.path(), "a", "127.0.1.7");
    a.configure(&[]);
    // Inherited from a parent whose stderr was the journal; ours is a file.
    spawn(&mut a, &[("JOURNAL_STREAM", "8:12345")]);
    wait_until("certmesh running", || a.log().contains("certmesh running"));
    a.stop();
    let log = a.log();
    let running = log
        .lines()
        .find(|l| l.contains("certmesh running"))
        .unwrap();
    assert!(!running.starts_with('<'), "{running}");
    assert!(running.contains("INFO"), "{running}");
}

/// Runs `certmesh run` for a node whose port is taken on a pseudo-terminal (through
/// `script`), so it logs (a warning about its damaged index, then info) and exits.
fn on_a_pty(node: &Node, no_color: bool) -> String {
    let cmd = format!("exec {BIN} run --config {}", node.config.display());
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null());
    if no_color {
        c.env("NO_COLOR", "1");
    }
    let out = c.output().expect("running script(1)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn no_color_means_no_escapes_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no script(1) (util-linux)");
        return;
    }
    let d = tempdir();
    let a = Node::new(d.path(), "a", "127.0.1.8");
    a.configure(&[]);
    let _taken = std::net::UdpSocket::bind(&a.addr).expect("holding the port");
    fs::write(a.state.join("index.db"), b"not an index").unwrap();

    let coloured = on_a_pty(&a, false);
    assert!(coloured.contains("damaged"), "{coloured}");
    assert!(
        coloured.contains('\x1b'),
        "a pty gets colours: {coloured:?}"
    );
    fs::write(a.state.join("index.db"), b"not an index").unwrap();
    let plain = on_a_pty(&a, true);
    assert!(plain.contains("WARN"), "{plain}");
    assert!(plain.contains("damaged"), "{plain}");
    assert!(!plain.contains('\x1b'), "NO_COLOR: {plain:?}");
}

/// `certmesh issue` on a terminal says what the order is doing while it waits, and
/// `--json` answers for scripts (Pebble validating through the built-in responder).
#[test]
fn issue_shows_progress_on_a_terminal_and_json_for_scripts() {
    use crate::acme::{enable_acme_with, wait_version, Pebble, DOMAIN};
    use crate::util::free_tcp;
    if !crate::acme::tools_present() || Command::new("script").arg("-V").output().is_err() {
        return;
    }
    let d = tempdir();
    let mut n = Node::new(d.path(), "solo", "127.0.1.10");
    n.configure(&[]);
    let http_port = free_tcp("127.0.1.10");
    let pebble = Pebble::start(d.path(), http_port);
    pebble.set_a(DOMAIN, "127.0.1.10");
    enable_acme_with(&n, &pebble, "");
    let cfg = fs::read_to_string(&n.config).unwrap();
    let listen = format!("127.0.1.10:{http_port}");
    fs::write(&n.config, format!("{cfg}\n[http]\nlisten = \"{listen}\"\n")).unwrap();
    n.start();
    wait_version(&[&n], 1, "the first certificate");

    let cmd = format!("exec {BIN} issue --config {} www", n.config.display());
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running script(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- certmesh issue on a pty:\n{text}");
    assert!(out.status.success(), "{text}\n{}", n.log());
    // The first step is always shown (it is polled before the order can finish).
    assert!(
        text.lines().any(|l| l.starts_with("www: ")),
        "no progress: {text}"
    );
    assert!(text.contains("www: version 2 issued"), "{text}");

    let out = crate::util::certmesh(&[
        "issue",
        "--config",
        n.config.to_str().unwrap(),
        "www",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("issue --json");
    assert_eq!(v["version"], 3, "{v}");
    let out = crate::util::certmesh(&[
        "renew",
        "--config",
        n.config.to_str().unwrap(),
        "--dry-run",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("renew --json");
    assert_eq!(v["results"][0]["name"], "www", "{v}");
    n.stop();
}

#[test]
fn man_page_and_completions_come_from_the_cli_definition() {
    let man = crate::util::certmesh(&["man"]);
    assert!(man.status.success());
    let man = String::from_utf8(man.stdout).unwrap();
    assert!(man.contains(".TH certmesh 1"), "{man}");
    assert!(man.contains("status"), "subcommands listed: {man}");
    for shell in ["bash", "zsh", "fish"] {
        let out = crate::util::certmesh(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("firewall"), "{shell}: {script}");
        assert!(
            script.contains("ip6tables"),
            "{shell}: --format values: {script}"
        );
    }
    let out = crate::util::certmesh(&["completions", "bash"]);
    let path = tempdir();
    let f = path.path().join("certmesh.bash");
    fs::write(&f, out.stdout).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(syntax.success(), "bash -n on the completions");
}

/// `restore --json`: the kept versions and the restored one, for scripts.
#[test]
fn restore_answers_in_json() {
    let d = tempdir();
    let mut a = Node::new(d.path(), "a", "127.0.1.11");
    let mut b = Node::new(d.path(), "b", "127.0.1.12");
    a.configure(&[&b]);
    b.configure(&[&a]);
    a.start();
    b.start();
    wait_until("connected", || a.all_connected() && b.all_connected());
    a.write("dhparam.pem", "one");
    wait_until("b has one", || {
        b.read("dhparam.pem").as_deref() == Some("one")
    });
    // Atomic: a plain write could send an empty file first, which b would keep too.
    a.write_atomic("dhparam.pem", "two");
    wait_until("b has two", || {
        b.read("dhparam.pem").as_deref() == Some("two")
    });

    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["restore", "--config", b.config.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        let out = crate::util::certmesh(&all);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("restore --json")
    };
    assert_eq!(json(&["--list"])["paths"][0]["path"], "dhparam.pem");
    let listed = json(&["dhparam.pem", "--list"]);
    assert_eq!(listed["versions"][0]["version"], 1, "{listed}");
    assert_eq!(listed["versions"][0]["cause"], "replaced by a", "{listed}");
    let restored = json(&["dhparam.pem"]);
    assert_eq!(restored["restored"], "dhparam.pem", "{restored}");
    assert_eq!(restored["size"], 3, "{restored}");
    wait_until("a has one again", || {
        a.read("dhparam.pem").as_deref() == Some("one")
    });
}

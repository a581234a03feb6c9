//! The `[http] listen` port is never free (issue 25 item 8): the daemon takes it from
//! systemd socket activation (`LISTEN_FDS`, the socket at fd 3), so across a restart
//! the port stays held and a request made meanwhile is answered by the new process.
//! Here the test plays systemd: it binds the socket and hands it to `certmesh run`.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::trust_links::get;
use crate::util::{wait_until, Node, BIN};

const TOKEN: &str = "acme/.well-known/acme-challenge/tok-held";

/// A node on `ip` whose `[http] listen` is the address of `socket`.
fn node_with_http(dir: &std::path::Path, ip: &str, socket: &TcpListener) -> Node {
    let n = Node::new(dir, "solo", ip);
    n.configure(&[]);
    let addr = socket.local_addr().unwrap();
    let mut cfg = fs::read_to_string(&n.config).unwrap();
    cfg.push_str(&format!("\n[http]\nlisten = \"{addr}\"\n"));
    fs::write(&n.config, cfg).unwrap();
    n.write(TOKEN, "tok-held.thumb");
    n
}

/// Starts `certmesh run` as systemd would with socket activation: `socket` at fd 3,
/// `LISTEN_FDS=1`, `LISTEN_FDNAMES=http` and `LISTEN_PID` the daemon's own PID (the
/// shell's, which `exec` makes the daemon's).
fn start_activated(n: &mut Node, socket: &TcpListener) {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(n.dir.join("node.log"))
        .unwrap();
    let fd = socket.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ exec \"$0\" \"$@\"",
        BIN,
        "run",
        "--config",
    ])
    .arg(&n.config)
    .env("LISTEN_FDS", "1")
    .env("LISTEN_FDNAMES", "http")
    .env("RUST_LOG", "info,certmesh=debug")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    // SAFETY: dup2 and fcntl are async-signal-safe; nothing else runs after fork.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    n.child = Some(cmd.spawn().unwrap());
    let sock = n.state.join("control.sock");
    wait_until("the activated daemon's control socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
}

#[test]
fn the_responder_serves_on_the_socket_systemd_passes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = TcpListener::bind("127.0.7.2:0").unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    let mut n = node_with_http(dir.path(), "127.0.7.2", &socket);
    start_activated(&mut n, &socket);
    assert_eq!(
        get(&addr, "/.well-known/acme-challenge/tok-held"),
        (200, "tok-held.thumb".to_string())
    );
    assert!(
        n.log().contains("socket activation"),
        "the daemon did not say it took the passed socket:\n{}",
        n.log()
    );
    n.stop();
}

#[test]
fn across_a_restart_the_port_stays_held_and_a_waiting_request_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let socket = TcpListener::bind("127.0.7.3:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let mut n = node_with_http(dir.path(), "127.0.7.3", &socket);
    start_activated(&mut n, &socket);
    n.stop();
    // Down: another local user cannot take the port, and the CA's request waits.
    let taken = TcpListener::bind(addr);
    assert!(taken.is_err(), "the port was free while certmesh was down");
    let mut waiting = TcpStream::connect(addr).unwrap();
    write!(
        waiting,
        "GET /.well-known/acme-challenge/tok-held HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    start_activated(&mut n, &socket);
    let mut reply = String::new();
    waiting.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("tok-held.thumb"), "{reply}");
    n.stop();
}

#[test]
fn without_activation_a_taken_port_stops_the_start_before_the_index_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let squatter = TcpListener::bind("127.0.7.4:0").unwrap();
    let n = node_with_http(dir.path(), "127.0.7.4", &squatter);
    let out = Command::new(BIN)
        .args(["run", "--config", n.config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("http.listen"), "{err}");
    assert!(err.contains("ss -tlpn"), "no hint: {err}");
    let state: Vec<_> = fs::read_dir(&n.state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // Only the state dir's lock (taken first, so a second `run` names the running
    // one's pid) may be there: nothing was loaded or written.
    assert!(
        state.iter().all(|f| !f.contains("index")),
        "the index was touched before the port was taken: {state:?}"
    );
}

//! The `[http] listen` socket, taken first at start so the port is never free while
//! certmesh starts or restarts: from systemd socket activation (`LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from `SD_LISTEN_FDS_START` = 3; the
//! unit `certmesh-http.socket` holds the port across `systemctl restart`), else bound
//! here. A local user who binds the port during a restart would receive the CA's
//! validation requests and could validate their own orders for the fleet's names.
//!
//! The descriptors are taken at most once per process (each becomes an owned
//! listener) and are close-on-exec, so hooks never inherit them.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};

/// The name a socket unit gives the responder's socket (`FileDescriptorName=http`).
pub const FD_NAME: &str = "http";

/// Whether the passed descriptors were already taken in this process.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listener for `[http] listen = addr` (`None` when not configured): the socket
/// systemd passed, if any, else a new one bound to `addr`.
pub fn http_listener(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let passed = passed_fds().context("reading LISTEN_FDS (systemd socket activation)")?;
    let Some(addr) = addr else {
        if !passed.is_empty() {
            tracing::warn!(
                count = passed.len(),
                "systemd passed sockets (LISTEN_FDS) but [http] listen is not configured: ignored"
            );
        }
        return Ok(None);
    };
    if passed.is_empty() {
        let l = TcpListener::bind(addr).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    " (another certmesh with this config may still be running, or another \
                     program holds the port: check `ss -tlpn`)"
                }
                _ => "",
            };
            anyhow::anyhow!("http.listen {addr}: cannot bind: {e}{hint}")
        })?;
        return Ok(Some(l));
    }
    let l = take(&passed)?;
    let got = l.local_addr().context("the passed http socket's address")?;
    if got != addr {
        tracing::warn!(%got, configured = %addr, "the socket systemd passed for http.listen listens elsewhere than configured; serving on it");
    }
    tracing::info!(addr = %got, "http-01 responder socket from systemd (socket activation)");
    Ok(Some(l))
}

/// The descriptors passed to this process with their names (empty without socket
/// activation, or once taken).
fn passed_fds() -> std::io::Result<Vec<(RawFd, String)>> {
    if TAKEN.load(Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    Ok(sd_notify::listen_fds_with_names()?.collect())
}

/// The responder's socket among the passed ones: the one named [`FD_NAME`], else the
/// only listening TCP socket.
fn take(passed: &[(RawFd, String)]) -> anyhow::Result<TcpListener> {
    let tcp: Vec<(RawFd, &str)> = passed
        .iter()
        .filter(|(fd, _)| is_tcp_listener(*fd))
        .map(|(fd, name)| (*fd, name.as_str()))
        .collect();
    let fd = match (tcp.iter().find(|(_, n)| *n == FD_NAME), tcp.as_slice()) {
        (Some((fd, _)), _) => *fd,
        (None, [(fd, _)]) => *fd,
        (None, []) => bail!(
            "systemd passed {} socket(s) (LISTEN_FDS) but none is a listening TCP socket for http.listen",
            passed.len()
        ),
        (None, _) => bail!(
            "systemd passed {} listening TCP sockets (LISTEN_FDS) and none is named \"{FD_NAME}\" (FileDescriptorName=) for http.listen",
            tcp.len()
        ),
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        bail!("the sockets systemd passed were already taken in this process");
    }
    // SAFETY: `fd` was passed to this process by the service manager (LISTEN_PID is
    // ours), is open (checked by `is_tcp_listener`) and is owned by nothing else:
    // `TAKEN` makes this the only place that ever wraps a passed descriptor.
    let l = unsafe { TcpListener::from_raw_fd(fd) };
    Ok(l)
}

/// Whether `fd` is an open, listening stream socket of the IPv4 or IPv6 family.
fn is_tcp_listener(fd: RawFd) -> bool {
    // SAFETY: borrowed only for these calls; an fd that is not open fails them.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let stream = sockopt::socket_type(fd).is_ok_and(|t| t == SocketType::STREAM);
    let listening = sockopt::socket_acceptconn(fd).unwrap_or(false);
    let inet = rustix::net::getsockname(fd).is_ok_and(|a| {
        matches!(
            a.address_family(),
            AddressFamily::INET | AddressFamily::INET6
        )
    });
    stream && listening && inet
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_listening_tcp_sockets_are_taken() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(is_tcp_listener(l.as_raw_fd()));
        assert!(!is_tcp_listener(udp.as_raw_fd()));
        let e = take(&[(udp.as_raw_fd(), "http".into())]).unwrap_err();
        assert!(
            e.to_string().contains("none is a listening TCP socket"),
            "{e}"
        );
    }

    #[test]
    fn without_activation_the_configured_address_is_bound() {
        let l = http_listener(Some("127.0.0.1:0".parse().unwrap()))
            .unwrap()
            .expect("a listener");
        assert!(l.local_addr().unwrap().ip().is_loopback());
        assert!(http_listener(None).unwrap().is_none());
    }
}

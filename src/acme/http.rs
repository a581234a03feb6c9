//! The optional built-in http-01 responder (`[http] listen`), for setups where the
//! front (HAProxy, say) forwards `/.well-known/acme-challenge/` to certmesh instead of
//! serving `<tree>/acme` itself. It serves the token files from the tree and answers
//! a token it does not have yet statelessly with `<token>.<account thumbprint>`: the
//! account is shared, so the answer is right whichever node placed the order.
//! Only regular files with token-shaped names directly in the challenge directory are
//! served (no link followed, at most 4 KiB); at most 256 connections at once, and over
//! that the oldest is dropped for the newcomer (slow clients cannot keep the CA out);
//! an accept error (EMFILE) pauses the loop, never ends it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{ca::ACCOUNT_FILE, order::CHALLENGE_DIR};
use crate::disk::tree;
use crate::net::clients::Clients;

const PREFIX: &str = "/.well-known/acme-challenge/";

/// Connections served at once; more are closed at once (a CA validates a handful).
const MAX_CLIENTS: usize = 256;
/// A key authorization is under 100 bytes; anything over this is not one.
const MAX_TOKEN_FILE: u64 = 4096;

/// Serves the tree at `root` in the background on `std`, the `[http] listen` socket
/// the daemon took first thing at start (bound, or passed by systemd).
pub fn start(
    root: PathBuf,
    std: std::net::TcpListener,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    std.set_nonblocking(true)?;
    let addr = std.local_addr().context("http.listen socket address")?;
    let listener = TcpListener::from_std(std)?;
    tracing::info!(%addr, "http-01 responder listening");
    // A slowloris must not keep the CA out: over the cap the oldest client goes.
    let clients = Clients::new("http-01 responder", MAX_CLIENTS).evicting_oldest();
    let limit = Some(Duration::from_secs(10));
    let root: Arc<Path> = root.into();
    Ok(crate::net::clients::serve_forever(
        listener,
        clients,
        limit,
        move |stream| {
            let root = root.clone();
            async move { serve(&root, stream).await }
        },
    ))
}

async fn serve(root: &Path, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return reply(&mut stream, 431, b"").await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return reply(&mut stream, 405, b"").await;
    }
    let body = answer(root, target);
    match body {
        Some(b) if method == "GET" => reply(&mut stream, 200, &b).await,
        Some(_) => reply(&mut stream, 200, b"").await,
        None => reply(&mut stream, 404, b"").await,
    }
}

/// The key authorization for a request target, if there is one (from the tree at
/// `root`).
pub fn answer(root: &Path, target: &str) -> Option<Vec<u8>> {
    let token = target.strip_prefix(PREFIX)?;
    if token.is_empty()
        || token.len() > 256
        || !token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return None;
    }
    if let Some(b) = token_file(root, token) {
        return Some(b);
    }
    let thumb = super::account::key_thumbprint(&tree::read(root, ACCOUNT_FILE)?)?;
    Some(format!("{token}.{thumb}").into_bytes())
}

/// The content of `acme/.well-known/acme-challenge/<token>` if it is a regular file
/// (reached without following any link) of at most [`MAX_TOKEN_FILE`] bytes.
fn token_file(root: &Path, token: &str) -> Option<Vec<u8>> {
    let r = crate::disk::safe_fs::Root::open(root).ok()?;
    r.read(&format!("{CHALLENGE_DIR}/{token}"), MAX_TOKEN_FILE)
        .ok()
}

async fn reply(stream: &mut TcpStream, code: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn only_small_regular_token_files_are_served() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let dir = root.join(CHALLENGE_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(root.join("live/x")).unwrap();
        fs::write(root.join("live/x/privkey.pem"), "KEY").unwrap();
        fs::write(dir.join("tok"), "tok.thumb").unwrap();
        fs::write(dir.join("big"), vec![b'a'; 4097]).unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink("../../../live/x/privkey.pem", dir.join("k")).unwrap();
        assert_eq!(token_file(root, "tok").as_deref(), Some(&b"tok.thumb"[..]));
        for refused in ["k", "big", "sub", "missing"] {
            assert!(token_file(root, refused).is_none(), "{refused}");
        }
        // The challenge directory itself reached through a link: refused too.
        let other = tempfile::tempdir().unwrap();
        fs::create_dir_all(other.path().join("acme")).unwrap();
        std::os::unix::fs::symlink(
            root.join("acme/.well-known"),
            other.path().join("acme/.well-known"),
        )
        .unwrap();
        assert!(token_file(other.path(), "tok").is_none());
    }
}

//! The optional built-in http-01 responder (`[http] listen`), for setups where the
//! front (HAProxy, say) forwards `/.well-known/acme-challenge/` to certmesh instead of
//! serving `<tree>/acme` itself. It serves the token files from the tree and answers
//! a token it does not have yet statelessly with `<token>.<account thumbprint>`: the
//! account is shared, so the answer is right whichever node placed the order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{account::ACCOUNT_FILE, order::CHALLENGE_DIR, tree};
use crate::node::Shared;

const PREFIX: &str = "/.well-known/acme-challenge/";

/// Binds and serves in the background.
pub fn start(shared: Arc<Shared>, addr: SocketAddr) -> anyhow::Result<()> {
    let std = std::net::TcpListener::bind(addr).with_context(|| format!("http.listen {addr}"))?;
    std.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std)?;
    tracing::info!(%addr, "http-01 responder listening");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), serve(&shared, stream)).await;
            });
        }
    });
    Ok(())
}

async fn serve(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
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
    let body = answer(shared, target);
    match body {
        Some(b) if method == "GET" => reply(&mut stream, 200, &b).await,
        Some(_) => reply(&mut stream, 200, b"").await,
        None => reply(&mut stream, 404, b"").await,
    }
}

/// The key authorization for a request target, if there is one.
pub fn answer(shared: &Shared, target: &str) -> Option<Vec<u8>> {
    let token = target.strip_prefix(PREFIX)?;
    if token.is_empty()
        || token.len() > 256
        || !token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return None;
    }
    if let Some(b) = tree::read(&shared.tree.root, &format!("{CHALLENGE_DIR}/{token}")) {
        return Some(b);
    }
    let thumb = thumbprint(&tree::read(&shared.tree.root, ACCOUNT_FILE)?)?;
    Some(format!("{token}.{thumb}").into_bytes())
}

/// RFC 7638 thumbprint of the shared account's key (instant-acme: ECDSA P-256).
pub fn thumbprint(account_json: &[u8]) -> Option<String> {
    use sha2::Digest;
    let v: serde_json::Value = serde_json::from_slice(account_json).ok()?;
    let b64 = v["credentials"]["key_pkcs8"].as_str()?;
    let der = data_encoding::BASE64URL_NOPAD
        .decode(b64.trim_end_matches('=').as_bytes())
        .ok()?;
    let key = rcgen::KeyPair::try_from(der.as_slice()).ok()?;
    let raw = key.public_key_raw();
    if raw.len() != 65 || raw[0] != 4 {
        return None;
    }
    let enc = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        enc(&raw[1..33]),
        enc(&raw[33..])
    );
    Some(enc(&sha2::Sha256::digest(jwk.as_bytes())))
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

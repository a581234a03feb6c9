//! The HTTPS client the ACME code talks to the CA with: it trusts the system roots
//! plus `acme.ca_roots`, puts a timeout and a size cap on every request, and caps
//! `Retry-After` before instant-acme sees it. A CA that cannot be reached, times out
//! or answers 5xx comes back as [`CaUnavailable`] (what moves an order to the next
//! CA).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use bytes::Bytes;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};

use super::ca::CaUnavailable;
use super::schedule::MAX_RETRY_AFTER;
use crate::config::acme::AcmeConfig;

/// A CA response body is at most this many bytes (a chain is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A `Retry-After` value as passed on to instant-acme: delay-seconds capped at
/// [`MAX_RETRY_AFTER`] (instant-acme adds the raw value to `SystemTime::now()`, which
/// panics on overflow); an HTTP-date becomes the (capped) seconds until then; `None`
/// (header dropped) for anything else.
pub fn capped_retry_after(value: &str, now: SystemTime) -> Option<u64> {
    let value = value.trim();
    let cap = MAX_RETRY_AFTER.as_secs();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.min(cap));
    }
    let at =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let now = time::OffsetDateTime::from(now);
    let secs = (at - now).whole_seconds().clamp(0, cap as i64);
    Some(secs as u64)
}

/// Wraps the HTTPS client: each request (body included) within `timeout`, bodies at
/// most [`MAX_RESPONSE_BYTES`] (counted while they stream, chunked ones included, so
/// a CA that never ends a body costs at most that much memory), `Retry-After`
/// capped ([`capped_retry_after`]). A transport failure, a timeout and an HTTP 5xx
/// come back as [`CaUnavailable`] (what moves an order to the next CA).
struct Guarded<C> {
    inner: hyper_util::client::legacy::Client<C, BodyWrapper<Bytes>>,
    timeout: Duration,
}

impl<C> HttpClient for Guarded<C>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        use http_body_util::BodyExt;
        let what = format!("{} {}", req.method(), req.uri());
        let fut = self.inner.request(req);
        let timeout = self.timeout;
        Box::pin(async move {
            let other = |m: String| instant_acme::Error::Other(m.into());
            let exchange = async {
                let rsp = fut.await.map_err(|e| {
                    CaUnavailable::Unreachable {
                        what: what.clone(),
                        why: transport_error(&instant_acme::Error::Other(Box::new(e))),
                    }
                    .into_acme()
                })?;
                let (mut parts, body) = rsp.into_parts();
                let declared = parts
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                if declared.is_some_and(|n| n > MAX_RESPONSE_BYTES as u64) {
                    return Err(other(format!(
                        "{what}: response body too large (Content-Length over {MAX_RESPONSE_BYTES} bytes)"
                    )));
                }
                let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.is::<http_body_util::LengthLimitError>() {
                            other(format!(
                                "{what}: response body too large (more than {MAX_RESPONSE_BYTES} bytes streamed; stopped reading)"
                            ))
                        } else {
                            other(format!("{what}: reading the response: {e}"))
                        }
                    })?
                    .to_bytes();
                let status = parts.status;
                if status.is_server_error() {
                    return Err(CaUnavailable::ServerError {
                        what: what.clone(),
                        status: status.as_u16(),
                        detail: server_error_detail(&body),
                    }
                    .into_acme());
                }
                let body = String::from_utf8(body.to_vec())
                    .map_err(|_| other(format!("{what}: response body is not UTF-8")))?;
                let headers = &mut parts.headers;
                let capped = headers.get(http::header::RETRY_AFTER).map(|v| {
                    v.to_str()
                        .ok()
                        .and_then(|v| capped_retry_after(v, SystemTime::now()))
                });
                match capped {
                    None => {}
                    Some(None) => {
                        headers.remove(http::header::RETRY_AFTER);
                    }
                    Some(Some(secs)) => {
                        headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
                    }
                }
                Ok(BytesResponse::from(http::Response::from_parts(parts, body)))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(CaUnavailable::Timeout {
                    what,
                    limit: timeout,
                }
                .into_acme()),
            }
        })
    }
}

/// A transport error and its causes on one line ("client error (Connect): tcp
/// connect error: Connection refused (os error 111)").
fn transport_error(e: &instant_acme::Error) -> String {
    let mut out = e.to_string();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = match e {
        instant_acme::Error::Other(b) => b.source(),
        _ => None,
    };
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    if out.contains("UnknownIssuer") {
        out.push_str(
            " (the CA's HTTPS certificate is not signed by a root this host trusts: \
             for a private or test CA, set acme.ca_roots to its root's PEM)",
        );
    }
    // Long chains keep their end: the cause is there.
    let n = out.chars().count();
    if n > 400 {
        let tail: String = out.chars().skip(n - 300).collect();
        out = format!("{}…{tail}", out.chars().take(99).collect::<String>());
    }
    out
}

/// `": <detail>"` of a 5xx body: the problem document's `detail`, or the start of
/// the body on one line; empty if there is nothing to show.
fn server_error_detail(body: &[u8]) -> String {
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).to_string());
    let one: String = detail
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(160)
        .collect();
    if one.is_empty() {
        one
    } else {
        format!(": {one}")
    }
}

/// The HTTPS client for the CA: system roots plus `ca_roots`.
pub(super) fn http_client(cfg: &AcmeConfig) -> anyhow::Result<Box<dyn HttpClient>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &cfg.ca_roots {
        let mut n = 0;
        for c in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading acme.ca_roots {}", path.display()))?
        {
            let c = c.with_context(|| format!("parsing acme.ca_roots {}", path.display()))?;
            roots
                .add(c)
                .with_context(|| format!("acme.ca_roots {}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            bail!("acme.ca_roots {}: no certificate in it", path.display());
        }
    }
    if roots.is_empty() {
        bail!("no trusted roots: none in the system store and no acme.ca_roots");
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    Ok(Box::new(Guarded {
        inner: client,
        timeout: cfg.request_timeout,
    }))
}

/// `fut` (one step of talking to the CA) within `limit`; running out of time is a
/// [`CaUnavailable::Timeout`].
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, instant_acme::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => Err(CaUnavailable::Timeout {
            what: what.to_string(),
            limit,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A hostile "CA": answers every request with a chunked body that never ends;
    /// counts the bytes it got out before the client hung up. It exists only to be
    /// hostile.
    fn endless_chunked_server() -> (String, Arc<AtomicU64>) {
        let l = std::net::TcpListener::bind("127.0.1.30:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let count = sent.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut req = [0u8; 4096];
                let _ = std::io::Read::read(&mut s, &mut req);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                            Transfer-Encoding: chunked\r\n\r\n";
                if s.write_all(head.as_bytes()).is_err() {
                    continue;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "a".repeat(64 << 10));
                while s.write_all(chunk.as_bytes()).is_ok() {
                    count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            }
        });
        (addr, sent)
    }

    #[tokio::test]
    async fn an_endless_chunked_body_is_cut_off_at_the_cap() {
        let (addr, sent) = endless_chunked_server();
        let client = Guarded {
            inner:
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(hyper_util::client::legacy::connect::HttpConnector::new()),
            timeout: Duration::from_secs(30),
        };
        let req = http::Request::get(format!("http://{addr}/dir"))
            .body(BodyWrapper::default())
            .unwrap();
        let t = std::time::Instant::now();
        let e = match client.request(req).await {
            Ok(_) => panic!("an endless body was accepted"),
            Err(e) => e.to_string(),
        };
        let took = t.elapsed();
        assert!(e.contains("response body too large"), "{e}");
        assert!(e.contains("stopped reading"), "{e}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        // Read no further than the cap plus what the sockets buffer.
        let out = sent.load(Ordering::SeqCst);
        assert!(out < 16 << 20, "the server got {out} bytes out");
        eprintln!(
            "MEASURED: endless chunked body refused after {took:?}; server wrote {out} bytes"
        );
    }

    #[test]
    fn retry_after_is_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let cap = MAX_RETRY_AFTER.as_secs();
        assert_eq!(capped_retry_after(&u64::MAX.to_string(), now), Some(cap));
        assert_eq!(capped_retry_after("120", now), Some(120));
        assert_eq!(
            capped_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(cap)
        );
        assert_eq!(
            capped_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(0)
        );
        assert_eq!(capped_retry_after("soon", now), None);
        assert_eq!(capped_retry_after("-1", now), None);
    }
}

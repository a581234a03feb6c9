//! One serving probe: a TLS handshake with SNI against a frontend, reading the leaf
//! it presents. The verifier accepts any chain (the point is to see what the server
//! hands out, not to judge it); nothing is sent after the handshake.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Longest one probe (connect + handshake) may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The leaf a frontend presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub sha256: [u8; 32],
    pub not_after_unix: Option<i64>,
}

/// Accepts every chain; signatures are still checked, so the server proves it holds
/// the key of the leaf it presents.
#[derive(Debug)]
struct AnyChain(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyChain {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyChain(provider)))
            .with_no_client_auth();
        Ok(Arc::new(c))
    });
    config
        .as_ref()
        .map(|c| tokio_rustls::TlsConnector::from(c.clone()))
        .map_err(Clone::clone)
}

/// Shakes hands with `address` sending `sni`; the error says what failed, for
/// people ("connection refused", "timed out after 5s", "no certificate presented").
pub async fn probe(address: SocketAddr, sni: &str) -> Result<Presented, String> {
    match tokio::time::timeout(TIMEOUT, handshake(address, sni)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}s", TIMEOUT.as_secs())),
    }
}

async fn handshake(address: SocketAddr, sni: &str) -> Result<Presented, String> {
    let name = ServerName::try_from(sni.to_string())
        .map_err(|_| format!("{sni:?} is not a valid server name"))?;
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(io_reason)?;
    let tls = connector()?.connect(name, tcp).await.map_err(io_reason)?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| "no certificate presented".to_string())?;
    Ok(presented(leaf.as_ref()))
}

/// The SHA-256 and notAfter of a leaf's DER.
pub fn presented(der: &[u8]) -> Presented {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.as_ref());
    let not_after_unix = x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp());
    Presented {
        sha256,
        not_after_unix,
    }
}

/// Whether a probe error means the frontend takes no connections at all (as
/// opposed to a failed handshake for one name).
pub fn unreachable(error: &str) -> bool {
    error == "connection refused" || error.starts_with("timed out")
}

/// An I/O error as people say it: "connection refused", not "Connection refused
/// (os error 111)".
fn io_reason(e: std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::ConnectionReset => "connection reset".into(),
        K::UnexpectedEof => "connection closed during the handshake".into(),
        K::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_named_connection_refused() {
        // Bind then drop: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let err = probe(addr, "www.example.com").await.unwrap_err();
        assert_eq!(err, "connection refused");
    }
}

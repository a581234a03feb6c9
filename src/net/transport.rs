//! The QUIC endpoint: quinn over rustls 1.3 with mutual TLS, ALPN `certmesh/1`, both
//! sides accepting only certificates whose device ID is configured. The pinning
//! happens inside the handshake, so an unknown device never gets to send a message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::core::device::DeviceId;
use crate::identity::Identity;

/// The ALPN protocol of this wire version.
pub const ALPN: &[u8] = b"certmesh/1";
/// The SNI every node presents (identity is the pinned certificate, not a name).
pub const SERVER_NAME: &str = "certmesh";

/// Which device IDs may connect: asked at every handshake. The daemon derives it
/// from the config channel (the one peer registry), so a SIGHUP that adds or removes
/// a `[[peer]]` changes it with nothing kept in step by hand.
pub type Allowed = Arc<dyn Fn(&DeviceId) -> bool + Send + Sync>;

/// An allow-list of exactly these devices (tests and tools).
pub fn allow_only(ids: impl IntoIterator<Item = DeviceId>) -> Allowed {
    let ids: std::collections::HashSet<DeviceId> = ids.into_iter().collect();
    Arc::new(move |id| ids.contains(id))
}

/// Errors setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS configuration was refused.
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// The QUIC crypto config was refused.
    #[error("QUIC setup: {0}")]
    Quic(String),
    /// Binding the UDP socket failed (the OS error is in the message, not chained,
    /// so it is said once).
    #[error("node.listen {addr}: cannot bind: {error}{}", bind_hint(error))]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// The likely cause of a bind failure, and what to do.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another certmesh may still be running on it, e.g. one just stopped that is \
             finishing its writes: wait for it to exit, or check `ss -ulpn`)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no interface of this host has that address: check node.listen)"
        }
        _ => "",
    }
}

/// A peer that proved another device ID than the configured one: both IDs, so the
/// refusal in `status` says which side's config is wrong.
#[derive(Debug)]
struct WrongDeviceId {
    expected: DeviceId,
    presented: DeviceId,
}

impl std::fmt::Display for WrongDeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the peer presented device ID {} but peer.id is {} (a wrong ID in this \
             config, or another node at that address)",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for WrongDeviceId {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks a presented certificate: parseable and inside its validity period (an
/// expired or not-yet-valid node certificate is refused even when its device ID is
/// pinned; RELIABILITY.md explains why). Returns the device ID; a refusal is logged
/// with its reason, the dates and our clock (a wrong clock shows up here).
fn check_cert(end_entity: &CertificateDer<'_>, now: UnixTime) -> Result<DeviceId, rustls::Error> {
    let id = DeviceId::of_cert(end_entity);
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity).map_err(|_| {
        tracing::warn!(device = %id, "refused peer certificate: not a valid X.509 certificate");
        rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
    })?;
    let clock = x509_parser::time::ASN1Time::from_timestamp(now.as_secs() as i64)
        .map_err(|_| rustls::Error::General("bad clock".into()))?;
    let validity = cert.validity();
    let refused = if clock < validity.not_before {
        Some(("not yet valid", rustls::CertificateError::NotValidYet))
    } else if clock > validity.not_after {
        Some(("expired", rustls::CertificateError::Expired))
    } else {
        None
    };
    if let Some((why, error)) = refused {
        tracing::warn!(
            device = %id,
            not_before = %validity.not_before,
            not_after = %validity.not_after,
            local_clock = %clock,
            "refused peer certificate: {why}"
        );
        return Err(rustls::Error::InvalidCertificate(error));
    }
    Ok(id)
}

/// True if `cert` is inside its validity period now.
fn currently_valid(cert: &CertificateDer<'_>) -> bool {
    let now = UnixTime::now();
    x509_parser::parse_x509_certificate(cert)
        .ok()
        .zip(x509_parser::time::ASN1Time::from_timestamp(now.as_secs() as i64).ok())
        .is_some_and(|((_, c), t)| c.validity().is_valid_at(t))
}

fn verify13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
    .inspect_err(|e| {
        tracing::warn!(
            device = %DeviceId::of_cert(cert),
            error = %e,
            "refused: the handshake signature does not match the presented certificate (the peer does not hold its key)"
        );
    })
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Server side: accept a client certificate only if its ID is configured.
struct PinnedClients {
    allowed: Allowed,
}

impl std::fmt::Debug for PinnedClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedClients")
    }
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = check_cert(end_entity, now)?;
        if !(self.allowed)(&id) {
            tracing::warn!(device = %id, "refused incoming connection from unknown device");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Client side: the server must be exactly the peer we dialled.
#[derive(Debug)]
struct PinnedServer {
    expected: DeviceId,
    /// The other device ID the server proved, if it did: for the dial's error.
    presented: Arc<std::sync::Mutex<Option<DeviceId>>>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = check_cert(end_entity, now)?;
        if id != self.expected {
            tracing::warn!(expected = %self.expected, presented = %id, "refused: peer presented another device ID");
            if let Ok(mut p) = self.presented.lock() {
                *p = Some(id);
            }
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Socket buffers asked for (the kernel caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

/// Bigger socket buffers, so a burst of large datagrams is not dropped on arrival;
/// best effort: the defaults still work, only slower.
fn grow_socket_buffers(socket: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    for r in [
        sockopt::set_socket_recv_buffer_size(socket, SOCKET_BUFFER),
        sockopt::set_socket_send_buffer_size(socket, SOCKET_BUFFER),
    ] {
        if let Err(e) = r {
            tracing::debug!(error = %e, "could not grow a socket buffer");
        }
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        20_000,
    ))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256));
    // One unidirectional stream each way carries hello, index and acks; more would
    // only let a peer park unread data in our receive window.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(1));
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    Arc::new(t)
}

/// A stopping node's connections, closed: [`Closing::sent`] waits until each has sent
/// its CONNECTION_CLOSE, not for the draining period (which only absorbs stray
/// packets) nor for a handshake still in flight to a peer that is down.
pub struct Closing {
    conns: Vec<(quinn::Connection, u64)>,
}

impl Closing {
    /// Closes every connection of `endpoint`; `conns` are those to see off.
    pub fn start(endpoint: &quinn::Endpoint, conns: Vec<quinn::Connection>) -> Closing {
        let conns = conns
            .into_iter()
            .map(|c| {
                let sent = c.stats().udp_tx.datagrams;
                (c, sent)
            })
            .collect();
        endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        Closing { conns }
    }

    /// Returns once every connection sent a datagram after the close (the close
    /// packet is the only one a closed connection sends), or after `linger`.
    pub async fn sent(self, linger: Duration) {
        let deadline = tokio::time::Instant::now() + linger;
        let pending = || {
            self.conns
                .iter()
                .any(|(c, before)| c.stats().udp_tx.datagrams <= *before)
        };
        while pending() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tracing::trace!(target: crate::clock::STAGE, stage = "close_sent", t_us = crate::clock::mono_us());
    }
}

/// The bound endpoint plus what is needed to dial pinned peers.
pub struct Transport {
    pub endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
}

impl Transport {
    /// Binds the endpoint on `listen`, accepting the devices in `allowed`.
    pub fn bind(
        identity: Arc<Identity>,
        listen: SocketAddr,
        allowed: Allowed,
    ) -> Result<Self, TransportError> {
        if !currently_valid(&identity.cert) {
            tracing::warn!(
                id = %identity.id,
                "this node's certificate is outside its validity period: every peer will refuse it"
            );
        }
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(PinnedClients { allowed }))
            .with_single_cert(vec![identity.cert.clone()], identity.key_der())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let quic =
            QuicServerConfig::try_from(server).map_err(|e| TransportError::Quic(e.to_string()))?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
        sc.transport_config(transport_config());
        let bind_err = |error| TransportError::Bind {
            addr: listen,
            error,
        };
        let socket = std::net::UdpSocket::bind(listen).map_err(bind_err)?;
        grow_socket_buffers(&socket);
        let ec = quinn::EndpointConfig::default();
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Quic("no async runtime".into()))?;
        let endpoint = quinn::Endpoint::new(ec, Some(sc), socket, runtime).map_err(bind_err)?;
        Ok(Transport { endpoint, identity })
    }

    /// A client config that only accepts `expected` as the server.
    pub fn client_config(&self, expected: DeviceId) -> Result<quinn::ClientConfig, TransportError> {
        self.pinned_client(expected, Default::default())
    }

    /// [`Self::client_config`], recording into `presented` the device ID a server
    /// proved when it is not `expected`.
    fn pinned_client(
        &self,
        expected: DeviceId,
        presented: Arc<std::sync::Mutex<Option<DeviceId>>>,
    ) -> Result<quinn::ClientConfig, TransportError> {
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer {
                expected,
                presented,
            }))
            .with_client_auth_cert(vec![self.identity.cert.clone()], self.identity.key_der())?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        let quic =
            QuicClientConfig::try_from(client).map_err(|e| TransportError::Quic(e.to_string()))?;
        let mut cc = quinn::ClientConfig::new(Arc::new(quic));
        cc.transport_config(transport_config());
        Ok(cc)
    }

    /// Dials `expected` at `addr`.
    pub async fn connect(
        &self,
        expected: DeviceId,
        addr: SocketAddr,
    ) -> anyhow::Result<quinn::Connection> {
        let presented = Arc::default();
        let cc = self.pinned_client(expected, Arc::clone(&presented))?;
        let result = self.endpoint.connect_with(cc, addr, SERVER_NAME)?.await;
        let wrong = presented.lock().ok().and_then(|p| *p);
        match (result, wrong) {
            (Ok(conn), _) => Ok(conn),
            (Err(_), Some(presented)) => Err(WrongDeviceId {
                expected,
                presented,
            }
            .into()),
            (Err(e), None) => Err(e.into()),
        }
    }
}

/// The device ID a connection's peer authenticated with.
pub fn peer_device(conn: &quinn::Connection) -> Option<DeviceId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| DeviceId::of_cert(c))
}

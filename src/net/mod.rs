//! The network: everything that talks QUIC to peers or serves local clients.
//! [`transport`] (quinn endpoint, pinned mutual TLS, the allow-list), [`wire`]
//! (protobuf messages from `proto/`, framing and bounds), [`peer`] (one task per
//! connection: index and ack frames in and out of the engine), [`pull`] (fetches by
//! hash over QUIC, then the blocking apply), [`clients`] (the one accept loop for the
//! control socket, the http-01 responder and `/metrics`) and [`activation`] (the
//! `[http] listen` socket: from systemd socket activation, or bound first at start);
//! [`admission`] decides which QUIC handshakes start (Retry, a cap in flight).
//! These use [`crate::core`] and [`crate::disk`]; features above use them.

pub mod activation;
pub mod admission;
pub mod clients;
pub mod peer;
pub mod pull;
pub mod transport;
pub mod wire;

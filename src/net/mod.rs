//! The network: everything that talks QUIC to peers or serves local clients.
//! [`transport`] (quinn endpoint, pinned mutual TLS, the allow-list), [`wire`]
//! (framing and bounds of the protobuf messages in [`crate::core::codec`]), [`clients`] (the one accept loop for the
//! control socket, the http-01 responder and `/metrics`) and [`activation`] (the
//! `[http] listen` socket: from systemd socket activation, or bound first at start);
//! [`admission`] decides which QUIC handshakes start (Retry, a cap in flight).
//! These use [`crate::core`] and know nothing of the driver; the tasks in
//! [`crate::tasks`] run sessions and fetches over them.

pub mod activation;
pub mod admission;
pub mod clients;
pub mod transport;
pub mod wire;

//! certmesh keeps one directory — the certificate tree — identical on every node of a
//! fleet of TLS frontends, over QUIC with mutual TLS.
//!
//! # Layout
//! Pure core (no I/O), all under [`core`]: the sans-I/O [`core::engine::Engine`]
//! (the only way to change the index and the plan; what to send and ack to each
//! peer) and [`core::pipeline::Pipeline`] (the puller's decisions), driven by the
//! daemon's tasks and by the simulator alike; their value types [`version`] (version
//! vectors), [`index`] (local records and sequence numbers), [`plan`] (peers'
//! records, needs, conflict rule, acks), [`paths`] (the validated path type) and
//! [`inline`] (recent small contents), re-exported here at their old paths.
//!
//! Edges: [`config`] (TOML), [`identity`] (device key + ID), [`wire`] (protobuf from
//! `proto/`, framing), [`store`] (index on disk), [`scan`] + [`watch`] (reading the
//! tree, notify + debounce), [`apply`] (staged atomic writes), [`transport`] (quinn +
//! pinned mTLS), [`peer`] (one task per connection), [`pull`] (fetch + apply batches),
//! [`safe_fs`] (no-symlink access relative to the tree root handle),
//! [`node`] (the shared state), [`daemon`] (the wiring: starts and stops every task),
//! [`atomic`] (the one atomic file write), [`control`] (local socket for `status`),
//! [`metrics`] (optional Prometheus `/metrics`),
//! [`demo`] (a 3-node mesh on loopback).
//!
//! On top: [`acme`] (cluster ACME: shared account, renewer lease, challenge barrier,
//! http-01 and dns-01 challenges, versioned publish), [`hooks`] (commands or HAProxy
//! hot swaps when matching paths change) and [`dhparam`] (an RFC 7919 group written
//! once into the tree).
//!
//! Nothing lost for good: [`keep`] (versions a peer's change replaced or deleted,
//! kept locally under `.certmesh/kept/`, bounded; `certmesh restore`) and [`repair`]
//! (configured certificates a peer's change broke are put back from them).
//!
//! Who may change the tree: [`writers`] (`[tree] writers` resolved at start-up) and
//! [`core::authorship`] (signed records, checked on receipt).
//!
//! Operations: [`firewall`] (nftables / iptables rules for the QUIC port from the config),
//! [`systemd`] (readiness, status line, reload and watchdog for `Type=notify`),
//! [`logging`] (stderr, journald or `<N>`-prefixed lines for the journal),
//! [`import`] (adopting a certbot or lego tree without a new order).

pub mod acme;
pub mod apply;
pub mod atomic;
pub mod clients;
pub mod clock;
pub mod config;
pub mod control;
pub mod core;
// The core's value types, at the paths the rest of the crate has always used.
pub use crate::core::{index, inline, paths, plan, version};
pub mod daemon;
pub mod demo;
pub mod demo_pebble;
pub mod dhgroup;
pub mod dhparam;
pub mod firewall;
pub mod hooks;
pub mod identity;
pub mod import;
pub mod keep;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod pull;
pub mod repair;
pub mod safe_fs;
pub mod scan;
#[cfg(test)]
mod sim;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod transport;
pub mod watch;
pub mod wire;
pub mod writers;

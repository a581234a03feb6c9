//! certmesh keeps one directory — the certificate tree — identical on every node of a
//! fleet of TLS frontends, over QUIC with mutual TLS.
//!
//! # Layout
//! - [`core`]: the pure core (no I/O): the sans-I/O [`core::engine::Engine`] (the
//!   only way to change the index and the plan; what to send and ack to each peer)
//!   and [`core::pipeline::Pipeline`] (the puller's decisions), driven by the
//!   daemon's tasks and by the simulator alike, and their value types ([`version`],
//!   [`index`], [`plan`], [`paths`], [`inline`], [`core::authorship`]).
//! - [`disk`]: the tree and the state directory ([`safe_fs`], [`scan`], [`watch`],
//!   [`apply`], [`keep`], [`store`], [`atomic`]).
//! - [`net`]: [`transport`] (quinn + pinned mTLS), [`wire`] (protobuf from `proto/`,
//!   framing), [`peer`] (one task per connection), [`pull`] (fetch + apply batches),
//!   [`clients`] (local HTTP/control listeners).
//! - [`ops`]: [`control`], [`metrics`], [`telemetry`], [`hooks`], [`firewall`],
//!   [`systemd`], [`logging`].
//! - Features: [`acme`] (cluster ACME, http-01 and dns-01), [`import`] (certbot /
//!   lego trees), [`repair`] and [`keep`] (nothing lost for good), [`dhparam`],
//!   [`writers`] (who may change the tree), [`probe`] (what the frontends serve),
//!   [`certs`] (certificates as data in the tree).
//! - [`config`], [`identity`], [`node`] (the shared state) and [`daemon`] (the wiring:
//!   starts and stops every task); [`demo`] (a 3-node mesh on loopback).
//!
//! Modules under [`core`], [`disk`], [`net`] and [`ops`] are re-exported here at the paths
//! the crate has always used (`crate::store`, `crate::control`, …).

pub mod acme;
pub mod certs;
pub mod clock;
pub mod config;
pub mod core;
pub mod disk;
pub mod net;
pub mod ops;
// The core's value types, the disk, network and operations modules, at the paths
// the rest of the crate has always used.
pub use crate::core::{index, inline, paths, plan, version};
pub use crate::disk::{apply, atomic, keep, safe_fs, scan, store, watch};
pub use crate::net::{clients, peer, pull, transport, wire};
pub use crate::ops::{control, firewall, hooks, logging, metrics, systemd, telemetry};
pub mod daemon;
pub mod demo;
pub mod demo_pebble;
pub mod dhgroup;
pub mod dhparam;
pub mod handles;
pub mod identity;
pub mod import;
pub mod node;
pub mod probe;
pub mod repair;
#[cfg(test)]
mod sim;
pub mod writers;

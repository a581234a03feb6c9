//! certmesh keeps one directory — the certificate tree — identical on every node of a
//! fleet of TLS frontends, over QUIC with mutual TLS.
//!
//! # Layout
//! - [`core`]: the pure core (no I/O): the sans-I/O [`core::engine::Engine`] (the
//!   only way to change the index and the plan; what to send and ack to each peer)
//!   and [`core::pipeline::Pipeline`] (the puller's decisions), driven by the
//!   daemon's tasks and by the simulator alike, and their value types
//!   ([`core::version`], [`core::index`], [`core::plan`], [`core::paths`],
//!   [`core::inline`], [`core::authorship`]).
//! - [`disk`]: the tree and the state directory ([`disk::safe_fs`], [`disk::scan`],
//!   [`disk::apply`], [`disk::keep`], [`disk::store`],
//!   [`disk::atomic`]).
//! - [`net`]: [`net::transport`] (quinn + pinned mTLS), [`net::wire`] (protobuf from
//!   `proto/`, framing), [`net::clients`] (local HTTP/control listeners).
//! - [`tasks`]: [`tasks::peer`] (one task per connection), [`tasks::pull`] (fetch +
//!   apply batches), [`tasks::watch`] (notify + debounce), over the [`handles`].
//! - [`ops`]: [`ops::control`], [`ops::metrics`], [`ops::hooks`],
//!   [`ops::firewall`], [`ops::systemd`], [`ops::logging`].
//! - Features: [`acme`] (cluster ACME, http-01 and dns-01), [`import`] (certbot /
//!   lego trees), [`repair`] and [`disk::keep`] (nothing lost for good), [`dhparam`],
//!   [`writers`] (who may change the tree), [`probe`] (what the frontends serve),
//!   [`certs`] (certificates as data in the tree).
//! - [`clock`] and [`telemetry`] (counters and recent errors any layer records into),
//!   [`config`], [`identity`], [`node`] (the shared state) and [`daemon`] (the wiring:
//!   starts and stops every task); [`demo`] (a 3-node mesh on loopback).

pub mod acme;
pub mod certs;
pub mod clock;
pub mod config;
pub mod core;
pub mod daemon;
pub mod demo;
pub mod demo_pebble;
pub mod dhgroup;
pub mod dhparam;
pub mod disk;
pub mod handles;
pub mod identity;
pub mod import;
pub mod net;
pub mod node;
pub mod ops;
pub mod probe;
pub mod repair;
#[cfg(test)]
mod sim;
pub mod tasks;
pub mod telemetry;
pub mod writers;

//! Integration tests: real `certmesh` processes talking QUIC on 127.0.0.x.

mod acme;
mod alerts;
mod cli;
mod crash;
mod dhparam;
mod dns01;
mod fallback_ca;
mod faults;
mod hostile;
mod hubs;
mod import;
mod metrics;
mod observe;
mod ops;
mod reload;
mod security;
mod served;
mod sync;
mod systemd;
mod trust_acme;
mod trust_keep;
mod trust_links;
mod trust_ops;
mod trust_wire;
mod util;
mod writers;

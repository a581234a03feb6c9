//! What operators see and wire up: [`control`] (the local socket behind `status`,
//! `issue`, `renew`, `confirm`), [`status`] (what `certmesh status` shows, typed;
//! [`render`] makes its tables; [`observe`] builds it from the node's state, [`cert_cache`] keeps
//! what each certificate's files say until they change), [`metrics`] (optional Prometheus `/metrics`, reading the counters
//! of [`crate::telemetry`]), [`hooks`] (commands or HAProxy hot swaps
//! when matching paths change), [`firewall`] (nftables / iptables rules from the
//! config), [`systemd`] (readiness, status line, reload, watchdog) and [`logging`]
//! (stderr, journald or `<N>`-prefixed lines); [`census`] (`status --cluster`: is
//! the whole cluster in sync); [`served`] (what each node's frontends serve, as
//! `status` shows it).

pub mod census;
pub mod cert_cache;
pub mod coalesce;
pub mod control;
pub mod firewall;
pub mod fleet;
pub mod hooks;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod render;
pub mod served;
pub mod status;
pub mod systemd;

//! The sync tasks the daemon runs, above the driver's handles and below the features:
//! [`peer`] (one task per connection: index and ack frames in and out of the engine,
//! content served), [`pull`] (fetches by hash over QUIC, then the blocking apply) and
//! [`watch`] (notify + debounce, then a rescan into the engine). Each drives the
//! shells in [`crate::disk`] and [`crate::net`] through a [`crate::handles`] handle.

pub mod peer;
pub mod pull;
pub mod watch;

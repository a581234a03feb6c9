//! The pure sync core: no sockets, no files, no clocks — time and events come in as
//! arguments, decisions go out as values. It holds the [`engine`] (index, peers' views,
//! what to send) and the puller's [`pipeline`] (what to fetch, when to apply, retries),
//! and their value types: [`paths`], [`version`], [`index`], [`plan`], [`inline`];
//! [`secret`] tells key material by content; [`session`] keeps one session per peer. [`device`] holds the device ID
//! and record signing as values; key files are `crate::identity`'s.

pub mod authorship;
pub mod cluster;
pub mod codec;
pub mod device;
pub mod engine;
pub mod fair;
pub mod index;
pub mod inline;
pub mod paths;
pub mod pipeline;
pub mod plan;
pub mod record;
pub mod rollout_time;
pub mod secret;
pub mod served;
pub mod session;
pub mod version;

//! The pure sync core: no sockets, no files, no clocks — time and events come in as
//! arguments, decisions go out as values. It holds the [`engine`] (index, peers' views,
//! what to send) and the puller's [`pipeline`] (what to fetch, when to apply, retries);
//! the value types (ids, paths, versions, index, plan) move here in a later step.

pub mod engine;
pub mod pipeline;

//! The pure sync core: no sockets, no files, no clocks — time and events come in as
//! arguments, decisions go out as values. For now it holds the [`engine`]; the value
//! types (ids, paths, versions, index, plan) move here in a later step.

pub mod engine;

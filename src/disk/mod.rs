//! The tree and the state directory on disk: everything that touches the file system
//! for the sync engine. [`safe_fs`] (no-symlink access relative to the tree root
//! handle), [`scan`] (reading the tree), [`apply`]
//! (staged atomic writes of peers' changes), [`keep`] (versions a change replaced,
//! under `.certmesh/kept/`), [`store`] (the index file), [`tree`] (a feature's
//! writes into the tree, staged and renamed as a person would, and checked reads),
//! [`lock`] (the state directory's lock) and [`atomic`] (the one atomic file write).
//! Features above (ACME, hooks, repair) use these; these use only [`crate::core`].

pub mod apply;
pub mod atomic;
pub mod keep;
pub mod lock;
pub mod safe_fs;
pub mod scan;
pub mod store;
pub mod tree;

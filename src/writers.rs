//! `[tree] writers` at start-up: the configured entries resolved to
//! device IDs, and the rule that only writers may renew certificates. The checks on
//! records live in the pure core (`core::authorship`); this is the edge that turns
//! the config and this node's identity into that policy.

use crate::config::Config;
use crate::core::authorship::Writers;
use crate::core::device::DeviceId;

/// This node is not a writer but has `[acme]`: it would renew into a tree it may
/// not change.
#[derive(Debug, thiserror::Error)]
#[error(
    "{file}: acme: this node ({me}) is not in tree.writers: only writers may renew \
     certificates (add it to tree.writers or remove [acme])"
)]
pub struct NotAWriter {
    pub file: String,
    pub me: DeviceId,
}

/// The policy for `config` on the node `me`.
pub fn policy(config: &Config, me: DeviceId) -> Result<Writers, NotAWriter> {
    let Some(list) = &config.writers else {
        return Ok(Writers::everyone());
    };
    let writers = Writers::only(list.iter().map(|w| w.id(me)));
    if config.acme.is_some() && !writers.allows(&me) {
        return Err(NotAWriter {
            file: config.file.display().to_string(),
            me,
        });
    }
    Ok(writers)
}

/// "writer" or "reader", as `status` and `/metrics` show it.
pub fn role(is_writer: bool) -> &'static str {
    if is_writer {
        "writer"
    } else {
        "reader"
    }
}

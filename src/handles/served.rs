//! The serving probes' handle (issue 26): publish this node's latest results to the
//! engine (which sends them to the peers), and reach the probes' shared side.

use std::sync::Arc;

use crate::core::served::ServedRecord;
use crate::node::Shared;
use crate::probe::Probes;

/// Where the probes put what this node's frontends serve.
#[derive(Clone)]
pub struct ServedReports(Arc<Shared>);

impl ServedReports {
    pub fn new(shared: &Arc<Shared>) -> Self {
        ServedReports(shared.clone())
    }

    /// This node's latest results: the peers' senders are woken to send them.
    pub fn set_mine(&self, records: Vec<ServedRecord>) {
        self.0.lock().engine.set_served(records);
        self.0.bump_progress();
    }

    /// The probes' shared side (hook runs in, re-runs out, counters).
    pub fn probes(&self) -> &Probes {
        &self.0.probes
    }
}

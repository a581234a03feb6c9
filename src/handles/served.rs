//! The serving probes' handle: publish this node's latest results to the
//! engine (which sends them to the peers), and reach the probes' shared side.

use std::sync::Arc;

use crate::core::device::NodeSigner;
use crate::core::paths::RelPath;
use crate::core::served::{ServedRecord, SignedReport};
use crate::node::Shared;
use crate::telemetry::Probes;

/// Where the probes put what this node's frontends serve.
#[derive(Clone)]
pub struct ServedReports(Arc<Shared>);

impl ServedReports {
    pub fn new(shared: &Arc<Shared>) -> Self {
        ServedReports(shared.clone())
    }

    /// This node's latest results and its signed report of them: the peers'
    /// senders are woken to send it.
    pub fn set_mine(&self, records: Vec<ServedRecord>, report: Option<SignedReport>) {
        self.0.lock().engine.set_served(records, report);
        self.0.bump_progress();
    }

    /// A signer with this node's key (reports are signed outside the state lock).
    pub fn signer(&self) -> Option<NodeSigner> {
        self.0.identity.signer().ok()
    }

    /// This node's name.
    pub fn name(&self) -> String {
        self.0.config().name.clone()
    }

    /// The probes' shared side (hook runs in, re-runs out, counters).
    pub fn probes(&self) -> &Probes {
        &self.0.probes
    }

    /// This node made the last change of `live/<cert>` (the index's author).
    pub fn live_flipped_by_me(&self, cert: &str) -> bool {
        let Ok(link) = RelPath::parse(&format!("live/{cert}")) else {
            return false;
        };
        let me = self.0.me().short();
        let st = self.0.lock();
        st.engine
            .index()
            .get(&link)
            .is_some_and(|e| !e.record.deleted && e.record.modified_by == me)
    }

    /// Writes into the tree (a rollback's flip and its list of rolled-back leaves).
    pub fn writer(&self) -> crate::handles::TreeWriter {
        crate::handles::TreeWriter::new(&self.0)
    }
}

//! `certmesh status --cluster`: whether the whole cluster is in sync, not
//! only this node's direct peers. Behind a hub, an edge two hops away is invisible
//! to the per-peer `in_sync`; a census (a cluster-wide barrier on this node's newest
//! record, [`crate::node::census`]) asks every node whether it is in sync with each
//! of its peers. Every live link in sync, over a connected peer graph, means every
//! live node holds the same tree.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::handles::acme::Barrier;

/// The cluster as a census found it (`status.cluster`, only with `--cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSync {
    /// Every live node was in sync with each of its connected peers (and had this
    /// node's newest record) before the wait ended.
    pub in_sync: bool,
    /// The record asked about: this node's newest (`None`: nothing to ask about).
    pub path: Option<String>,
    /// How long the census took, in milliseconds.
    pub took_ms: u64,
    /// Every other node known, by name.
    pub nodes: Vec<ClusterNode>,
    /// Why there was no census (an empty index, too many barriers running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One node in a [`ClusterSync`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub name: String,
    pub id: String,
    /// Connected to this node or to a node that answered.
    pub live: bool,
    /// It has this node's newest record.
    pub has: bool,
    /// Every node connected to it that answered (this one included) is in sync
    /// with it.
    pub in_sync: bool,
}

/// Runs a census for up to `timeout`.
pub async fn run(barrier: &Barrier, timeout: Duration) -> ClusterSync {
    let start = Instant::now();
    let census = barrier.census(timeout).await;
    let took_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let Some((path, status)) = census else {
        return ClusterSync {
            in_sync: false,
            path: None,
            took_ms,
            nodes: Vec::new(),
            error: Some("no census: this node's index is empty, or too many barriers run".into()),
        };
    };
    let nodes: Vec<ClusterNode> = status
        .nodes
        .into_iter()
        .map(|n| ClusterNode {
            name: n.name,
            id: n.device.to_string(),
            live: n.live,
            has: n.has,
            in_sync: n.in_sync,
        })
        .collect();
    ClusterSync {
        in_sync: status.done && nodes.iter().all(|n| !n.live || (n.has && n.in_sync)),
        path: Some(path.as_str().to_string()),
        took_ms,
        nodes,
        error: None,
    }
}

/// One line for people: "cluster: in sync (…)" or what is behind.
pub fn render(c: &ClusterSync) -> String {
    let live = c.nodes.iter().filter(|n| n.live).count();
    let names = |f: &dyn Fn(&ClusterNode) -> bool| {
        c.nodes
            .iter()
            .filter(|n| f(n))
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut line = if let Some(e) = &c.error {
        format!("cluster: unknown ({e})")
    } else if c.in_sync {
        format!(
            "cluster: in sync ({live} other live nodes, checked in {} ms)",
            c.took_ms
        )
    } else {
        format!(
            "cluster: NOT in sync after {} ms; behind or not in sync with a peer: {}",
            c.took_ms,
            names(&|n| n.live && !(n.has && n.in_sync))
        )
    };
    let gone = names(&|n| !n.live);
    if !gone.is_empty() {
        line.push_str(&format!("; not connected to anyone: {gone}"));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, live: bool, in_sync: bool) -> ClusterNode {
        ClusterNode {
            name: name.into(),
            id: "X".into(),
            live,
            has: true,
            in_sync,
        }
    }

    #[test]
    fn render_names_nodes_behind_and_unreachable() {
        let c = ClusterSync {
            in_sync: false,
            path: Some("a".into()),
            took_ms: 2000,
            nodes: vec![
                node("hub", true, true),
                node("edge", true, false),
                node("gone", false, false),
            ],
            error: None,
        };
        assert_eq!(
            render(&c),
            "cluster: NOT in sync after 2000 ms; behind or not in sync with a peer: edge; \
             not connected to anyone: gone\n"
        );
        let ok = ClusterSync {
            in_sync: true,
            nodes: vec![node("hub", true, true)],
            took_ms: 3,
            ..c
        };
        assert_eq!(
            render(&ok),
            "cluster: in sync (1 other live nodes, checked in 3 ms)\n"
        );
    }
}

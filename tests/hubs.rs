//! Hub topologies (issue 16): the challenge barrier covers nodes behind hubs. Real
//! `certmesh` processes on 127.0.7.x: renewer — hub — edge, the edge not peered with
//! the renewer.

use crate::util::{certmesh, wait_until, Node};
use certmesh::ops::census::ClusterSync;
use certmesh::ops::control::ConfirmReply;
use certmesh::ops::status::Status;

/// renewer (0) — hub (1) — edge (2), started and connected.
fn chain() -> (tempfile::TempDir, Vec<Node>) {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-hubs-")
        .tempdir()
        .unwrap();
    let mut nodes: Vec<Node> = ["renewer", "hub", "edge"]
        .iter()
        .enumerate()
        .map(|(i, name)| Node::new(dir.path(), name, &format!("127.0.7.{}", i + 2)))
        .collect();
    nodes[0].configure(&[&nodes[1]]);
    nodes[1].configure(&[&nodes[0], &nodes[2]]);
    nodes[2].configure(&[&nodes[1]]);
    for n in &mut nodes {
        n.start();
    }
    for n in &nodes {
        wait_until(&format!("{} connected", n.name), || n.all_connected());
    }
    (dir, nodes)
}

/// `certmesh confirm PATH` on `node`: the reply and whether it exited 0.
fn confirm(node: &Node, path: &str, timeout: &str) -> (ConfirmReply, bool) {
    let out = certmesh(&[
        "confirm",
        "--config",
        node.config.to_str().unwrap(),
        "--timeout",
        timeout,
        "--json",
        path,
    ]);
    let reply: ConfirmReply = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "confirm answer: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (reply, out.status.success())
}

/// `path` is in `node`'s index (`certmesh confirm` answers rather than refusing).
fn indexed(node: &Node, path: &str) -> bool {
    let out = certmesh(&[
        "confirm",
        "--config",
        node.config.to_str().unwrap(),
        "--timeout",
        "0s",
        "--json",
        path,
    ]);
    serde_json::from_slice::<ConfirmReply>(&out.stdout).is_ok()
}

fn node<'a>(r: &'a ConfirmReply, name: &str) -> &'a certmesh::ops::control::ConfirmedNode {
    r.nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} not named in {r:?}"))
}

#[test]
fn the_barrier_waits_for_an_edge_two_hops_away() {
    let (_dir, nodes) = chain();
    nodes[0].write("acme/token-1", "key-authorization-1");
    wait_until("the renewer indexed the token", || {
        indexed(&nodes[0], "acme/token-1")
    });
    let (r, ok) = confirm(&nodes[0], "acme/token-1", "30s");
    assert!(ok && r.done, "{r:?}");
    // The edge is known to the renewer only through the hub, and had the token
    // when the barrier returned.
    let edge = node(&r, "edge");
    assert!(edge.live && edge.after_ms.is_some(), "{r:?}");
    assert!(node(&r, "hub").after_ms.is_some(), "{r:?}");
    assert_eq!(
        nodes[2].read("acme/token-1").as_deref(),
        Some("key-authorization-1")
    );
}

#[test]
fn the_barrier_timeout_names_a_frozen_edge() {
    let (_dir, nodes) = chain();
    nodes[2].signal(libc::SIGSTOP);
    nodes[0].write("acme/token-2", "key-authorization-2");
    wait_until("the renewer indexed the token", || {
        indexed(&nodes[0], "acme/token-2")
    });
    let (r, ok) = confirm(&nodes[0], "acme/token-2", "2s");
    nodes[2].signal(libc::SIGCONT);
    assert!(!ok && !r.done, "{r:?}");
    let edge = node(&r, "edge");
    assert!(edge.live && edge.after_ms.is_none(), "{r:?}");
    assert!(node(&r, "hub").after_ms.is_some(), "{r:?}");
    // Once it runs again, it catches up and the barrier passes.
    let (r, ok) = confirm(&nodes[0], "acme/token-2", "30s");
    assert!(ok && r.done && node(&r, "edge").after_ms.is_some(), "{r:?}");
}

#[test]
fn a_stopped_edge_is_named_but_not_waited_for() {
    let (_dir, mut nodes) = chain();
    nodes[2].stop();
    wait_until("the hub saw the edge go", || {
        nodes[1].status()["peers"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["name"] == "edge" && p["connected"] == false)
        })
    });
    nodes[0].write("acme/token-3", "key-authorization-3");
    wait_until("the renewer indexed the token", || {
        indexed(&nodes[0], "acme/token-3")
    });
    let (r, ok) = confirm(&nodes[0], "acme/token-3", "30s");
    assert!(ok && r.done, "{r:?}");
    let edge = node(&r, "edge");
    assert!(!edge.live && edge.after_ms.is_none(), "{r:?}");
}

/// `certmesh status --cluster --json` on `node`: the cluster part.
fn cluster(node: &Node, timeout: &str) -> ClusterSync {
    let out = certmesh(&[
        "status",
        "--config",
        node.config.to_str().unwrap(),
        "--cluster",
        "--timeout",
        timeout,
        "--json",
    ]);
    let s: Status = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status answer: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    s.cluster.expect("a cluster part with --cluster")
}

#[test]
fn status_cluster_names_an_edge_two_hops_away_that_is_behind() {
    let (_dir, nodes) = chain();
    nodes[0].write("misc/a.txt", "v1");
    wait_until("the edge has v1", || {
        nodes[2].read("misc/a.txt").as_deref() == Some("v1")
    });
    wait_until("the cluster in sync", || cluster(&nodes[0], "5s").in_sync);
    nodes[2].signal(libc::SIGSTOP);
    nodes[0].write("misc/a.txt", "v2");
    // Seen from the renewer, its only peer (the hub) is in sync…
    wait_until("the renewer in sync with the hub", || {
        nodes[0].all_in_sync() && nodes[1].read("misc/a.txt").as_deref() == Some("v2")
    });
    // …the cluster is not: the frozen edge is behind.
    let c = cluster(&nodes[0], "1s");
    // …and `status --cluster` says so in its exit code, naming the edge.
    let cfg = nodes[0].config.to_str().unwrap();
    let out = certmesh(&["status", "--config", cfg, "--cluster", "--timeout", "1s"]);
    nodes[2].signal(libc::SIGCONT);
    assert!(!c.in_sync, "{c:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cluster not in sync: edge"), "{err}");
    let edge = c
        .nodes
        .iter()
        .find(|n| n.name == "edge")
        .expect("edge named");
    assert!(edge.live && !edge.in_sync, "{c:?}");
    assert!(
        c.nodes.iter().any(|n| n.name == "hub" && n.in_sync),
        "{c:?}"
    );
    // Once it runs again, it catches up and the cluster is in sync.
    wait_until("the cluster in sync again", || {
        cluster(&nodes[0], "5s").in_sync
    });
}

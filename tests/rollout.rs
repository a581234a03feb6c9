//! Rollouts (issue 26 items 3 and 6), on the served harness (`tests/served.rs`:
//! three `certmesh` nodes, each with a real nginx probed by the node itself): the
//! time from a publish to every node serving it, and `rollout = "verify"` flipping
//! `live/` back when the publisher's own frontend does not take the new version.
//! Nodes and servers on 127.0.11.2–127.0.11.250.

use crate::reload::{have, Ca, NAME};
use crate::served::{fleet, tempdir, Hook};
use crate::util::wait_until;

#[test]
fn a_new_version_shows_its_rollout_time_and_the_last_node() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.11.2", "127.0.11.3", "127.0.11.4"];
    let fleet = fleet(dir.path(), ips, [Hook::Reload; 3], None, &ca);
    ca.bundle(0x7002).publish(&fleet[0].node.tree, 2);
    for m in &fleet {
        wait_until("every node shows the rollout of version 2", || {
            m.www().is_some_and(|c| c.last_rollout_version == Some(2))
        });
    }
    let c = fleet[2].www().expect("www");
    let ms = c.last_rollout_ms.expect("a rollout time");
    eprintln!(
        "rollout of version 2: {ms} ms, last {:?}",
        c.last_rollout_node
    );
    assert!(ms < 30_000, "{ms} ms");
    let last = c.last_rollout_node.expect("the last node");
    assert!(["lb1", "lb2", "lb3"].contains(&last.as_str()), "{last}");
    // The publisher counts it in its histogram; the others do not.
    assert_eq!(fleet[0].status().counters.rollout_seconds.count, 1);
    assert_eq!(fleet[1].status().counters.rollout_seconds.count, 0);
    let text =
        crate::util::certmesh(&["status", "--config", fleet[1].node.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    let want = format!("rollout {NAME}: version 2 served everywhere ");
    assert!(text.contains(&want), "{text}");
}

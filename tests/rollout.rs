//! Rollouts (issue 26 items 3 and 6), on the served harness (`tests/served.rs`:
//! three `certmesh` nodes, each with a real nginx probed by the node itself): the
//! time from a publish to every node serving it, and `rollout = "verify"` flipping
//! `live/` back when the publisher's own frontend does not take the new version.
//! Nodes and servers on 127.0.11.2–127.0.11.250.

use std::time::Instant;

use certmesh::acme::handle::AcmeState;

use crate::reload::{have, Ca, NAME};
use crate::served::{entry, fleet, fleet_with, tempdir, Hook};
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

/// How long the publisher's probes may take before they give up on a version
/// (`probe::rollout::WINDOW`).
const WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

#[test]
fn verify_rolls_back_a_version_the_publishers_frontend_does_not_serve() {
    if !have("nginx") {
        return;
    }
    let (dir, ca) = (tempdir(), Ca::new());
    let ips = ["127.0.11.5", "127.0.11.6", "127.0.11.7"];
    // lb1 publishes (and has [acme], with a CA it never needs to reach); its reload
    // hook fails as nginx's config test would, so its nginx keeps version 1.
    let acme = "\n[acme]\ndirectory = \"https://127.0.11.5:9/dir\"\n";
    let verify = "rollout = \"verify\"\n";
    let hooks = [Hook::Broken, Hook::Reload, Hook::Reload];
    let extra = [(verify, acme), (verify, ""), (verify, "")];
    let fleet = fleet_with(dir.path(), ips, hooks, None, &ca, extra);
    let published = Instant::now();
    ca.bundle(0x8002).publish(&fleet[0].node.tree, 2);
    for m in &fleet[1..] {
        wait_until("lb2 and lb3 serve version 2 at first", || {
            m.www().is_some_and(|c| {
                entry(&c, &m.node.name).is_some_and(|s| s.current && s.version == Some(2))
            })
        });
    }
    for m in &fleet {
        wait_until("live/www back on version 1 on every node", || {
            m.www().is_some_and(|c| c.version == Some(1))
        });
    }
    for m in &fleet[1..] {
        wait_until("lb2 and lb3 serve version 1 again", || {
            m.www().is_some_and(|c| {
                entry(&c, &m.node.name).is_some_and(|s| s.current && s.version == Some(1))
            })
        });
    }
    let took = published.elapsed();
    assert!(took < WINDOW, "version 2 was served for {took:?}");
    let lb3 = &fleet[2].node;
    assert!(
        lb3.tree.join("archive/www/2/fullchain.pem").exists(),
        "kept"
    );
    let listed = lb3
        .read(".certmesh/acme/rolled-back/www")
        .unwrap_or_default();
    assert!(
        listed.contains(" 2 "),
        "version 2's leaf listed: {listed:?}"
    );
    let c = fleet[0].www().expect("www");
    assert_eq!((c.state, c.failures), (Some(AcmeState::Backoff), 1));
    let e = c.last_error.unwrap_or_default();
    assert!(e.contains("rolled back to version 1"), "{e}");
    assert!(e.contains("configuration test failed"), "{e}");
}

#[test]
fn the_dashboard_is_json_and_queries_only_documented_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("packaging/certmesh-grafana.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let readme = std::fs::read_to_string(root.join("docs/monitoring.md")).unwrap();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 3);
    let mut names = Vec::new();
    for t in panels.iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        let expr = t["expr"].as_str().expect("a query");
        for (i, _) in expr.match_indices("certmesh_") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    for wanted in [
        "certmesh_served_certificate_version",
        "certmesh_certificate_runway_seconds",
        "certmesh_rollout_seconds_bucket",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} not queried");
    }
    for n in names {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(&n);
        assert!(
            readme.contains(&format!("| `{family}` |")),
            "{n} is not in the metrics table of docs/monitoring.md"
        );
    }
}

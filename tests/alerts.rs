//! `packaging/certmesh-alerts.yml` (issue 26): `promtool check rules` accepts it,
//! `promtool test rules` runs its unit tests (each alert fires on the series it is
//! for, and not before its `for:`), and every metric it uses is one the daemon
//! serves (docs/monitoring.md's table, which `metrics::` checks against `/metrics`).

use std::process::Command;

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging"))
        .output()
        .expect("promtool (Debian package prometheus) is installed");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn alert_rules_pass_promtool_check() {
    let (ok, said) = promtool(&["check", "rules", "certmesh-alerts.yml"]);
    assert!(ok && said.contains("SUCCESS: 3 rules found"), "{said}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let (ok, said) = promtool(&["test", "rules", "certmesh-alerts.test.yml"]);
    assert!(ok, "{said}");
}

#[test]
fn alert_rules_use_only_metrics_the_daemon_serves() {
    let rules = include_str!("../packaging/certmesh-alerts.yml");
    let readme = include_str!("../docs/monitoring.md");
    let used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("certmesh_"))
        .collect();
    assert_eq!(used.len(), 3, "{used:?}");
    for m in used {
        assert!(
            readme.contains(&format!("| `{m}` |")),
            "{m} is not in the metric table of docs/monitoring.md"
        );
    }
}

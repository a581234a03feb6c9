//! What the fleet serves, as `status` shows it: per certificate, each
//! node's and frontend's served leaf (`certificates[].served[]`), one summary line
//! ("served: current on 2/3 nodes; lb7 (nginx) serves version 1 (current 2) since
//! 14:02:10 UTC; lb9 (nginx) handshake failed: connection refused"), and, with
//! `--cluster`, the nodes that do not serve the current version.
//!
//! A stale report (not refreshed within `core::served::STALE_AFTER_MS`) is listed
//! as such and left out of the counts: a node that stopped reporting is not known
//! to serve an old certificate. Nodes removed from the peer list are not listed.

use crate::ops::status::{CertStatus, ServedStatus, Status};

/// "HH:MM:SS UTC" of a unix time.
fn clock(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| format!("{:02}:{:02}:{:02} UTC", t.hour(), t.minute(), t.second()))
        .unwrap_or_else(|_| unix.to_string())
}

/// How many nodes report what for one certificate (status and `/metrics` both
/// count with this).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Nodes with a fresh report whose every frontend serves the current leaf.
    pub current: usize,
    /// Nodes with a fresh report of which some frontend does not.
    pub not_current: usize,
    /// Nodes whose report is stale (counted in neither).
    pub stale: usize,
}

/// What the nodes report for `c`.
pub fn counts(c: &CertStatus) -> Counts {
    let mut nodes: Vec<(&str, bool)> = c
        .served
        .iter()
        .map(|s| (s.node.as_str(), s.stale))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut out = Counts::default();
    for (n, stale) in nodes {
        if stale {
            out.stale += 1;
        } else if c.served.iter().filter(|s| s.node == n).all(|s| s.current) {
            out.current += 1;
        } else {
            out.not_current += 1;
        }
    }
    out
}

/// What one entry that is not current says, after the node's name.
fn problem(s: &ServedStatus, c: &CertStatus) -> String {
    if s.stale {
        return format!("report stale (last seen {})", clock(s.seen_unix));
    }
    if let Some(e) = &s.error {
        return format!("handshake failed: {e}");
    }
    let what = match (s.version, c.version) {
        (Some(v), Some(cur)) => format!("version {v} (current {cur})"),
        (Some(v), None) => format!("version {v}"),
        (None, _) => format!(
            "another leaf ({}…)",
            s.leaf_sha256
                .as_deref()
                .map_or("?", |h| &h[..h.len().min(12)])
        ),
    };
    format!("serves {what} since {}", clock(s.since_unix))
}

/// The summary line of one certificate, `None` when no node reported for it.
pub fn line(c: &CertStatus) -> Option<String> {
    let n = counts(c);
    let nodes = n.current + n.not_current;
    if nodes + n.stale == 0 {
        return None;
    }
    let mut out = format!("served {}: current on {}/{nodes} nodes", c.name, n.current);
    for s in c.served.iter().filter(|s| !s.current || s.stale) {
        out.push_str(&format!("; {} ({}) {}", s.node, s.frontend, problem(s, c)));
    }
    Some(out)
}

/// The last finished rollout of one certificate, `None` before the first.
pub fn rollout_line(c: &CertStatus) -> Option<String> {
    let ms = c.last_rollout_ms?;
    Some(format!(
        "rollout {}: version {} served everywhere {ms} ms after its publish (last: {})",
        c.name,
        c.last_rollout_version
            .map_or_else(|| "?".into(), |v| v.to_string()),
        c.last_rollout_node.as_deref().unwrap_or("?")
    ))
}

/// Every certificate's summary line, and its last rollout.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    for c in &s.certificates {
        for l in [line(c), rollout_line(c)].into_iter().flatten() {
            o.push_str(&l);
            o.push('\n');
        }
    }
    o
}

/// `status --cluster`: the nodes that do not serve the current version, by name, and
/// those whose report went stale (nothing says what they serve now).
pub fn render_cluster(s: &Status) -> String {
    not_serving(&s.certificates)
}

fn not_serving(certificates: &[CertStatus]) -> String {
    let mut behind: Vec<String> = Vec::new();
    for c in certificates {
        for e in c.served.iter().filter(|e| !e.current || e.stale) {
            behind.push(format!(
                "{} ({} {}: {})",
                e.node,
                c.name,
                e.frontend,
                problem(e, c)
            ));
        }
    }
    if behind.is_empty() {
        return String::new();
    }
    format!("not serving the current version: {}\n", behind.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: &str, current: bool, version: Option<u32>, error: Option<&str>) -> ServedStatus {
        ServedStatus {
            node: node.into(),
            frontend: "nginx".into(),
            current,
            version,
            leaf_sha256: error.is_none().then(|| "ab".repeat(32)),
            not_after_unix: None,
            error: error.map(Into::into),
            seen_unix: 50_000,
            since_unix: 50_520,
            since_ms: 50_520_000,
            stale: false,
        }
    }

    fn www_at_version_13() -> CertStatus {
        serde_json::from_value(serde_json::json!({"name": "www",
            "domains": [], "not_after": null, "not_after_unix": null, "days_left": null,
            "version": 13, "serial": null, "renewer": null, "lease": null,
            "next_renewal": null, "state": null, "last_attempt": null,
            "last_error": null, "failures": 0, "waiting_for": null, "last_took_ms": null}))
        .expect("a certificate status")
    }

    #[test]
    fn the_line_names_nodes_on_an_old_version_and_failed_handshakes() {
        let mut c = www_at_version_13();
        c.served = vec![
            entry("lb1", true, Some(13), None),
            entry("lb7", false, Some(12), None),
            entry("lb9", false, None, Some("connection refused")),
        ];
        assert_eq!(
            line(&c).as_deref(),
            Some(
                "served www: current on 1/3 nodes; lb7 (nginx) serves version 12 (current 13) \
                 since 14:02:00 UTC; lb9 (nginx) handshake failed: connection refused"
            )
        );
    }

    #[test]
    fn a_stale_report_is_named_but_not_counted() {
        let mut c = www_at_version_13();
        let mut old = entry("lb7", false, Some(12), None);
        old.stale = true;
        c.served = vec![entry("lb1", true, Some(13), None), old];
        let n = counts(&c);
        assert_eq!((n.current, n.not_current, n.stale), (1, 0, 1));
        assert_eq!(
            not_serving(std::slice::from_ref(&c)),
            "not serving the current version: lb7 (www nginx: report stale (last seen \
             13:53:20 UTC))\n"
        );
        assert_eq!(
            line(&c).as_deref(),
            Some(
                "served www: current on 1/1 nodes; lb7 (nginx) report stale (last seen \
                 13:53:20 UTC)"
            )
        );
    }
}

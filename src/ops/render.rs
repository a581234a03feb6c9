//! `certmesh status` for people: the typed answer ([`crate::ops::status`]) as
//! tables, one function per table; with many certificates a summary
//! ([`render_view`]), one certificate in full, or every row.

use std::fmt::Write;

use crate::ops::status::*;
use crate::telemetry::RecentError;

/// Renders the status as tables for people: node, tree, peers, certificates,
/// recent errors.
pub fn render(s: &Status) -> String {
    let now = if s.node.now_unix > 0 {
        s.node.now_unix
    } else {
        crate::acme::unix_now()
    };
    let mut o = String::new();
    render_node(&mut o, s);
    render_tree(&mut o, s);
    render_peers(&mut o, s, now);
    render_certificates(&mut o, s);
    render_queue(&mut o, s);
    render_repairs(&mut o, s, now);
    render_errors(&mut o, s, now);
    o
}

/// `-`: a value that is not known or does not apply.
fn dash() -> String {
    "-".to_string()
}

/// The first line: name, device ID, address, uptime and role.
fn render_node(o: &mut String, s: &Status) {
    let _ = writeln!(
        o,
        "node {} ({})  listen {}  up {}{}\n",
        s.node.name,
        s.node.id,
        s.node.listen,
        age(s.node.uptime_s as i64),
        if s.node.role.is_empty() {
            String::new()
        } else {
            format!("  {}", s.node.role)
        }
    );
}

/// The tree's table, then the paths not fetched or not sent.
fn render_tree(o: &mut String, s: &Status) {
    table(
        o,
        &["TREE", "FILES", "OUT OF SYNC", "SCANS", "SEQUENCE"],
        vec![vec![
            s.tree.path.clone(),
            s.tree.files.to_string(),
            s.tree.out_of_sync.to_string(),
            s.tree.scans.to_string(),
            s.tree.sequence.to_string(),
        ]],
    );
    for f in &s.tree.too_large {
        let _ = writeln!(
            o,
            "too large, not fetched: {} ({} bytes; see [tree] max_file_size)",
            f.path, f.size
        );
    }
    if s.tree.too_large_count > s.tree.too_large.len() {
        let _ = writeln!(
            o,
            "… and {} more files too large",
            s.tree.too_large_count - s.tree.too_large.len()
        );
    }
    for f in &s.tree.refused {
        let _ = writeln!(
            o,
            "over budget, not fetched: {} ({} bytes from {}; see [tree] {})",
            f.path,
            f.size,
            f.peer.as_deref().unwrap_or("?"),
            f.reason
        );
    }
    if s.tree.refused_total > s.tree.refused.len() as u64 {
        let _ = writeln!(
            o,
            "… {} paths refused by a budget since start",
            s.tree.refused_total
        );
    }
    if s.tree.not_adopted > 0 {
        let _ = writeln!(
            o,
            "index full: new paths from peers refused {} times",
            s.tree.not_adopted
        );
    }
    if s.tree.not_sent_count > 0 {
        let _ = writeln!(
            o,
            "not sent: this node is not a writer ({} local changes put back): {}",
            s.tree.not_sent_count,
            s.tree.not_sent.join(", ")
        );
    }
    let _ = writeln!(o);
}

/// The peers' table, the cluster's sync (`--cluster`), then what each peer sent that
/// was refused.
fn render_peers(o: &mut String, s: &Status, now: i64) {
    let peers = s
        .peers
        .iter()
        .map(|p| {
            let sync = if p.in_sync {
                "in sync".to_string()
            } else if p.out_of_sync > 0 {
                format!("{} out of sync", p.out_of_sync)
            } else if p.connected {
                "syncing".to_string()
            } else {
                dash()
            };
            vec![
                p.name.clone(),
                p.address.clone(),
                if p.connected { "yes" } else { "no" }.to_string(),
                p.rtt_ms.map_or_else(dash, |r| format!("{r:.2}ms")),
                sync,
                p.last_sync_unix.map_or_else(
                    || "never".to_string(),
                    |t| match now - t {
                        ..=1 => "just now".to_string(),
                        a => format!("{} ago", age(a)),
                    },
                ),
            ]
        })
        .collect();
    table(
        o,
        &["PEER", "ADDRESS", "CONNECTED", "RTT", "SYNC", "LAST SYNC"],
        peers,
    );
    if let Some(c) = &s.cluster {
        o.push_str(&crate::ops::census::render(c));
        o.push_str(&crate::ops::served::render_cluster(s));
    }
    for p in s.peers.iter().filter(|p| p.over_cap.count > 0) {
        let _ = writeln!(
            o,
            "refused from {}: {} new paths, its view is full (last: {})",
            p.name,
            p.over_cap.count,
            p.over_cap.last_path.as_deref().unwrap_or("-")
        );
    }
    for p in s.peers.iter().filter(|p| p.refused.count > 0) {
        let r = &p.refused;
        let author = r.last_author.as_deref().map_or_else(dash, |a| {
            let known = s.peers.iter().find(|q| q.id == a).map(|q| q.name.as_str());
            match (known, a == s.node.id) {
                (_, true) => format!("{} (this node)", s.node.name),
                (Some(n), _) => format!("{n} ({a})"),
                (None, _) => a.to_string(),
            }
        });
        let _ = writeln!(
            o,
            "refused from {}: {} records for their authorship (last: {}, claiming {author}: {})",
            p.name,
            r.count,
            r.last_path.as_deref().unwrap_or("-"),
            r.last_reason.as_deref().unwrap_or("-")
        );
    }
}

/// The certificates' table and what the frontends serve; nothing without
/// certificates.
fn render_certificates(o: &mut String, s: &Status) {
    if s.certificates.is_empty() {
        return;
    }
    let _ = writeln!(o);
    let certs = s.certificates.iter().map(certificate_row).collect();
    table(
        o,
        &[
            "CERTIFICATE",
            "DOMAINS",
            "NOT AFTER",
            "DAYS LEFT",
            "RUNWAY",
            "VER",
            "CA",
            "RENEWER",
            "NEXT RENEWAL",
            "STATE",
            "CHALLENGE",
            "NOTE",
        ],
        certs,
    );
    o.push_str(&crate::ops::served::render(s));
}

/// One row of the certificates' table.
fn certificate_row(c: &CertStatus) -> Vec<String> {
    let domains = match c.domains.as_slice() {
        [] => dash(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (+{})", rest.len()),
    };
    vec![
        c.name.clone(),
        domains,
        c.not_after.clone().unwrap_or_else(|| "missing".into()),
        c.days_left.map_or_else(dash, |d| format!("{d:.1}")),
        c.runway_s
            .map_or_else(dash, |r| format!("{:.1}d", r as f64 / 86_400.0)),
        c.version.map_or_else(dash, |v| v.to_string()),
        c.ca.as_deref().map_or_else(dash, crate::acme::ca::ca_label),
        c.renewer.clone().unwrap_or_else(dash),
        c.next_renewal.clone().unwrap_or_else(dash),
        c.state.map_or_else(dash, |s| s.as_str().to_string()),
        c.challenge.clone(),
        certificate_note(c),
    ]
}

/// The NOTE column: the lease or what the order waits for, a tree entry, the dns-01
/// propagation.
fn certificate_note(c: &CertStatus) -> String {
    let mut note = match (&c.lease, &c.waiting_for) {
        (Some(l), _) => format!("lease held by {l}"),
        (_, Some(w)) => w.clone(),
        _ => String::new(),
    };
    if c.source == crate::config::certificate::CertSource::Tree {
        let sep = if note.is_empty() { "" } else { "; " };
        note = format!("{note}{sep}from the tree");
    }
    if let Some(p) = &c.dns_propagation {
        let have = p.iter().filter(|n| n.has_record).count();
        let missing: Vec<&str> = p
            .iter()
            .filter(|n| !n.has_record)
            .map(|n| n.nameserver.as_str())
            .collect();
        let sep = if note.is_empty() { "" } else { "; " };
        note = format!(
            "{note}{sep}{} TXT on {have}/{} nameservers{}",
            c.challenge,
            p.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(", waiting for {}", missing.join(", "))
            }
        );
    }
    note
}

/// ACME nodes: the orders waiting for the budget or a CA's pause; nothing when none
/// wait.
fn render_queue(o: &mut String, s: &Status) {
    let Some(q) = s
        .acme_queue
        .as_ref()
        .filter(|q| q.queued > 0 || q.paused_until.is_some())
    else {
        return;
    };
    let _ = writeln!(
        o,
        "\norders: {} queued (next: {}), budget {}/{} per hour left, empty in {}{}",
        q.queued,
        q.next
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        q.budget_left,
        q.max_per_hour,
        q.eta_s.map_or_else(dash, age),
        q.paused_until.map_or_else(String::new, |t| format!(
            "; CA paused until {}",
            crate::acme::rfc3339(t)
        ))
    );
}

/// The certificates this node put back after a peer broke them; nothing without any.
fn render_repairs(o: &mut String, s: &Status, now: i64) {
    if s.repairs.is_empty() {
        return;
    }
    let _ = writeln!(o);
    let rows = s
        .repairs
        .iter()
        .map(|r| {
            vec![
                r.certificate.clone(),
                format!("{} ago", age(now - r.at_unix)),
                r.caused_by.clone(),
                r.from_version.to_string(),
                one_line(&r.reason, 80),
            ]
        })
        .collect();
    table(
        o,
        &[
            "REPAIRED",
            "WHEN",
            "CAUSED BY",
            "FROM VERSION",
            "WHAT WAS WRONG",
        ],
        rows,
    );
}

/// Errors: what still holds (peers, certificates), then the daemon's recent ones;
/// the same list as `--json` `errors[]` and the `certmesh_recent_errors` metric.
fn render_errors(o: &mut String, s: &Status, now: i64) {
    let mut errors: Vec<String> = Vec::new();
    let (ongoing, recent): (Vec<&RecentError>, Vec<&RecentError>) =
        s.errors.iter().partition(|e| e.ongoing);
    for e in ongoing {
        errors.push(one_line(&e.message, 200));
    }
    const SHOWN: usize = 5;
    let skipped = recent.len().saturating_sub(SHOWN);
    for e in &recent[skipped..] {
        errors.push(format!(
            "{} ago: {}",
            age(now.saturating_sub(e.at_unix)),
            one_line(&e.message, 200)
        ));
    }
    let counters = &s.counters;
    if counters.hook_failures + counters.acme_failures > 0 {
        errors.push(format!(
            "since start: {} hook failures, {} ACME failures",
            counters.hook_failures, counters.acme_failures
        ));
    }
    if errors.is_empty() {
        return;
    }
    let more = if skipped > 0 {
        format!(
            " (last {SHOWN} of {} past ones, all in --json)",
            recent.len()
        )
    } else {
        String::new()
    };
    let _ = writeln!(o, "\nERRORS{more}");
    for e in errors {
        let _ = writeln!(o, "  {e}");
    }
}

/// Which certificates `certmesh status` shows as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertView<'a> {
    /// The full table up to [`SUMMARY_ABOVE`] certificates, a summary above.
    Auto,
    /// The full table (`--all`).
    All,
    /// One certificate in full (`--cert NAME`).
    One(&'a str),
}

/// `certmesh status` as text for `view`: the node, tree and peers as [`render`]
/// shows them, the certificates in full or summarised. An unknown `--cert` name is
/// an error that says how many there are.
pub fn render_view(mut s: Status, view: CertView<'_>) -> Result<String, String> {
    match view {
        CertView::One(name) => {
            let c = s
                .certificates
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| {
                    format!(
                        "no certificate {name:?} on this node ({} configured; `certmesh cert list` names them)",
                        s.certificates.len()
                    )
                })?;
            Ok(render_cert(c, now_of(&s)))
        }
        CertView::All => Ok(render(&s)),
        CertView::Auto if s.cert_summary.is_none() && s.certificates.len() <= SUMMARY_ABOVE => {
            Ok(render(&s))
        }
        CertView::Auto => {
            // Summed up by the daemon, or here (a daemon that sent every certificate).
            let summary = match s.cert_summary.take() {
                Some(summary) => summary,
                None => CertSummary::of(&s.certificates),
            };
            s.certificates.clear();
            let queue = s.acme_queue.take();
            let mut o = render(&s);
            o.push('\n');
            o.push_str(&render_summary(&summary, queue.as_ref(), now_of(&s)));
            Ok(o)
        }
    }
}

/// The daemon's clock when it answered (this process's for an old daemon).
fn now_of(s: &Status) -> i64 {
    if s.node.now_unix > 0 {
        s.node.now_unix
    } else {
        crate::acme::unix_now()
    }
}

/// Many certificates in a screenful: counts by state, the soonest expiries, those
/// with errors, the order queue.
pub fn render_summary(
    sum: &CertSummary,
    queue: Option<&crate::acme::handle::QueueStatus>,
    now: i64,
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "CERTIFICATES {} ({} from the tree, {} from the config)",
        sum.total,
        sum.from_tree,
        sum.total - sum.from_tree
    );
    let states: Vec<String> = sum
        .by_state
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let _ = writeln!(
        o,
        "  {} live, {} missing, {} damaged, {} unscheduled; {}",
        sum.live,
        sum.missing,
        sum.damaged,
        sum.unscheduled,
        states.join(", ")
    );
    o.push('\n');
    let rows = sum
        .soonest
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.not_after.clone().unwrap_or_else(|| "missing".into()),
                c.not_after_unix.map_or_else(
                    || "-".into(),
                    |t| format!("{:.1}", (t - now) as f64 / 86_400.0),
                ),
                c.next_renewal.clone().unwrap_or_else(|| "-".into()),
                c.state
                    .map_or_else(|| "-".into(), |s| s.as_str().to_string()),
            ]
        })
        .collect();
    table(
        &mut o,
        &[
            "SOONEST EXPIRY",
            "NOT AFTER",
            "DAYS LEFT",
            "NEXT RENEWAL",
            "STATE",
        ],
        rows,
    );
    if sum.failing_total > 0 {
        o.push('\n');
        let rows = sum
            .failing
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.failures.to_string(),
                    one_line(&cert_error(c), 100),
                ]
            })
            .collect();
        table(&mut o, &["WITH ERRORS", "FAILURES", "ERROR"], rows);
        if sum.failing_total > sum.failing.len() {
            let _ = writeln!(
                o,
                "… and {} more with errors",
                sum.failing_total - sum.failing.len()
            );
        }
    }
    if let Some(q) = queue {
        let _ = writeln!(o, "\n{}", queue_line(q));
    }
    let _ = writeln!(
        o,
        "\none certificate in full: certmesh status --cert NAME; all of them: --all or --json"
    );
    o
}

/// What is wrong with a certificate: its last order's error, a damaged bundle, a
/// warning.
fn cert_error(c: &CertStatus) -> String {
    [
        c.last_error.as_deref(),
        c.bundle_error.as_deref().map(|_| "damaged bundle"),
        c.warning.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("; ")
}

/// The order queue in one line, as the full status shows it.
fn queue_line(q: &crate::acme::handle::QueueStatus) -> String {
    let names: Vec<&str> = q.next.iter().map(|n| n.name.as_str()).collect();
    format!(
        "orders: {} queued (next: {}), budget {}/{} per hour left, empty in {}{}",
        q.queued,
        if names.is_empty() {
            "-".to_string()
        } else {
            names.join(", ")
        },
        q.budget_left,
        q.max_per_hour,
        q.eta_s.map_or_else(|| "-".to_string(), age),
        q.paused_until.map_or_else(String::new, |t| format!(
            "; CA paused until {}",
            crate::acme::rfc3339(t)
        ))
    )
}

/// `--cert NAME`: one certificate, every field, one per line.
pub fn render_cert(c: &CertStatus, now: i64) -> String {
    use std::fmt::Write;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let mut rows: Vec<(&str, String)> = vec![
        ("certificate", c.name.clone()),
        ("domains", c.domains.join(", ")),
        (
            "source",
            match c.source {
                crate::config::certificate::CertSource::Tree => {
                    "tree (certmesh cert add)".to_string()
                }
                _ => "config ([[certificate]])".to_string(),
            },
        ),
        ("challenge", c.challenge.clone()),
        (
            "not after",
            c.not_after.clone().unwrap_or_else(|| "missing".into()),
        ),
        (
            "days left",
            opt(c
                .not_after_unix
                .map(|t| format!("{:.1}", (t - now) as f64 / 86_400.0))),
        ),
        (
            "runway",
            opt(c.runway_s.map(|r| format!("{:.1}d", r as f64 / 86_400.0))),
        ),
        ("version", opt(c.version.map(|v| v.to_string()))),
        ("serial", opt(c.serial.clone())),
        ("ca", opt(c.ca.as_deref().map(crate::acme::ca::ca_label))),
        ("renewer", opt(c.renewer.clone())),
        ("lease", opt(c.lease.clone())),
        ("next renewal", opt(c.next_renewal.clone())),
        ("state", opt(c.state.map(|s| s.as_str().to_string()))),
        ("waiting for", opt(c.waiting_for.clone())),
        ("last attempt", opt(c.last_attempt.clone())),
        ("last took", opt(c.last_took_ms.map(|t| format!("{t}ms")))),
        ("failures", c.failures.to_string()),
        (
            "last error",
            opt(c.last_error.as_deref().map(|e| one_line(e, 200))),
        ),
        (
            "bundle error",
            opt(c.bundle_error.as_deref().map(|e| one_line(e, 200))),
        ),
        ("warning", opt(c.warning.clone())),
        (
            "last rollout",
            opt(c.last_rollout_ms.map(|ms| {
                format!(
                    "version {} served everywhere {}ms after its publish (last: {})",
                    c.last_rollout_version
                        .map_or_else(|| "?".into(), |v| v.to_string()),
                    ms,
                    c.last_rollout_node.as_deref().unwrap_or("?")
                )
            })),
        ),
    ];
    for s in &c.served {
        rows.push((
            "served",
            format!(
                "{} {}: {}{}",
                s.node,
                s.frontend,
                if s.current { "current" } else { "not current" },
                s.error
                    .as_deref()
                    .map_or_else(String::new, |e| format!(" ({})", one_line(e, 100)))
            ),
        ));
    }
    let mut o = String::new();
    for (k, v) in rows {
        let _ = writeln!(o, "{k:<13} {v}");
    }
    o
}

/// Left-aligned columns as wide as their widest cell; the last one is not padded.
fn table(o: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            if i + 1 < cells.len() {
                l.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
        }
        o.push_str(l.trim_end());
        o.push('\n');
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `95` → `1m35s`, `7300` → `2h01m`, `200000` → `2d07h`.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        ..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The first line of `s`, at most `max` characters. A longer one keeps its start and
/// its end, where an error chain has its cause ("…: UnknownIssuer"), cut in between.
fn one_line(s: &str, max: usize) -> String {
    let first = s.lines().next().unwrap_or("");
    let n = first.chars().count();
    if n > max {
        let head = max / 3;
        let tail = max.saturating_sub(head + 1);
        let mut t: String = first.chars().take(head).collect();
        t.push('…');
        t.extend(first.chars().skip(n - tail));
        t
    } else {
        first.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            node: NodeStatus {
                name: "lb0".into(),
                id: "AAAA".into(),
                listen: "127.0.0.1:22000".into(),
                uptime_s: 7300,
                now_unix: 1_000_000,
                role: "reader".into(),
            },
            tree: TreeStatus {
                path: "/etc/nginx/certs".into(),
                files: 42,
                out_of_sync: 3,
                sequence: 120,
                scans: 7,
                too_large: vec![TooLargeFile {
                    path: "big.iso".into(),
                    size: 2 << 20,
                }],
                too_large_count: 1,
                refused: vec![RefusedPath {
                    path: "junk/1.bin".into(),
                    reason: "max_size".into(),
                    peer: Some("lb2".into()),
                    size: 60 << 20,
                }],
                refused_count: 1,
                refused_total: 1,
                not_adopted: 0,
                not_sent: vec!["live/www/cert.pem".into()],
                not_sent_count: 2,
            },
            peers: vec![
                PeerStatus {
                    name: "lb1".into(),
                    id: "B".into(),
                    address: "10.0.0.2:22000".into(),
                    connected: true,
                    in_sync: true,
                    rtt_ms: Some(0.412),
                    acked: 120,
                    pending_from: 0,
                    last_error: None,
                    out_of_sync: 0,
                    last_sync_unix: Some(1_000_000),
                    last_sync: None,
                    refused: RefusedStatus::default(),
                    over_cap: OverCapStatus {
                        count: 7,
                        last_path: Some("flood/9.pem".into()),
                    },
                },
                PeerStatus {
                    name: "lb2".into(),
                    id: "C".into(),
                    address: "10.0.0.3:22000".into(),
                    connected: false,
                    in_sync: false,
                    rtt_ms: None,
                    acked: 0,
                    pending_from: 0,
                    last_error: Some("timed out\nsecond line".into()),
                    out_of_sync: 4,
                    last_sync_unix: Some(1_000_000 - 312),
                    last_sync: None,
                    refused: RefusedStatus {
                        count: 3,
                        last_path: Some("live/www/privkey.pem".into()),
                        last_author: Some("B".into()),
                        last_reason: Some("the signature does not match the record".into()),
                    },
                    over_cap: OverCapStatus::default(),
                },
            ],
            certificates: Vec::new(),
            errors: vec![
                RecentError {
                    at_unix: 1_000_000,
                    message: "peer lb2: timed out\nsecond line".into(),
                    ongoing: true,
                },
                RecentError {
                    at_unix: 999_990,
                    message: "hook [\"false\"] failed".into(),
                    ongoing: false,
                },
                RecentError {
                    at_unix: 999_000,
                    message: "index damaged".into(),
                    ongoing: false,
                },
            ],
            counters: Counters {
                hook_failures: 1,
                acme_failures: 0,
                ..Default::default()
            },
            repairs: vec![crate::telemetry::RepairStatus {
                certificate: "www".into(),
                at: String::new(),
                at_unix: 1_000_000 - 95,
                caused_by: "lb2".into(),
                from_version: 3,
                reason: "live/www missing".into(),
            }],
            cluster: None,
            acme_queue: None,
            cert_summary: None,
        }
    }

    /// `sample()` with every section filled: certificates (a lease, a tree entry, a
    /// dns-01 propagation, a missing one) and an order queue.
    fn full_sample() -> Status {
        let mut s = sample();
        s.certificates = serde_json::from_value(serde_json::json!([
            {
                "name": "www", "domains": ["www.example.com", "example.com"],
                "not_after": "2026-03-01T00:00:00Z", "days_left": 42.25, "version": 3,
                "ca": "https://acme-v02.api.letsencrypt.org/directory",
                "renewer": "lb0", "next_renewal": "2026-02-01T00:00:00Z",
                "state": "waiting", "failures": 0, "lease": "lb1",
                "challenge": "http-01", "runway_s": 3_000_000, "source": "tree",
                "last_rollout_ms": 1500, "last_rollout_version": 3,
                "last_rollout_node": "lb2"
            },
            {
                "name": "wild", "domains": ["*.example.com"], "failures": 2,
                "challenge": "dns-01", "waiting_for": "the mesh",
                "dns_propagation": [
                    {"nameserver": "ns1 (192.0.2.1)", "has_record": true, "error": null},
                    {"nameserver": "ns2 (192.0.2.2)", "has_record": false, "error": null}
                ]
            },
            {"name": "none", "domains": [], "failures": 0, "challenge": "http-01"}
        ]))
        .expect("the sample certificates are valid status JSON");
        s.acme_queue = Some(
            serde_json::from_value(serde_json::json!({
                "queued": 2,
                "next": [{"name": "wild", "kind": "new"}, {"name": "none", "kind": "renewal"}],
                "budget_left": 1, "max_per_hour": 50, "eta_s": 4000,
                "paused_until": 1_000_600
            }))
            .expect("the sample queue is valid status JSON"),
        );
        s
    }

    #[test]
    fn a_full_status_renders_exactly() {
        assert_eq!(render(&full_sample()), GOLDEN);
    }

    const GOLDEN: &str = concat!(
        "node lb0 (AAAA)  listen 127.0.0.1:22000  up 2h01m  reader\n",
        "\n",
        "TREE              FILES  OUT OF SYNC  SCANS  SEQUENCE\n",
        "/etc/nginx/certs  42     3            7      120\n",
        "too large, not fetched: big.iso (2097152 bytes; see [tree] max_file_size)\n",
        "over budget, not fetched: junk/1.bin (62914560 bytes from lb2; see [tree] max_size)\n",
        "not sent: this node is not a writer (2 local changes put back): live/www/cert.pem\n",
        "\n",
        "PEER  ADDRESS         CONNECTED  RTT     SYNC           LAST SYNC\n",
        "lb1   10.0.0.2:22000  yes        0.41ms  in sync        just now\n",
        "lb2   10.0.0.3:22000  no         -       4 out of sync  5m12s ago\n",
        "refused from lb1: 7 new paths, its view is full (last: flood/9.pem)\n",
        "refused from lb2: 3 records for their authorship (last: live/www/privkey.pem, claiming lb1 (B): the signature does not match the record)\n",
        "\n",
        "CERTIFICATE  DOMAINS               NOT AFTER             DAYS LEFT  RUNWAY  VER  CA                            RENEWER  NEXT RENEWAL          STATE    CHALLENGE  NOTE\n",
        "www          www.example.com (+1)  2026-03-01T00:00:00Z  42.2       34.7d   3    acme-v02.api.letsencrypt.org  lb0      2026-02-01T00:00:00Z  waiting  http-01    lease held by lb1; from the tree\n",
        "wild         *.example.com         missing               -          -       -    -                             -        -                     -        dns-01     the mesh; dns-01 TXT on 1/2 nameservers, waiting for ns2 (192.0.2.2)\n",
        "none         -                     missing               -          -       -    -                             -        -                     -        http-01\n",
        "rollout www: version 3 served everywhere 1500 ms after its publish (last: lb2)\n",
        "\n",
        "orders: 2 queued (next: wild, none), budget 1/50 per hour left, empty in 1h06m; CA paused until 1970-01-12T13:56:40Z\n",
        "\n",
        "REPAIRED  WHEN       CAUSED BY  FROM VERSION  WHAT WAS WRONG\n",
        "www       1m35s ago  lb2        3             live/www missing\n",
        "\n",
        "ERRORS\n",
        "  peer lb2: timed out\n",
        "  10s ago: hook [\"false\"] failed\n",
        "  16m40s ago: index damaged\n",
        "  since start: 1 hook failures, 0 ACME failures\n",
    );

    #[test]
    fn table_is_aligned_and_complete() {
        let out = render(&sample());
        let lines: Vec<&str> = out.lines().collect();
        let head = lines.iter().position(|l| l.starts_with("PEER")).unwrap();
        let col = |l: &str| {
            l.find("CONNECTED")
                .or_else(|| l.find("yes"))
                .or_else(|| l.find("no "))
        };
        assert_eq!(col(lines[head]), col(lines[head + 1]), "{out}");
        assert_eq!(col(lines[head]), col(lines[head + 2]), "{out}");
        for needle in [
            "TREE",
            "OUT OF SYNC",
            "SCANS",
            "in sync",
            "just now",
            "4 out of sync",
            "5m12s ago",
            "0.41ms",
            "peer lb2: timed out",
            "10s ago: hook",
            "index damaged",
            "since start: 1 hook failures, 0 ACME failures",
            "up 2h01m",
            "REPAIRED",
            "1m35s ago",
            "live/www missing",
            "too large, not fetched: big.iso (2097152 bytes",
            "over budget, not fetched: junk/1.bin (62914560 bytes from lb2; see [tree] max_size)",
            "  reader",
            "refused from lb1: 7 new paths, its view is full (last: flood/9.pem)",
            "not sent: this node is not a writer (2 local changes put back): live/www/cert.pem",
            "refused from lb2: 3 records for their authorship (last: live/www/privkey.pem, \
             claiming lb1 (B): the signature does not match the record)",
        ] {
            assert!(out.contains(needle), "{needle:?} missing in:\n{out}");
        }
        assert!(!out.contains("second line"), "{out}");
    }

    /// `n` certificates `c0`…: `c<i>` expires in `i` hours (from `now` 1,000,000),
    /// every tenth missing, `c3` failing.
    fn many(n: usize) -> Status {
        let mut s = sample();
        s.errors.clear();
        s.certificates = (0..n)
            .map(|i| {
                let not_after = (i % 10 != 0).then_some(1_000_000 + 3600 * i as i64);
                CertStatus {
                    name: format!("c{i}"),
                    domains: vec![format!("c{i}.example.com")],
                    not_after: not_after.map(crate::acme::rfc3339),
                    not_after_unix: not_after,
                    days_left: None,
                    version: Some(1),
                    serial: Some("01".into()),
                    ca: None,
                    renewer: Some("lb0".into()),
                    lease: None,
                    next_renewal: None,
                    next_renewal_unix: None,
                    state: Some(if i == 3 {
                        crate::acme::handle::AcmeState::Backoff
                    } else {
                        crate::acme::handle::AcmeState::Idle
                    }),
                    last_attempt: None,
                    last_attempt_unix: None,
                    last_error: (i == 3).then(|| "rateLimited: too many orders".into()),
                    failures: u32::from(i == 3),
                    waiting_for: None,
                    last_took_ms: None,
                    challenge: "http-01".into(),
                    dns_propagation: None,
                    bundle_error: None,
                    runway_s: None,
                    warning: None,
                    served: Vec::new(),
                    last_rollout_ms: None,
                    last_rollout_version: None,
                    last_rollout_node: None,
                    source: crate::config::certificate::CertSource::Tree,
                }
            })
            .collect();
        s.acme_queue = Some(crate::acme::handle::QueueStatus {
            queued: 12,
            next: vec![crate::acme::handle::QueuedOrder {
                name: "c10".into(),
                kind: crate::acme::budget::Kind::New,
            }],
            budget_left: 0,
            max_per_hour: 100,
            eta_s: Some(450),
            paused_until: None,
        });
        s
    }

    #[test]
    fn many_certificates_are_summarised() {
        let out = render_view(many(30), CertView::Auto).unwrap();
        for needle in [
            "CERTIFICATES 30 (30 from the tree, 0 from the config)",
            "27 live, 3 missing, 0 damaged, 0 unscheduled; 1 backoff, 29 idle",
            "SOONEST EXPIRY",
            "c3           1         rateLimited",
            "rateLimited: too many orders",
            "orders: 12 queued (next: c10), budget 0/100 per hour left, empty in 7m30s",
            "status --cert NAME",
            "PEER",
        ] {
            assert!(out.contains(needle), "{needle:?} missing in:\n{out}");
        }
        // The missing ones first (c0, c10, c20), then the soonest: c1, c2.
        let soonest: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("SOONEST EXPIRY"))
            .skip(1)
            .take(5)
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(soonest, ["c0", "c10", "c20", "c1", "c2"], "{out}");
        assert!(!out.contains("c29"), "{out}");
    }

    #[test]
    fn the_summary_the_daemon_sends_reads_as_the_full_list_would_and_is_small() {
        let whole = render_view(many(30), CertView::Auto).unwrap();
        let mut s = many(30);
        s.summarise();
        assert!(s.certificates.is_empty());
        let sent: Status = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(render_view(sent, CertView::Auto).unwrap(), whole);
        let mut big = many(10_000);
        let listed = serde_json::to_vec(&big).unwrap().len();
        big.summarise();
        let summed = serde_json::to_vec(&big).unwrap().len();
        eprintln!("10,000 certificates: {listed} bytes listed, {summed} bytes summed up");
        assert!(summed < 32 << 10, "{summed} bytes");
        let mut few = many(20);
        few.summarise();
        assert_eq!(few.certificates.len(), 20, "20 keep the table");
    }

    #[test]
    fn twenty_certificates_keep_the_table() {
        let out = render_view(many(20), CertView::Auto).unwrap();
        assert!(out.contains("CERTIFICATE  DOMAINS"), "{out}");
        assert!(!out.contains("SOONEST EXPIRY"), "{out}");
        let all = render_view(many(30), CertView::All).unwrap();
        assert!(all.contains("c29.example.com"), "{all}");
    }

    #[test]
    fn one_certificate_in_full() {
        let out = render_view(many(30), CertView::One("c3")).unwrap();
        for needle in [
            "certificate   c3",
            "domains       c3.example.com",
            "source        tree",
            "state         backoff",
            "failures      1",
            "last error    rateLimited: too many orders",
        ] {
            assert!(out.contains(needle), "{needle:?} missing in:\n{out}");
        }
        assert!(!out.contains("c4"), "{out}");
        let e = render_view(many(30), CertView::One("nope")).unwrap_err();
        assert!(
            e.contains("no certificate \"nope\"") && e.contains("30 configured"),
            "{e}"
        );
    }

    /// Issue 29 item 3: `status` within 1 s (`--json` 2 s) at 10,000 certificates.
    /// The client's part (decode the daemon's JSON, render) is measured here; the
    /// daemon's part is measured by the benchmark (`--only certs`).
    #[test]
    fn ten_thousand_certificates_render_quickly() {
        let json = serde_json::to_vec(&many(10_000)).unwrap();
        let t = std::time::Instant::now();
        let s: Status = serde_json::from_slice(&json).unwrap();
        let out = render_view(s, CertView::Auto).unwrap();
        let summary = t.elapsed();
        let t = std::time::Instant::now();
        let s: Status = serde_json::from_slice(&json).unwrap();
        let all = render_view(s, CertView::All).unwrap();
        let full = t.elapsed();
        eprintln!(
            "10,000 certificates: JSON {} bytes; summary {} bytes in {summary:?}, --all {} bytes in {full:?}",
            json.len(),
            out.len(),
            all.len()
        );
        assert!(out.len() < 4 << 10, "{}", out.len());
        // Unoptimised test builds on a shared machine get three times the budget.
        let slack = if cfg!(debug_assertions) { 3 } else { 1 };
        assert!(
            summary < std::time::Duration::from_secs(slack),
            "{summary:?}"
        );
        assert!(full < std::time::Duration::from_secs(2 * slack), "{full:?}");
    }

    #[test]
    fn ages() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(95), "1m35s");
        assert_eq!(age(7300), "2h01m");
        assert_eq!(age(200_000), "2d07h");
        assert_eq!(age(-5), "0s");
    }
}

//! The optional Prometheus endpoint (`[metrics] listen`): `GET /metrics` in the text
//! exposition format (version 0.0.4), built from the same snapshot as `status`, plus
//! event counters bumped where things happen (in [`crate::telemetry`]:
//! `order_finished`, `applied`, `conflict_kept`, `session_ended`) and the standard `process_*` metrics read
//! from `/proc/self`. Names follow Prometheus conventions: base units, `_total` on
//! counters, `_timestamp_seconds` for Unix times, no `node` label (the scrape adds
//! `instance`). A tiny HTTP/1 responder on a tokio listener: one request per
//! connection, bounded in size and time; anything but `GET /metrics` gets a 404.

use std::collections::BTreeMap;
use std::fmt::{Display, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::handles::{Observer, Settings};
use crate::net::clients::Clients;
use crate::ops::observe::StatusSource;
use crate::ops::status::{PeerStatus, Status};
use crate::telemetry::{events, Event, Events};

/// Largest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once; more are turned away (a scraper needs one).
const MAX_CLIENTS: usize = 16;

/// Starts the endpoint if `[metrics] listen` is configured.
pub fn start(
    settings: Settings,
    source: StatusSource,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let addr = settings.read(|c| c.metrics_listen).flatten();
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = bind(addr)?;
    tracing::info!(%addr, "metrics endpoint listening");
    let clients = Clients::new("metrics", MAX_CLIENTS);
    let limit = Some(CLIENT_TIMEOUT);
    Ok(Some(crate::net::clients::serve_forever(
        listener,
        clients,
        limit,
        move |stream| {
            let (settings, source) = (settings.clone(), source.clone());
            async move { serve(&settings, &source, stream).await }
        },
    )))
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?;
    TcpListener::from_std(std).map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))
}

async fn serve(
    settings: &Settings,
    source: &StatusSource,
    mut stream: TcpStream,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", b"").await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(
                &source.status(),
                &scrape(settings, source.observer()),
                &events(),
            );
            let body = if method == "HEAD" { "" } else { &body };
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"try /metrics\n",
            )
            .await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", b"").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// What a scrape reads from the daemon besides the `status` snapshot.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Certificates live in the tree (`live/<name>/cert.pem`) but not configured
    /// here: name and not-after.
    pub unconfigured: Vec<(String, i64)>,
    /// Per configured peer: name, UDP bytes received and sent (ended sessions plus
    /// the live one).
    pub peer_bytes: Vec<(String, u64, u64)>,
    pub process: Option<Process>,
    /// `[metrics] per_certificate`: series per certificate besides the aggregates.
    pub per_certificate: bool,
}

fn scrape(settings: &Settings, observer: &Observer) -> Scrape {
    let per_certificate = settings.read(|c| c.metrics_per_certificate).unwrap_or(true);
    Scrape {
        // Only the per-certificate series show them: no walk of live/ otherwise.
        unconfigured: if per_certificate {
            live_only(settings, observer.root())
        } else {
            Vec::new()
        },
        peer_bytes: peer_bytes(observer),
        process: Process::read(),
        per_certificate,
    }
}

/// Bytes per peer: under the state lock, as `session_ended` is called, so a session
/// moving from live to ended is counted exactly once.
fn peer_bytes(observer: &Observer) -> Vec<(String, u64, u64)> {
    let ev = events();
    let mut out: Vec<(String, u64, u64)> = observer.with_peer_sessions(|peers| {
        peers
            .iter()
            .map(|(name, live)| {
                let (rx, tx) = live.unwrap_or((0, 0));
                (
                    name.to_string(),
                    ev.get(Event::BytesReceived, name) + rx,
                    ev.get(Event::BytesSent, name) + tx,
                )
            })
            .collect()
    });
    out.sort();
    out
}

/// Certificates live in the tree but not configured here: name and not-after.
fn live_only(settings: &Settings, root: &std::path::Path) -> Vec<(String, i64)> {
    // A set: with 10,000 certificates a list made this scan quadratic.
    let configured: std::collections::HashSet<String> = settings
        .read(|c| c.certificates.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    let mut out: Vec<(String, i64)> = std::fs::read_dir(root.join("live"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !configured.contains(n))
        .filter_map(|n| {
            let v = crate::acme::live_validity(root, &n)?;
            Some((n, v.0.not_after))
        })
        .collect();
    out.sort();
    out
}

/// The standard `process_*` metrics, from `/proc/self` (Linux).
#[derive(Debug, Clone, Default)]
pub struct Process {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

impl Process {
    fn read() -> Option<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        Process::parse(
            &stat,
            &boot,
            rustix::param::clock_ticks_per_second(),
            rustix::param::page_size() as u64,
            open_fds,
            max_fds,
        )
    }

    /// From `/proc/self/stat` (fields after the command name, which may hold spaces
    /// and parentheses) and `/proc/stat`'s `btime`.
    fn parse(
        stat: &str,
        proc_stat: &str,
        ticks: u64,
        page: u64,
        open_fds: u64,
        max_fds: Option<u64>,
    ) -> Option<Process> {
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // proc(5) numbers fields from 1; `state` (field 3) is fields[0] here.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let btime: u64 = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        let ticks = ticks.max(1) as f64;
        Some(Process {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            start_time_seconds: btime as f64 + field(22)? as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)?.saturating_mul(page),
            open_fds,
            max_fds,
        })
    }
}

/// A label value escaped per the exposition format (backslash, quote, newline).
pub fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// A sample's one label, if any: `(name, value)`.
type Label<'a> = Option<(&'static str, &'a str)>;

/// The exposition text being written.
struct Exposition(String);

impl Exposition {
    /// One family: HELP, TYPE, then its samples.
    fn family<'a, V: Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Label<'a>, V)>,
    ) {
        let o = &mut self.0;
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (label, value) in samples {
            match label {
                Some((k, v)) => {
                    let _ = writeln!(o, "{name}{{{k}=\"{}\"}} {value}", escape(v));
                }
                None => {
                    let _ = writeln!(o, "{name} {value}");
                }
            }
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help, [(None, value)]);
    }
}

/// The exposition text for a status snapshot, what the scrape read besides it, and
/// the event counters.
pub fn render(s: &Status, scrape: &Scrape, events: &Events) -> String {
    let mut o = Exposition(String::new());
    o.family(
        "certmesh_build_info",
        "gauge",
        "Always 1; the certmesh version as a label.",
        [(Some(("version", env!("CARGO_PKG_VERSION"))), 1)],
    );
    peers(&mut o, s, scrape);
    o.one(
        "certmesh_tree_files",
        "gauge",
        "Live (not deleted) records in the local index.",
        s.tree.files,
    );
    o.one(
        "certmesh_tree_items_out_of_sync",
        "gauge",
        "Items this node still needs from its peers.",
        s.tree.out_of_sync,
    );
    o.one(
        "certmesh_tree_scans_total",
        "counter",
        "Rescans of the tree since start (watcher-driven and periodic).",
        s.tree.scans,
    );
    // `[tree] writers`: this node's role, a reader's local changes not sent.
    o.one(
        "certmesh_writer",
        "gauge",
        "1 if this node may change the tree ([tree] writers lists it or is absent), 0 for a reader.",
        u8::from(s.node.role != "reader"),
    );
    o.one(
        "certmesh_not_sent_total",
        "counter",
        "Local changes of this reader node not sent and put back, since start.",
        s.tree.not_sent_count,
    );
    aggregates(&mut o, s);
    if scrape.per_certificate {
        certificates(&mut o, s, scrape, events);
        served(&mut o, s);
    } else {
        totals(&mut o, events);
    }
    rollouts(&mut o, s);
    let unlabelled = |e: Event| events.get(e, "");
    o.one(
        "certmesh_applied_files_total",
        "counter",
        "Peers' changes (files, links, directories, deletions) written to the tree since start.",
        unlabelled(Event::Applied),
    );
    o.one(
        "certmesh_apply_failures_total",
        "counter",
        "Peers' changes that could not be written (I/O error or refused) since start; retried.",
        unlabelled(Event::ApplyFailure),
    );
    o.one(
        "certmesh_conflicts_total",
        "counter",
        "Conflicts lost by a local version, kept under .certmesh/conflicts/, since start.",
        unlabelled(Event::Conflict),
    );
    o.family(
        "certmesh_hook_runs_total",
        "counter",
        "Hook runs (succeeded or failed) since start, per hook (command path or HAProxy socket).",
        events
            .of(Event::HookRun)
            .map(|(l, v)| (Some(("hook", l)), v)),
    );
    o.one(
        "certmesh_hook_failures_total",
        "counter",
        "Hooks that failed to start, exited non-zero or timed out, since start.",
        s.counters.hook_failures,
    );
    o.one(
        "certmesh_recent_errors",
        "gauge",
        "Errors in the status error list: conditions that still hold (peers down, certificates failing or damaged) plus the last 20 past ones.",
        s.errors.len(),
    );
    if let Some(p) = &scrape.process {
        process(&mut o, p);
    }
    o.0
}

fn peers(o: &mut Exposition, s: &Status, scrape: &Scrape) {
    o.one(
        "certmesh_peers",
        "gauge",
        "Configured peers.",
        s.peers.len(),
    );
    o.one(
        "certmesh_peers_connected",
        "gauge",
        "Configured peers with a live session.",
        s.peers.iter().filter(|p| p.connected).count(),
    );
    let mut per_peer =
        |name: &str, kind: &str, help: &str, v: &dyn Fn(&PeerStatus) -> Option<String>| {
            let samples = s
                .peers
                .iter()
                .filter_map(|p| Some((Some(("peer", p.name.as_str())), v(p)?)));
            o.family(name, kind, help, samples);
        };
    let b = |x: bool| Some(u8::from(x).to_string());
    per_peer(
        "certmesh_peer_connected",
        "gauge",
        "1 if the peer has a live session.",
        &|p| b(p.connected),
    );
    per_peer(
        "certmesh_peer_in_sync",
        "gauge",
        "1 if the peer acknowledged everything we have and we need nothing it announced.",
        &|p| b(p.in_sync),
    );
    per_peer(
        "certmesh_peer_items_out_of_sync",
        "gauge",
        "Items between us and the peer: ours it has not acknowledged (also while disconnected) plus theirs we still need.",
        &|p| Some(p.out_of_sync.to_string()),
    );
    per_peer(
        "certmesh_peer_rtt_seconds",
        "gauge",
        "QUIC round-trip time to the peer (connected peers only).",
        &|p| p.rtt_ms.map(|r| (r / 1000.0).to_string()),
    );
    per_peer(
        "certmesh_peer_last_sync_timestamp_seconds",
        "gauge",
        "Unix time of the last successful sync with the peer: its last ack, or the last time it was seen fully in sync (absent: never since start).",
        &|p| p.last_sync_unix.map(|t| t.to_string()),
    );
    // `[tree] writers`: records refused for their authorship, per peer.
    per_peer(
        "certmesh_peer_refused_authorship_total",
        "counter",
        "Records from the peer not taken in because their author is not in [tree] writers or the signature does not match, since start.",
        &|p| Some(p.refused.count.to_string()),
    );
    let bytes = |pick: fn(&(String, u64, u64)) -> u64| {
        scrape
            .peer_bytes
            .iter()
            .map(move |e| (Some(("peer", e.0.as_str())), pick(e)))
    };
    o.family(
        "certmesh_peer_received_bytes_total",
        "counter",
        "UDP bytes received from the peer since start (QUIC: sync traffic and handshakes).",
        bytes(|e| e.1),
    );
    o.family(
        "certmesh_peer_sent_bytes_total",
        "counter",
        "UDP bytes sent to the peer since start.",
        bytes(|e| e.2),
    );
}

fn certificates(o: &mut Exposition, s: &Status, scrape: &Scrape, events: &Events) {
    let configured = s
        .certificates
        .iter()
        .filter_map(|c| Some((c.name.as_str(), c.not_after_unix?)));
    let others = scrape.unconfigured.iter().map(|(n, t)| (n.as_str(), *t));
    o.family(
        "certmesh_certificate_not_after_timestamp_seconds",
        "gauge",
        "Unix time the certificate live/<cert>/fullchain.pem serves expires (its leaf, never cert.pem alone), configured or not (absent while none is live).",
        configured.chain(others).map(|(c, t)| (Some(("cert", c)), t)),
    );
    o.family(
        "certmesh_certificate_runway_seconds",
        "gauge",
        "Seconds until the served leaf expires, less the time retries need (max(1 day, a tenth of the lifetime)): page when it nears 0.",
        s.certificates
            .iter()
            .filter_map(|c| Some((Some(("cert", c.name.as_str())), c.runway_s?))),
    );
    o.family(
        "certmesh_certificate_bundle_damaged",
        "gauge",
        "1 while live/<cert> is a damaged bundle (cert.pem, chain, key or names not matching the served leaf), else 0.",
        s.certificates
            .iter()
            .map(|c| (Some(("cert", c.name.as_str())), u64::from(c.bundle_error.is_some()))),
    );
    o.family(
        "certmesh_certificate_unscheduled",
        "gauge",
        "1 while the certificate is inside its renewal window and no order is scheduled, else 0.",
        s.certificates.iter().map(|c| {
            (
                Some(("cert", c.name.as_str())),
                u64::from(c.warning.is_some()),
            )
        }),
    );
    // Every configured certificate from 0, so rate() and increase() see the first.
    let per_cert = |e: Event| {
        let mut m: BTreeMap<&str, u64> = s
            .certificates
            .iter()
            .map(|c| (c.name.as_str(), 0))
            .collect();
        m.extend(events.of(e));
        m.into_iter().map(|(c, v)| (Some(("cert", c)), v))
    };
    o.family(
        "certmesh_acme_orders_total",
        "counter",
        "ACME orders this node finished (issued or failed) since start.",
        per_cert(Event::Order),
    );
    o.family(
        "certmesh_acme_order_failures_total",
        "counter",
        "ACME orders that failed on this node since start.",
        per_cert(Event::OrderFailure),
    );
}

/// The certificates in a few series whatever their number: counts by
/// state, the earliest expiry, the smallest runway, leaves served but not current.
fn aggregates(o: &mut Exposition, s: &Status) {
    let certs = &s.certificates;
    let live = certs.iter().filter(|c| c.not_after_unix.is_some()).count();
    o.family(
        "certmesh_certificates",
        "gauge",
        "Configured certificates (config and tree) by state: live (live/<cert> serves a leaf) or missing.",
        [
            (Some(("state", "live")), live),
            (Some(("state", "missing")), certs.len() - live),
        ],
    );
    let count =
        |f: fn(&crate::ops::status::CertStatus) -> bool| certs.iter().filter(|c| f(c)).count();
    o.one(
        "certmesh_certificates_damaged",
        "gauge",
        "Certificates whose live/<cert> is a damaged bundle.",
        count(|c| c.bundle_error.is_some()),
    );
    o.one(
        "certmesh_certificates_unscheduled",
        "gauge",
        "Certificates inside their renewal window with no order scheduled.",
        count(|c| c.warning.is_some()),
    );
    o.one(
        "certmesh_certificates_failing",
        "gauge",
        "Certificates whose last order on this node failed.",
        count(|c| c.last_error.is_some()),
    );
    o.family(
        "certmesh_certificates_earliest_not_after_timestamp_seconds",
        "gauge",
        "Unix time the first of the live certificates expires (absent while none is live).",
        certs
            .iter()
            .filter_map(|c| c.not_after_unix)
            .min()
            .map(|t| (None, t)),
    );
    o.family(
        "certmesh_certificates_min_runway_seconds",
        "gauge",
        "The smallest runway of the live certificates: page when it nears 0.",
        certs
            .iter()
            .filter_map(|c| c.runway_s)
            .min()
            .map(|t| (None, t)),
    );
    let mut stale: BTreeMap<&str, u64> = BTreeMap::new();
    for e in certs
        .iter()
        .flat_map(|c| &c.served)
        .filter(|e| e.node == s.node.name)
    {
        *stale.entry(e.frontend.as_str()).or_default() += u64::from(!e.current);
    }
    o.family(
        "certmesh_served_certificates_not_current",
        "gauge",
        "Certificates this node's frontend serves with another leaf than live/<cert>/fullchain.pem, per frontend.",
        stale.into_iter().map(|(f, n)| (Some(("frontend", f)), n)),
    );
}

/// `[metrics] per_certificate = false`: the order counters summed over the
/// certificates (the same families, without the `cert` label).
fn totals(o: &mut Exposition, events: &Events) {
    let sum = |e: Event| events.of(e).map(|(_, v)| v).fold(0u64, u64::saturating_add);
    o.one(
        "certmesh_acme_orders_total",
        "counter",
        "ACME orders this node finished (issued or failed) since start.",
        sum(Event::Order),
    );
    o.one(
        "certmesh_acme_order_failures_total",
        "counter",
        "ACME orders that failed on this node since start.",
        sum(Event::OrderFailure),
    );
}

/// What this node's frontends serve, per certificate and frontend.
fn served(o: &mut Exposition, s: &Status) {
    let mine: Vec<(&str, &crate::ops::status::ServedStatus)> = s
        .certificates
        .iter()
        .flat_map(|c| c.served.iter().map(move |e| (c.name.as_str(), e)))
        .filter(|(_, e)| e.node == s.node.name)
        .collect();
    let two = |o: &mut Exposition,
               name: &str,
               kind: &str,
               help: &str,
               v: &dyn Fn(&crate::ops::status::ServedStatus) -> Option<i64>| {
        let _ = writeln!(o.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (cert, e) in &mine {
            if let Some(value) = v(e) {
                let _ = writeln!(
                    o.0,
                    "{name}{{cert=\"{}\",frontend=\"{}\"}} {value}",
                    escape(cert),
                    escape(&e.frontend)
                );
            }
        }
    };
    two(
        o,
        "certmesh_served_certificate_not_after_timestamp_seconds",
        "gauge",
        "Unix time the certificate this node's frontend serves for <cert> expires (absent while the probe fails).",
        &|e| e.not_after_unix,
    );
    two(
        o,
        "certmesh_served_certificate_version",
        "gauge",
        "The archive/<cert>/<n> whose leaf this node's frontend serves for <cert> (absent when not kept or the probe fails).",
        &|e| e.version.map(i64::from),
    );
    two(
        o,
        "certmesh_served_certificate_current",
        "gauge",
        "1 if this node's frontend serves the leaf of live/<cert>/fullchain.pem, else 0.",
        &|e| Some(i64::from(e.current)),
    );
    let name = "certmesh_served_nodes";
    let _ = writeln!(
        o.0,
        "# HELP {name} Nodes whose latest report says all their frontends serve live/<cert> (state=current), some do not (not_current), or whose report was not refreshed within 3 probe periods (stale; counted in neither). Nodes removed from the peer list are not counted.\n# TYPE {name} gauge"
    );
    for c in s.certificates.iter().filter(|c| !c.served.is_empty()) {
        let n = crate::ops::served::counts(c);
        for (state, v) in [
            ("current", n.current),
            ("not_current", n.not_current),
            ("stale", n.stale),
        ] {
            let _ = writeln!(
                o.0,
                "{name}{{cert=\"{}\",state=\"{state}\"}} {v}",
                escape(&c.name)
            );
        }
    }
}

/// Rollout times and probe failures: per node and frontend, whatever the number of
/// certificates.
fn rollouts(o: &mut Exposition, s: &Status) {
    let h = &s.counters.rollout_seconds;
    let name = "certmesh_rollout_seconds";
    let _ = writeln!(
        o.0,
        "# HELP {name} Time from this node's publish of a certificate version (the live/<cert> flip) until every node's frontends served it (each node's probe clock).\n# TYPE {name} histogram"
    );
    for (le, n) in h.cumulative() {
        let _ = writeln!(o.0, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        o.0,
        "{name}_sum {}\n{name}_count {}",
        h.sum_seconds, h.count
    );
    o.family(
        "certmesh_frontend_probe_failures_total",
        "counter",
        "Serving probes of this node's frontend that failed (no TLS handshake) since start.",
        s.counters
            .probe_failures
            .iter()
            .map(|(f, v)| (Some(("frontend", f.as_str())), *v)),
    );
}

fn process(o: &mut Exposition, p: &Process) {
    o.one(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    o.one(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes,
    );
    o.one(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes,
    );
    o.one(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
    o.one(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds,
    );
    if let Some(max) = p.max_fds {
        o.one(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_from_proc() {
        // A command name with spaces and a parenthesis, as proc(5) allows.
        let stat = "4242 (cert mesh) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 50 0 0 20 0 9 0 123400 104857600 2560 18446744073709551615";
        let p = Process::parse(
            stat,
            "cpu 1 2 3\nbtime 1700000000\n",
            100,
            4096,
            7,
            Some(1024),
        )
        .unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.start_time_seconds, 1_700_001_234.0);
        assert_eq!(p.virtual_bytes, 104_857_600);
        assert_eq!(p.resident_bytes, 2560 * 4096);
        assert!(Process::parse("1 (x) S 1", "btime 1\n", 100, 4096, 0, None).is_none());
        // This process, for real.
        let me = Process::read().unwrap();
        assert!(me.resident_bytes > 0 && me.open_fds > 0, "{me:?}");
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
        assert_eq!(escape("plain.example.com"), "plain.example.com");
    }

    /// A status with `n` live certificates (`c<i>.example.com` expiring at
    /// 1,800,000,000 + i) and one finished order each.
    fn many(n: usize) -> (Status, Events) {
        let certs: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                serde_json::json!({"name": format!("c{i}.example.com"),
                    "domains": [format!("c{i}.example.com")], "failures": 0,
                    "not_after_unix": 1_800_000_000 + i as i64,
                    "runway_s": 5_000_000 + i as i64, "state": "idle", "source": "tree"})
            })
            .collect();
        let s = serde_json::from_value(serde_json::json!({
            "node": {"name": "lb0", "id": "X", "listen": "127.0.0.1:1", "uptime_s": 5},
            "tree": {"path": "/t", "files": 4 * n, "out_of_sync": 0, "sequence": 9},
            "peers": [], "certificates": certs, "errors": []
        }))
        .unwrap();
        let mut events = Events::default();
        for i in 0..n {
            events.add(Event::Order, &format!("c{i}.example.com"), 1);
        }
        (s, events)
    }

    fn scrape_of(per_certificate: bool) -> Scrape {
        Scrape {
            per_certificate,
            ..Scrape::default()
        }
    }

    #[test]
    fn aggregates_replace_per_certificate_series_when_turned_off() {
        let (s, events) = many(30);
        let text = render(&s, &scrape_of(false), &events);
        assert!(!text.contains("cert=\""), "{text}");
        for line in [
            "certmesh_certificates{state=\"live\"} 30",
            "certmesh_certificates{state=\"missing\"} 0",
            "certmesh_certificates_earliest_not_after_timestamp_seconds 1800000000",
            "certmesh_certificates_min_runway_seconds 5000000",
            "certmesh_acme_orders_total 30",
            "certmesh_rollout_seconds_count 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        let full = render(&s, &scrape_of(true), &events);
        assert!(full.contains("certmesh_acme_orders_total{cert=\"c29.example.com\"} 1"));
        assert!(full.contains("certmesh_certificates{state=\"live\"} 30"));
    }

    /// Issue 29 item 3: `/metrics` ≤ 5 MB and rendered well within 1 s at 10,000
    /// certificates, both ways.
    #[test]
    fn ten_thousand_certificates_both_ways() {
        let (s, events) = many(10_000);
        for per_certificate in [true, false] {
            let t = std::time::Instant::now();
            let text = render(&s, &scrape_of(per_certificate), &events);
            let took = t.elapsed();
            eprintln!(
                "10,000 certificates, per_certificate = {per_certificate}: {} bytes in {took:?}",
                text.len()
            );
            let slack = if cfg!(debug_assertions) { 3 } else { 1 };
            assert!(
                took < std::time::Duration::from_millis(500 * slack),
                "{took:?}"
            );
            let max = if per_certificate { 5 << 20 } else { 16 << 10 };
            assert!(text.len() < max, "{} bytes", text.len());
        }
    }

    #[test]
    fn exposition_format() {
        let s: Status = serde_json::from_value(serde_json::json!({
            "node": {"name": "lb\"0", "id": "X", "listen": "127.0.0.1:1", "uptime_s": 5},
            "tree": {"path": "/t", "files": 3, "out_of_sync": 0, "sequence": 9},
            "peers": [
                {"name": "lb1", "id": "Y", "address": "127.0.0.2:1", "connected": true,
                 "in_sync": true, "rtt_ms": 1.5, "acked": 9, "pending_from": 0,
                 "last_error": null, "last_sync_unix": 1700000000},
                {"name": "lb\\2", "id": "Z", "address": "127.0.0.3:1", "connected": false,
                 "in_sync": false, "rtt_ms": null, "acked": 0, "pending_from": 0,
                 "last_error": "refused", "out_of_sync": 2}
            ],
            "certificates": [],
            "errors": [],
            "counters": {"hook_failures": 2, "acme_failures": 0}
        }))
        .unwrap();
        let scrape = Scrape {
            unconfigured: vec![("www".into(), 1800000000)],
            peer_bytes: vec![("lb1".into(), 1200, 900)],
            process: None,
            per_certificate: true,
        };
        let mut events = Events::default();
        events.add(Event::Order, "www", 2);
        events.add(Event::OrderFailure, "www", 1);
        events.add(Event::Conflict, "", 1);
        events.add(Event::HookRun, "/usr/sbin/nginx", 3);
        let text = render(&s, &scrape, &events);
        for line in [
            "certmesh_hook_runs_total{hook=\"/usr/sbin/nginx\"} 3",
            "certmesh_build_info{version=\"0.1.0\"} 1",
            "certmesh_peers_connected 1",
            "certmesh_peer_connected{peer=\"lb1\"} 1",
            "certmesh_peer_connected{peer=\"lb\\\\2\"} 0",
            "certmesh_peer_items_out_of_sync{peer=\"lb\\\\2\"} 2",
            "certmesh_peer_rtt_seconds{peer=\"lb1\"} 0.0015",
            "certmesh_peer_last_sync_timestamp_seconds{peer=\"lb1\"} 1700000000",
            "certmesh_peer_received_bytes_total{peer=\"lb1\"} 1200",
            "certmesh_peer_sent_bytes_total{peer=\"lb1\"} 900",
            "certmesh_certificate_not_after_timestamp_seconds{cert=\"www\"} 1800000000",
            "certmesh_acme_orders_total{cert=\"www\"} 2",
            "certmesh_acme_order_failures_total{cert=\"www\"} 1",
            "certmesh_conflicts_total 1",
            "certmesh_applied_files_total 0",
            "certmesh_hook_failures_total 2",
            "# TYPE certmesh_hook_failures_total counter",
            "# TYPE certmesh_rollout_seconds histogram",
            "certmesh_rollout_seconds_bucket{le=\"+Inf\"} 0",
            "certmesh_rollout_seconds_count 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(!text.contains("node="), "{text}");
        assert!(!text.contains("last_sync_timestamp_seconds{peer=\"lb\\\\2\"}"));
        // Every sample belongs to a family announced just before it.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                // A histogram's samples carry a suffix on its family's name.
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|f| declared.contains(*f))
                    .unwrap_or(name);
                assert!(declared.contains(family), "{l}");
            }
        }
    }
}

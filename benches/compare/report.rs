//! The report: value formatting, the Markdown tables and the machine header.

use super::*;

pub(crate) fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.1 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

pub(crate) fn fmt_ratio(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Unit {
    Secs,
    Mib,
    Cpu,
    Rate(&'static str),
    Count,
    /// A ratio of two figures of the same system (printed as `1.23×`).
    Ratio,
}

pub(crate) fn fmt_val(v: f64, u: Unit) -> String {
    match u {
        Unit::Secs => fmt_secs(v),
        Unit::Mib => format!("{v:.1} MiB"),
        Unit::Cpu => format!("{v:.2} s"),
        Unit::Rate(unit) => format!("{v:.1} {unit}"),
        Unit::Count => format!("{v:.0}"),
        Unit::Ratio => fmt_ratio(v),
    }
}

pub(crate) struct Table {
    pub(crate) rows: Vec<[String; 7]>,
}

impl Table {
    /// A row: certmesh, Syncthing tuned, Syncthing defaults, with ratios Syncthing ÷ certmesh.
    pub(crate) fn row(
        &mut self,
        metric: &str,
        u: Unit,
        cm: Option<f64>,
        tuned: Option<f64>,
        def: Option<f64>,
        target: String,
    ) {
        if cm.is_none() && tuned.is_none() && def.is_none() {
            return; // a section that did not run (--only)
        }
        let cell = |v: Option<f64>| v.map_or("—".to_string(), |v| fmt_val(v, u));
        let ratio = |v: Option<f64>| match (v, cm) {
            // CPU time is counted in 10 ms clock ticks: no ratio of a tick or two.
            (Some(s), Some(_)) if matches!(u, Unit::Cpu) && s < 0.05 => "—".to_string(),
            (Some(_), Some(c)) if matches!(u, Unit::Cpu) && c < 0.05 => "—".to_string(),
            (Some(s), Some(c)) if c > 0.0 && !matches!(u, Unit::Count) => fmt_ratio(s / c),
            _ => "—".to_string(),
        };
        self.rows.push([
            metric.to_string(),
            cell(cm),
            cell(tuned),
            ratio(tuned),
            cell(def),
            ratio(def),
            target,
        ]);
    }

    pub(crate) fn render(&self) -> String {
        let mut s = String::from(
            "| metric | certmesh | Syncthing tuned | tuned ÷ certmesh | Syncthing defaults | defaults ÷ certmesh | target (DESIGN §6) |\n|---|---:|---:|---:|---:|---:|---|\n",
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

pub(crate) fn check(ok: bool, text: &str) -> String {
    format!("{text} {}", if ok { "✅" } else { "❌ missed" })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn render_report(
    o: &Opts,
    header: &str,
    cm: &SysResult,
    tuned: &SysResult,
    def: &SysResult,
    cm_bulk: Option<f64>,
    st_bulk: Option<f64>,
    bulk_small: Option<&Stats>,
    scale: &[ScaleResult],
    acme: Option<&(Stats, Stats)>,
    acme_served: Option<&(Stats, Stats)>,
    stops: Option<&(Stats, Stats)>,
    flood: Option<&handshake_flood::FloodResult>,
    notes: &[String],
) -> String {
    let mut t = Table { rows: Vec::new() };
    let get = |r: &SysResult, f: &dyn Fn(&SysResult) -> Option<f64>| f(r);
    let trio = |f: &dyn Fn(&SysResult) -> Option<f64>| (get(cm, f), get(tuned, f), get(def, f));

    // 1. small file
    let (a, b, c) = trio(&|r| r.small.map(|s| s.n as f64));
    t.row(
        "small file, 3 nodes: samples",
        Unit::Count,
        a,
        b,
        c,
        String::new(),
    );
    type Pick = fn(&Stats) -> f64;
    let picks: [(&str, Pick); 5] = [
        ("min", |s| s.min),
        ("p50", |s| s.p50),
        ("p90", |s| s.p90),
        ("p99", |s| s.p99),
        ("max", |s| s.max),
    ];
    for (name, pick) in picks {
        let (a, b, c) = trio(&|r| r.small.as_ref().map(pick));
        let target = match (name, a) {
            ("p50", Some(v)) => {
                let mut s = check(v <= 0.0015, "≤ 1.5 ms");
                if let Some(tv) = b {
                    s.push_str("; ");
                    s.push_str(&check(tv / v >= 400.0, "≥ 400× vs tuned"));
                }
                s
            }
            ("p99", Some(v)) => check(v <= 0.003, "≤ 3 ms"),
            _ => String::new(),
        };
        t.row(
            &format!("small file, 3 nodes: {name}"),
            Unit::Secs,
            a,
            b,
            c,
            target,
        );
    }
    // 2. bundle
    let (a, b, c) = trio(&|r| r.bundle.map(|s| s.n as f64));
    t.row(
        "cert + key bundle, 3 nodes: samples",
        Unit::Count,
        a,
        b,
        c,
        String::new(),
    );
    for (name, pick) in [picks[1], picks[3], picks[4]] {
        let (a, b, c) = trio(&|r| r.bundle.as_ref().map(pick));
        let target = match (name, a) {
            ("p50", Some(v)) => check(v <= 0.0025, "≤ 2.5 ms"),
            ("p99", Some(v)) => check(v <= 0.005, "≤ 5 ms"),
            _ => String::new(),
        };
        t.row(
            &format!("cert + key bundle: {name}"),
            Unit::Secs,
            a,
            b,
            c,
            target,
        );
    }
    let (a, b, c) = trio(&|r| r.torn.map(|v| v as f64));
    let target = a.map_or(String::new(), |v| check(v == 0.0, "never torn"));
    t.row(
        "cert + key bundle: samples seen torn on a peer",
        Unit::Count,
        a,
        b,
        c,
        target,
    );
    let (a, b, c) = trio(&|r| r.connect);
    t.row(
        "3 nodes: start → all connected",
        Unit::Secs,
        a,
        b,
        c,
        String::new(),
    );
    // 3. idle
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.rss_mean));
    let target = a.map_or(String::new(), |v| check(v <= 15.0, "≤ 15 MiB"));
    t.row(
        &format!("idle RSS per node after {} s (mean)", o.rss_after_secs),
        Unit::Mib,
        a,
        b,
        c,
        target,
    );
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.rss_max));
    let target = a.map_or(String::new(), |v| check(v <= 15.0, "≤ 15 MiB"));
    t.row("idle RSS per node (max)", Unit::Mib, a, b, c, target);
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.cpu_mean));
    t.row(
        &format!("idle CPU per node over {} s", o.idle_secs),
        Unit::Cpu,
        a,
        b,
        c,
        String::new(),
    );
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.wakeups_mean));
    t.row(
        "idle context switches per node",
        Unit::Rate("/s"),
        a,
        b,
        c,
        "no periodic wakeups faster than 1 s (see note)".into(),
    );
    let (a, b, c) = trio(&|r| r.idle.map(|i| i.threads_mean));
    t.row("threads per node", Unit::Count, a, b, c, String::new());
    // 4. bulk (Syncthing: default folder settings; the watcher plays no part in it)
    let mb = (o.bulk_mib * 1024 * 1024) as f64 / 1e6;
    let files = o.bulk_files as f64;
    let name = format!("bulk {} files / {} MiB, 2 nodes", o.bulk_files, o.bulk_mib);
    t.row(
        &format!("{name}: time to full copy"),
        Unit::Secs,
        cm_bulk,
        None,
        st_bulk,
        String::new(),
    );
    let target = match (cm_bulk, st_bulk) {
        (Some(c), Some(s)) => check(s / c >= 3.0, "≥ 3× Syncthing"),
        _ => String::new(),
    };
    t.row(
        &format!("{name}: MB/s (higher is better)"),
        Unit::Rate("MB/s"),
        cm_bulk.map(|s| mb / s),
        None,
        st_bulk.map(|s| mb / s),
        target.clone(),
    );
    t.row(
        &format!("{name}: files/s (higher is better)"),
        Unit::Rate("files/s"),
        cm_bulk.map(|s| files / s),
        None,
        st_bulk.map(|s| files / s),
        target,
    );
    // 4b. small files while a bulk transfer runs (certmesh only)
    if let Some(s) = bulk_small {
        t.row(
            "small file during a bulk sync, 3 nodes: p50",
            Unit::Secs,
            Some(s.p50),
            None,
            None,
            String::new(),
        );
        t.row(
            "small file during a bulk sync, 3 nodes: p99",
            Unit::Secs,
            Some(s.p99),
            None,
            None,
            check(s.p99 <= 2.0, "≤ 2 s"),
        );
    }
    // 5. scale
    for s in scale {
        let f_target = if s.n == 32 {
            check(s.formation <= 5.0, "≤ 5 s")
        } else {
            String::new()
        };
        t.row(
            &format!("{} nodes: start → full mesh", s.n),
            Unit::Secs,
            Some(s.formation),
            None,
            None,
            f_target,
        );
        t.row(
            &format!("{} nodes: small file p50", s.n),
            Unit::Secs,
            Some(s.small.p50),
            None,
            None,
            String::new(),
        );
        let target = if s.n == 32 {
            check(s.small.p99 <= 0.1, "≤ 100 ms")
        } else {
            String::new()
        };
        t.row(
            &format!("{} nodes: small file p99", s.n),
            Unit::Secs,
            Some(s.small.p99),
            None,
            None,
            target,
        );
    }
    // 6. ACME issuance, 1 node vs 3
    if let Some((one, three)) = acme {
        for (label, st) in [("1 node", one), ("3 nodes", three)] {
            for (p, v) in [("p50", st.p50), ("max", st.max)] {
                t.row(
                    &format!("ACME issue → live everywhere, {label}: {p}"),
                    Unit::Secs,
                    Some(v),
                    None,
                    None,
                    String::new(),
                );
            }
        }
        let extra = three.p50 - one.p50;
        t.row(
            "ACME issue: 3 nodes − 1 node (p50)",
            Unit::Secs,
            Some(extra),
            None,
            None,
            check(extra <= 0.05, "≤ 50 ms"),
        );
    }
    // 7. Issued → served by every node's nginx (issue 26 item 3).
    if let Some((live, served)) = acme_served {
        for (label, st) in [("live everywhere", live), ("served by every nginx", served)] {
            for (p, v) in [("p50", st.p50), ("p99", st.p99)] {
                t.row(
                    &format!("ACME issue → {label}, 3 nodes + nginx: {p}"),
                    Unit::Secs,
                    Some(v),
                    None,
                    None,
                    String::new(),
                );
            }
        }
    }

    // 8. SIGTERM → exit (issue 28 item 4)
    if let Some((idle, busy)) = stops {
        for (label, st, target) in [
            ("idle node", idle, check(idle.p50 <= 0.1, "≤ 100 ms")),
            ("node mid-sync", busy, String::new()),
        ] {
            t.row(
                &format!("SIGTERM → exit, {label}: p50"),
                Unit::Secs,
                Some(st.p50),
                None,
                None,
                target,
            );
            t.row(
                &format!("SIGTERM → exit, {label}: max"),
                Unit::Secs,
                Some(st.max),
                None,
                None,
                String::new(),
            );
        }
    }

    // 9. Small files during a flood of QUIC handshakes (issue 25 item 7)
    if let Some(f) = flood {
        let name = "small file a → b, 2 nodes";
        for (when, st) in [("calm", &f.calm), ("during a handshake flood", &f.flooded)] {
            for (p, v) in [("p50", st.p50), ("p99", st.p99)] {
                t.row(
                    &format!("{name}, {when}: {p}"),
                    Unit::Secs,
                    Some(v),
                    None,
                    None,
                    String::new(),
                );
            }
        }
        let ratio = f.flooded.p99 / f.calm.p99;
        t.row(
            &format!("{name}: p99 during the flood ÷ calm"),
            Unit::Ratio,
            Some(ratio),
            None,
            None,
            check(ratio <= 2.0, "≤ 2× calm"),
        );
        t.row(
            &format!(
                "handshake flood: attempts ({} strangers)",
                handshake_flood::STRANGERS
            ),
            Unit::Count,
            Some(f.attempts as f64),
            None,
            None,
            String::new(),
        );
        t.row(
            "handshake flood: attempts/s during the flooded samples",
            Unit::Rate("/s"),
            Some(f.rate),
            None,
            None,
            String::new(),
        );
        for (what, n) in [
            ("Retries sent by b", f.retries),
            ("handshakes b refused at the cap", f.refused),
        ] {
            t.row(
                &format!("handshake flood: {what}"),
                Unit::Count,
                Some(n as f64),
                None,
                None,
                String::new(),
            );
        }
        for (who, (calm, flooded)) in [
            ("node b", f.b_cpu),
            ("the harness (poller; + the strangers)", f.harness_cpu),
        ] {
            for (when, v) in [("calm", calm), ("during the flood", flooded)] {
                t.row(
                    &format!("handshake flood: CPU of {who}, {when}"),
                    Unit::Rate("% of a core"),
                    Some(v * 100.0),
                    None,
                    None,
                    String::new(),
                );
            }
        }
    }

    let mut out = String::new();
    out.push_str(header);
    out.push('\n');
    out.push_str(&t.render());
    out.push('\n');
    for n in notes {
        let _ = writeln!(out, "- {n}");
    }
    out
}

pub(crate) fn machine_header(o: &Opts, exe: &Path, st: Option<&Path>) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = cmd_output("nproc", &[]).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("?".into(), |s| s.trim().to_string());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| status_field(&m, "MemTotal"))
        .map_or("?".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let date = cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").map_or("?".into(), |l| {
        l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    });
    let rev = cmd_output(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .map_or(String::new(), |r| format!(" (git {r})"));
    let st_ver = st
        .and_then(|p| cmd_output(&p.display().to_string(), &["--version"]))
        .unwrap_or_else(|| "not run".into());
    let args = if o.args.is_empty() {
        String::new()
    } else {
        format!(" -- {}", o.args.join(" "))
    };
    format!(
        "## certmesh vs Syncthing\n\n\
         Generated by `cargo build --release && cargo bench --bench compare{args}` on {date}.\n\n\
         - machine: nproc {nproc}, CPU {cpu}, kernel {kernel}, RAM {mem}, load average at start {load}\n\
         - certmesh {}{rev}: `{}`\n\
         - Syncthing: {st_ver}\n\
         - settings: {} samples per system ({} for Syncthing defaults), bulk {} files / {} MiB, scale {:?}, idle window {} s{}\n",
        env!("CARGO_PKG_VERSION"),
        exe.display(),
        o.samples,
        o.defaults_samples,
        o.bulk_files,
        o.bulk_mib,
        o.scale,
        o.idle_secs,
        if o.quick { " (--quick)" } else { "" },
    )
}

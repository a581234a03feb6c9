//! Where a small file's time goes (issue 28, `--only stages`): 3 nodes run with the
//! stage trace on (`RUST_LOG=warn,certmesh::stage=trace`, JSON log lines), node 1
//! writes small files as the latency rows do, and each sample's events are lined up
//! on `CLOCK_MONOTONIC` (one clock for every process here) from the harness's rename
//! into node 1's tree to the peers' rename and the acks back. Prints the median of
//! each step as a Markdown table.

use super::*;

/// The writer's steps, in order: (stage, what the step from the previous one covers).
const WRITER: &[(&str, &str)] = &[
    ("event", "inotify delivers the rename (notify's thread)"),
    (
        "debounced",
        "debounce: 300 µs of quiet ends the burst (a whole token: at once)",
    ),
    ("hashed", "scan task woken, stat + read + BLAKE3"),
    ("locked", "state lock taken for the observations"),
    ("signed", "index update + ECDSA signature + plan"),
    (
        "committed",
        "index entries encoded, handed to the persister",
    ),
    (
        "persisted",
        "index file written + fdatasync (persister thread)",
    ),
    (
        "sent",
        "sender woken, frame encoded, written to the QUIC stream",
    ),
];

/// Each peer's steps, after the writer's `sent`.
const PEER: &[(&str, &str)] = &[
    ("received", "QUIC hop + frame read + decode"),
    ("verified", "signature verified (outside the lock)"),
    ("planned", "engine takes the record, plans the need"),
    ("apply_start", "puller woken, unit taken"),
    ("apply_thread", "hand-off to a blocking thread"),
    ("written", "inline content written to a staging file"),
    ("fsynced", "staging file: mode, mtime, fsync"),
    ("renamed", "rename into the tree (visible from here)"),
    ("dirs_synced", "fsync of the parent directory"),
    ("recorded", "outcome in the index, commit"),
    ("ack_sent", "sender woken, ack written"),
];

/// One stage event from a node's log.
struct Ev {
    stage: String,
    t_us: u64,
}

/// The stage events in a node's JSON log, in order of time.
fn read_events(log: &Path) -> Result<Vec<Ev>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["target"] != "certmesh::stage" {
            continue;
        }
        let f = &v["fields"];
        if let (Some(stage), Some(t_us)) = (f["stage"].as_str(), f["t_us"].as_u64()) {
            out.push(Ev {
                stage: stage.to_string(),
                t_us,
            });
        }
    }
    out.sort_by_key(|e| e.t_us);
    Ok(out)
}

/// The first `stage` event in `[from, until)`.
fn first(evs: &[Ev], stage: &str, from: u64, until: u64) -> Option<u64> {
    evs.iter()
        .find(|e| e.stage == stage && e.t_us >= from && e.t_us < until)
        .map(|e| e.t_us)
}

/// One sample: when the harness renamed the file in, when each peer first read it,
/// and whether it was an ACME challenge token (the others are `certs/*.pem`).
struct Sample {
    t0: u64,
    seen: Vec<u64>,
    token: bool,
}

/// Follows `steps` from `start` on one node's events: each step's duration (µs) and
/// its time since `t0`, `None` from the first step not found on.
fn follow(
    evs: &[Ev],
    steps: &[(&str, &str)],
    t0: u64,
    start: u64,
    until: u64,
) -> Vec<Option<(u64, u64)>> {
    let mut prev = Some(start);
    steps
        .iter()
        .map(|(stage, _)| {
            let t = first(evs, stage, prev?, until)?;
            let step = t - prev?;
            prev = Some(t);
            Some((step, t - t0))
        })
        .collect()
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    (!v.is_empty()).then(|| v[(v.len() - 1) / 2])
}

/// Runs the samples on a 3-node cluster with the trace on; returns the Markdown section.
pub(crate) fn run_stages(exe: &Path, rt: &tokio::runtime::Runtime, o: &Opts) -> Result<String> {
    eprintln!(
        "[certmesh] stage trace: {} challenge tokens and {} other small files, 3 nodes",
        o.samples, o.samples
    );
    let (mut c, _) = cm_start_env(
        exe,
        3,
        &[
            ("RUST_LOG", "warn,certmesh::stage=trace"),
            ("CERTMESH_LOG_FORMAT", "json"),
        ],
    )?;
    cm_wait_connected(rt, &c, Duration::from_secs(30))?;
    c.settle(Duration::from_secs(10));
    let samples = timed_samples(&c, o.samples)?;
    let logs: Vec<PathBuf> = c
        .nodes
        .iter()
        .map(|n| n.config.with_file_name("node.log"))
        .collect();
    c.stop_all(); // the logs are complete once the processes are gone
    let evs = logs
        .iter()
        .map(|l| read_events(l))
        .collect::<Result<Vec<_>>>()?;
    let mut out = render_stages(&evs, &samples, true);
    out.push('\n');
    out.push_str(&render_stages(&evs, &samples, false));
    Ok(out)
}

/// Small files written on node 1, each timed on `CLOCK_MONOTONIC` until both peers read
/// it; then a pause, so that the acks land before the next sample's window. `n` ACME
/// challenge tokens and `n` other small files, in alternation.
fn timed_samples(c: &CmCluster, n: usize) -> Result<Vec<Sample>> {
    let mut rng = rand::rng();
    let writer = &c.nodes[0].tree;
    let mut out = Vec::new();
    for i in 0..2 * n + 2 {
        let token = i % 2 == 0;
        let rel = if token {
            format!(
                "acme/.well-known/acme-challenge/stage-{i}-{:08x}",
                rng.random::<u32>()
            )
        } else {
            format!("certs/stage-{i}-{:08x}.pem", rng.random::<u32>())
        };
        let mut content = format!("{rel}.").into_bytes();
        content.resize(SMALL_SIZE, b'x');
        let tmp = writer.with_file_name(format!(".bench-{}", rng.random::<u64>()));
        std::fs::write(&tmp, &content)?;
        std::fs::create_dir_all(writer.join(&rel).parent().expect("has a parent"))?;
        jitter(Duration::from_millis(50));
        let t0 = certmesh::clock::mono_us();
        std::fs::rename(&tmp, writer.join(&rel))?;
        let mut seen = vec![None; c.nodes.len() - 1];
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.iter().any(Option::is_none) {
            for (s, node) in seen.iter_mut().zip(&c.nodes[1..]) {
                if s.is_none() && std::fs::read(node.tree.join(&rel)).is_ok_and(|d| d == content) {
                    *s = Some(certmesh::clock::mono_us());
                }
            }
            if Instant::now() > deadline {
                bail!("stage trace: {rel} did not reach both peers within 10 s");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_millis(30));
        if i > 1 {
            // The first of each kind warms up.
            out.push(Sample {
                t0,
                seen: seen.into_iter().flatten().collect(),
                token,
            });
        }
    }
    Ok(out)
}

/// The table: per step, the median duration and the median time since the write.
fn render_stages(evs: &[Vec<Ev>], samples: &[Sample], tokens: bool) -> String {
    let mut writer: Vec<Vec<(u64, u64)>> = vec![Vec::new(); WRITER.len()];
    let mut peer: Vec<Vec<(u64, u64)>> = vec![Vec::new(); PEER.len()];
    let mut seen: Vec<u64> = Vec::new();
    let mut persisted: Vec<u64> = Vec::new();
    let mut acks: Vec<u64> = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let until = samples.get(i + 1).map_or(u64::MAX, |n| n.t0);
        if s.token != tokens {
            continue;
        }
        let w = follow(&evs[0], WRITER, s.t0, s.t0, until);
        for (acc, v) in writer.iter_mut().zip(&w) {
            acc.extend(*v);
        }
        let Some(Some((_, sent))) = w.last() else {
            continue;
        };
        let sent = s.t0 + sent;
        for (k, node) in evs[1..].iter().enumerate() {
            let p = follow(node, PEER, s.t0, sent, until);
            for (acc, v) in peer.iter_mut().zip(&p) {
                acc.extend(*v);
            }
            // The peer's index write runs beside the ack, after `recorded`.
            let at = PEER.iter().position(|(st, _)| *st == "recorded");
            let recorded = at.and_then(|i| p[i]).map(|x| s.t0 + x.1);
            if let Some(t) = recorded.and_then(|r| first(node, "persisted", r, until)) {
                persisted.push(t - s.t0);
            }
            if let Some(t) = s.seen.get(k) {
                seen.push(t - s.t0);
            }
        }
        // Both acks back on the writer (the second one completes the round).
        let back: Vec<u64> = evs[0]
            .iter()
            .filter(|e| e.stage == "ack_received" && e.t_us >= sent && e.t_us < until)
            .map(|e| e.t_us - s.t0)
            .take(2)
            .collect();
        if back.len() == 2 {
            acks.push(back[1]);
        }
    }
    let mut out = format!(
        "### {}\n\n{} samples, 3 nodes, medians in µs (`compare -- --only stages`). \
         \"step\" is the time from the previous row, \"since write\" from the harness's rename into node 1's tree.\n\n\
         | node | stage | step covers | step p50 | since write p50 |\n|---|---|---|---:|---:|\n",
        if tokens { "An ACME challenge token (`acme/.well-known/acme-challenge/*`)" } else { "Another small file (`certs/*.pem`)" },
        samples.iter().filter(|s| s.token == tokens).count()
    );
    let mut row = |node: &str, stage: &str, what: &str, v: &[(u64, u64)]| {
        let step = median(v.iter().map(|x| x.0).collect());
        let since = median(v.iter().map(|x| x.1).collect());
        let f = |x: Option<u64>| x.map_or("—".into(), |x| x.to_string());
        let _ = writeln!(
            out,
            "| {node} | {stage} | {what} | {} | {} |",
            f(step),
            f(since)
        );
    };
    for ((stage, what), v) in WRITER.iter().zip(&writer) {
        row("writer", stage, what, v);
    }
    for ((stage, what), v) in PEER.iter().zip(&peer) {
        row("peer", stage, what, v);
    }
    let f = |x: Option<u64>| x.map_or("—".into(), |x| x.to_string());
    let _ = writeln!(
        out,
        "| harness | seen | file read with the right content on a peer (polled every 100 µs) | — | {} |",
        f(median(seen))
    );
    let _ = writeln!(
        out,
        "| peer | persisted | peer's index write + fdatasync (beside the ack) | — | {} |",
        f(median(persisted))
    );
    let _ = writeln!(
        out,
        "| writer | ack_received | both peers' acks back | — | {} |",
        f(median(acks))
    );
    out
}

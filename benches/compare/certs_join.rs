//! `--only certs-scale`, last part (issue 29): a new node joins the node holding the
//! N planted certificates, and the same tree is synced by Syncthing for comparison.
//!
//! certmesh: the planted node is running with its index (it was measured before);
//! it gains the new node as a peer (SIGHUP, awaited on its `/metrics`), then the
//! new node starts with an empty tree, peered with it. Syncthing: a copy of the
//! planted tree (files with their modes, `live/<name>` copied as symlinks) in one
//! instance's folder, which is started alone and awaited until its first scan is
//! done (REST: folder idle, every file and link counted); then a second instance
//! with an empty folder starts. Both are timed from the joining process's start
//! until its tree holds every planted entry: each file with its size, each
//! `live/<name>` a link with the planted target that resolves to a directory. The
//! contents are compared afterwards, outside the timing.

use std::collections::VecDeque;

use super::*;

/// What a planted entry must be on the joining node.
pub(crate) enum Kind {
    /// A regular file of this many bytes.
    File(u64),
    /// A symlink with this target.
    Link(PathBuf),
}

/// Every entry `plant` wrote, relative to the tree.
#[derive(Default)]
pub(crate) struct Planted {
    pub(crate) entries: Vec<(String, Kind)>,
    pub(crate) files: usize,
    pub(crate) links: usize,
    pub(crate) bytes: u64,
}

impl Planted {
    pub(crate) fn file(&mut self, rel: String, len: usize) {
        self.entries.push((rel, Kind::File(len as u64)));
        self.files += 1;
        self.bytes += len as u64;
    }

    pub(crate) fn link(&mut self, rel: String, target: String) {
        self.entries.push((rel, Kind::Link(PathBuf::from(target))));
        self.links += 1;
    }
}

fn present(tree: &Path, rel: &str, kind: &Kind) -> bool {
    let p = tree.join(rel);
    match kind {
        Kind::File(len) => {
            std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file() && m.len() == *len)
        }
        Kind::Link(target) => {
            std::fs::read_link(&p).is_ok_and(|t| t == *target)
                && std::fs::metadata(&p).is_ok_and(|m| m.is_dir())
        }
    }
}

/// A join, timed from the joining process's start.
pub(crate) struct Join {
    /// Until every planted entry is there, or until the timeout.
    pub(crate) secs: f64,
    /// Entries held at `secs`: all of them unless the join timed out.
    pub(crate) held: usize,
    pub(crate) complete: bool,
    /// Until the first planted entry was seen (connection, index exchange).
    pub(crate) first_s: f64,
    /// CPU seconds (utime + stime) during the join: the node holding the tree, the
    /// joining one.
    pub(crate) cpu_source: f64,
    pub(crate) cpu_joiner: f64,
    /// Entries held every 10 s: (seconds, held), to see the rate along the way.
    pub(crate) progress: Vec<(f64, usize)>,
    /// RSS (MiB, the process and its children) when the join ended: the node holding
    /// the tree, the joining one. Each now holds the other's view of the whole tree.
    pub(crate) rss: [f64; 2],
}

/// RSS in MiB of `pid` and of its descendants ([`process_tree`]).
fn rss_tree(pid: u32) -> f64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| rss_mib(p).ok())
        .sum()
}

/// CPU seconds of `pid` and of its descendants ([`process_tree`]).
fn cpu_tree(pid: u32) -> f64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| cpu_seconds(p).ok())
        .sum()
}

/// Checks at most this many missing entries per poll, going round the list, so that
/// polling 70,000 paths does not take the CPU the nodes need.
const MISSES_PER_POLL: usize = 200;

/// Polls `tree` until it holds every planted entry, or `timeout` (then the join is
/// incomplete, with what was held).
fn wait_held(
    tree: &Path,
    planted: &Planted,
    t0: Instant,
    timeout: Duration,
    pids: [u32; 2],
    label: &str,
) -> Result<Join> {
    let cpu0 = pids.map(cpu_tree);
    let total = planted.entries.len();
    let mut missing: VecDeque<usize> = (0..total).collect();
    let mut first_s = None;
    let mut progress = Vec::new();
    let mut next_report = 10.0;
    loop {
        let mut misses = 0;
        for _ in 0..missing.len() {
            let Some(i) = missing.pop_front() else { break };
            let (rel, kind) = &planted.entries[i];
            if present(tree, rel, kind) {
                first_s.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                continue;
            }
            missing.push_back(i);
            misses += 1;
            if misses >= MISSES_PER_POLL {
                break;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let timed_out = secs > timeout.as_secs_f64();
        if missing.is_empty() || timed_out {
            if timed_out {
                // A full count: the polls look at only part of what is missing.
                missing.retain(|&i| {
                    let (rel, kind) = &planted.entries[i];
                    !present(tree, rel, kind)
                });
            }
            let cpu1 = pids.map(cpu_tree);
            let held = total - missing.len();
            eprintln!("[{label}] the new node holds {held} of {total} entries after {secs:.1} s");
            return Ok(Join {
                secs,
                held,
                complete: missing.is_empty(),
                first_s: first_s.unwrap_or(secs),
                cpu_source: cpu1[0] - cpu0[0],
                cpu_joiner: cpu1[1] - cpu0[1],
                progress,
                rss: pids.map(rss_tree),
            });
        }
        if secs >= next_report {
            // A lower bound: entries not looked at since they arrived still count as missing.
            let held = total - missing.len();
            eprintln!("[{label}] {held} of {total} entries after {secs:.0} s");
            progress.push((secs, held));
            next_report += 10.0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every planted file on `dst` has the bytes it has on `src`.
fn verify(planted: &Planted, src: &Path, dst: &Path) -> Result<()> {
    for (rel, kind) in &planted.entries {
        if let Kind::File(_) = kind {
            if std::fs::read(src.join(rel))? != std::fs::read(dst.join(rel))? {
                bail!("{rel} differs on the new node");
            }
        }
    }
    Ok(())
}

/// How long a join (or Syncthing's first scan) may take: generous, the figure is what
/// is measured; `--certs-timeout` lowers it for the join.
pub(crate) fn join_timeout(planted: &Planted) -> Duration {
    Duration::from_secs(300 + planted.entries.len() as u64 / 50)
}

/// The `[[peer]]` block naming `peer` in a config written by `demo::write_mesh`.
pub(crate) fn peer_block(cfg: &str, peer: &str) -> Result<String> {
    let marker = format!("\n[[peer]]\nname = \"{peer}\"\n");
    let start = cfg
        .find(&marker)
        .ok_or_else(|| anyhow!("no [[peer]] {peer} in the config"))?;
    let rest = &cfg[start + 1..];
    let end = rest.find("\n[").map_or(cfg.len(), |e| start + 1 + e);
    Ok(cfg[start..end].to_string() + "\n")
}

/// certmesh: `c.nodes[0]` holds the planted tree and serves `/metrics` on `metrics`;
/// `joiner` is the new node's (name, config, tree), already peered with it. Adds the
/// new node to node 1's peers (SIGHUP), starts it, and waits until it holds the tree.
pub(crate) fn certmesh_join(
    exe: &Path,
    c: &mut CmCluster,
    metrics: &str,
    peer: &str,
    joiner: &(String, PathBuf, PathBuf),
    planted: &Planted,
    timeout: Duration,
) -> Result<Join> {
    let cfg = c.nodes[0].config.clone();
    let text = std::fs::read_to_string(&cfg)? + peer;
    std::fs::write(&cfg, text)?;
    let pid = c.pids().first().copied().unwrap_or(0);
    let p = rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| anyhow!("no pid"))?;
    rustix::process::kill_process(p, rustix::process::Signal::HUP)?;
    let t = Instant::now();
    loop {
        let (_, body) = crate::certs::scrape(metrics)?;
        if body.lines().any(|l| l == "certmesh_peers 1") {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("node 1 did not reload its peer list within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (name, jcfg, jtree) = joiner;
    eprintln!(
        "[certmesh] certs-scale: a new node joins ({} files, {} links)",
        planted.files, planted.links
    );
    let t0 = Instant::now();
    c.nodes.push(demo::spawn(exe, name, jcfg, jtree)?);
    let pids = c.pids();
    let j = wait_held(
        jtree,
        planted,
        t0,
        timeout,
        [pids[0], pids.get(1).copied().unwrap_or(0)],
        "certmesh join",
    )
    .map_err(|e| {
        let log = std::fs::read_to_string(jcfg.with_file_name("node.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        anyhow!(
            "{e:#}\nnew node's log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    })?;
    if j.complete {
        verify(planted, &c.nodes[0].tree, jtree)?;
    }
    Ok(j)
}

/// Copies the planted entries from `src` to `dst`: files with their modes, links as links.
fn copy_planted(planted: &Planted, src: &Path, dst: &Path) -> Result<()> {
    for (rel, kind) in &planted.entries {
        let to = dst.join(rel);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match kind {
            Kind::File(_) => {
                std::fs::copy(src.join(rel), &to)?;
            }
            Kind::Link(target) => std::os::unix::fs::symlink(target, &to)?,
        }
    }
    Ok(())
}

/// Syncthing: what its join measured, and how long the first instance's first scan
/// of the copied tree took (started alone, until its folder is idle with every
/// file and link counted).
pub(crate) struct StJoin {
    pub(crate) scan_s: f64,
    pub(crate) join: Join,
}

pub(crate) fn syncthing_join(
    st: &Path,
    src: &Path,
    planted: &Planted,
    timeout: Duration,
) -> Result<StJoin> {
    let label = "syncthing join";
    let mut c = st_prepare(st, 2, 130, DEFAULTS)?;
    copy_planted(planted, src, &c.nodes[0].tree)?;
    eprintln!("[{label}] first instance started alone, scanning the copied tree");
    let t = st_spawn_one(st, &mut c.nodes[0])?;
    let want = |v: &serde_json::Value| {
        v["state"].as_str() == Some("idle")
            && v["localFiles"].as_u64() == Some(planted.files as u64)
            && v["localSymlinks"].as_u64() == Some(planted.links as u64)
    };
    let path = format!("/rest/db/status?folder={FOLDER_ID}");
    let scan_s = loop {
        if st_get(&c.nodes[0], &path).is_ok_and(|v| want(&v)) {
            break t.elapsed().as_secs_f64();
        }
        if t.elapsed() > join_timeout(planted) {
            let last = st_get(&c.nodes[0], &path).map(|v| v.to_string());
            bail!(
                "[{label}] the first scan did not end within {:?}: {last:?}\n{}",
                join_timeout(planted),
                st_log_tail(&c)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("[{label}] scanned in {scan_s:.1} s; the second instance starts");
    let t0 = st_spawn_one(st, &mut c.nodes[1])?;
    // The processes started (their children are counted by `cpu_tree`).
    let pids = pids_of(c.nodes.iter().map(|n| &n.child));
    let join = wait_held(
        &c.nodes[1].tree,
        planted,
        t0,
        timeout,
        [pids[0], pids.get(1).copied().unwrap_or(0)],
        label,
    )
    .map_err(|e| anyhow!("{e:#}\n{}", st_log_tail(&c)))?;
    if join.complete {
        verify(planted, &c.nodes[0].tree, &c.nodes[1].tree)?;
    }
    Ok(StJoin { scan_s, join })
}

/// The join's rows and note, appended to the certs-scale section.
pub(crate) fn render(
    n: usize,
    planted: &Planted,
    start_s: f64,
    cm: &Result<Join, String>,
    st: &Option<Result<StJoin, String>>,
) -> String {
    let mut o = String::new();
    let entries = planted.entries.len();
    let _ = writeln!(
        o,
        "\n### A new node joins ({n} certificates: {} files + {} links, {:.1} MB)\n",
        planted.files,
        planted.links,
        planted.bytes as f64 / 1e6
    );
    let _ = writeln!(
        o,
        "| measure | certmesh | Syncthing | Syncthing ÷ certmesh |\n|---|---|---|---|"
    );
    let cmj = cm.as_ref().ok();
    let stj = st.as_ref().and_then(|r| r.as_ref().ok()).map(|s| &s.join);
    let cell = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let secs = |s: f64| format!("{s:.1} s");
    let fail = |e: &String| e.lines().next().unwrap_or("").to_string();
    let took = |j: &Join| match j.complete {
        true => secs(j.secs),
        false => format!("not done: {} of {entries} after {:.0} s", j.held, j.secs),
    };
    // Syncthing ÷ certmesh; a bound when one of them did not finish.
    let ratio = match (cmj, stj) {
        (Some(c), Some(s)) => match (c.complete, s.complete) {
            (true, true) => fmt_ratio(s.secs / c.secs),
            (false, true) => format!("< {}", fmt_ratio(s.secs / c.secs)),
            (true, false) => format!("> {}", fmt_ratio(s.secs / c.secs)),
            (false, false) => "-".into(),
        },
        _ => "-".into(),
    };
    let _ = writeln!(
        o,
        "| join: from the new node's start until it holds every file and link | {} | {} | {ratio} |",
        match cm {
            Ok(j) => took(j),
            Err(e) => fail(e),
        },
        match st {
            None => "not run".into(),
            Some(Err(e)) => fail(e),
            Some(Ok(s)) => took(&s.join),
        },
    );
    let rate = |j: Option<&Join>| {
        j.map_or("-".into(), |j| {
            let r = format!("{:.1} entries/s", j.held as f64 / j.secs);
            match j.complete {
                true => r,
                false => r + " (until the timeout)",
            }
        })
    };
    let _ = writeln!(
        o,
        "| entries per second over the join | {} | {} | |",
        rate(cmj),
        rate(stj)
    );
    let cm_first = cmj.map(|j| j.first_s);
    let st_first = stj.map(|j| j.first_s);
    let _ = writeln!(
        o,
        "| first entry on the new node after | {} | {} | |",
        cell(cm_first, &secs),
        cell(st_first, &secs)
    );
    let cpu = |j: Option<&Join>| {
        j.map_or("-".into(), |j| {
            format!("{:.1} / {:.1} s", j.cpu_source, j.cpu_joiner)
        })
    };
    let _ = writeln!(
        o,
        "| CPU during the join, node holding the tree / new node | {} | {} | |",
        cpu(cmj),
        cpu(stj)
    );
    let rss = |j: Option<&Join>| {
        j.map_or("-".into(), |j| {
            format!("{:.0} / {:.0} MiB", j.rss[0], j.rss[1])
        })
    };
    let _ = writeln!(
        o,
        "| RSS when the join ended, node holding the tree / new node | {} | {} | |",
        rss(cmj),
        rss(stj)
    );
    let _ = writeln!(
        o,
        "| the holding node ready before (certmesh: start with an empty index until the control socket answers; Syncthing: first scan until the folder is idle) | {} | {} | |",
        secs(start_s),
        cell(
            st.as_ref().and_then(|r| r.as_ref().ok()).map(|s| s.scan_s),
            &secs
        )
    );
    // The goal: unless all of 10,000 certificates were measured, the time
    // until the first entry plus the rest at the rate measured after it, scaled to
    // the entries of 10,000 certificates.
    let goal = |j: Option<&Join>| {
        j.map_or("-".into(), |j| {
            if j.held == 0 {
                return "not met (nothing arrived)".into();
            }
            let at_10k = entries as f64 * 10_000.0 / n as f64;
            let t = j.first_s + (j.secs - j.first_s) * at_10k / j.held.max(1) as f64;
            let verdict = if t <= 60.0 { "met" } else { "not met" };
            if n == 10_000 && j.complete {
                format!("{verdict} ({t:.0} s)")
            } else {
                format!("{verdict} (about {t:.0} s if linear)")
            }
        })
    };
    let _ = writeln!(
        o,
        "| target: 10,000 certificates within 60 s | {} | {} | |",
        goal(cmj),
        goal(stj)
    );
    // At most 12 points, evenly spread.
    let progress = |j: Option<&Join>| {
        j.map(|j| {
            let step = j.progress.len().div_ceil(12).max(1);
            j.progress
                .iter()
                .skip(step - 1)
                .step_by(step)
                .map(|(s, h)| format!("{h} at {s:.0} s"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
    };
    for (who, p) in [("certmesh", progress(cmj)), ("Syncthing", progress(stj))] {
        if let Some(p) = p {
            let _ = writeln!(o, "\n{who}, entries held along the way (at least): {p}.");
        }
    }
    let _ = writeln!(
        o,
        "\nJoin: certmesh's planted node keeps running with its index (it gains the new node as a peer by SIGHUP, awaited on its `/metrics`); the new node starts with an empty tree, peered with it, on 127.0.0.3. Syncthing (default folder settings, offline, 127.0.0.130-131): a copy of the planted tree (files with their modes, `live/<name>` as symlinks, which Syncthing syncs as links without following them) in the first instance's folder, started alone until its first scan is done; then the second starts with an empty folder. Both timed from the joining process's start until its tree holds every planted entry (each file with its size, each `live/<name>` with its target and resolving to a directory; polled every 50 ms, at most {MISSES_PER_POLL} missing paths looked at per poll), contents compared afterwards. What a system adds by itself (Syncthing's `.stfolder`) is not counted. Each bundle has its own key; `chain.pem` is the same in every bundle (one CA), as it is with a real CA. CPU is utime + stime from `/proc` (Syncthing's with its child process). Unless every entry of 10,000 certificates arrived, the target row adds the time to the first entry to the rest of the join at its rate, scaled linearly to 10,000 certificates' entries. A join is given 300 s plus 20 ms per entry (at most `--certs-timeout`), then reported as not done with the entries held."
    );
    o
}

//! Statistics of samples, and what a process costs (CPU, RSS, context switches, threads) from /proc.

use super::*;

#[derive(Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) n: usize,
    pub(crate) min: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

/// Nearest-rank percentiles, in seconds.
pub(crate) fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let s = |d: Duration| d.as_secs_f64();
    let pct = |q: f64| {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        s(v[rank - 1])
    };
    Stats {
        n: v.len(),
        min: s(v[0]),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: s(v[v.len() - 1]),
    }
}

pub(crate) fn clk_tck() -> f64 {
    rustix::param::clock_ticks_per_second().max(1) as f64
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat
        .rfind(')')
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?
        + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = f.get(11).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    let stime: u64 = f.get(12).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    Ok((utime + stime) as f64 / clk_tck())
}

pub(crate) fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// VmRSS in MiB.
pub(crate) fn rss_mib(pid: u32) -> Result<f64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status_field(&st, "VmRSS").ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(kb as f64 / 1024.0)
}

/// Voluntary + involuntary context switches of each live thread, by thread id.
pub(crate) fn ctx_switches(pid: u32) -> HashMap<String, u64> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    rd.flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = status_field(&s, "voluntary_ctxt_switches").unwrap_or(0)
                + status_field(&s, "nonvoluntary_ctxt_switches").unwrap_or(0);
            Some((t.file_name().to_string_lossy().into_owned(), n))
        })
        .collect()
}

/// Context switches between two snapshots: per thread, so that threads exiting in
/// between (tokio's idle blocking-pool threads do after 10 s) do not hide the others'.
pub(crate) fn ctx_delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

pub(crate) fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[derive(Clone, Copy)]
pub(crate) struct Idle {
    pub(crate) rss_mean: f64,
    pub(crate) rss_max: f64,
    pub(crate) cpu_mean: f64,
    pub(crate) wakeups_mean: f64,
    pub(crate) threads_mean: f64,
}

/// CPU and context switches over `total`, RSS after `rss_after`, per node.
pub(crate) fn measure_idle(
    label: &str,
    pids: &[u32],
    rss_after: Duration,
    total: Duration,
) -> Result<Idle> {
    eprintln!(
        "[{label}] idle: RSS after {} s, CPU over {} s",
        rss_after.as_secs(),
        total.as_secs()
    );
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .collect::<Result<_>>()?;
    let ctx0: Vec<HashMap<String, u64>> = pids.iter().map(|&p| ctx_switches(p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(rss_after);
    let rss: Vec<f64> = pids.iter().map(|&p| rss_mib(p)).collect::<Result<_>>()?;
    std::thread::sleep(total.saturating_sub(t0.elapsed()));
    let secs = t0.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .collect::<Result<_>>()?;
    let ctx1: Vec<HashMap<String, u64>> = pids.iter().map(|&p| ctx_switches(p)).collect();
    let n = pids.len() as f64;
    Ok(Idle {
        rss_mean: rss.iter().sum::<f64>() / n,
        rss_max: rss.iter().cloned().fold(0.0, f64::max),
        cpu_mean: cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).sum::<f64>() / n,
        wakeups_mean: ctx1
            .iter()
            .zip(&ctx0)
            .map(|(a, b)| ctx_delta(b, a) as f64)
            .sum::<f64>()
            / n
            / secs,
        threads_mean: pids.iter().map(|&p| threads(p) as f64).sum::<f64>() / n,
    })
}

/// A tmpfs mounted on a fresh directory for one run (as root), unmounted on drop.
pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
    keep: bool,
}

impl Tmpfs {
    pub(crate) fn mount(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("certmesh-bench-tmpfs-")
            .tempdir()?;
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .context("running mount")?;
        if !st.success() {
            bail!(
                "mounting a tmpfs on {} failed ({st}): run as root, or pass --hubs-trees disk",
                dir.path().display()
            );
        }
        Ok(Tmpfs { dir, keep: false })
    }

    /// Left mounted, with its files, for diagnosis.
    pub(crate) fn keep(&mut self) {
        self.keep = true;
        self.dir.disable_cleanup(true);
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

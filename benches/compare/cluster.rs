//! Local certmesh clusters for the benchmark (built on `certmesh::demo`'s harness).

use super::*;

/// Field order matters: the nodes are stopped before the directory is removed.
/// Field order matters: the nodes are stopped before the directory is removed.
pub(crate) struct CmCluster {
    pub(crate) nodes: Vec<LocalNode>,
    pub(crate) _dir: tempfile::TempDir,
}

impl Drop for CmCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl CmCluster {
    /// Stops every node at once (SIGTERM to all, then waits; SIGKILL after 10 s).
    /// One by one, a daemon's up to 2 s of connection draining adds up to minutes
    /// for a 128-node topology.
    pub(crate) fn stop_all(&mut self) {
        let mut children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for c in &children {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            if children.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        pids_of(self.nodes.iter().map(|n| &n.child))
    }

    /// utime + stime of every node, summed.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.pids()
            .into_iter()
            .filter_map(|p| cpu_seconds(p).ok())
            .sum()
    }

    /// Waits until the nodes together take less than 5 % of one core in each of four
    /// 250 ms windows in a row (at most `limit`), so that start-up work still running
    /// (it comes in bursts) is not measured as the first samples' latency or CPU; the
    /// seconds waited.
    pub(crate) fn settle(&self, limit: Duration) -> f64 {
        let cpu = || self.cpu_seconds();
        let t = Instant::now();
        let window = Duration::from_millis(250);
        let mut quiet = 0;
        while quiet < 4 && t.elapsed() < limit {
            let a = cpu();
            std::thread::sleep(window);
            if cpu() - a < 0.05 * window.as_secs_f64() {
                quiet += 1;
            } else {
                quiet = 0;
            }
        }
        t.elapsed().as_secs_f64()
    }

    pub(crate) fn trees<'a>(
        &'a self,
        label: &'a str,
        jitter: Duration,
        timeout: Duration,
    ) -> Trees<'a> {
        Trees::of(
            label,
            self.nodes.iter().map(|n| n.tree.as_path()),
            jitter,
            timeout,
        )
    }
}

/// Writes configs for `n` nodes, lets `prepare` fill trees, starts every node at once;
/// returns the cluster and the instant the first process was started.
pub(crate) fn cm_start(
    exe: &Path,
    n: usize,
    prepare: impl FnOnce(&[(String, PathBuf, PathBuf)]) -> Result<()>,
) -> Result<(CmCluster, Instant)> {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-bench-")
        .tempdir()?;
    let configs = demo::write_mesh(dir.path(), n)?;
    for (_, _, tree) in &configs {
        std::fs::create_dir_all(tree)?;
    }
    prepare(&configs)?;
    let t0 = Instant::now();
    let mut nodes = Vec::with_capacity(n);
    for (name, cfg, tree) in &configs {
        nodes.push(demo::spawn(exe, name, cfg, tree)?);
    }
    Ok((CmCluster { nodes, _dir: dir }, t0))
}

/// [`cm_start`] with environment variables set for the nodes (`RUST_LOG`, say), as
/// the harness's own environment is what `demo::spawn` passes on; restored after.
pub(crate) fn cm_start_env(
    exe: &Path,
    n: usize,
    env: &[(&str, &str)],
) -> Result<(CmCluster, Instant)> {
    let old: Vec<_> = env.iter().map(|(k, _)| (*k, std::env::var_os(k))).collect();
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let started = cm_start(exe, n, |_| Ok(()));
    for (k, v) in old {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    started
}

pub(crate) fn cm_wait_connected(
    rt: &tokio::runtime::Runtime,
    c: &CmCluster,
    timeout: Duration,
) -> Result<()> {
    rt.block_on(demo::wait_connected(&c.nodes, timeout))
        .map_err(|e| {
            let logs: Vec<String> = c
                .nodes
                .iter()
                .filter_map(|n| std::fs::read_to_string(n.config.with_file_name("node.log")).ok())
                .filter(|l| !l.is_empty())
                .take(2)
                .collect();
            anyhow!("{e:#}\nnode logs:\n{}", logs.join("\n"))
        })
}

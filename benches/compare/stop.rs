//! How fast a node stops (issue 28 item 4, `--only stop`): SIGTERM to one node of 3,
//! timed until the process has exited (`waitpid`), then the node is started again and
//! the mesh waited for. Once while the node is idle, once while it is taking in a burst
//! of small files from node 1 (SIGTERM as soon as the first of them is on its disk);
//! after that restart, the burst must arrive whole.

use super::*;

/// Files in each burst (2 KiB each).
const BURST: usize = 200;

/// SIGTERM → exit times: (idle, mid-sync).
pub(crate) fn run_stops(
    exe: &Path,
    rt: &tokio::runtime::Runtime,
    n: usize,
) -> Result<(Stats, Stats)> {
    eprintln!("[certmesh] stop: {n} stops of an idle node, {n} of a node mid-sync (3 nodes)");
    let (mut c, _) = cm_start(exe, 3, |_| Ok(()))?;
    cm_wait_connected(rt, &c, Duration::from_secs(30))?;
    c.settle(Duration::from_secs(10));
    let (mut idle, mut busy) = (Vec::new(), Vec::new());
    for i in 0..n {
        idle.push(stop_and_restart(exe, rt, &mut c, None)?);
        let burst = burst(i);
        busy.push(stop_and_restart(exe, rt, &mut c, Some(&burst))?);
        let tree = c.nodes[2].tree.clone();
        let whole = || {
            burst
                .iter()
                .all(|(rel, d)| std::fs::read(tree.join(rel)).is_ok_and(|g| g == *d))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !whole() {
            if Instant::now() > deadline {
                bail!("stop {i}: the burst did not arrive whole on the restarted node within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (idle, busy) = (stats(idle), stats(busy));
    eprintln!(
        "[certmesh] SIGTERM → exit: idle p50 {} max {}, mid-sync p50 {} max {}",
        fmt_secs(idle.p50),
        fmt_secs(idle.max),
        fmt_secs(busy.p50),
        fmt_secs(busy.max)
    );
    Ok((idle, busy))
}

/// The `i`th burst: `BURST` files of 2 KiB under their own directory.
fn burst(i: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rng();
    (0..BURST)
        .map(|k| {
            let rel = format!("stop-{i}/f{k:04}.pem");
            let mut d = format!("{rel}\n").into_bytes();
            d.extend(random_text(&mut rng, 2048 - d.len()));
            (rel, d)
        })
        .collect()
}

/// SIGTERM to node 3 (after writing `burst` on node 1 and seeing its first file on
/// node 3, if given); the time until it exited; then node 3 runs again and the mesh is
/// whole.
fn stop_and_restart(
    exe: &Path,
    rt: &tokio::runtime::Runtime,
    c: &mut CmCluster,
    burst: Option<&[(String, Vec<u8>)]>,
) -> Result<Duration> {
    if let Some(b) = burst {
        for (rel, d) in b {
            demo::write_atomic(&c.nodes[0].tree, rel, d)?;
        }
        let first = c.nodes[2].tree.join(&b[0].0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !first.exists() {
            if Instant::now() > deadline {
                bail!("the burst did not start reaching node 3 within 10 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let node = &mut c.nodes[2];
    let mut child = node.child.take().context("node 3 is running")?;
    let pid = rustix::process::Pid::from_raw(child.id() as i32).context("a pid")?;
    let t = Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    let status = child.wait()?;
    let took = t.elapsed();
    if !status.success() {
        bail!("node 3 exited with {status} on SIGTERM");
    }
    let (name, config, tree) = (node.name.clone(), node.config.clone(), node.tree.clone());
    *node = demo::spawn(exe, &name, &config, &tree)?;
    cm_wait_connected(rt, c, Duration::from_secs(30))?;
    Ok(took)
}

//! The workloads: a small file, a certificate bundle (with torn-read detection) and a bulk data set, and waiting until every node has them.

use super::*;

/// Until every `trees[i]/rel` holds `content`; checks the trees not yet seen done, stopping
/// at the first that is not, so that the poller itself costs little with 31 peers.
pub(crate) fn wait_all(
    trees: &[&Path],
    rel: &str,
    content: &[u8],
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut pending: Vec<&Path> = trees.to_vec();
    loop {
        while let Some(t) = pending.last() {
            if std::fs::read(t.join(rel)).is_ok_and(|c| c == content) {
                pending.pop();
            } else {
                break;
            }
        }
        if pending.is_empty() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// One version of a certificate: the two files, read through `live/<name>`.
pub(crate) struct Pair<'a> {
    pub(crate) cert: &'a [u8],
    pub(crate) key: &'a [u8],
}

/// Until `live/<name>` resolves to `new` on every peer. Also reports whether a peer was
/// seen with a torn bundle: the symlink unchanged across the two reads, yet the files
/// behind it neither the old pair nor the new one (one of them missing or from another
/// version). A peer whose link still points at the old version (`old_target`) costs
/// one `readlink` per poll, not three reads: with 127 peers the poller would otherwise
/// take most of a core from the nodes it measures.
pub(crate) fn wait_bundle(
    trees: &[&Path],
    live: &str,
    old_target: Option<&Path>,
    old: Option<&Pair>,
    new: &Pair,
    timeout: Duration,
) -> Option<(Duration, Option<String>)> {
    let start = Instant::now();
    let mut done = vec![false; trees.len()];
    let mut torn = None;
    loop {
        for (t, d) in trees.iter().zip(done.iter_mut()) {
            if *d {
                continue;
            }
            let link = t.join(live);
            let before = std::fs::read_link(&link).ok();
            if before.is_none() || before.as_deref() == old_target {
                continue;
            }
            let cert = std::fs::read(link.join("fullchain.pem")).ok();
            let key = std::fs::read(link.join("privkey.pem")).ok();
            let after = std::fs::read_link(&link).ok();
            if before.is_none() || before != after {
                continue;
            }
            let is = |p: &Pair| cert.as_deref() == Some(p.cert) && key.as_deref() == Some(p.key);
            if is(new) {
                *d = true;
            } else if !old.is_some_and(is) && torn.is_none() {
                let what = |got: &Option<Vec<u8>>, n: &[u8], o: Option<&[u8]>| match got.as_deref()
                {
                    None => "missing",
                    Some(g) if g == n => "new",
                    Some(g) if Some(g) == o => "old",
                    Some(_) => "other",
                };
                torn = Some(format!(
                    "peer {} after {}: {live} -> {}, fullchain.pem {}, privkey.pem {}",
                    t.display(),
                    fmt_secs(start.elapsed().as_secs_f64()),
                    before
                        .as_deref()
                        .map_or("?".into(), |b| b.display().to_string()),
                    what(&cert, new.cert, old.map(|p| p.cert)),
                    what(&key, new.key, old.map(|p| p.key)),
                ));
            }
        }
        if done.iter().all(|d| *d) {
            return Some((start.elapsed(), torn));
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Points `tree/rel` at `target` atomically (new symlink beside the tree, rename).
pub(crate) fn flip_symlink(tree: &Path, rel: &str, target: &str) -> std::io::Result<()> {
    let dest = tree.join(rel);
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = tree.with_file_name(format!(".bench-link-{}", rand::random::<u64>()));
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, &dest)
}

/// What a propagation run needs from a cluster: where to write and where to look.
pub(crate) struct Trees<'a> {
    pub(crate) label: &'a str,
    pub(crate) writer: &'a Path,
    pub(crate) peers: Vec<&'a Path>,
    /// Random pause before each sample: randomises the phase against periodic timers.
    pub(crate) jitter: Duration,
    pub(crate) timeout: Duration,
}

impl<'a> Trees<'a> {
    /// The first of a cluster's `trees` writes, the others must see it.
    pub(crate) fn of(
        label: &'a str,
        mut trees: impl Iterator<Item = &'a Path>,
        jitter: Duration,
        timeout: Duration,
    ) -> Trees<'a> {
        Trees {
            label,
            writer: trees.next().expect("a cluster has nodes"),
            peers: trees.collect(),
            jitter,
            timeout,
        }
    }
}

/// The process IDs of the nodes that are running.
/// `pid` and its descendants: Syncthing 1.19 runs its work in a child of the process
/// started, even with `--no-restart`, so its RSS and CPU are the child's too.
pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for t in tasks.flatten() {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
            out.extend(process_tree(k));
        }
    }
    out
}

pub(crate) fn pids_of<'a>(children: impl Iterator<Item = &'a Option<Child>>) -> Vec<u32> {
    children
        .filter_map(|c| c.as_ref().map(|c| c.id()))
        .collect()
}

pub(crate) fn small_file_samples(
    t: &Trees,
    n: usize,
    warmup: bool,
    many_peers: bool,
) -> Result<Vec<Duration>> {
    let mut rng = rand::rng();
    let mut out = Vec::new();
    let total = n + usize::from(warmup);
    for i in 0..total {
        let rel = format!(
            "acme/.well-known/acme-challenge/tok-{i}-{:08x}",
            rng.random::<u32>()
        );
        let mut content = format!("{rel}.").into_bytes();
        content.resize(SMALL_SIZE, b'x');
        content[SMALL_SIZE - 16..].copy_from_slice(&random_text(&mut rng, 16));
        jitter(t.jitter);
        demo::write_atomic(t.writer, &rel, &content)?;
        let took = if many_peers {
            wait_all(&t.peers, &rel, &content, t.timeout)
        } else {
            demo::wait_present(&t.peers, &rel, &content, t.timeout)
        };
        let Some(took) = took else {
            bail!(
                "[{}] {rel} did not reach all peers within {:?}",
                t.label,
                t.timeout
            );
        };
        if warmup && i == 0 {
            eprintln!(
                "[{}] warm-up sample: {}",
                t.label,
                fmt_secs(took.as_secs_f64())
            );
            continue;
        }
        if took > Duration::from_secs(1) || i + 1 == total {
            eprintln!(
                "[{}] small file {}/{n}: {}",
                t.label,
                i + 1 - usize::from(warmup),
                fmt_secs(took.as_secs_f64())
            );
        }
        out.push(took);
    }
    Ok(out)
}

/// Publishes `n` versions of a certificate the way DESIGN.md §2/§5 (and certbot) do:
/// `archive/<name>/<i>/{fullchain,privkey}.pem` written, then `live/<name>` flipped to it.
pub(crate) fn bundle_samples(t: &Trees, n: usize) -> Result<(Vec<Duration>, usize)> {
    let mut rng = rand::rng();
    let name = format!("bench-{:08x}.example.com", rng.random::<u32>());
    let live = format!("live/{name}");
    let mut out = Vec::new();
    let mut torn = 0;
    let mut old: Option<(Vec<u8>, Vec<u8>)> = None;
    for i in 0..n {
        let cert = fake_pem(&mut rng, "CERTIFICATE", CERT_SIZE);
        let key = fake_pem(&mut rng, "PRIVATE KEY", KEY_SIZE);
        jitter(t.jitter);
        demo::write_atomic(
            t.writer,
            &format!("archive/{name}/{i}/fullchain.pem"),
            &cert,
        )?;
        demo::write_atomic(t.writer, &format!("archive/{name}/{i}/privkey.pem"), &key)?;
        flip_symlink(t.writer, &live, &format!("../archive/{name}/{i}"))?;
        let new = Pair {
            cert: &cert,
            key: &key,
        };
        let old_pair = old.as_ref().map(|(c, k)| Pair { cert: c, key: k });
        let old_target = (i > 0).then(|| PathBuf::from(format!("../archive/{name}/{}", i - 1)));
        let Some((took, was_torn)) = wait_bundle(
            &t.peers,
            &live,
            old_target.as_deref(),
            old_pair.as_ref(),
            &new,
            t.timeout,
        ) else {
            bail!(
                "[{}] certificate version {i} did not reach all peers within {:?}",
                t.label,
                t.timeout
            );
        };
        if let Some(how) = was_torn {
            eprintln!("[{}] bundle {i} torn: {how}", t.label);
            torn += 1;
        }
        if took > Duration::from_secs(1) || i + 1 == n {
            eprintln!(
                "[{}] bundle {}/{n}: {}",
                t.label,
                i + 1,
                fmt_secs(took.as_secs_f64())
            );
        }
        out.push(took);
        old = Some((cert, key));
    }
    Ok((out, torn))
}

// Bulk data set

pub(crate) struct Bulk {
    pub(crate) files: Vec<(String, u64)>,
}

/// `files` files totalling `mib` MiB of incompressible data under `tree`, 100 per directory.
pub(crate) fn make_bulk(tree: &Path, files: usize, mib: u64) -> Result<Bulk> {
    let bytes = mib * 1024 * 1024;
    let base = bytes / files as u64;
    let extra = bytes % files as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6365_7274_6d65_7368);
    let mut buf = Vec::new();
    let mut list = Vec::with_capacity(files);
    for i in 0..files {
        let rel = format!("bulk/d{:03}/f{i:05}.bin", i / 100);
        let len = base + u64::from((i as u64) < extra);
        let p = tree.join(&rel);
        if i % 100 == 0 {
            std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        }
        buf.resize(len as usize, 0);
        rng.fill_bytes(&mut buf);
        std::fs::write(&p, &buf)?;
        list.push((rel, len));
    }
    Ok(Bulk { files: list })
}

/// Until every bulk file has its full size under `dst` (both systems rename complete
/// files into place); checked cheaply, contents are verified afterwards.
pub(crate) fn wait_bulk(
    bulk: &Bulk,
    dst: &Path,
    start: Instant,
    timeout: Duration,
    label: &str,
) -> Result<Duration> {
    let mut pending: Vec<&(String, u64)> = bulk.files.iter().collect();
    let mut last_report = Instant::now();
    loop {
        while let Some((rel, len)) = pending.last() {
            if std::fs::metadata(dst.join(rel)).is_ok_and(|m| m.len() == *len) {
                pending.pop();
            } else {
                break;
            }
        }
        if pending.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "[{label}] bulk sync incomplete after {timeout:?}: {} files missing",
                pending.len()
            );
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            let have = bulk
                .files
                .iter()
                .filter(|(rel, len)| {
                    std::fs::metadata(dst.join(rel)).is_ok_and(|m| m.len() == *len)
                })
                .count();
            eprintln!(
                "[{label}] bulk: {have}/{} files after {:.0} s",
                bulk.files.len(),
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn verify_bulk(bulk: &Bulk, src: &Path, dst: &Path) -> Result<()> {
    for (rel, _) in &bulk.files {
        if std::fs::read(src.join(rel))? != std::fs::read(dst.join(rel))? {
            bail!("bulk file {rel} differs between the two nodes");
        }
    }
    Ok(())
}

pub(crate) fn bulk_timeout(mib: u64) -> Duration {
    Duration::from_secs(120 + mib / 2)
}

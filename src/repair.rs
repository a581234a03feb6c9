//! Repair of the certificates named in this node's `[[certificate]]` config: when a
//! peer's change deletes or breaks one (`live/<name>` missing or dangling, key not
//! matching the leaf of `fullchain.pem`, unparsable), the same certificate is put
//! back from the files still in `archive/<name>/` and the kept versions
//! ([`crate::disk::keep`]), written into the tree as a normal local change so it
//! replicates. No new order: when nothing good (unexpired, matching) is left, the
//! ACME driver orders the missing certificate as it always does.
//!
//! Two nodes repairing at once write the same bytes (the newest good archive version,
//! preferring files still in place, then the newest kept ones), so they never fight.
//! A certificate deleted on purpose comes back while another node still lists it:
//! remove it from every node's config first.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::acme::bundle::{self, chain_der};
use crate::acme::served::{self, check_pair, read_file, BundleFiles, MAX_PEM};
use crate::core::device::ShortId;
use crate::core::paths::RelPath;
use crate::disk::keep;
use crate::disk::tree;
use crate::handles::{Mesh, Reports, Settings, TreeWriter};

/// After a batch touched a certificate, wait this long for more before checking.
const SETTLE: Duration = Duration::from_millis(200);
/// While changes to a certificate are still arriving, check again after this.
const RETRY: Duration = Duration::from_secs(1);
/// How long the start-up check waits for the mesh to form first.
const START_GRACE: Duration = Duration::from_secs(10);

use crate::telemetry::RepairStatus;

/// What the repair task uses of the daemon.
#[derive(Clone)]
pub struct RepairHandles {
    pub settings: Settings,
    pub mesh: Mesh,
    pub writer: TreeWriter,
    pub reports: Reports,
}

/// Starts the repair task: one check of every configured certificate once the mesh
/// has formed, then one after each applied batch that touched one.
pub fn start(h: RepairHandles) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(h))
}

fn configured(h: &RepairHandles) -> Vec<String> {
    let writer = h.mesh.is_writer();
    h.settings
        .read(|c| crate::handles::repaired(writer, c))
        .unwrap_or_default()
}

async fn run(h: RepairHandles) {
    h.mesh.wait_formed(START_GRACE).await;
    let repairs = h.reports.repairs();
    repairs.lock_pending().extend(configured(&h));
    let mut stopping = h.mesh.stopping();
    loop {
        if repairs.lock_pending().is_empty() {
            tokio::select! {
                _ = repairs.wake.notified() => {}
                _ = stopping.changed() => {}
            }
        }
        if *stopping.borrow() {
            return;
        }
        tokio::time::sleep(SETTLE).await;
        let names = std::mem::take(&mut *repairs.lock_pending());
        let mut unsettled = Vec::new();
        for name in names {
            if !settled(&h.mesh, &name) {
                unsettled.push(name);
                continue;
            }
            match repair(&h, &name).await {
                Ok(Some(r)) => {
                    tracing::warn!(cert = %name, version = r.from_version, caused_by = %r.caused_by, reason = %r.reason, "certificate repaired");
                    repairs.push(r);
                }
                Ok(None) => {}
                Err(e) => h
                    .reports
                    .error(format!("repairing certificate {name}: {e:#}")),
            }
        }
        if !unsettled.is_empty() {
            repairs.lock_pending().extend(unsettled);
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// The configured domains of certificate `name` (none if it is not configured).
fn domains_of(h: &RepairHandles, name: &str) -> Vec<String> {
    h.settings
        .read(|c| {
            c.certificates
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.domains.clone())
        })
        .flatten()
        .unwrap_or_default()
}

/// Nothing still to arrive or being applied for this certificate.
fn settled(mesh: &Mesh, name: &str) -> bool {
    ["live", "archive"].iter().all(|top| {
        RelPath::parse(&format!("{top}/{name}")).is_ok_and(|dir| mesh.settled_within(&dir))
    })
}

/// Checks one certificate and puts it back if it is broken and something good is left.
async fn repair(h: &RepairHandles, name: &str) -> anyhow::Result<Option<RepairStatus>> {
    let root = h.writer.root().to_path_buf();
    let now = crate::acme::unix_now();
    let n = name.to_string();
    let domains = domains_of(h, name);
    let decision = tokio::task::spawn_blocking(move || decide(&root, &n, &domains, now)).await?;
    let (why, r) = match decision {
        Decision::Healthy => return Ok(None),
        Decision::NothingGood(why) if why.ends_with(" missing") => {
            // Not issued yet (or deleted with nothing kept): the ACME driver orders it.
            tracing::debug!(cert = name, %why, "no certificate to repair; left to the ACME driver");
            return Ok(None);
        }
        Decision::NothingGood(why) => {
            tracing::info!(cert = name, %why, "certificate broken and nothing good kept; left to the ACME driver");
            return Ok(None);
        }
        Decision::Restore { why, restore } => (why, restore),
    };
    let dir = format!("archive/{name}/{}", r.version);
    let mut staged = Vec::new();
    for (file, data, mode) in &r.files {
        let p = tree::rel(&format!("{dir}/{file}"))?;
        staged.push((p.clone(), h.writer.stage(&p, data, *mode)?));
    }
    let mut expect = Vec::new();
    for (p, s) in staged {
        expect.push((p, h.writer.place(s)?));
    }
    if !expect.is_empty() {
        if let Ok(d) = std::fs::File::open(h.writer.root().join(&dir)) {
            let _ = d.sync_all();
        }
        h.writer
            .await_indexed(&expect, Duration::from_secs(10))
            .await?;
    }
    let link = tree::rel(&format!("live/{name}"))?;
    let cause = r.caused_by.or_else(|| h.mesh.modified_by(&link));
    if r.flip_link {
        let e = h
            .writer
            .symlink(&link, &format!("../archive/{name}/{}", r.version))?;
        h.writer
            .await_indexed(&[(link, e)], Duration::from_secs(10))
            .await?;
    }
    let at = crate::acme::unix_now();
    Ok(Some(RepairStatus {
        certificate: name.to_string(),
        at: crate::acme::rfc3339(at),
        at_unix: at,
        caused_by: cause.map_or_else(|| "unknown".into(), |c| node_name(h, c)),
        from_version: r.version,
        reason: why,
    }))
}

/// The configured name of the node with this short ID (or the ID in hex).
fn node_name(h: &RepairHandles, id: ShortId) -> String {
    if h.mesh.me().short() == id {
        return h.settings.read(|c| c.name.clone()).unwrap_or_default();
    }
    h.settings
        .read(|c| name_of(&c.peers, id))
        .unwrap_or_else(|| keep::short_hex(id))
}

/// The name of the peer with this short ID, or the ID in hex.
pub fn name_of(peers: &[crate::config::peer::PeerConfig], id: ShortId) -> String {
    peers
        .iter()
        .find(|p| p.id.short() == id)
        .map_or_else(|| keep::short_hex(id), |p| p.name.clone())
}

/// What to do about one certificate.
#[derive(Debug)]
pub enum Decision {
    Healthy,
    /// Broken, and no unexpired matching key + certificate is left.
    NothingGood(String),
    Restore {
        why: String,
        restore: Restore,
    },
}

/// The files to write back and the link to flip.
#[derive(Debug)]
pub struct Restore {
    pub version: u32,
    /// `(file, content, mode)` under `archive/<name>/<version>/`, only those that differ.
    pub files: Vec<(&'static str, Vec<u8>, u32)>,
    pub flip_link: bool,
    /// Who made the change that removed the kept files used, if any were.
    pub caused_by: Option<ShortId>,
}

/// Is `live/<name>` good (DESIGN §8: the leaf of `fullchain.pem`, checked against
/// `cert.pem`, the key, the configured names and the chain)? `Err` says what is wrong.
pub fn health(root: &Path, name: &str, domains: &[String]) -> Result<(), String> {
    served::check_live(root, name, domains).map(|_| ())
}

/// Candidates for one file of one version: the file in place first, then the kept
/// versions newest first. Each with who removed it (kept ones).
fn candidates(root: &Path, rel: &str) -> Vec<(Vec<u8>, Option<ShortId>)> {
    let mut out = Vec::new();
    if let Some(d) = read_file(&root.join(rel)) {
        out.push((d, None));
    }
    if let Ok(p) = RelPath::parse(rel) {
        for v in keep::list(root, &p).unwrap_or_default() {
            if v.size > MAX_PEM {
                continue;
            }
            let by = v
                .meta
                .as_ref()
                .and_then(|m| u64::from_str_radix(&m.modified_by, 16).ok())
                .map(ShortId);
            if let Ok(d) = v.read() {
                out.push((d, by));
            }
        }
    }
    out
}

/// Archive versions present in the tree or in the kept store.
fn versions(root: &Path, name: &str) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for dir in [
        root.join("archive").join(name),
        keep::kept_root(root).join("archive").join(name),
    ] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.insert(n);
            }
        }
    }
    out
}

/// Decides whether and how to repair certificate `name` (pure reads, no writes):
/// the newest version whose files, in place or kept, make a good bundle
/// ([`served::check_bundle`]) that has not expired, and whose leaf a rollout did
/// not take back ([`crate::acme::rolled_back`]) — unless only such are left.
pub fn decide(root: &Path, name: &str, domains: &[String], now_unix: i64) -> Decision {
    let why = match health(root, name, domains) {
        Ok(()) => return Decision::Healthy,
        Err(why) => why,
    };
    let rolled_back = crate::acme::rolled_back::read(root, name);
    let restore = newest_good(root, name, domains, now_unix, &rolled_back)
        .or_else(|| newest_good(root, name, domains, now_unix, &[]));
    match restore {
        Some(restore) => Decision::Restore { why, restore },
        None => Decision::NothingGood(why),
    }
}

/// The newest version that makes a good, unexpired bundle whose leaf is not in
/// `skip`, as a [`Restore`].
fn newest_good(
    root: &Path,
    name: &str,
    domains: &[String],
    now_unix: i64,
    skip: &[[u8; 32]],
) -> Option<Restore> {
    for n in versions(root, name).into_iter().rev() {
        let dir = format!("archive/{name}/{n}");
        let fcs = candidates(root, &format!("{dir}/fullchain.pem"));
        let keys = candidates(root, &format!("{dir}/privkey.pem"));
        let pairs = fcs.iter().flat_map(|fc| keys.iter().map(move |k| (fc, k)));
        let found = pairs
            .filter(|(fc, _)| {
                crate::acme::rolled_back::leaf_sha256(&fc.0).is_none_or(|l| !skip.contains(&l))
            })
            .filter(|(fc, k)| {
                check_pair(&fc.0, &k.0).is_ok_and(|leaf| leaf.validity.not_after > now_unix)
            })
            .find_map(|(fc, key)| {
                let (chosen, by) = assemble(root, &dir, &fc.0, &key.0);
                let files = BundleFiles {
                    fullchain: Some(fc.0.clone()),
                    key: Some(key.0.clone()),
                    cert: Some(chosen[0].1.clone()),
                    chain: Some(chosen[1].1.clone()),
                    combined: Some(chosen[4].1.clone()),
                };
                served::check_bundle(&files, domains)
                    .is_ok()
                    .then(|| (chosen, fc.1.or(key.1).or(by)))
            });
        let Some((chosen, caused_by)) = found else {
            continue;
        };
        let files = chosen
            .into_iter()
            .filter(|(f, d)| read_file(&root.join(format!("{dir}/{f}"))).as_ref() != Some(d))
            .map(|(f, d)| {
                let mode = if matches!(f, "privkey.pem" | "combined.pem") {
                    0o640
                } else {
                    0o644
                };
                (f, d, mode)
            })
            .collect();
        let target = format!("../archive/{name}/{n}");
        let flip_link = std::fs::read_link(root.join("live").join(name))
            .map_or(true, |t| t.to_str() != Some(target.as_str()));
        return Some(Restore {
            version: n,
            files,
            flip_link,
            caused_by,
        });
    }
    None
}

/// The files of one version around this fullchain and key, in [`bundle::FILES`]
/// order: each one in place or kept if it fits, else made from the two; with who
/// removed the kept ones used.
fn assemble(
    root: &Path,
    dir: &str,
    fc: &[u8],
    key: &[u8],
) -> (Vec<(&'static str, Vec<u8>)>, Option<ShortId>) {
    let mut caused_by = None;
    let chosen = bundle::FILES
        .iter()
        .map(|&file| {
            let data = match file {
                "fullchain.pem" => fc.to_vec(),
                "privkey.pem" => key.to_vec(),
                other => {
                    let cands = candidates(root, &format!("{dir}/{other}"));
                    match cands.iter().find(|c| consistent(other, &c.0, fc, key)) {
                        Some(c) => {
                            caused_by = caused_by.or(c.1);
                            c.0.clone()
                        }
                        None => derive(other, fc, key),
                    }
                }
            };
            (file, data)
        })
        .collect();
    (chosen, caused_by)
}

/// Does `data` fit as `file` next to this fullchain and key?
fn consistent(file: &str, data: &[u8], fc: &[u8], key: &[u8]) -> bool {
    let fc_ders = chain_der(fc).unwrap_or_default();
    match file {
        "cert.pem" => chain_der(data).is_ok_and(|d| d.first() == fc_ders.first()),
        "chain.pem" => match chain_der(data) {
            Ok(d) => d.as_slice() == fc_ders.get(1..).unwrap_or_default(),
            Err(_) => fc_ders.len() == 1 && data.is_empty(),
        },
        "combined.pem" => {
            let key = key.trim_ascii();
            chain_der(data).is_ok_and(|d| d == fc_ders)
                && !key.is_empty()
                && data.windows(key.len()).any(|w| w == key)
        }
        _ => false,
    }
}

/// `cert.pem`, `chain.pem` or `combined.pem` made from the fullchain and key, as
/// publish writes them.
fn derive(file: &str, fc: &[u8], key: &[u8]) -> Vec<u8> {
    let ders = chain_der(fc).unwrap_or_default();
    let pem = |ds: &[Vec<u8>]| -> Vec<u8> {
        ds.iter()
            .map(|d| crate::acme::bundle::pem_cert(d))
            .collect::<String>()
            .into_bytes()
    };
    match file {
        "cert.pem" => pem(ders.get(..1).unwrap_or_default()),
        "chain.pem" => pem(ders.get(1..).unwrap_or_default()),
        _ => [fc, key].concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn www() -> Vec<String> {
        vec!["www.example.com".to_string()]
    }

    fn bundle_pem(days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["www.example.com".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(2);
        p.not_after = now + time::Duration::days(days);
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn place(root: &Path, n: u32, fc: &str, key: &str) {
        let d = root.join(format!("archive/www/{n}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("fullchain.pem"), fc).unwrap();
        fs::write(d.join("cert.pem"), fc).unwrap();
        fs::write(d.join("chain.pem"), "").unwrap();
        fs::write(d.join("privkey.pem"), key).unwrap();
        fs::write(d.join("combined.pem"), format!("{fc}{key}")).unwrap();
        fs::create_dir_all(root.join("live")).unwrap();
        let _ = fs::remove_file(root.join("live/www"));
        std::os::unix::fs::symlink(format!("../archive/www/{n}"), root.join("live/www")).unwrap();
    }

    fn kill_key(root: &Path, n: u32) {
        let p = RelPath::parse(&format!("archive/www/{n}/privkey.pem")).unwrap();
        let cause = keep::Cause {
            reason: keep::Reason::Replaced,
            modified_by: ShortId(42),
            version: Default::default(),
            content_by: None,
        };
        keep::keep(
            root,
            &p,
            &cause,
            crate::clock::now_ns(),
            keep::Budget::default(),
        )
        .unwrap()
        .unwrap();
        let (_, other) = bundle_pem(90);
        let tmp = root.join("new-key");
        fs::write(&tmp, other).unwrap();
        fs::rename(tmp, root.join(p.as_str())).unwrap(); // a new inode, as apply does
    }

    #[test]
    fn mismatching_key_is_put_back_from_the_kept_version() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (fc, key) = bundle_pem(90);
        place(root, 1, &fc, &key);
        let now = crate::acme::unix_now();
        assert!(matches!(
            decide(root, "www", &www(), now),
            Decision::Healthy
        ));
        kill_key(root, 1);
        let Decision::Restore { why, restore } = decide(root, "www", &www(), now) else {
            panic!("not repaired");
        };
        assert!(why.contains("does not match"), "{why}");
        assert_eq!(restore.version, 1);
        assert_eq!(restore.caused_by, Some(ShortId(42)));
        assert_eq!(restore.files.len(), 1, "only the key differs");
        assert_eq!(restore.files[0].0, "privkey.pem");
        assert_eq!(restore.files[0].1, key.as_bytes());
        assert!(!restore.flip_link);
    }

    #[test]
    fn deleted_live_link_points_back_to_the_newest_good_version() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (fc, key) = bundle_pem(90);
        place(root, 1, &fc, &key);
        let (fc2, key2) = bundle_pem(90);
        place(root, 2, &fc2, &key2);
        // Version 3: a broken one a peer made live.
        place(root, 3, &fc, &key2);
        let Decision::Restore { restore, .. } =
            decide(root, "www", &www(), crate::acme::unix_now())
        else {
            panic!("not repaired");
        };
        assert_eq!((restore.version, restore.flip_link), (2, true));
        assert!(restore.files.is_empty());
    }

    #[test]
    fn a_rolled_back_version_is_not_restored_while_an_older_good_one_exists() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (fc1, key1) = bundle_pem(90);
        place(root, 1, &fc1, &key1);
        let (fc2, key2) = bundle_pem(90);
        place(root, 2, &fc2, &key2);
        place(root, 3, &fc1, &key2); // broken, live
        let leaf2 = crate::acme::rolled_back::leaf_sha256(fc2.as_bytes()).unwrap();
        let marker = root.join(crate::acme::rolled_back::rel("www"));
        fs::create_dir_all(marker.parent().unwrap()).unwrap();
        fs::write(
            &marker,
            crate::acme::rolled_back::with_entry(b"", &leaf2, 2, 0),
        )
        .unwrap();
        let restored = |root: &Path| match decide(root, "www", &www(), crate::acme::unix_now()) {
            Decision::Restore { restore, .. } => restore.version,
            other => panic!("{other:?}"),
        };
        assert_eq!(restored(root), 1);
        // A marker listing every good leaf (forged) cannot leave it broken.
        let leaf1 = crate::acme::rolled_back::leaf_sha256(fc1.as_bytes()).unwrap();
        let both = crate::acme::rolled_back::with_entry(&fs::read(&marker).unwrap(), &leaf1, 1, 0);
        fs::write(&marker, both).unwrap();
        assert_eq!(restored(root), 2);
    }

    #[test]
    fn expired_or_absent_is_left_to_acme() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        assert!(matches!(
            decide(root, "www", &www(), crate::acme::unix_now()),
            Decision::NothingGood(_)
        ));
        let (fc, key) = bundle_pem(-1);
        place(root, 1, &fc, &key);
        kill_key(root, 1);
        assert!(matches!(
            decide(root, "www", &www(), crate::acme::unix_now()),
            Decision::NothingGood(_)
        ));
    }
}

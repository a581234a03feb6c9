//! `rollout = "verify"`: when this node published a version of a
//! certificate and its own frontends do not serve it within the probe schedule (the
//! hook failed, the server refused the bundle or kept the old one), `live/<name>` goes
//! back to the version before, for the whole fleet.
//!
//! Only a fresh publish is taken back: the live version must be the newest in
//! `archive/<name>/` and this node must have made the flip (so after a rollback, the
//! version live again is never rolled back in turn, and a node never undoes another's
//! publish). The target is the newest older version that is a good, unexpired bundle
//! and not listed as rolled back. The new version stays in `archive/` for inspection,
//! its leaf is listed in `.certmesh/acme/rolled-back/<name>` (repair honours it), and
//! on an ACME node the certificate counts as failed with backoff, like an order.

use std::path::Path;
use std::time::Duration;

use crate::acme::bundle::{archive_versions, live_version};
use crate::acme::rolled_back::{self, leaf_sha256};
use crate::acme::served::{check_bundle, read_file, BundleFiles};
use crate::disk::tree;

use super::ProbeHandles;

/// A rollback to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The version taken back.
    pub from: u32,
    /// The version made live again.
    pub to: u32,
    /// The leaf of `from` (listed as rolled back).
    pub leaf: [u8; 32],
    /// The serial of `to`'s leaf.
    pub to_serial: String,
}

/// What to roll back for certificate `name` in the tree at `root`, if anything
/// (pure reads).
pub fn plan(root: &Path, name: &str, domains: &[String], now_unix: i64) -> Option<Plan> {
    let from = live_version(root, name)?;
    let versions = archive_versions(root, name);
    if versions.last() != Some(&from) {
        return None; // not a fresh publish: a rollback or a repair made it live
    }
    let fullchain = read_file(&root.join(format!("archive/{name}/{from}/fullchain.pem")))?;
    let leaf = leaf_sha256(&fullchain)?;
    let listed = rolled_back::read(root, name);
    versions.iter().rev().filter(|v| **v < from).find_map(|&v| {
        let files = BundleFiles::read(&root.join(format!("archive/{name}/{v}")));
        let good = check_bundle(&files, domains).ok()?;
        let l = leaf_sha256(files.fullchain.as_deref()?)?;
        (good.validity.not_after > now_unix && !listed.contains(&l)).then_some(Plan {
            from,
            to: v,
            leaf,
            to_serial: good.serial,
        })
    })
}

/// After the schedule ended with `cert` still not served by this node's frontends
/// (`why`): rolls back when the certificate has `rollout = "verify"` and this node
/// published the live version.
pub async fn after_failed_rollout(h: &ProbeHandles, cert: &str, why: String) {
    let found = h.settings.read(|c| {
        let cc = c.certificates.iter().find(|x| x.name == cert)?;
        cc.verify_rollout
            .then(|| (cc.domains.clone(), c.tree.clone()))
    });
    let Some((domains, root)) = found.flatten() else {
        return;
    };
    if !h.served.live_flipped_by_me(cert) {
        return;
    }
    let name = cert.to_string();
    let now = crate::clock::unix_now();
    let p = tokio::task::spawn_blocking(move || plan(&root, &name, &domains, now)).await;
    let Ok(Some(p)) = p else {
        tracing::warn!(cert, "rollout = \"verify\": nothing to roll back to");
        return;
    };
    if let Err(e) = apply(h, cert, &p).await {
        h.reports.error(format!(
            "certificate {cert}: rolling back to version {}: {e:#}",
            p.to
        ));
        return;
    }
    let msg = format!(
        "certificate {cert}: rolled back to version {} (rollout = \"verify\"): this node's \
         frontend did not serve version {} ({why}); version {} kept in archive/{cert}/{}",
        p.to, p.from, p.from, p.from
    );
    tracing::warn!(cert, from = p.from, to = p.to, "{msg}");
    h.reports.error(msg.clone());
    if let Some(acme) = h.acme.get() {
        acme.rollout_failed(cert, msg, Some(p.to_serial.clone()));
    }
}

/// Lists the leaf as rolled back, then flips `live/<cert>` to the older version.
async fn apply(h: &ProbeHandles, cert: &str, p: &Plan) -> anyhow::Result<()> {
    let w = h.served.writer();
    let list = rolled_back::rel(cert);
    let old = read_file(&w.root().join(&list)).unwrap_or_default();
    let text = rolled_back::with_entry(&old, &p.leaf, p.from, crate::clock::unix_now());
    let list = tree::rel(&list)?;
    let e = w.write(&list, &text, 0o644)?;
    w.await_indexed(&[(list, e)], Duration::from_secs(10))
        .await?;
    let link = tree::rel(&format!("live/{cert}"))?;
    let e = w.symlink(&link, &format!("../archive/{cert}/{}", p.to))?;
    w.await_indexed(&[(link, e)], Duration::from_secs(10))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn www() -> Vec<String> {
        vec!["www.example.com".into()]
    }

    /// A good self-signed bundle at `archive/www/<n>/`, made live.
    fn place(root: &Path, n: u32) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(www()).unwrap();
        let cert = p.self_signed(&key).unwrap().pem();
        let k = key.serialize_pem();
        let d = root.join(format!("archive/www/{n}"));
        fs::create_dir_all(&d).unwrap();
        for (f, data) in [
            ("cert.pem", cert.clone()),
            ("fullchain.pem", cert.clone()),
            ("chain.pem", String::new()),
            ("privkey.pem", k.clone()),
            ("combined.pem", format!("{cert}{k}")),
        ] {
            fs::write(d.join(f), data).unwrap();
        }
        link(root, n);
    }

    fn link(root: &Path, n: u32) {
        fs::create_dir_all(root.join("live")).unwrap();
        let _ = fs::remove_file(root.join("live/www"));
        std::os::unix::fs::symlink(format!("../archive/www/{n}"), root.join("live/www")).unwrap();
    }

    #[test]
    fn a_fresh_publish_goes_back_to_the_version_before_and_only_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        place(root, 1);
        place(root, 2);
        let now = crate::clock::unix_now();
        let p = plan(root, "www", &www(), now).expect("a rollback");
        assert_eq!((p.from, p.to), (2, 1));
        // Once back on 1, version 2 is still the newest: 1 is not a fresh publish.
        link(root, 1);
        assert_eq!(plan(root, "www", &www(), now), None);
    }

    #[test]
    fn a_version_listed_as_rolled_back_is_never_the_target() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        place(root, 1);
        place(root, 2);
        place(root, 3);
        let fc2 = fs::read(root.join("archive/www/2/fullchain.pem")).unwrap();
        let list = root.join(rolled_back::rel("www"));
        fs::create_dir_all(list.parent().unwrap()).unwrap();
        let leaf = leaf_sha256(&fc2).unwrap();
        fs::write(&list, rolled_back::with_entry(b"", &leaf, 2, 0)).unwrap();
        let p = plan(root, "www", &www(), crate::clock::unix_now()).expect("a rollback");
        assert_eq!((p.from, p.to), (3, 1));
    }
}

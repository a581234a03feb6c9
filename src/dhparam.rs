//! `[tree] dhparam`: writes an RFC 7919 finite-field group (the well-known
//! `ffdhe2048` / `ffdhe3072` / `ffdhe4096` constants, PKCS#3 PEM as OpenSSL prints
//! it) to `<tree>/dhparam.pem` once, for nginx's `ssl_dhparam`. The file is an
//! ordinary synced file: if it is already in the tree (from a peer or from the
//! operator) nothing is written, and an operator's file is never replaced — not here
//! (the write is a no-replace link) and not through sync (the written file carries an
//! old mtime, so an operator's concurrent file wins the conflict rule).

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::core::record::ContentHash;
use crate::dhgroup::DhGroup;
use crate::disk::tree;
use crate::handles::{Mesh, Reports, Settings, TreeWriter};

/// Where the group goes, relative to the tree.
pub const FILE: &str = "dhparam.pem";
/// How long a starting node waits for its peers (and their copy of the file).
const MESH_GRACE: Duration = Duration::from_secs(10);
/// mtime of a written file: RFC 7919's publication (2016-08-01). Older than any
/// operator's file, so a concurrent operator file wins the sync's conflict rule.
const WRITTEN_MTIME: Duration = Duration::from_secs(1_470_009_600);

/// What [`place`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The file was absent and has been written.
    Written,
    /// The file is there with exactly this group.
    Present,
    /// The file is there with other content: kept.
    KeptOther,
}

/// Starts the one-off writer if `[tree] dhparam` is set.
pub fn start(
    settings: &Settings,
    mesh: Mesh,
    writer: TreeWriter,
    reports: Reports,
) -> Option<tokio::task::JoinHandle<()>> {
    let group = settings.read(|c| c.dhparam).flatten()?;
    Some(tokio::spawn(ensure(mesh, writer, reports, group)))
}

async fn ensure(mesh: Mesh, writer: TreeWriter, reports: Reports, group: DhGroup) {
    // Waits until every configured peer is connected and in sync (their copy of the
    // file, if any, has arrived), or MESH_GRACE.
    if !mesh.wait_formed(MESH_GRACE).await {
        tracing::info!(
            "{FILE}: not every peer is connected and in sync; deciding with the ones that are"
        );
    }
    match place(writer.root(), group) {
        Ok(Placed::Written) => {
            tracing::info!(group = group.name(), "wrote {FILE} (RFC 7919 group)");
            if let Ok(rel) = tree::rel(FILE) {
                let want = tree::Expect::File(ContentHash(
                    *blake3::hash(group.pem().as_bytes()).as_bytes(),
                ));
                if let Err(e) = writer.await_indexed(&[(rel, want)], MESH_GRACE).await {
                    tracing::warn!(error = %e, "{FILE} written but not indexed yet");
                }
            }
        }
        Ok(Placed::Present) => tracing::debug!(group = group.name(), "{FILE} already present"),
        Ok(Placed::KeptOther) => tracing::info!(
            group = group.name(),
            "{FILE} in the tree is not the configured group; keeping the operator's file"
        ),
        Err(e) => reports.error(format!("tree.dhparam: writing {FILE}: {e:#}")),
    }
}

/// Writes `group` to `<root>/dhparam.pem` unless something is there already. The
/// file is staged under `.certmesh/tmp/` (fsynced, 0644, old mtime) and hard-linked
/// into place, which fails rather than replaces if a file appeared meanwhile.
pub fn place(root: &Path, group: DhGroup) -> anyhow::Result<Placed> {
    let dest = root.join(FILE);
    if let Some(found) = existing(&dest, group) {
        return Ok(found);
    }
    let staging = crate::disk::apply::Tree::new(root.to_path_buf());
    let tmp = staging
        .stage_bytes(group.pem().as_bytes())
        .context("staging")?;
    let result = (|| -> anyhow::Result<Placed> {
        let f = fs::OpenOptions::new().write(true).open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.set_modified(SystemTime::UNIX_EPOCH + WRITTEN_MTIME)?;
        f.sync_all()?;
        match fs::hard_link(&tmp, &dest) {
            Ok(()) => {
                if let Ok(d) = fs::File::open(root) {
                    let _ = d.sync_all();
                }
                Ok(Placed::Written)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                Ok(existing(&dest, group).unwrap_or(Placed::KeptOther))
            }
            Err(e) => Err(e).with_context(|| format!("linking {}", dest.display())),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result
}

fn existing(dest: &Path, group: DhGroup) -> Option<Placed> {
    fs::symlink_metadata(dest).ok()?;
    Some(match fs::read(dest) {
        Ok(data) if data == group.pem().as_bytes() => Placed::Present,
        _ => Placed::KeptOther,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7919, appendix A.1: the ffdhe2048 prime.
    const RFC7919_FFDHE2048_P: &str = "\
        FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FB\
        CC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED0\
        856365553DED1AF3B557135E7F57C935984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE735\
        30ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4\
        AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F619172FE9CE98583FF\
        8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA\
        886B423861285C97FFFFFFFFFFFFFFFF";

    /// (p, g) from the PKCS#3 DER `SEQUENCE { INTEGER p, INTEGER g }`.
    fn decode(pem: &str) -> (Vec<u8>, Vec<u8>) {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = data_encoding::BASE64.decode(b64.as_bytes()).unwrap();
        let (seq, rest) = tlv(&der, 0x30);
        assert!(rest.is_empty());
        let (p, rest) = tlv(seq, 0x02);
        let (g, rest) = tlv(rest, 0x02);
        assert!(rest.is_empty());
        (p.to_vec(), g.to_vec())
    }

    fn tlv(d: &[u8], tag: u8) -> (&[u8], &[u8]) {
        assert_eq!(d[0], tag);
        let (len, at) = match d[1] {
            n if n < 0x80 => (n as usize, 2),
            0x81 => (d[2] as usize, 3),
            0x82 => ((d[2] as usize) << 8 | d[3] as usize, 4),
            n => panic!("length form {n:#x}"),
        };
        (&d[at..at + len], &d[at + len..])
    }

    #[test]
    fn groups_are_the_rfc7919_primes() {
        for (g, bits) in [
            (DhGroup::Ffdhe2048, 2048),
            (DhGroup::Ffdhe3072, 3072),
            (DhGroup::Ffdhe4096, 4096),
        ] {
            assert_eq!(DhGroup::parse(g.name()), Some(g));
            let (p, gen) = decode(g.pem());
            assert_eq!(gen, [2], "{g:?}");
            // A positive INTEGER: a leading 0 byte, then exactly `bits` bits.
            assert_eq!(p[0], 0, "{g:?}");
            let p = &p[1..];
            assert_eq!(p.len() * 8, bits, "{g:?}");
            // p = 2^b - 2^{b-64} + {[2^{b-130} e] + X} * 2^64 - 1: 64 one bits at both ends,
            // and the same digits of e after the top ones in every size.
            assert!(p[..8].iter().chain(&p[p.len() - 8..]).all(|&b| b == 0xff));
            assert_eq!(
                data_encoding::HEXUPPER.encode(&p[8..24]),
                "ADF85458A2BB4A9AAFDC5620273D3CF1"
            );
        }
        let (p, _) = decode(DhGroup::Ffdhe2048.pem());
        assert_eq!(data_encoding::HEXUPPER.encode(&p[1..]), RFC7919_FFDHE2048_P);
        assert_eq!(DhGroup::parse("ffdhe1024"), None);
    }

    #[test]
    fn writes_once_and_keeps_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        crate::disk::apply::Tree::new(root.to_path_buf())
            .prepare()
            .unwrap();
        assert_eq!(place(root, DhGroup::Ffdhe2048).unwrap(), Placed::Written);
        let written = fs::read_to_string(root.join(FILE)).unwrap();
        assert_eq!(written, DhGroup::Ffdhe2048.pem());
        let meta = fs::metadata(root.join(FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(
            meta.modified().unwrap(),
            SystemTime::UNIX_EPOCH + WRITTEN_MTIME
        );
        assert_eq!(place(root, DhGroup::Ffdhe2048).unwrap(), Placed::Present);
        // Another group configured later: the file there is kept.
        assert_eq!(place(root, DhGroup::Ffdhe4096).unwrap(), Placed::KeptOther);
        assert_eq!(
            fs::read_to_string(root.join(FILE)).unwrap(),
            DhGroup::Ffdhe2048.pem()
        );
        fs::write(root.join(FILE), "operator's own\n").unwrap();
        assert_eq!(place(root, DhGroup::Ffdhe2048).unwrap(), Placed::KeptOther);
        assert_eq!(
            fs::read_to_string(root.join(FILE)).unwrap(),
            "operator's own\n"
        );
        // No staging leftovers.
        assert_eq!(fs::read_dir(root.join(".certmesh/tmp")).unwrap().count(), 0);
    }
}

//! The index on disk (`state_dir/index.db`): an append-only log of `StoredEntry`
//! frames, each `[len u32][blake3 prefix u32][protobuf]`, fdatasynced per batch and
//! compacted when mostly superseded. A torn tail (crash) or garbage is detected by the
//! checksum: loading stops there, says so, and the rescan and the peers rebuild the
//! rest.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::index::{Entry, Index, LocalStat};
use crate::wire::{pb, record_from_wire, record_to_wire};

const MAGIC: &[u8; 8] = b"CMIDX01\n";
const MAX_ENTRY: usize = 64 << 10;

/// The open index file.
pub struct Store {
    path: PathBuf,
    file: fs::File,
    appended: usize,
}

/// What loading found.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub entries: usize,
    /// Set when the file was damaged: where and why loading stopped.
    pub damaged: Option<String>,
}

fn checksum(b: &[u8]) -> [u8; 4] {
    let h = blake3::hash(b);
    let mut c = [0u8; 4];
    c.copy_from_slice(&h.as_bytes()[..4]);
    c
}

fn encode(e: &Entry, out: &mut Vec<u8>) {
    let msg = pb::StoredEntry {
        record: Some(record_to_wire(&e.record, e.sequence)),
        stat: e.stat.map(|s| pb::LocalStat {
            size: s.size,
            mtime_ns: s.mtime_ns,
            mode: s.mode,
            ino: s.ino,
            ctime_ns: s.ctime_ns,
        }),
    };
    let body = msg.encode_to_vec();
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&checksum(&body));
    out.extend_from_slice(&body);
}

fn decode(body: &[u8]) -> Option<Entry> {
    let msg = pb::StoredEntry::decode(body).ok()?;
    let (record, sequence) = record_from_wire(msg.record?).ok()?;
    Some(Entry {
        record,
        sequence,
        stat: msg.stat.map(|s| LocalStat {
            size: s.size,
            mtime_ns: s.mtime_ns,
            mode: s.mode,
            ino: s.ino,
            ctime_ns: s.ctime_ns,
        }),
    })
}

impl Store {
    /// Loads `state_dir/index.db` into `index` and rewrites it compacted.
    pub fn open(state_dir: &Path, index: &mut Index) -> io::Result<(Store, LoadReport)> {
        let path = state_dir.join("index.db");
        let mut report = LoadReport::default();
        match fs::read(&path) {
            Ok(bytes) => load_into(&bytes, index, &mut report),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = write_compacted(&path, index)?;
        Ok((
            Store {
                path,
                file,
                appended: 0,
            },
            report,
        ))
    }

    /// Durably appends changed entries (fdatasync once per call).
    pub fn append<'a>(
        &mut self,
        entries: impl Iterator<Item = &'a Entry>,
        index: &Index,
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut n = 0;
        for e in entries {
            encode(e, &mut buf);
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.appended += n;
        if self.appended > 2 * index.len() + 1024 {
            self.file = write_compacted(&self.path, index)?;
            self.appended = 0;
        }
        Ok(())
    }
}

/// Loads index entries from the bytes of an index file (what `open` does; the fuzz
/// entry point).
pub fn load_bytes(bytes: &[u8], index: &mut Index) -> LoadReport {
    let mut report = LoadReport::default();
    load_into(bytes, index, &mut report);
    report
}

fn load_into(bytes: &[u8], index: &mut Index, report: &mut LoadReport) {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        report.damaged = Some("not a certmesh index file (bad header)".into());
        return;
    }
    let mut pos = MAGIC.len();
    while pos < bytes.len() {
        let stop = |why: &str| format!("offset {pos}: {why}");
        let Some(head) = bytes.get(pos..pos + 8) else {
            report.damaged = Some(stop("truncated entry header"));
            return;
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_ENTRY {
            report.damaged = Some(stop("entry length out of range"));
            return;
        }
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else {
            report.damaged = Some(stop("truncated entry"));
            return;
        };
        if checksum(body) != head[4..8] {
            report.damaged = Some(stop("checksum mismatch"));
            return;
        }
        let Some(entry) = decode(body) else {
            report.damaged = Some(stop("undecodable entry"));
            return;
        };
        index.restore(entry);
        report.entries += 1;
        pos += 8 + len;
    }
}

fn write_compacted(path: &Path, index: &Index) -> io::Result<fs::File> {
    let tmp = path.with_extension("db.tmp");
    let mut buf = Vec::with_capacity(64 + index.len() * 200);
    buf.extend_from_slice(MAGIC);
    let mut entries: Vec<&Entry> = index.entries().collect();
    entries.sort_by_key(|e| e.sequence);
    for e in entries {
        encode(e, &mut buf);
    }
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    fs::OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ShortId;
    use crate::index::tests::file;
    use crate::paths::RelPath;

    #[test]
    fn survives_reopen_torn_tail_and_garbage() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = Index::new(ShortId(1));
        let (mut st, rep) = Store::open(d.path(), &mut ix).unwrap();
        assert!(rep.damaged.is_none());
        for i in 0..10 {
            let p = RelPath::parse(&format!("f{i}")).unwrap();
            ix.observe(&p, Some(file("f", i, 10)), 10);
            let seq = ix.sequence();
            st.append(ix.changed_since(seq - 1), &ix).unwrap();
        }
        drop(st);
        let mut ix2 = Index::new(ShortId(1));
        let (_, rep) = Store::open(d.path(), &mut ix2).unwrap();
        assert_eq!((rep.entries, ix2.len(), ix2.sequence()), (10, 10, 10));

        // A torn tail: loading keeps what is intact and reports the damage.
        let path = d.path().join("index.db");
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        fs::write(&path, &bytes).unwrap();
        let mut ix3 = Index::new(ShortId(1));
        let (_, rep) = Store::open(d.path(), &mut ix3).unwrap();
        assert_eq!(ix3.len(), 9);
        assert!(rep.damaged.unwrap().contains("truncated"));

        fs::write(&path, b"garbage garbage").unwrap();
        let mut ix4 = Index::new(ShortId(1));
        let (_, rep) = Store::open(d.path(), &mut ix4).unwrap();
        assert_eq!(ix4.len(), 0);
        assert!(rep.damaged.unwrap().contains("bad header"));
    }
}

//! The index on disk (`state_dir/index.db`): an append-only log of `StoredEntry`
//! frames, each `[len u32][blake3 prefix u32][protobuf]`, fdatasynced per batch and
//! compacted when mostly superseded. A torn tail (crash) or garbage is detected by the
//! checksum: loading stops there, says so, and the rescan and the peers rebuild the
//! rest. An intact entry that is not acceptable (too long, undecodable, or a record
//! the wire would refuse, e.g. a counter far ahead of the clock) is skipped by its
//! length, and loading goes on with the next one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::clock::now_us;
use crate::core::codec::{pb, record_from_wire, record_to_wire};
use crate::core::index::{Entry, Index, LocalStat};

const MAGIC: &[u8; 8] = b"CMIDX01\n";
/// Largest entry loaded. A record at every wire limit (a `MAX_PATH` path and link
/// target, `MAX_VERSION_ENTRIES` counters, two certificates) encodes to ~37 KiB
/// (tested below).
const MAX_ENTRY: usize = 64 << 10;
/// Longest body read past when skipping an entry that is intact but too long.
const MAX_SKIP: usize = 16 << 20;

/// What loading found.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub entries: usize,
    /// Set when the file was damaged: where and why loading stopped.
    pub damaged: Option<String>,
    /// Intact entries that were not loaded, with where and why (at most 10 kept).
    pub skipped: Vec<String>,
    /// How many entries were skipped.
    pub skipped_count: usize,
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
        learned_ns: e.learned_ns,
    };
    let body = msg.encode_to_vec();
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&checksum(&body));
    out.extend_from_slice(&body);
}

/// Decodes and validates one entry as the wire would a peer's record.
fn decode(body: &[u8], now_us: u64) -> Result<Entry, String> {
    let msg = pb::StoredEntry::decode(body).map_err(|e| format!("undecodable entry: {e}"))?;
    let record = msg.record.ok_or("entry without a record")?;
    let (record, sequence) =
        record_from_wire(record, now_us).map_err(|e| format!("refused entry: {e}"))?;
    Ok(Entry {
        record: std::sync::Arc::new(record),
        sequence,
        stat: msg.stat.map(|s| LocalStat {
            size: s.size,
            mtime_ns: s.mtime_ns,
            mode: s.mode,
            ino: s.ino,
            ctime_ns: s.ctime_ns,
        }),
        learned_ns: learned_at(msg.learned_ns, now_us),
    })
}

/// The learned time of a stored entry: as stored, never later than the clock
/// reading `now_us`; an entry stored before learned times were kept (0) counts as
/// learned at load, so its tombstone is kept a full retention from now, never
/// collected at once as if learned in 1970.
fn learned_at(stored_ns: i64, now_us: u64) -> i64 {
    let now_ns = i64::try_from(now_us.saturating_mul(1000)).unwrap_or(i64::MAX);
    if stored_ns <= 0 {
        now_ns
    } else {
        stored_ns.min(now_ns)
    }
}

/// Bytes for the index file, prepared (encoded) under the state lock and written
/// outside it, in the order they were prepared.
#[derive(Debug)]
pub enum Pending {
    /// Frames to append.
    Append(Vec<u8>),
    /// A whole compacted file (header and every entry) to replace it with.
    Rewrite(Vec<u8>),
}

/// The in-memory side of the index file: encodes what changed and decides when to
/// compact. No I/O, so it can sit under the state lock.
pub struct Journal {
    appended: usize,
}

impl Journal {
    /// Encodes changed entries; the whole file instead when the log is mostly
    /// superseded. `None` when there is nothing to write.
    pub fn prepare<'a>(
        &mut self,
        entries: impl Iterator<Item = &'a Entry>,
        index: &Index,
    ) -> Option<Pending> {
        let mut buf = Vec::new();
        let mut n = 0;
        for e in entries {
            encode(e, &mut buf);
            n += 1;
        }
        if n == 0 {
            return None;
        }
        self.appended += n;
        if self.appended > 2 * index.len() + 1024 {
            return Some(self.prepare_rewrite(index));
        }
        // It waits in the persister's queue: not with up to twice its size spare (a
        // first scan of 90,000 paths queues ~60 MB of these).
        buf.shrink_to_fit();
        Some(Pending::Append(buf))
    }

    /// The whole file from `index` (after records were removed from it, e.g.
    /// collected tombstones: the append-only log cannot say "removed").
    pub fn prepare_rewrite(&mut self, index: &Index) -> Pending {
        self.appended = 0;
        Pending::Rewrite(encode_compacted(index))
    }
}

/// The file side of the index: writes what the journal prepared, durably.
pub struct StoreFile {
    path: PathBuf,
    file: fs::File,
}

impl StoreFile {
    /// Writes `pending` items in order with one fdatasync for a run of appends.
    /// The appends are written as they were prepared, not copied into one buffer
    /// first (a first scan's run of them is as large as the whole index).
    pub fn write(&mut self, pending: impl IntoIterator<Item = Pending>) -> io::Result<()> {
        let mut appends = Vec::new();
        for p in pending {
            match p {
                Pending::Append(b) => appends.push(b),
                Pending::Rewrite(b) => {
                    appends.clear(); // the whole file supersedes them
                    self.file = replace_file(&self.path, &b)?;
                }
            }
        }
        for b in &appends {
            self.file.write_all(b)?;
        }
        if !appends.is_empty() {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// The open index file: its journal and its file together.
pub struct Store {
    journal: Journal,
    file: StoreFile,
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
        let file = replace_file(&path, &encode_compacted(index))?;
        Ok((
            Store {
                journal: Journal { appended: 0 },
                file: StoreFile { path, file },
            },
            report,
        ))
    }

    /// Separates the journal (kept under the state lock) from the file (written by
    /// the persister, outside it).
    pub fn split(self) -> (Journal, StoreFile) {
        (self.journal, self.file)
    }

    /// Durably appends changed entries (fdatasync once per call).
    pub fn append<'a>(
        &mut self,
        entries: impl Iterator<Item = &'a Entry>,
        index: &Index,
    ) -> io::Result<()> {
        match self.journal.prepare(entries, index) {
            Some(p) => self.file.write([p]),
            None => Ok(()),
        }
    }

    /// Rewrites the file from `index`.
    pub fn rewrite(&mut self, index: &Index) -> io::Result<()> {
        let p = self.journal.prepare_rewrite(index);
        self.file.write([p])
    }
}

/// Loads index entries from the bytes of an index file (what `open` does; the fuzz
/// entry point).
pub fn load_bytes(bytes: &[u8], index: &mut Index) -> LoadReport {
    load_bytes_at(bytes, index, now_us())
}

/// As `load_bytes`, validating counters against the clock reading `now_us`.
pub fn load_bytes_at(bytes: &[u8], index: &mut Index, now_us: u64) -> LoadReport {
    let mut report = LoadReport::default();
    load_at(bytes, index, &mut report, now_us);
    report
}

fn load_into(bytes: &[u8], index: &mut Index, report: &mut LoadReport) {
    load_at(bytes, index, report, now_us())
}

impl LoadReport {
    fn skip(&mut self, why: String) {
        self.skipped_count += 1;
        if self.skipped.len() < 10 {
            self.skipped.push(why);
        }
    }
}

fn load_at(bytes: &[u8], index: &mut Index, report: &mut LoadReport, now_us: u64) {
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
        if len > MAX_SKIP {
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
        // Intact (the checksum matches), so its length is right: skip it if bad.
        let entry = if len > MAX_ENTRY {
            Err(format!("entry of {len} bytes, more than {MAX_ENTRY}"))
        } else {
            decode(body, now_us)
        };
        match entry {
            Ok(entry) => {
                index.restore(entry);
                report.entries += 1;
            }
            Err(why) => report.skip(stop(&why)),
        }
        pos += 8 + len;
    }
}

/// The whole file for `index`: the header, then every entry in sequence order.
fn encode_compacted(index: &Index) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + index.len() * 200);
    buf.extend_from_slice(MAGIC);
    let mut entries: Vec<&Entry> = index.entries().collect();
    entries.sort_by_key(|e| e.sequence);
    for e in entries {
        encode(e, &mut buf);
    }
    buf
}

/// Replaces the file at `path` with `bytes` atomically and durably; returns it
/// opened for appending.
fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<fs::File> {
    crate::disk::atomic::replace(path, bytes, 0o600)?;
    fs::OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::device::ShortId;
    use crate::core::index::tests::file;
    use crate::core::paths::RelPath;

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

    /// The largest record the wire accepts: a `MAX_PATH` path of 255-byte names, a
    /// `MAX_PATH` link target, `MAX_VERSION_ENTRIES` counters at the clock bound with
    /// 10-byte device ids, every integer at its widest.
    fn largest_record(now_us: u64) -> pb::FileInfo {
        use crate::core::codec::{MAX_CLOCK_AHEAD_US, MAX_SEQUENCE, MAX_VERSION_ENTRIES};
        use crate::core::paths::MAX_PATH;
        let name = "n".repeat(254);
        let mut path = vec![name.as_str(); 16].join("/");
        path.push('/');
        path.push_str(&"p".repeat(MAX_PATH - path.len()));
        let mut target = "./".repeat(MAX_PATH / 2 - 1);
        target.push_str(&"t".repeat(MAX_PATH - target.len()));
        pb::FileInfo {
            path,
            kind: pb::Kind::Symlink as i32,
            size: 0,
            mode: 0o7777,
            mtime_ns: i64::MIN,
            hash: Vec::new(),
            version: (0..MAX_VERSION_ENTRIES as u64)
                .map(|i| pb::Counter {
                    device: u64::MAX - i,
                    value: now_us + MAX_CLOCK_AHEAD_US,
                })
                .collect(),
            deleted: false,
            sequence: MAX_SEQUENCE,
            symlink_target: target,
            modified_by: u64::MAX,
            data: Vec::new(),
            author: vec![0xff; 32],
            signature: vec![0xff; crate::core::record::MAX_SIGNATURE],
            author_cert: vec![0xff; crate::core::authorship::MAX_AUTHOR_CERT],
            // Another writer's attestation (its certificate is the larger form).
            signed_ns: 0,
            attestation: Vec::new(),
            attested_by_ns: ((now_us + MAX_CLOCK_AHEAD_US) * 1000) as i64,
            attested_by_signature: vec![0xff; crate::core::record::MAX_SIGNATURE],
            attested_by: vec![0xfe; 32],
            attested_by_cert: vec![0xff; crate::core::authorship::MAX_AUTHOR_CERT],
        }
    }

    #[test]
    fn the_largest_record_the_wire_accepts_is_stored_and_reloaded() {
        let now = crate::clock::now_us();
        let f = largest_record(now);
        assert_eq!((f.path.len(), f.symlink_target.len()), (4096, 4096));
        let (record, sequence) = record_from_wire(f, now).expect("the wire accepts it");
        let entry = Entry {
            record: record.into(),
            sequence,
            stat: Some(LocalStat {
                size: u64::MAX,
                mtime_ns: i64::MIN,
                mode: u32::MAX,
                ino: u64::MAX,
                ctime_ns: i64::MIN,
            }),
            learned_ns: i64::MAX,
        };
        let mut bytes = MAGIC.to_vec();
        encode(&entry, &mut bytes);
        let len = bytes.len() - MAGIC.len() - 8;
        assert!(len <= MAX_ENTRY, "{len} bytes > MAX_ENTRY");
        eprintln!("largest entry: {len} bytes of {MAX_ENTRY}");
        let mut ix = Index::new(ShortId(1));
        let rep = load_bytes_at(&bytes, &mut ix, now);
        assert!(rep.damaged.is_none() && rep.skipped.is_empty(), "{rep:?}");
        assert_eq!(ix.get(&entry.record.path).unwrap().record, entry.record);
    }

    #[test]
    fn learned_times_are_stored_and_an_old_store_loads_as_learned_now() {
        let now = 1_000_000_000_000;
        let (record, sequence) = record_from_wire(largest_record(now), now).unwrap();
        let mut entry = Entry {
            record: record.into(),
            sequence,
            stat: None,
            learned_ns: 5_000,
        };
        let load = |e: &Entry| {
            let mut bytes = MAGIC.to_vec();
            encode(e, &mut bytes);
            let mut ix = Index::new(ShortId(1));
            load_bytes_at(&bytes, &mut ix, now);
            ix.get(&e.record.path).unwrap().learned_ns
        };
        assert_eq!(load(&entry), 5_000);
        // Written before learned times were kept: never 1970, the load time.
        entry.learned_ns = 0;
        assert_eq!(load(&entry), (now * 1000) as i64);
    }

    #[test]
    fn bad_entries_are_skipped_and_the_rest_still_loads() {
        let now = 1_000_000_000_000;
        let entry = |name: &str, counter: u64| {
            let mut record = record_from_wire(largest_record(now), now).unwrap().0;
            record.path = RelPath::parse(name).unwrap();
            record.target = "x".into();
            record.version =
                crate::core::version::VersionVector::from_pairs(vec![(ShortId(2), counter)]);
            Entry {
                record: record.into(),
                sequence: counter,
                stat: None,
                learned_ns: 1,
            }
        };
        let mut bytes = MAGIC.to_vec();
        encode(&entry("a", 5), &mut bytes);
        // A corrupted counter (a frozen path if it were loaded).
        encode(&entry("b", u64::MAX), &mut bytes);
        // An intact entry longer than MAX_ENTRY (as an older build could write).
        let body = vec![0u8; MAX_ENTRY + 1];
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&checksum(&body));
        bytes.extend_from_slice(&body);
        encode(&entry("c", 6), &mut bytes);
        let mut ix = Index::new(ShortId(1));
        let rep = load_bytes_at(&bytes, &mut ix, now);
        assert!(rep.damaged.is_none(), "{rep:?}");
        assert_eq!((rep.entries, rep.skipped_count), (2, 2), "{rep:?}");
        assert!(rep.skipped[0].contains("ahead"), "{rep:?}");
        let mut paths: Vec<&str> = ix.entries().map(|e| e.record.path.as_str()).collect();
        paths.sort();
        assert_eq!(paths, ["a", "c"]);
    }
}

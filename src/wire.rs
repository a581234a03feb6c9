//! The wire format: prost types generated from `proto/certmesh.proto`, their
//! conversion to and from domain types (validating everything a peer sends), and
//! length-prefixed framing with a hard size limit.

use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::identity::ShortId;
use crate::index::{ContentHash, FileRecord, Kind};
use crate::paths::{PathError, RelPath};
use crate::version::VersionVector;

/// Generated protobuf types.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/certmesh.v1.rs"));
}

/// Largest control frame accepted (an index batch of ~1000 records fits easily).
pub const MAX_FRAME: usize = 4 << 20;
/// Largest request/response header.
pub const MAX_HEADER: usize = 8 << 10;
/// Records per index batch sent.
pub const INDEX_BATCH: usize = 1000;
/// Largest file whose content may travel inline in an index increment.
pub const MAX_INLINE: usize = 16 << 10;
/// Largest version vector accepted (one entry per device that ever wrote the path).
pub const MAX_VERSION_ENTRIES: usize = 4096;

/// Time a frame may take once its first byte arrived, before its length is counted.
pub const FRAME_BASE_TIME: Duration = Duration::from_secs(10);
/// Slowest rate a started frame may arrive at (bytes per second) beyond the base.
pub const FRAME_MIN_RATE: usize = 64 << 10;

/// How long a frame of `len` bytes may take from its first byte to its last: a peer
/// that starts a frame and then trickles (slow-loris) or stops is cut off.
pub fn frame_deadline(len: usize) -> Duration {
    deadline_from(FRAME_BASE_TIME, len)
}

fn deadline_from(base: Duration, len: usize) -> Duration {
    base + Duration::from_secs((len / FRAME_MIN_RATE) as u64)
}

/// A peer sent something it must not.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A length prefix above the limit.
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    /// Bytes that are not a valid protobuf message.
    #[error("undecodable message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A message that decodes but breaks a rule.
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    /// A path that would leave the tree or is not allowed.
    #[error("refused path: {0}")]
    Path(#[from] PathError),
    /// The stream failed or ended early.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// A frame was started but not completed in time.
    #[error("frame of {len} bytes not completed within {within:?} ({got} bytes arrived)")]
    Stalled {
        len: usize,
        got: usize,
        within: Duration,
    },
}

fn invalid(what: &'static str, why: impl Into<String>) -> WireError {
    WireError::Invalid {
        what,
        why: why.into(),
    }
}

/// Converts a local record for sending.
pub fn record_to_wire(r: &FileRecord, sequence: u64) -> pb::FileInfo {
    pb::FileInfo {
        path: r.path.as_str().to_string(),
        kind: match r.kind {
            Kind::File => pb::Kind::File,
            Kind::Directory => pb::Kind::Directory,
            Kind::Symlink => pb::Kind::Symlink,
        } as i32,
        size: r.size,
        mode: r.mode,
        mtime_ns: r.mtime_ns,
        hash: if r.kind == Kind::File && !r.deleted {
            r.hash.0.to_vec()
        } else {
            Vec::new()
        },
        version: r
            .version
            .pairs()
            .iter()
            .map(|(d, v)| pb::Counter {
                device: d.0,
                value: *v,
            })
            .collect(),
        deleted: r.deleted,
        sequence,
        symlink_target: r.target.clone(),
        modified_by: r.modified_by.0,
        data: Vec::new(),
    }
}

/// Validates a received record: path, hash, symlink target, version, mode.
pub fn record_from_wire(f: pb::FileInfo) -> Result<(FileRecord, u64), WireError> {
    let path = RelPath::parse_shared(&f.path)?;
    let kind = match pb::Kind::try_from(f.kind) {
        Ok(pb::Kind::File) => Kind::File,
        Ok(pb::Kind::Directory) => Kind::Directory,
        Ok(pb::Kind::Symlink) => Kind::Symlink,
        Err(_) => {
            return Err(invalid(
                "record",
                format!("{path}: unknown kind {}", f.kind),
            ))
        }
    };
    if f.version.is_empty() || f.version.len() > MAX_VERSION_ENTRIES {
        return Err(invalid(
            "record",
            format!("{path}: {} version entries", f.version.len()),
        ));
    }
    let version = VersionVector::from_pairs(
        f.version
            .iter()
            .map(|c| (ShortId(c.device), c.value))
            .collect(),
    );
    if version.is_empty() {
        return Err(invalid("record", format!("{path}: all-zero version")));
    }
    let mut hash = ContentHash::default();
    if kind == Kind::File && !f.deleted {
        if f.hash.len() != 32 {
            return Err(invalid(
                "record",
                format!("{path}: hash of {} bytes", f.hash.len()),
            ));
        }
        hash.0.copy_from_slice(&f.hash);
    } else if !f.hash.is_empty() {
        return Err(invalid("record", format!("{path}: hash on a non-file")));
    }
    if kind == Kind::Symlink && !f.deleted {
        path.check_symlink_target(&f.symlink_target)?;
    } else if !f.symlink_target.is_empty() {
        return Err(invalid(
            "record",
            format!("{path}: link target on a non-symlink"),
        ));
    }
    if f.mode & !0o7777 != 0 {
        return Err(invalid("record", format!("{path}: mode {:o}", f.mode)));
    }
    Ok((
        FileRecord {
            path,
            kind,
            size: if kind == Kind::File { f.size } else { 0 },
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            hash,
            target: f.symlink_target,
            version,
            deleted: f.deleted,
            modified_by: ShortId(f.modified_by),
        },
        f.sequence,
    ))
}

/// Validates content sent inline with a record: small, a live file, matching hash.
pub fn check_inline(r: &FileRecord, data: &[u8]) -> Result<(), WireError> {
    if data.len() > MAX_INLINE || r.kind != Kind::File || r.deleted || data.len() as u64 != r.size {
        return Err(invalid(
            "inline content",
            format!("{}: {} bytes not acceptable", r.path, data.len()),
        ));
    }
    if blake3::hash(data).as_bytes() != &r.hash.0 {
        return Err(invalid(
            "inline content",
            format!("{}: content does not match its BLAKE3 hash", r.path),
        ));
    }
    Ok(())
}

/// Writes one length-prefixed message.
pub async fn write_msg<W: AsyncWrite + Unpin, M: Message>(
    w: &mut W,
    m: &M,
) -> Result<(), WireError> {
    let len = m.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut buf)
        .map_err(|e| invalid("outgoing message", e.to_string()))?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one length-prefixed message of at most `limit` bytes; `None` at a clean end.
/// Waiting for a frame to start is unbounded (the caller decides about idle peers);
/// once its first byte is here the rest must follow within [`frame_deadline`], and
/// memory grows only as bytes arrive.
pub async fn read_msg<R: AsyncRead + Unpin, M: Message + Default>(
    r: &mut R,
    limit: usize,
) -> Result<Option<M>, WireError> {
    read_msg_within(r, limit, FRAME_BASE_TIME).await
}

async fn read_msg_within<R: AsyncRead + Unpin, M: Message + Default>(
    r: &mut R,
    limit: usize,
    base: Duration,
) -> Result<Option<M>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let started = tokio::time::Instant::now();
    let stalled = |len, got| WireError::Stalled {
        len,
        got,
        within: deadline_from(base, len),
    };
    tokio::time::timeout(base, r.read_exact(&mut len[1..]))
        .await
        .map_err(|_| stalled(0, 1))??;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(WireError::TooLarge(len, limit));
    }
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    let mut body = (&mut *r).take(len as u64);
    let body = body.read_to_end(&mut buf);
    match tokio::time::timeout_at(started + deadline_from(base, len), body).await {
        Ok(Ok(_)) if buf.len() == len => {}
        Ok(Ok(_)) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(stalled(len, buf.len())),
    }
    Ok(Some(M::decode(buf.as_slice())?))
}

/// Decodes a frame from bytes already read (the fuzz entry point).
pub fn decode_frame(bytes: &[u8]) -> Result<pb::Frame, WireError> {
    if bytes.len() > MAX_FRAME {
        return Err(WireError::TooLarge(bytes.len(), MAX_FRAME));
    }
    let frame = pb::Frame::decode(bytes)?;
    if let Some(pb::frame::Body::Index(ix)) = &frame.body {
        for f in &ix.files {
            let (r, _) = record_from_wire(f.clone())?;
            if !f.data.is_empty() {
                check_inline(&r, &f.data)?;
            }
        }
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn a_started_frame_that_stalls_is_cut_off() {
        let base = Duration::from_millis(50);
        // A 1000-byte frame of which 3 bytes ever arrive.
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&[0, 0, 3, 0xe8, 1, 2, 3]).await.unwrap();
        let r: Result<Option<pb::Frame>, _> = read_msg_within(&mut server, MAX_FRAME, base).await;
        match r {
            Err(WireError::Stalled {
                len: 1000, got: 3, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // A length prefix that stops after one byte.
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&[0]).await.unwrap();
        let r: Result<Option<pb::Frame>, _> = read_msg_within(&mut server, MAX_FRAME, base).await;
        assert!(matches!(r, Err(WireError::Stalled { .. })), "{r:?}");
        // A stream that ends inside a frame is an error, a clean end is `None`.
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        drop(client);
        let r: Result<Option<pb::Frame>, _> = read_msg_within(&mut server, MAX_FRAME, base).await;
        assert!(matches!(r, Err(WireError::Io(_))), "{r:?}");
        let (client, mut server) = tokio::io::duplex(1 << 16);
        drop(client);
        let r: Option<pb::Frame> = read_msg(&mut server, MAX_FRAME).await.unwrap();
        assert!(r.is_none());
        assert_eq!(frame_deadline(4 << 20), Duration::from_secs(74));
    }

    fn sample() -> FileRecord {
        FileRecord {
            path: RelPath::parse("live/www/privkey.pem").unwrap(),
            kind: Kind::File,
            size: 1700,
            mode: 0o600,
            mtime_ns: 1_700_000_000_123_456_789,
            hash: ContentHash([7; 32]),
            target: String::new(),
            version: VersionVector::from_pairs(vec![(ShortId(1), 2), (ShortId(9), 1)]),
            deleted: false,
            modified_by: ShortId(9),
        }
    }

    #[test]
    fn snapshot_file_info() {
        let bytes = record_to_wire(&sample(), 42).encode_to_vec();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0a146c6976652f7777772f707269766b65792e70656d18a40d20800328959a97ece39fe7cb17\
             322007070707070707070707070707070707070707070707070707070707070707073a04\
             080110023a0408091001482a5809",
            "the FileInfo encoding drifted"
        );
    }

    #[test]
    fn snapshot_frames() {
        let cases: Vec<(pb::Frame, &str)> = vec![
            (
                pb::Frame {
                    body: Some(pb::frame::Body::Hello(pb::Hello {
                        name: "lb0".into(),
                        instance: 5,
                        version: "0.1.0".into(),
                    })),
                },
                "0a0e0a036c623010051a05302e312e30",
            ),
            (
                pb::Frame {
                    body: Some(pb::frame::Body::Ack(pb::Ack { sequence: 300 })),
                },
                "1a0308ac02",
            ),
            (
                pb::Frame {
                    body: Some(pb::frame::Body::Index(pb::IndexUpdate {
                        files: vec![],
                        last_sequence: 7,
                        full: true,
                        full_done: true,
                    })),
                },
                "12061007180120 01",
            ),
        ];
        for (frame, hex) in cases {
            let got: String = frame
                .encode_to_vec()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, hex.replace(' ', ""), "{frame:?}");
            assert_eq!(decode_frame(&frame.encode_to_vec()).unwrap(), frame);
        }
        let req = pb::Request {
            path: "a".into(),
            hash: vec![1, 2],
        };
        assert_eq!(req.encode_to_vec(), vec![0x0a, 1, b'a', 0x12, 2, 1, 2]);
        let resp = pb::Response {
            status: pb::response::Status::NotFound as i32,
            size: 0,
        };
        assert_eq!(resp.encode_to_vec(), vec![0x08, 1]);
    }

    #[test]
    fn hostile_records_are_refused() {
        let good = record_to_wire(&sample(), 1);
        for (mutate, what) in [
            (
                Box::new(|f: &mut pb::FileInfo| f.path = "../etc/passwd".into())
                    as Box<dyn Fn(&mut pb::FileInfo)>,
                "dotdot",
            ),
            (
                Box::new(|f: &mut pb::FileInfo| f.path = "/etc/passwd".into()),
                "absolute",
            ),
            (
                Box::new(|f: &mut pb::FileInfo| f.path = "a\0b".into()),
                "nul",
            ),
            (
                Box::new(|f: &mut pb::FileInfo| f.path = ".certmesh/conflicts/x".into()),
                "local-only",
            ),
            (
                Box::new(|f: &mut pb::FileInfo| f.hash = vec![1; 31]),
                "short hash",
            ),
            (
                Box::new(|f: &mut pb::FileInfo| f.version.clear()),
                "no version",
            ),
            (
                Box::new(|f: &mut pb::FileInfo| f.mode = 0o170000),
                "file type bits",
            ),
            (
                Box::new(|f: &mut pb::FileInfo| {
                    f.kind = pb::Kind::Symlink as i32;
                    f.hash.clear();
                    f.symlink_target = "../../../etc".into();
                }),
                "escaping symlink",
            ),
        ] {
            let mut f = good.clone();
            mutate(&mut f);
            assert!(record_from_wire(f).is_err(), "{what} accepted");
        }
        assert!(record_from_wire(good).is_ok());
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocation() {
        let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0];
        let r: Result<Option<pb::Frame>, _> = read_msg(&mut bytes, MAX_FRAME).await;
        assert!(matches!(r, Err(WireError::TooLarge(..))));
    }

    fn arb_record() -> impl Strategy<Value = FileRecord> {
        (
            "[a-z]{1,8}(/[a-zA-Z0-9 ._é-]{1,12}){0,3}",
            0u8..3,
            any::<u64>(),
            0u32..0o7777,
            any::<i64>(),
            any::<[u8; 32]>(),
            prop::collection::vec((any::<u64>(), 1u64..1000), 1..5),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_filter_map(
                "valid path",
                |(p, k, size, mode, mtime, hash, vv, deleted, by)| {
                    let path = RelPath::parse(&p).ok()?;
                    if path.name() == "." || path.name() == ".." || path.is_local_only() {
                        return None;
                    }
                    let kind = [Kind::File, Kind::Directory, Kind::Symlink][k as usize];
                    let is_link = kind == Kind::Symlink && !deleted;
                    Some(FileRecord {
                        target: if is_link {
                            path.name().to_string()
                        } else {
                            String::new()
                        },
                        path,
                        kind,
                        size: if kind == Kind::File { size } else { 0 },
                        mode,
                        mtime_ns: mtime,
                        hash: if kind == Kind::File && !deleted {
                            ContentHash(hash)
                        } else {
                            ContentHash::default()
                        },
                        version: VersionVector::from_pairs(
                            vv.into_iter().map(|(d, v)| (ShortId(d), v)).collect(),
                        ),
                        deleted,
                        modified_by: ShortId(by),
                    })
                },
            )
    }

    proptest! {
        #[test]
        fn record_round_trips(r in arb_record(), seq in any::<u64>()) {
            let bytes = record_to_wire(&r, seq).encode_to_vec();
            let back = record_from_wire(pb::FileInfo::decode(bytes.as_slice()).unwrap()).unwrap();
            prop_assert_eq!(back, (r, seq));
        }

        #[test]
        fn frames_round_trip(name in ".{0,20}", inst in any::<u64>(), seq in any::<u64>(), rs in prop::collection::vec(arb_record(), 0..4)) {
            for frame in [
                pb::Frame { body: Some(pb::frame::Body::Hello(pb::Hello { name: name.clone(), instance: inst, version: "1".into() })) },
                pb::Frame { body: Some(pb::frame::Body::Ack(pb::Ack { sequence: seq })) },
                pb::Frame { body: Some(pb::frame::Body::Index(pb::IndexUpdate {
                    files: rs.iter().map(|r| record_to_wire(r, seq)).collect(),
                    last_sequence: seq, full: inst % 2 == 0, full_done: false })) },
            ] {
                prop_assert_eq!(decode_frame(&frame.encode_to_vec()).unwrap(), frame);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
        }
    }
}

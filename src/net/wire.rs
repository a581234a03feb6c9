//! The wire format on a stream: length-prefixed framing with a hard size limit, a
//! precheck of a frame's raw bytes, and validation of a whole frame. The protobuf
//! types and the record codec are [`crate::core::codec`]'s.

use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::clock::now_us;
use crate::core::codec::{
    invalid, pb, record_from_wire, WireError, MAX_SEQUENCE, MAX_VERSION_ENTRIES,
};
use crate::core::record::{FileRecord, Kind};

pub mod cluster;
pub mod served;

/// Largest control frame accepted (an index batch of ~1000 records fits easily).
pub const MAX_FRAME: usize = 4 << 20;
/// Largest request/response header.
pub const MAX_HEADER: usize = 8 << 10;
/// Records per index batch sent.
pub const INDEX_BATCH: usize = 1000;
/// Largest file whose content may travel inline in an index increment.
pub const MAX_INLINE: usize = crate::core::engine::MAX_INLINE;
/// Most records one index frame may carry (a sender batches `INDEX_BATCH`). Counted
/// on the raw bytes before decoding: a 4 MiB frame of empty entries would otherwise
/// decode to ~350 MiB of structs before any record is looked at.
pub const MAX_FRAME_RECORDS: usize = 2 * INDEX_BATCH;
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

/// Validates a peer's ack: it cannot have processed more of our records than we have.
pub fn check_ack(sequence: u64, ours: u64) -> Result<(), WireError> {
    if sequence > ours {
        return Err(invalid(
            "ack",
            format!("acknowledges sequence {sequence}, ours is only {ours}"),
        ));
    }
    Ok(())
}

/// Validates an index frame's `last_sequence`.
pub fn check_last_sequence(last_sequence: u64) -> Result<(), WireError> {
    if last_sequence > MAX_SEQUENCE {
        return Err(invalid(
            "index",
            format!("last_sequence {last_sequence} beyond {MAX_SEQUENCE}"),
        ));
    }
    Ok(())
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
pub async fn read_msg<R: AsyncRead + Unpin, M: WireMessage>(
    r: &mut R,
    limit: usize,
) -> Result<Option<M>, WireError> {
    read_msg_within(r, limit, FRAME_BASE_TIME).await
}

async fn read_msg_within<R: AsyncRead + Unpin, M: WireMessage>(
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
    M::precheck(&buf)?;
    Ok(Some(M::decode(buf.as_slice())?))
}

/// A message [`read_msg`] reads: its raw bytes are checked before it is decoded.
pub trait WireMessage: Message + Default {
    /// Refuses bytes whose decoding would allocate far more than their own size.
    fn precheck(_bytes: &[u8]) -> Result<(), WireError> {
        Ok(())
    }
}

impl WireMessage for pb::Frame {
    fn precheck(bytes: &[u8]) -> Result<(), WireError> {
        precheck_frame(bytes)
    }
}
impl WireMessage for pb::Request {}
impl WireMessage for pb::Response {}

fn read_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Walks the fields of one protobuf message without allocating, calling `f` with the
/// number and body of each length-delimited field. Groups (unused by certmesh) and
/// anything malformed are refused.
fn for_each_len_field(
    b: &[u8],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let bad = || invalid("frame", "malformed protobuf");
    let mut pos = 0;
    while pos < b.len() {
        let key = read_varint(b, &mut pos).ok_or_else(bad)?;
        match key & 7 {
            0 => {
                read_varint(b, &mut pos).ok_or_else(bad)?;
            }
            1 => {
                pos = pos
                    .checked_add(8)
                    .filter(|p| *p <= b.len())
                    .ok_or_else(bad)?
            }
            5 => {
                pos = pos
                    .checked_add(4)
                    .filter(|p| *p <= b.len())
                    .ok_or_else(bad)?
            }
            2 => {
                let len = read_varint(b, &mut pos).ok_or_else(bad)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| pos.checked_add(l))
                    .filter(|e| *e <= b.len())
                    .ok_or_else(bad)?;
                f(key >> 3, &b[pos..end])?;
                pos = end;
            }
            _ => return Err(bad()),
        }
    }
    Ok(())
}

/// Counts, on the raw bytes of a `Frame`, the records of its index update(s) and the
/// version entries of each, refusing more than `MAX_FRAME_RECORDS` /
/// `MAX_VERSION_ENTRIES` before anything is decoded (and allocated).
pub fn precheck_frame(bytes: &[u8]) -> Result<(), WireError> {
    let mut records = 0usize;
    for_each_len_field(bytes, |field, index| {
        if field == 4 || field == 5 {
            return precheck_cluster(field, index);
        }
        if field == 6 {
            return served::precheck(index); // Frame.served
        }
        if field != 2 {
            return Ok(()); // Frame.index
        }
        for_each_len_field(index, |field, record| {
            if field != 1 {
                return Ok(()); // IndexUpdate.files
            }
            records += 1;
            if records > MAX_FRAME_RECORDS {
                return Err(invalid(
                    "index",
                    format!("more than {MAX_FRAME_RECORDS} records in one frame"),
                ));
            }
            let mut counters = 0usize;
            for_each_len_field(record, |field, _| {
                counters += usize::from(field == 7); // FileInfo.version
                if counters > MAX_VERSION_ENTRIES {
                    return Err(invalid(
                        "record",
                        format!("more than {MAX_VERSION_ENTRIES} version entries"),
                    ));
                }
                Ok(())
            })
        })
    })
}

/// Counts the device IDs and version entries of a `Confirm` (field 4 of `Frame`)
/// or the peers of a `Report` (field 5) before they are decoded (and allocated).
fn precheck_cluster(frame_field: u64, body: &[u8]) -> Result<(), WireError> {
    use crate::core::cluster::{MAX_ASKED, MAX_CONFIRM_BYTES, MAX_REPORT_PEERS};
    if frame_field == 4 && body.len() > MAX_CONFIRM_BYTES {
        return Err(invalid(
            "confirm",
            format!("{} bytes (at most {MAX_CONFIRM_BYTES})", body.len()),
        ));
    }
    let limits: &[(u64, usize)] = if frame_field == 4 {
        &[(7, MAX_ASKED), (4, MAX_VERSION_ENTRIES)] // Confirm.asked, Confirm.version
    } else {
        &[(5, MAX_REPORT_PEERS)] // Report.peers
    };
    let what = if frame_field == 4 {
        "confirm"
    } else {
        "report"
    };
    let mut counts = [0usize; 2];
    for_each_len_field(body, |field, _| {
        for (i, (f, max)) in limits.iter().enumerate() {
            if field == *f {
                counts[i] += 1;
                if counts[i] > *max {
                    return Err(invalid(what, format!("more than {max} entries")));
                }
            }
        }
        Ok(())
    })
}

/// Decodes a frame from bytes already read (the fuzz entry point), at this node's
/// clock.
pub fn decode_frame(bytes: &[u8]) -> Result<pb::Frame, WireError> {
    decode_frame_at(bytes, now_us())
}

/// Decodes and validates a frame as a receiver whose clock reads `now_us`.
pub fn decode_frame_at(bytes: &[u8], now_us: u64) -> Result<pb::Frame, WireError> {
    if bytes.len() > MAX_FRAME {
        return Err(WireError::TooLarge(bytes.len(), MAX_FRAME));
    }
    precheck_frame(bytes)?;
    let frame = pb::Frame::decode(bytes)?;
    match &frame.body {
        Some(pb::frame::Body::Index(ix)) => {
            check_last_sequence(ix.last_sequence)?;
            for f in &ix.files {
                let (r, _) = record_from_wire(f.clone(), now_us)?;
                if !f.data.is_empty() {
                    check_inline(&r, &f.data)?;
                }
            }
        }
        Some(pb::frame::Body::Confirm(c)) => {
            cluster::confirm_from_wire(c.clone())?;
        }
        Some(pb::frame::Body::Report(r)) => {
            cluster::report_from_wire(r.clone())?;
        }
        Some(pb::frame::Body::Served(s)) => {
            served::served_from_wire(s.clone())?;
        }
        _ => {}
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::authorship::MAX_AUTHOR_CERT;
    use crate::core::codec::{record_to_wire, MAX_CLOCK_AHEAD_US};
    use crate::core::device::ShortId;
    use crate::core::paths::RelPath;
    use crate::core::record::ContentHash;
    use crate::core::record::MAX_SIGNATURE;
    use crate::core::version::VersionVector;
    use proptest::prelude::*;

    /// The receiver's clock in these tests (µs): 2023-11-14.
    const NOW: u64 = 1_700_000_000_000_000;

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
            auth: None,
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
                        relays_confirm: false,
                        takes_served: false,
                        signs_reports: false,
                    })),
                },
                "0a0e0a036c623010051a05302e312e30",
            ),
            (
                pb::Frame {
                    body: Some(pb::frame::Body::Hello(pb::Hello {
                        name: "lb0".into(),
                        instance: 5,
                        version: "0.1.0".into(),
                        relays_confirm: true,
                        takes_served: false,
                        signs_reports: true,
                    })),
                },
                "0a120a036c623010051a05302e312e3020013001",
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
    fn another_writers_attestation_travels_in_its_own_fields() {
        let author = crate::core::authorship::tests::signer();
        let other = crate::core::authorship::tests::signer();
        let mut r = sample();
        r.modified_by = author.id().short();
        r.version = VersionVector::from_pairs(vec![(author.id().short(), 3)]);
        assert!(crate::core::authorship::sign(&mut r, &author, 1));
        assert!(crate::core::authorship::reattest(&mut r, &other, 2));
        let f = record_to_wire(&r, 1);
        // A node that predates it sees a v1 record (no attestation it would refuse).
        assert_eq!((f.signed_ns, f.attestation.len()), (0, 0));
        assert_eq!(record_from_wire(f.clone(), now_us()).unwrap().0, r);
        let cases: [fn(&mut pb::FileInfo); 5] = [
            |f| f.attested_by.clear(),
            |f| f.attested_by_cert.clear(),
            |f| f.attested_by_cert = vec![1; MAX_AUTHOR_CERT + 1],
            |f| f.attested_by_signature.clear(),
            |f| (f.signed_ns, f.attestation) = (1, vec![1; 8]),
        ];
        for case in cases {
            let mut bad = f.clone();
            case(&mut bad);
            let err = record_from_wire(bad, now_us()).unwrap_err().to_string();
            assert!(err.contains("live/www/privkey.pem"), "{err}");
        }
    }

    #[test]
    fn authorship_travels_intact_and_malformed_authorship_is_refused() {
        let signer = crate::core::authorship::tests::signer();
        let mut r = sample();
        r.modified_by = signer.id().short();
        r.version = VersionVector::from_pairs(vec![(signer.id().short(), 3)]);
        assert!(crate::core::authorship::sign(&mut r, &signer, 1));
        let f = record_to_wire(&r, 1);
        let back = record_from_wire(f.clone(), now_us()).unwrap().0;
        assert_eq!(back, r);
        let cases: [fn(&mut pb::FileInfo); 9] = [
            |f| f.attestation.clear(),
            |f| f.attestation = vec![1; MAX_SIGNATURE + 1],
            |f| f.signed_ns = -1,
            |f| f.signed_ns = i64::MAX,
            |f| f.author.truncate(31),
            |f| f.signature.clear(),
            |f| f.signature = vec![1; MAX_SIGNATURE + 1],
            |f| f.author_cert.clear(),
            |f| f.author_cert = vec![1; MAX_AUTHOR_CERT + 1],
        ];
        for mutate in cases {
            let mut bad = f.clone();
            mutate(&mut bad);
            let err = record_from_wire(bad, now_us()).unwrap_err().to_string();
            assert!(err.contains("live/www/privkey.pem"), "{err}");
        }
        // None at all: an unsigned record (an older node).
        let (f_author, f_signature, f_cert) =
            (f.author.clone(), f.signature.clone(), f.author_cert.clone());
        let mut unsigned = f;
        (unsigned.author, unsigned.signature, unsigned.author_cert) = Default::default();
        let mut attested_only = unsigned.clone();
        (unsigned.signed_ns, unsigned.attestation) = Default::default();
        assert!(record_from_wire(attested_only.clone(), now_us()).is_err());
        // A record from a node that predates attestations: v1 only.
        (
            attested_only.author,
            attested_only.signature,
            attested_only.author_cert,
        ) = (f_author, f_signature, f_cert);
        (attested_only.signed_ns, attested_only.attestation) = Default::default();
        let v1 = record_from_wire(attested_only, now_us()).unwrap().0;
        assert!(v1.auth.is_some_and(|a| a.attestation.is_none()));
        assert!(record_from_wire(unsigned, now_us())
            .unwrap()
            .0
            .auth
            .is_none());
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
            assert!(record_from_wire(f, NOW).is_err(), "{what} accepted");
        }
        assert!(record_from_wire(good, NOW).is_ok());
    }

    #[test]
    fn counters_ahead_of_the_clock_are_refused() {
        let with_counter = |value: u64| {
            let mut f = record_to_wire(&sample(), 1);
            f.version[1].value = value;
            record_from_wire(f, NOW)
        };
        assert!(with_counter(NOW + MAX_CLOCK_AHEAD_US).is_ok());
        for value in [NOW + MAX_CLOCK_AHEAD_US + 1, u64::MAX] {
            let e = with_counter(value).unwrap_err().to_string();
            assert!(
                e.contains("live/www/privkey.pem")
                    && e.contains(&value.to_string())
                    && e.contains("0000000000000009"),
                "{e}"
            );
        }
    }

    #[test]
    fn sequences_and_acks_beyond_the_bounds_are_refused() {
        let mut f = record_to_wire(&sample(), MAX_SEQUENCE);
        assert!(record_from_wire(f.clone(), NOW).is_ok());
        f.sequence = MAX_SEQUENCE + 1;
        assert!(record_from_wire(f, NOW).is_err());
        assert!(check_last_sequence(MAX_SEQUENCE).is_ok());
        assert!(check_last_sequence(u64::MAX).is_err());
        assert!(check_ack(7, 7).is_ok());
        assert!(check_ack(8, 7).is_err());
        assert!(check_ack(u64::MAX, 7).is_err());
        let ack = pb::Frame {
            body: Some(pb::frame::Body::Index(pb::IndexUpdate {
                last_sequence: u64::MAX,
                ..Default::default()
            })),
        };
        assert!(decode_frame(&ack.encode_to_vec()).is_err());
    }

    /// A `MAX_FRAME` frame of index entries that are all empty (2 bytes each).
    fn frame_of_empty_entries() -> Vec<u8> {
        let n = (MAX_FRAME - 16) / 2;
        let mut inner = Vec::with_capacity(2 * n);
        for _ in 0..n {
            inner.extend_from_slice(&[0x0a, 0x00]);
        }
        let mut frame = vec![0x12];
        prost::encoding::encode_varint(inner.len() as u64, &mut frame);
        frame.extend_from_slice(&inner);
        frame
    }

    #[tokio::test]
    async fn a_frame_of_empty_entries_is_refused_before_decoding() {
        let frame = frame_of_empty_entries();
        assert!(frame.len() <= MAX_FRAME && frame.len() > MAX_FRAME - 32);
        let start = std::time::Instant::now();
        let e = decode_frame(&frame).unwrap_err();
        assert!(e.to_string().contains("records in one frame"), "{e}");
        let mut framed = (frame.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&frame);
        let r: Result<Option<pb::Frame>, _> = read_msg(&mut framed.as_slice(), MAX_FRAME).await;
        assert!(
            matches!(r, Err(WireError::Invalid { what: "index", .. })),
            "{r:?}"
        );
        // Refused after walking ~4 KiB, not after decoding 2 million structs.
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        // At the bound it is accepted (as far as counting goes).
        let mut ok = vec![0x12];
        prost::encoding::encode_varint(2 * MAX_FRAME_RECORDS as u64, &mut ok);
        ok.extend(std::iter::repeat_n([0x0a, 0x00], MAX_FRAME_RECORDS).flatten());
        assert!(precheck_frame(&ok).is_ok());
    }

    #[test]
    fn version_entries_are_counted_before_decoding() {
        let mut f = record_to_wire(&sample(), 1);
        f.version = (0..=MAX_VERSION_ENTRIES as u64)
            .map(|d| pb::Counter {
                device: d,
                value: 1,
            })
            .collect();
        let frame = pb::Frame {
            body: Some(pb::frame::Body::Index(pb::IndexUpdate {
                files: vec![f],
                ..Default::default()
            })),
        };
        let e = precheck_frame(&frame.encode_to_vec()).unwrap_err();
        assert!(e.to_string().contains("version entries"), "{e}");
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
            // Counters up to the clock bound of a receiver at NOW.
            prop::collection::vec((any::<u64>(), 1u64..=NOW + MAX_CLOCK_AHEAD_US), 1..5),
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
                        auth: None,
                    })
                },
            )
    }

    proptest! {
        #[test]
        fn record_round_trips(r in arb_record(), seq in 0..=MAX_SEQUENCE) {
            let bytes = record_to_wire(&r, seq).encode_to_vec();
            let back = record_from_wire(pb::FileInfo::decode(bytes.as_slice()).unwrap(), NOW).unwrap();
            prop_assert_eq!(back, (r, seq));
        }

        #[test]
        fn frames_round_trip(name in ".{0,20}", inst in any::<u64>(), seq in 0..=MAX_SEQUENCE, rs in prop::collection::vec(arb_record(), 0..4)) {
            for frame in [
                pb::Frame { body: Some(pb::frame::Body::Hello(pb::Hello { name: name.clone(), instance: inst, version: "1".into(), relays_confirm: false, takes_served: false, signs_reports: false })) },
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

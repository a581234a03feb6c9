//! Serving-probe reports (issue 26) on the wire: [`ServedRecord`]s to and from the
//! protobuf `Served` frame, every bound checked on receipt (count, names, leaf
//! hash of 32 bytes, a leaf or an error). The sender cuts its report at
//! [`SEND_BYTES`], well under the frame limit.

use super::{for_each_len_field, invalid, pb, WireError};
use crate::core::served::{ServedRecord, MAX_SERVED_RECORDS};

/// Most encoded bytes of records one `Served` frame carries (the rest are left out).
pub const SEND_BYTES: usize = 3 << 20;

/// This node's records as one frame body (cut at [`SEND_BYTES`]).
pub fn served_to_wire(records: &[ServedRecord]) -> pb::Served {
    use prost::Message;
    let mut probes = Vec::with_capacity(records.len());
    let mut bytes = 0;
    for r in records {
        let p = pb::ServedProbe {
            cert: r.cert.clone(),
            frontend: r.frontend.clone(),
            leaf_sha256: r.leaf_sha256.map(|h| h.to_vec()).unwrap_or_default(),
            not_after_unix: r.not_after_unix.unwrap_or(0),
            error: r.error.clone().unwrap_or_default(),
            seen_unix: r.seen_unix,
            since_unix: r.since_unix,
        };
        bytes += p.encoded_len() + 4;
        if bytes > SEND_BYTES {
            tracing::warn!(
                sent = probes.len(),
                of = records.len(),
                "serving-probe report cut to fit one frame"
            );
            break;
        }
        probes.push(p);
    }
    pb::Served { probes }
}

/// Counts the probes of a `Served` (field 6 of `Frame`) on its raw bytes, refusing
/// more than [`MAX_SERVED_RECORDS`] before anything is decoded (and allocated): a
/// 4 MiB frame of empty probes would otherwise decode to about 2 million records.
pub fn precheck(body: &[u8]) -> Result<(), WireError> {
    let mut n = 0usize;
    for_each_len_field(body, |field, _| {
        n += usize::from(field == 1);
        if n > MAX_SERVED_RECORDS {
            return Err(invalid(
                "served",
                format!("more than {MAX_SERVED_RECORDS} records"),
            ));
        }
        Ok(())
    })
}

/// Validates a received report.
pub fn served_from_wire(s: pb::Served) -> Result<Vec<ServedRecord>, WireError> {
    const W: &str = "served";
    if s.probes.len() > MAX_SERVED_RECORDS {
        return Err(invalid(W, format!("{} records", s.probes.len())));
    }
    s.probes
        .into_iter()
        .map(|p| {
            let leaf_sha256 = match p.leaf_sha256.len() {
                0 => None,
                _ => Some(<[u8; 32]>::try_from(p.leaf_sha256.as_slice()).map_err(|_| {
                    invalid(W, format!("leaf hash of {} bytes", p.leaf_sha256.len()))
                })?),
            };
            let r = ServedRecord {
                cert: p.cert,
                frontend: p.frontend,
                not_after_unix: leaf_sha256.map(|_| p.not_after_unix),
                leaf_sha256,
                error: (!p.error.is_empty()).then_some(p.error),
                seen_unix: p.seen_unix,
                since_unix: p.since_unix,
            };
            r.check().map_err(|why| invalid(W, why))?;
            Ok(r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = ServedRecord> {
        (
            "[a-z.]{1,40}",
            "[a-z]{1,12}",
            proptest::option::of(any::<[u8; 32]>()),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(|(cert, frontend, leaf, t, seen)| ServedRecord {
                cert,
                frontend,
                leaf_sha256: leaf,
                not_after_unix: leaf.map(|_| t),
                error: leaf.is_none().then(|| "connection refused".into()),
                seen_unix: seen,
                since_unix: seen,
            })
    }

    proptest! {
        #[test]
        fn round_trip(records in proptest::collection::vec(record(), 0..20)) {
            let back = served_from_wire(served_to_wire(&records)).unwrap();
            prop_assert_eq!(back, records);
        }
    }

    #[test]
    fn fixed_bytes() {
        use prost::Message;
        let r = ServedRecord {
            cert: "w".into(),
            frontend: "n".into(),
            leaf_sha256: None,
            not_after_unix: None,
            error: Some("e".into()),
            seen_unix: 1,
            since_unix: 1,
        };
        let bytes = served_to_wire(&[r]).encode_to_vec();
        assert_eq!(
            bytes,
            [10, 13, 10, 1, b'w', 18, 1, b'n', 42, 1, b'e', 48, 1, 56, 1]
        );
    }

    #[test]
    fn a_frame_of_empty_probes_is_refused_before_decoding() {
        use prost::Message;
        let f = pb::Frame {
            body: Some(pb::frame::Body::Served(pb::Served {
                probes: vec![pb::ServedProbe::default(); MAX_SERVED_RECORDS + 1],
            })),
        };
        let err = super::super::precheck_frame(&f.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn a_bad_leaf_hash_is_refused() {
        let s = pb::Served {
            probes: vec![pb::ServedProbe {
                cert: "w".into(),
                frontend: "n".into(),
                leaf_sha256: vec![1; 31],
                ..Default::default()
            }],
        };
        assert!(served_from_wire(s).is_err());
    }
}

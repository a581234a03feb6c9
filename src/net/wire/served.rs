//! Serving-probe reports on the wire: [`SignedReport`]s to and from the
//! protobuf `Served` frame. On receipt every bound is checked before anything is
//! decoded or allocated (probe count, asked count, certificate and signature
//! sizes), then the origin's certificate must hash to its device ID and its key
//! must have signed [`signed_message`] — a node reports only for itself, whoever
//! relays it. The records are then decoded and checked ([`check_records`]).

use std::sync::Arc;

use prost::Message;

use super::for_each_len_field;
use crate::core::authorship::MAX_AUTHOR_CERT;
use crate::core::codec::{invalid, pb, WireError};
use crate::core::device::{cert_public_key, verify_p256, DeviceId};
use crate::core::record::MAX_SIGNATURE;
use crate::core::served::{
    check_records, signed_message, ServedRecord, SignedReport, MAX_ASKED, MAX_SERVED_NAME,
    MAX_SERVED_RECORDS,
};

/// Most bytes of an encoded list (the sender leaves out records beyond it).
pub const SEND_BYTES: usize = 3 << 20;

/// Encodes this node's records as the list it signs (cut at [`SEND_BYTES`]).
pub fn encode_list(records: &[ServedRecord]) -> Vec<u8> {
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
            since_ms: r.since_ms,
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
    pb::ServedList { probes }.encode_to_vec()
}

/// A report for sending.
pub fn served_to_wire(r: &SignedReport) -> pb::Served {
    pb::Served {
        origin: r.origin.0.to_vec(),
        origin_cert: r.origin_cert.to_vec(),
        generation: r.generation,
        name: r.name.clone(),
        list: r.list.to_vec(),
        signature: r.signature.to_vec(),
        asked: r.asked.iter().map(|d| d.0.to_vec()).collect(),
    }
}

/// Counts, on the raw bytes of a `Served` (field 6 of `Frame`), the asked IDs and
/// the probes inside its list, refusing more than the bounds before anything is
/// decoded: a 4 MiB frame of empty probes would otherwise decode to ~2 million.
pub fn precheck(body: &[u8]) -> Result<(), WireError> {
    let mut asked = 0usize;
    for_each_len_field(body, |field, value| {
        if field == 7 {
            asked += 1;
            if asked > MAX_ASKED {
                return Err(invalid("served", format!("more than {MAX_ASKED} asked")));
            }
        }
        if field == 5 {
            let mut n = 0usize;
            for_each_len_field(value, |f, _| {
                n += usize::from(f == 1);
                if n > MAX_SERVED_RECORDS {
                    return Err(invalid(
                        "served",
                        format!("more than {MAX_SERVED_RECORDS} records"),
                    ));
                }
                Ok(())
            })?;
        }
        Ok(())
    })
}

fn device(b: &[u8]) -> Result<DeviceId, WireError> {
    <[u8; 32]>::try_from(b)
        .map(DeviceId)
        .map_err(|_| invalid("served", format!("device ID of {} bytes", b.len())))
}

/// Checks a received report (bounds, the origin's certificate and signature) and
/// decodes its records.
pub fn served_from_wire(s: pb::Served) -> Result<(SignedReport, Vec<ServedRecord>), WireError> {
    const W: &str = "served";
    let origin = device(&s.origin)?;
    if s.origin_cert.len() > MAX_AUTHOR_CERT || s.signature.len() > MAX_SIGNATURE {
        return Err(invalid(W, "certificate or signature too large"));
    }
    if s.name.len() > MAX_SERVED_NAME || s.asked.len() > MAX_ASKED {
        return Err(invalid(W, "name or asked list too long"));
    }
    if DeviceId::of_cert(&s.origin_cert) != origin {
        return Err(invalid(W, "the certificate is not the origin's"));
    }
    let key = cert_public_key(&s.origin_cert).map_err(|e| invalid(W, e))?;
    let msg = signed_message(&origin, s.generation, &s.name, &s.list);
    if !verify_p256(&key, &msg, &s.signature) {
        return Err(invalid(W, "the signature does not match the report"));
    }
    let list = pb::ServedList::decode(s.list.as_slice())?;
    if list.probes.len() > MAX_SERVED_RECORDS {
        return Err(invalid(W, format!("{} records", list.probes.len())));
    }
    let records = list
        .probes
        .into_iter()
        .map(|p| {
            let leaf_sha256 = match p.leaf_sha256.len() {
                0 => None,
                _ => Some(<[u8; 32]>::try_from(p.leaf_sha256.as_slice()).map_err(|_| {
                    invalid(W, format!("leaf hash of {} bytes", p.leaf_sha256.len()))
                })?),
            };
            Ok(ServedRecord {
                cert: p.cert,
                frontend: p.frontend,
                not_after_unix: leaf_sha256.map(|_| p.not_after_unix),
                leaf_sha256,
                error: (!p.error.is_empty()).then_some(p.error),
                seen_unix: p.seen_unix,
                since_unix: p.since_unix,
                since_ms: p.since_ms,
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    check_records(&records).map_err(|why| invalid(W, why))?;
    let asked = s
        .asked
        .iter()
        .map(|a| device(a))
        .collect::<Result<Vec<_>, _>>()?;
    let report = SignedReport {
        origin,
        name: s.name,
        generation: s.generation,
        origin_cert: Arc::from(s.origin_cert),
        list: Arc::from(s.list),
        signature: Arc::from(s.signature),
        asked,
    };
    Ok((report, records))
}

/// Signs this node's `records` as report `generation` (the probes do this after
/// each round). `None` if the key cannot sign.
pub fn sign_report(
    signer: &crate::core::device::NodeSigner,
    name: &str,
    generation: u64,
    records: &[ServedRecord],
) -> Option<SignedReport> {
    let mut name = name.to_string();
    if name.len() > MAX_SERVED_NAME {
        let mut end = MAX_SERVED_NAME;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    let list = encode_list(records);
    let signature = signer.sign(&signed_message(&signer.id(), generation, &name, &list))?;
    Some(SignedReport {
        origin: signer.id(),
        name,
        generation,
        origin_cert: signer.cert().clone(),
        list: Arc::from(list),
        signature: Arc::from(signature),
        asked: Vec::new(),
    })
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
                since_ms: seen.wrapping_mul(3),
            })
    }

    fn signer() -> crate::core::device::NodeSigner {
        crate::core::authorship::tests::signer()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn round_trip(records in proptest::collection::vec(record(), 0..20)) {
            let mut records = records;
            records.sort_by(|a, b| (&a.cert, &a.frontend).cmp(&(&b.cert, &b.frontend)));
            records.dedup_by(|a, b| a.cert == b.cert && a.frontend == b.frontend);
            let s = signer();
            let r = sign_report(&s, "lb1", 7, &records).unwrap();
            let (back, got) = served_from_wire(served_to_wire(&r)).unwrap();
            prop_assert_eq!(back, r);
            prop_assert_eq!(got, records);
        }
    }

    #[test]
    fn fixed_bytes_of_the_list() {
        let r = ServedRecord {
            cert: "w".into(),
            frontend: "n".into(),
            leaf_sha256: None,
            not_after_unix: None,
            error: Some("e".into()),
            seen_unix: 1,
            since_unix: 1,
            since_ms: 0,
        };
        assert_eq!(
            encode_list(&[r]),
            [10, 13, 10, 1, b'w', 18, 1, b'n', 42, 1, b'e', 48, 1, 56, 1]
        );
    }

    #[test]
    fn a_report_for_another_node_or_altered_on_the_way_is_refused() {
        let a = signer();
        let b = signer();
        let good = served_to_wire(&sign_report(&a, "a", 1, &[]).unwrap());
        let mut other = good.clone();
        other.origin = b.id().0.to_vec(); // claims b, a's certificate
        assert!(served_from_wire(other).is_err());
        let mut b_cert = good.clone();
        b_cert.origin = b.id().0.to_vec();
        b_cert.origin_cert = b.cert().to_vec(); // b's certificate, a's signature
        assert!(served_from_wire(b_cert).is_err());
        let mut altered = good.clone();
        altered.generation += 1;
        assert!(served_from_wire(altered).is_err());
        let mut renamed = good.clone();
        renamed.name = "b".into();
        assert!(served_from_wire(renamed).is_err());
        assert!(served_from_wire(good).is_ok());
    }

    #[test]
    fn a_frame_of_empty_probes_is_refused_before_decoding() {
        let list = pb::ServedList {
            probes: vec![pb::ServedProbe::default(); MAX_SERVED_RECORDS + 1],
        };
        let f = pb::Frame {
            body: Some(pb::frame::Body::Served(pb::Served {
                list: list.encode_to_vec(),
                ..Default::default()
            })),
        };
        let err = super::super::precheck_frame(&f.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }
}

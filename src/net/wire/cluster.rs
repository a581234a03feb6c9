//! Cluster-wide barrier messages on the wire: [`Confirm`] and [`Report`]
//! to and from their protobuf form, every bound checked on receipt (device IDs of
//! 32 bytes, names, counts, hops, paths, versions).

use crate::core::authorship::MAX_AUTHOR_CERT;
use crate::core::cluster::{
    Confirm, Neighbor, Report, Seal, MAX_ASKED, MAX_CONFIRM_BYTES, MAX_HOPS, MAX_NAME,
    MAX_REPORT_PEERS, MAX_TTL_MS,
};
use crate::core::codec::{invalid, pb, WireError, MAX_VERSION_ENTRIES};
use crate::core::device::{DeviceId, ShortId};
use crate::core::paths::RelPath;
use crate::core::record::MAX_SIGNATURE;
use crate::core::version::VersionVector;

/// Converts a request for sending.
pub fn confirm_to_wire(c: &Confirm) -> pb::Confirm {
    pb::Confirm {
        id: c.id,
        origin: c.origin.0.to_vec(),
        path: c.path.as_str().to_string(),
        version: crate::core::codec::version_to_wire(&c.version),
        hops: c.hops,
        ttl_ms: c.ttl_ms,
        asked: c.asked.iter().map(|d| d.0.to_vec()).collect(),
        sync: c.sync,
        signature: c
            .seal
            .as_ref()
            .map_or_else(Vec::new, |s| s.signature.clone()),
        origin_cert: c.seal.as_ref().map_or_else(Vec::new, |s| s.cert.to_vec()),
    }
}

/// Converts a report for sending.
pub fn report_to_wire(r: &Report) -> pb::Report {
    pb::Report {
        id: r.id,
        node: r.node.0.to_vec(),
        name: r.name.clone(),
        has: r.has,
        peers: r
            .peers
            .iter()
            .map(|n| pb::Neighbor {
                device: n.device.0.to_vec(),
                name: n.name.clone(),
                connected: n.connected,
                has: n.has,
                relays: n.relays,
                in_sync: n.in_sync,
            })
            .collect(),
        signature: r
            .seal
            .as_ref()
            .map_or_else(Vec::new, |s| s.signature.clone()),
        node_cert: r.seal.as_ref().map_or_else(Vec::new, |s| s.cert.to_vec()),
    }
}

fn device(what: &'static str, b: &[u8]) -> Result<DeviceId, WireError> {
    <[u8; 32]>::try_from(b)
        .map(DeviceId)
        .map_err(|_| invalid(what, format!("device ID of {} bytes", b.len())))
}

/// A signature and certificate: both or neither, each within its bound.
fn seal(what: &'static str, signature: Vec<u8>, cert: Vec<u8>) -> Result<Option<Seal>, WireError> {
    match (signature.is_empty(), cert.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => {
            if signature.len() > MAX_SIGNATURE || cert.len() > MAX_AUTHOR_CERT {
                return Err(invalid(what, "oversized signature or certificate"));
            }
            Ok(Some(Seal {
                signature,
                cert: cert.into(),
            }))
        }
        _ => Err(invalid(
            what,
            "a signature without a certificate, or the reverse",
        )),
    }
}

fn name(what: &'static str, n: String) -> Result<String, WireError> {
    if n.len() > MAX_NAME {
        return Err(invalid(what, format!("name of {} bytes", n.len())));
    }
    Ok(n)
}

/// Validates a received request.
pub fn confirm_from_wire(c: pb::Confirm) -> Result<Confirm, WireError> {
    const W: &str = "confirm";
    let bytes = prost::Message::encoded_len(&c);
    if bytes > MAX_CONFIRM_BYTES {
        return Err(invalid(
            W,
            format!("{bytes} bytes (at most {MAX_CONFIRM_BYTES})"),
        ));
    }
    let path = RelPath::parse_shared(&c.path)?;
    if c.version.is_empty() || c.version.len() > MAX_VERSION_ENTRIES {
        return Err(invalid(W, format!("{} version entries", c.version.len())));
    }
    let version = VersionVector::from_pairs(
        c.version
            .iter()
            .map(|x| (ShortId(x.device), x.value))
            .collect(),
    );
    if version.is_empty() {
        return Err(invalid(W, "all-zero version"));
    }
    if c.hops > MAX_HOPS {
        return Err(invalid(W, format!("{} hops (at most {MAX_HOPS})", c.hops)));
    }
    if c.ttl_ms > MAX_TTL_MS {
        return Err(invalid(W, format!("ttl of {} ms", c.ttl_ms)));
    }
    if c.asked.len() > MAX_ASKED {
        return Err(invalid(W, format!("{} nodes asked", c.asked.len())));
    }
    let asked = c
        .asked
        .iter()
        .map(|d| device(W, d))
        .collect::<Result<_, _>>()?;
    Ok(Confirm {
        id: c.id,
        origin: device(W, &c.origin)?,
        path,
        version,
        hops: c.hops,
        ttl_ms: c.ttl_ms,
        asked,
        sync: c.sync,
        seal: seal(W, c.signature, c.origin_cert)?,
    })
}

/// Validates a received report.
pub fn report_from_wire(r: pb::Report) -> Result<Report, WireError> {
    const W: &str = "report";
    if r.peers.len() > MAX_REPORT_PEERS {
        return Err(invalid(W, format!("{} peers", r.peers.len())));
    }
    let peers = r
        .peers
        .into_iter()
        .map(|n| {
            Ok(Neighbor {
                device: device(W, &n.device)?,
                name: name(W, n.name)?,
                connected: n.connected,
                has: n.has,
                relays: n.relays,
                in_sync: n.in_sync,
            })
        })
        .collect::<Result<_, WireError>>()?;
    let seal = seal(W, r.signature, r.node_cert)?;
    Ok(Report {
        id: r.id,
        node: device(W, &r.node)?,
        name: name(W, r.name)?,
        has: r.has,
        peers,
        seal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sample_confirm() -> Confirm {
        Confirm {
            id: 7,
            origin: DeviceId([1; 32]),
            path: RelPath::parse("acme/t").unwrap(),
            version: VersionVector::from_pairs(vec![(ShortId(1), 2)]),
            hops: 3,
            ttl_ms: 1000,
            asked: vec![DeviceId([2; 32])],
            sync: false,
            seal: None,
        }
    }

    #[test]
    fn snapshot_confirm_and_report() {
        let c = confirm_to_wire(&sample_confirm()).encode_to_vec();
        assert_eq!(
            hex(&c),
            format!(
                "0807122001{}1a0661636d652f74220408011002280330e8073a2002{}",
                "01".repeat(31),
                "02".repeat(31)
            ),
            "the Confirm encoding drifted"
        );
        let r = Report {
            id: 7,
            node: DeviceId([3; 32]),
            name: "h".into(),
            has: true,
            peers: vec![Neighbor {
                device: DeviceId([4; 32]),
                name: "e".into(),
                connected: true,
                has: false,
                relays: true,
                in_sync: false,
            }],
            seal: None,
        };
        assert_eq!(
            hex(&report_to_wire(&r).encode_to_vec()),
            format!(
                "0807122003{}1a01682001{}",
                "03".repeat(31),
                format!("2a290a2004{}120165180128 01", "04".repeat(31)).replace(' ', "")
            ),
            "the Report encoding drifted"
        );
    }

    #[test]
    fn snapshot_sealed_confirm() {
        let c = Confirm {
            asked: vec![],
            seal: Some(Seal {
                signature: vec![0xaa; 2],
                cert: vec![0xbb; 2].into(),
            }),
            ..sample_confirm()
        };
        let bytes = confirm_to_wire(&c).encode_to_vec();
        assert_eq!(
            hex(&bytes),
            format!(
                "0807122001{}1a0661636d652f74220408011002280330e8074a02aaaa5202bbbb",
                "01".repeat(31)
            ),
            "the sealed Confirm encoding drifted"
        );
        let back = confirm_from_wire(pb::Confirm::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn snapshot_sealed_report() {
        let r = Report {
            id: 7,
            node: DeviceId([3; 32]),
            name: "h".into(),
            has: true,
            peers: vec![],
            seal: Some(Seal {
                signature: vec![0xaa; 2],
                cert: vec![0xbb; 2].into(),
            }),
        };
        let bytes = report_to_wire(&r).encode_to_vec();
        assert_eq!(
            hex(&bytes),
            format!("0807122003{}1a016820013202aaaa3a02bbbb", "03".repeat(31)),
            "the sealed Report encoding drifted"
        );
        let back = report_from_wire(pb::Report::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, r);
        // Half a seal is refused.
        let mut half = report_to_wire(&r);
        half.node_cert.clear();
        assert!(report_from_wire(half).is_err());
    }

    #[test]
    fn hostile_values_are_refused() {
        let ok = confirm_to_wire(&sample_confirm());
        let mut c = ok.clone();
        c.hops = MAX_HOPS + 1;
        assert!(confirm_from_wire(c).is_err());
        let mut c = ok.clone();
        c.origin = vec![1; 31];
        assert!(confirm_from_wire(c).is_err());
        let mut c = ok.clone();
        c.path = "../etc/passwd".into();
        assert!(confirm_from_wire(c).is_err());
        let mut c = ok.clone();
        c.version.clear();
        assert!(confirm_from_wire(c).is_err());
        let mut c = ok.clone();
        c.asked = vec![vec![0; 32]; MAX_ASKED + 1];
        assert!(confirm_from_wire(c).is_err());
        let mut c = ok;
        c.ttl_ms = MAX_TTL_MS + 1;
        assert!(confirm_from_wire(c).is_err());
        let r = pb::Report {
            id: 1,
            node: vec![0; 32],
            name: "x".repeat(MAX_NAME + 1),
            has: false,
            peers: vec![],
            ..Default::default()
        };
        assert!(report_from_wire(r.clone()).is_err());
        let many = pb::Report {
            name: "x".into(),
            peers: vec![pb::Neighbor::default(); MAX_REPORT_PEERS + 1],
            ..r
        };
        assert!(report_from_wire(many).is_err());
    }

    #[test]
    fn oversized_lists_are_refused_before_decoding() {
        let mut c = confirm_to_wire(&sample_confirm());
        c.asked = vec![Vec::new(); MAX_ASKED + 1];
        let f = pb::Frame {
            body: Some(pb::frame::Body::Confirm(c)),
        };
        let err = super::super::precheck_frame(&f.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("more than 1024"), "{err}");
        // Within every count, a Confirm is still bounded in bytes.
        let mut c = confirm_to_wire(&sample_confirm());
        c.asked = vec![vec![7; 32]; MAX_ASKED];
        c.version = (0..MAX_VERSION_ENTRIES as u64)
            .map(|d| pb::Counter {
                device: u64::MAX - d,
                value: u64::MAX,
            })
            .collect();
        let f = pb::Frame {
            body: Some(pb::frame::Body::Confirm(c.clone())),
        };
        let err = super::super::precheck_frame(&f.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("bytes (at most 40960)"), "{err}");
        assert!(confirm_from_wire(c).is_err());
        let r = pb::Report {
            peers: vec![pb::Neighbor::default(); MAX_REPORT_PEERS + 1],
            ..Default::default()
        };
        let f = pb::Frame {
            body: Some(pb::frame::Body::Report(r)),
        };
        assert!(super::super::decode_frame(&f.encode_to_vec()).is_err());
        // Valid ones pass the whole frame check.
        let f = pb::Frame {
            body: Some(pb::frame::Body::Confirm(confirm_to_wire(&sample_confirm()))),
        };
        assert!(super::super::decode_frame(&f.encode_to_vec()).is_ok());
    }

    /// A configured but hostile peer floods Confirms (fresh ids, the
    /// longest `asked` list the wire allows), decoded as the receive loop does. The
    /// relay keeps at most `MAX_RELAYS_PER_PEER` of its requests, takes them at the
    /// budget's pace, bounds what it queues by bytes, and still answers a good peer.
    #[test]
    fn a_flood_of_confirms_from_one_peer_is_capped() {
        use crate::core::cluster::{
            Cluster, ClusterMsg, Member, View, CONFIRM_BURST, CONFIRM_MIN_COST, CONFIRM_RATE,
            MAX_OUTBOX_BYTES,
        };
        use crate::core::index::Index;
        use crate::core::plan::Plan;
        let (hostile, good, other, me) = (
            DeviceId([1; 32]),
            DeviceId([3; 32]),
            DeviceId([4; 32]),
            DeviceId([2; 32]),
        );
        let mut cl = Cluster::default();
        let roster = [(hostile, "h"), (good, "g"), (other, "o")]
            .into_iter()
            .map(|(device, n)| Member {
                device,
                name: n.into(),
            })
            .collect();
        cl.set_roster(me, "me".into(), roster);
        for d in [hostile, good, other] {
            cl.set_relaying(d, true);
        }
        let (index, plan) = (Index::new(ShortId(2)), Plan::new(u64::MAX));
        let connected = |_: &DeviceId| true;
        let v = View {
            index: &index,
            plan: &plan,
            connected: &connected,
        };
        let receive = |cl: &mut Cluster, from: DeviceId, c: Confirm, now: i64| {
            let bytes = pb::Frame {
                body: Some(pb::frame::Body::Confirm(confirm_to_wire(&c))),
            }
            .encode_to_vec();
            let Some(pb::frame::Body::Confirm(c)) =
                super::super::decode_frame(&bytes).unwrap().body
            else {
                panic!("not a confirm")
            };
            cl.handle_confirm(&v, from, confirm_from_wire(c).unwrap(), true, now);
        };
        let flood = |id: u64| Confirm {
            id,
            ttl_ms: 1000,
            asked: (0..MAX_ASKED as u32 - 1)
                .map(|i| {
                    let mut d = [9; 32];
                    d[..4].copy_from_slice(&i.to_le_bytes());
                    DeviceId(d)
                })
                .collect(),
            ..sample_confirm()
        };
        let mut now = 0;
        for id in 0..200u64 {
            receive(&mut cl, hostile, flood(id), now);
            now += 10_000; // 200 requests in 2 ms
        }
        // Its budget counts bytes: a burst of CONFIRM_BURST, whatever the count.
        let wire_bytes = |q: &[ClusterMsg]| -> usize {
            q.iter()
                .map(|m| match m {
                    ClusterMsg::Confirm(c) => confirm_to_wire(c).encoded_len(),
                    ClusterMsg::Report(r) => report_to_wire(r).encoded_len(),
                })
                .sum()
        };
        let mut taken = 0;
        for peer in [good, other] {
            let relayed = cl.take_outbox(&peer);
            assert!(
                wire_bytes(&relayed) <= CONFIRM_BURST as usize,
                "bytes relayed"
            );
            assert!(!relayed.is_empty(), "the burst is taken");
            taken = relayed.len();
        }
        let reports = cl.take_outbox(&hostile);
        assert_eq!(reports.len(), taken, "reports to the flooder");
        // A good peer's request is still relayed and answered.
        receive(
            &mut cl,
            good,
            Confirm {
                id: 1 << 40,
                ..sample_confirm()
            },
            now,
        );
        assert_eq!(cl.take_outbox(&good).len(), 1, "report to the good peer");
        assert_eq!(cl.take_outbox(&other).len(), 1, "relayed for the good peer");
        // The flooder's routes expire (1 s); its budget refills at its pace only:
        // two seconds later, small requests are taken up to what refilled, each
        // costing at least CONFIRM_MIN_COST.
        let later = now + 2_000_000_000;
        for id in 20_000..20_100u64 {
            let c = Confirm {
                id,
                ..sample_confirm()
            };
            receive(&mut cl, hostile, c, later);
        }
        let most = (CONFIRM_BURST as usize)
            .min(CONFIRM_BURST as usize - taken * 34 * (MAX_ASKED - 1) + 2 * CONFIRM_RATE as usize)
            / CONFIRM_MIN_COST as usize;
        let refilled = cl.take_outbox(&other).len();
        assert!(
            refilled > 0 && refilled <= most,
            "{refilled} of at most {most}"
        );
        // What one peer's queue can hold is bounded by bytes: a peer that stops
        // reading is sent reports until MAX_OUTBOX_BYTES, then nothing more.
        let mut cl2 = Cluster::default();
        cl2.set_roster(
            me,
            "me".into(),
            vec![Member {
                device: hostile,
                name: "h".into(),
            }],
        );
        cl2.set_relaying(hostile, true);
        receive(&mut cl2, hostile, sample_confirm(), 0);
        let big = Report {
            id: sample_confirm().id,
            node: DeviceId([7; 32]),
            name: "x".repeat(MAX_NAME),
            has: true,
            peers: (0..MAX_REPORT_PEERS)
                .map(|i| Neighbor {
                    device: DeviceId([(i % 251) as u8; 32]),
                    name: "n".repeat(MAX_NAME),
                    connected: true,
                    has: true,
                    relays: true,
                    in_sync: true,
                })
                .collect(),
            seal: None,
        };
        let bytes = report_to_wire(&big).encode_to_vec();
        for _ in 0..10 {
            let r = report_from_wire(pb::Report::decode(bytes.as_slice()).unwrap()).unwrap();
            cl2.handle_report(hostile, r, true);
        }
        let queued: usize = cl2
            .take_outbox(&hostile)
            .iter()
            .map(|m| match m {
                ClusterMsg::Report(r) => report_to_wire(r).encoded_len(),
                ClusterMsg::Confirm(c) => confirm_to_wire(c).encoded_len(),
            })
            .sum();
        assert!(
            queued <= MAX_OUTBOX_BYTES + (MAX_OUTBOX_BYTES / 4),
            "{queued} bytes queued"
        );
        assert!(queued > bytes.len(), "some reports are forwarded");
    }

    proptest! {
        #[test]
        fn confirm_round_trips(id: u64, o: [u8; 32], hops in 0..=MAX_HOPS, ttl in 0..=MAX_TTL_MS,
                               counters in proptest::collection::vec((any::<u64>(), 1..u64::MAX), 1..8),
                               asked in proptest::collection::vec(any::<[u8; 32]>(), 0..8), sync: bool) {
            let c = Confirm {
                id,
                origin: DeviceId(o),
                path: RelPath::parse("live/a/cert.pem").unwrap(),
                version: VersionVector::from_pairs(counters.into_iter().map(|(d, v)| (ShortId(d), v)).collect()),
                hops,
                ttl_ms: ttl,
                asked: asked.into_iter().map(DeviceId).collect(),
                sync,
                seal: None,
            };
            let bytes = confirm_to_wire(&c).encode_to_vec();
            let back = confirm_from_wire(pb::Confirm::decode(bytes.as_slice()).unwrap()).unwrap();
            prop_assert_eq!(back, c);
        }

        #[test]
        fn report_round_trips(id: u64, node: [u8; 32], has: bool, name in "[a-z0-9-]{0,40}",
                              peers in proptest::collection::vec((any::<[u8; 32]>(), "[a-z]{0,10}", any::<(bool, bool, bool, bool)>()), 0..8)) {
            let r = Report {
                id,
                node: DeviceId(node),
                name,
                has,
                peers: peers.into_iter().map(|(d, name, (connected, has, relays, in_sync))| Neighbor {
                    device: DeviceId(d), name, connected, has, relays, in_sync,
                }).collect(),
                seal: None,
            };
            let bytes = report_to_wire(&r).encode_to_vec();
            let back = report_from_wire(pb::Report::decode(bytes.as_slice()).unwrap()).unwrap();
            prop_assert_eq!(back, r);
        }
    }
}

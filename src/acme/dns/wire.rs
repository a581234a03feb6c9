//! DNS exchanges over certmesh's own tokio sockets: queries (SOA, NS, A/AAAA, TXT)
//! and RFC 2136 updates, optionally signed with TSIG (RFC 8945). Messages are built
//! and parsed by hickory-proto; errors are turned into [`DnsError`]s that name the
//! server and what it refused.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::dnssec::rdata::DNSSECRData;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{update_message, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::DnsError;

/// One query or update may take this long (UDP, then TCP if truncated).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// TTL of the challenge records.
const TXT_TTL: u32 = 60;

/// Parses a DNS name (absolute).
pub fn name(s: &str) -> Result<Name, DnsError> {
    let mut n = Name::from_ascii(s).map_err(|e| DnsError::Protocol {
        server: "-".into(),
        what: format!("the name {s:?}"),
        why: e.to_string(),
    })?;
    n.set_fqdn(true);
    Ok(n)
}

/// The RFC 8945 error of a response's TSIG record, if it has one.
fn tsig_error(m: &Message) -> Option<u16> {
    let r = m
        .signature()
        .iter()
        .find(|r| r.record_type() == RecordType::TSIG)?;
    let RData::DNSSEC(DNSSECRData::TSIG(t)) = r.data() else {
        return None;
    };
    // RDATA: algorithm name (uncompressed as we emit it), time (6), fudge (2),
    // MAC size (2), MAC, original ID (2), error (2), other len (2), other.
    let b = t.to_bytes().ok()?;
    let mut i = 0;
    while *b.get(i)? != 0 {
        i += 1 + *b.get(i)? as usize;
    }
    i += 1 + 6 + 2;
    let mac = u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize;
    i += 2 + mac + 2;
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn tsig_code(code: u16) -> (&'static str, &'static str) {
    match code {
        16 => (
            "BADSIG",
            "the secret in acme.dns.tsig_secret_file does not match the server's",
        ),
        17 => (
            "BADKEY",
            "the server does not know this key name or algorithm (acme.dns.tsig_key_name, tsig_algorithm)",
        ),
        18 => (
            "BADTIME",
            "this node's clock and the server's differ by more than 5 minutes",
        ),
        22 => ("BADTRUNC", "the server wants a truncated MAC"),
        _ => ("TSIG error", "see the server's log"),
    }
}

/// Sends `msg` to `server` (signed with `signer` if given) and returns the answer.
/// A TSIG rejection is [`DnsError::Tsig`]; other response codes are left to the caller.
pub async fn exchange(
    server: SocketAddr,
    mut msg: Message,
    signer: Option<&TSigner>,
    label: &str,
) -> Result<Message, DnsError> {
    let proto = |why: String| DnsError::Protocol {
        server: label.to_string(),
        what: "DNS exchange".into(),
        why,
    };
    msg.set_id(rand::random());
    let mut verifier = match signer {
        Some(s) => {
            let now = crate::clock::unix_now().clamp(0, u32::MAX as i64) as u32;
            msg.finalize(s, now)
                .map_err(|e| proto(format!("signing: {e}")))?
        }
        None => None,
    };
    let bytes = msg.to_vec().map_err(|e| proto(e.to_string()))?;
    let unreachable = |why: String| DnsError::Unreachable {
        server: label.to_string(),
        why,
    };
    let raw = match tokio::time::timeout(EXCHANGE_TIMEOUT, udp(server, &bytes, msg.id())).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {EXCHANGE_TIMEOUT:?}"
            )))
        }
    };
    let mut raw = raw;
    let mut answer =
        Message::from_vec(&raw).map_err(|e| proto(format!("malformed answer: {e}")))?;
    if answer.truncated() {
        raw = match tokio::time::timeout(EXCHANGE_TIMEOUT, tcp(server, &bytes)).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => return Err(unreachable(format!("over TCP: {e}"))),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer over TCP within {EXCHANGE_TIMEOUT:?}"
                )))
            }
        };
        answer = Message::from_vec(&raw).map_err(|e| proto(format!("malformed answer: {e}")))?;
    }
    if answer.id() != msg.id() || answer.message_type() != MessageType::Response {
        return Err(proto("the answer does not match the question".into()));
    }
    if let Some(s) = signer {
        let tsig_err = tsig_error(&answer).filter(|&c| c != 0);
        if let Some(code) = tsig_err.or((answer.response_code() == ResponseCode::NotAuth
            && answer.signature().is_empty())
        .then_some(17))
        {
            let (code, hint) = tsig_code(code);
            return Err(DnsError::Tsig {
                server: label.to_string(),
                code,
                key: s.signer_name().to_ascii().trim_end_matches('.').to_string(),
                hint,
            });
        }
        if let Some(verify) = verifier.as_mut() {
            verify(&raw)
                .map_err(|e| proto(format!("the answer's TSIG signature does not verify: {e}")))?;
        }
    }
    Ok(answer)
}

async fn udp(server: SocketAddr, bytes: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Skip stray datagrams (another ID): the timeout bounds the wait.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp(server: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(server).await?;
    let len = u16::try_from(bytes.len()).map_err(|_| std::io::Error::other("message too long"))?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(bytes).await?;
    let len = s.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// A query message for `name`/`rtype` (recursion desired only for a resolver).
pub fn query(name: &Name, rtype: RecordType, recursion: bool) -> Message {
    let mut m = Message::new();
    m.set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(recursion)
        .add_query(Query::query(name.clone(), rtype));
    m
}

/// The zone holding `fqdn`, from the SOA in the answer or authority section.
pub async fn find_zone(
    server: SocketAddr,
    fqdn: &str,
    signer: Option<&TSigner>,
    recursion: bool,
) -> Result<String, DnsError> {
    let label = server.to_string();
    let n = name(fqdn)?;
    let a = exchange(
        server,
        query(&n, RecordType::SOA, recursion),
        signer,
        &label,
    )
    .await?;
    let zone_err = |why: String| DnsError::ZoneNotFound {
        name: fqdn.to_string(),
        why,
    };
    match a.response_code() {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        ResponseCode::Refused => {
            return Err(zone_err(format!(
                "{label} refused the SOA query (REFUSED): it is not authoritative for a zone holding this name \
                 (set acme.dns.zone, or check acme.dns.server)"
            )))
        }
        rc => return Err(zone_err(format!("{label} answered the SOA query with {rc}"))),
    }
    a.answers()
        .iter()
        .chain(a.name_servers())
        .find(|r| r.record_type() == RecordType::SOA && r.name().zone_of(&n))
        .map(|r| {
            r.name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase()
        })
        .ok_or_else(|| zone_err(format!("{label} returned no SOA record for it")))
}

/// RFC 2136: adds (`present`) or deletes (`!present`) one TXT value.
pub async fn update(
    server: SocketAddr,
    zone: &str,
    fqdn: &str,
    value: &str,
    present: bool,
    signer: &TSigner,
) -> Result<(), DnsError> {
    let label = server.to_string();
    let z = name(zone)?;
    let n = name(fqdn)?;
    if !z.zone_of(&n) {
        return Err(DnsError::ZoneNotFound {
            name: fqdn.to_string(),
            why: format!("it is not inside the zone {zone} (acme.dns.zone)"),
        });
    }
    let mut set = RecordSet::with_ttl(n, RecordType::TXT, TXT_TTL);
    set.add_rdata(RData::TXT(TXT::new(vec![value.to_string()])));
    let msg = if present {
        update_message::append(set, z, false, false)
    } else {
        update_message::delete_by_rdata(set, z, false)
    };
    let a = exchange(server, msg, Some(signer), &label).await?;
    let key = signer
        .signer_name()
        .to_ascii()
        .trim_end_matches('.')
        .to_string();
    match a.response_code() {
        ResponseCode::NoError => Ok(()),
        ResponseCode::Refused => Err(DnsError::UpdateRefused {
            server: label,
            name: fqdn.to_string(),
            zone: zone.to_string(),
            key,
        }),
        ResponseCode::NotAuth | ResponseCode::NotZone => Err(DnsError::ZoneNotFound {
            name: fqdn.to_string(),
            why: format!(
                "{label} is not authoritative for the zone {zone} ({})",
                a.response_code()
            ),
        }),
        rc => Err(DnsError::Rcode {
            server: label,
            what: format!("update of {fqdn} TXT in {zone}"),
            rcode: rc.to_string(),
        }),
    }
}

/// The NS names of `zone` (lowercase, no trailing dot), with any glue addresses.
pub async fn nameservers(
    server: SocketAddr,
    zone: &str,
    signer: Option<&TSigner>,
    recursion: bool,
) -> Result<Vec<(String, Vec<std::net::IpAddr>)>, DnsError> {
    let label = server.to_string();
    let z = name(zone)?;
    let a = exchange(server, query(&z, RecordType::NS, recursion), signer, &label).await?;
    if a.response_code() != ResponseCode::NoError {
        return Err(DnsError::ZoneNotFound {
            name: zone.to_string(),
            why: format!("{label} answered the NS query with {}", a.response_code()),
        });
    }
    let mut out: Vec<(String, Vec<std::net::IpAddr>)> = Vec::new();
    for r in a.answers() {
        if let RData::NS(ns) = r.data() {
            let host = ns.0.to_ascii().trim_end_matches('.').to_ascii_lowercase();
            if !out.iter().any(|(h, _)| *h == host) {
                out.push((host, Vec::new()));
            }
        }
    }
    for r in a.additionals() {
        let host = r
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let (Some((_, addrs)), Some(ip)) =
            (out.iter_mut().find(|(h, _)| *h == host), r.data().ip_addr())
        {
            addrs.push(ip);
        }
    }
    if out.is_empty() {
        return Err(DnsError::ZoneNotFound {
            name: zone.to_string(),
            why: format!("{label} returned no NS records for it"),
        });
    }
    Ok(out)
}

/// A and AAAA addresses of `host`.
pub async fn addresses(
    server: SocketAddr,
    host: &str,
    signer: Option<&TSigner>,
    recursion: bool,
) -> Result<Vec<std::net::IpAddr>, DnsError> {
    let label = server.to_string();
    let n = name(host)?;
    let mut out = Vec::new();
    for t in [RecordType::A, RecordType::AAAA] {
        let a = exchange(server, query(&n, t, recursion), signer, &label).await?;
        out.extend(a.answers().iter().filter_map(|r| r.data().ip_addr()));
    }
    Ok(out)
}

/// The TXT values `server` serves for `fqdn` authoritatively (no recursion).
pub async fn txt_values(
    server: SocketAddr,
    fqdn: &str,
    label: &str,
) -> Result<Vec<String>, DnsError> {
    let n = name(fqdn)?;
    let a = exchange(server, query(&n, RecordType::TXT, false), None, label).await?;
    match a.response_code() {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        rc => {
            return Err(DnsError::Rcode {
                server: label.to_string(),
                what: format!("TXT query for {fqdn}"),
                rcode: rc.to_string(),
            })
        }
    }
    Ok(a.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::TXT(t) => Some(
                t.txt_data()
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect())
}

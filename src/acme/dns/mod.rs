//! dns-01: TXT records `_acme-challenge.<name>` put in place by RFC 2136
//! updates with TSIG ([`wire`], [`key`]) or an operator's program ([`exec`]), checked
//! on every authoritative nameserver of the zone before the CA is told, removed
//! afterwards. What was presented is recorded in the tree
//! (`.certmesh/acme/dns/<certificate>`), so whichever node orders next removes
//! records a crashed renewer left behind.

pub mod error;
mod exec;
pub mod key;
pub mod wire;

use std::collections::BTreeMap;

use error::DnsError;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::dnssec::tsig::TSigner;

use serde::{Deserialize, Serialize};

use super::handle::NsProgress;
use crate::config::{certificate::CertificateConfig, dns::DnsConfig, dns::DnsProvider};

/// Where each certificate's presented records are recorded (replicated).
pub const RECORDS_DIR: &str = ".certmesh/acme/dns";
/// How often the nameservers are asked again while waiting.
const POLL: Duration = Duration::from_millis(250);

/// One challenge record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `_acme-challenge.<name>`, no trailing dot.
    pub fqdn: String,
    pub value: String,
}

/// The file under [`RECORDS_DIR`]: who presented what.
#[derive(Debug, Serialize, Deserialize)]
pub struct Presented {
    pub node: String,
    pub records: Vec<Record>,
}

/// Most values kept per challenge name (a name carries one per identifier it
/// validates: the bare name and its wildcard make two).
pub const MAX_VALUES_PER_NAME: usize = 4;

/// Whether `value` has exactly the shape of a dns-01 value: the base64url (no
/// padding) SHA-256 digest of a key authorization, 43 characters decoding to 32
/// bytes. Only such values reach DNS updates and `exec` programs.
pub fn is_digest(value: &str) -> bool {
    value.len() == 43
        && data_encoding::BASE64URL_NOPAD
            .decode(value.as_bytes())
            .is_ok_and(|d| d.len() == 32)
}

impl Presented {
    /// Parses the (untrusted, peer-written) file and keeps only records this node's
    /// config could have made for `cert` ([`Presented::parse_checked`]).
    pub fn parse_for(bytes: &[u8], cert: &CertificateConfig) -> Option<Presented> {
        Self::parse_checked(bytes, cert).map(|(p, _)| p)
    }

    /// [`Presented::parse_for`], with what was refused and why (one line each, at
    /// most a few): a record is kept only for a challenge name of one of `cert`'s
    /// domains, with a value of the digest shape ([`is_digest`]), each once (a file
    /// listing a record twice would otherwise have it removed twice), and at most
    /// [`MAX_VALUES_PER_NAME`] per name.
    pub fn parse_checked(
        bytes: &[u8],
        cert: &CertificateConfig,
    ) -> Option<(Presented, Vec<String>)> {
        let mut p: Presented = serde_json::from_slice(bytes).ok()?;
        let mut seen = std::collections::HashSet::new();
        let mut per_name: BTreeMap<String, usize> = BTreeMap::new();
        let mut refused = Vec::new();
        let mut refuse = |why: String| {
            if refused.len() < 8 {
                refused.push(why);
            }
        };
        p.records.retain(|r| {
            let shown: String = r.value.chars().take(60).collect();
            if !cert.domains.iter().any(|d| challenge_name(d) == r.fqdn) {
                refuse(format!("{:?}: not a challenge name of {}", r.fqdn, cert.name));
                return false;
            }
            if !is_digest(&r.value) {
                refuse(format!(
                    "{}: value {shown:?} is not a key-authorization digest (43 base64url characters)",
                    r.fqdn
                ));
                return false;
            }
            if !seen.insert((r.fqdn.clone(), r.value.clone())) {
                return false;
            }
            let n = per_name.entry(r.fqdn.clone()).or_default();
            *n += 1;
            if *n > MAX_VALUES_PER_NAME {
                refuse(format!(
                    "{}: more than {MAX_VALUES_PER_NAME} values",
                    r.fqdn
                ));
                return false;
            }
            true
        });
        Some((p, refused))
    }
}

/// `_acme-challenge.<name>` for a domain or wildcard (`*.` dropped).
pub fn challenge_name(domain: &str) -> String {
    format!(
        "_acme-challenge.{}",
        domain.strip_prefix("*.").unwrap_or(domain)
    )
}

/// Puts records in place and takes them away, with the configured provider.
pub struct Publisher {
    cfg: DnsConfig,
    signer: Option<TSigner>,
}

impl Publisher {
    /// Loads the TSIG key (RFC 2136); fails on an unusable secret file.
    pub fn new(cfg: &DnsConfig) -> Result<Publisher, DnsError> {
        let signer = match &cfg.provider {
            DnsProvider::Rfc2136 { key: k, .. } => Some(key::load(k)?),
            DnsProvider::Exec { .. } => None,
        };
        Ok(Publisher {
            cfg: cfg.clone(),
            signer,
        })
    }

    /// Who answers SOA/NS/address questions: `resolver` (recursive), else the
    /// RFC 2136 server (authoritative, TSIG-signed so a bad key shows before any
    /// order), else the first nameserver of /etc/resolv.conf.
    fn lookup_server(&self) -> Result<(SocketAddr, Option<&TSigner>, bool), DnsError> {
        if let Some(r) = self.cfg.resolver {
            return Ok((r, None, true));
        }
        if let DnsProvider::Rfc2136 { server, .. } = &self.cfg.provider {
            return Ok((*server, self.signer.as_ref(), false));
        }
        system_resolver().map(|r| (r, None, true))
    }

    /// The zone `fqdn` is in: `acme.dns.zone`, or found by SOA lookup.
    pub async fn zone(&self, fqdn: &str) -> Result<String, DnsError> {
        if let Some(z) = &self.cfg.zone {
            if fqdn == z || fqdn.ends_with(&format!(".{z}")) {
                return Ok(z.clone());
            }
            return Err(DnsError::ZoneNotFound {
                name: fqdn.to_string(),
                why: format!("it is not inside acme.dns.zone {z:?}"),
            });
        }
        let (server, signer, recursion) = self.lookup_server()?;
        wire::find_zone(server, fqdn, signer, recursion).await
    }

    pub async fn present(&self, zone: &str, r: &Record) -> Result<(), DnsError> {
        self.change(zone, r, true).await
    }

    pub async fn cleanup(&self, zone: &str, r: &Record) -> Result<(), DnsError> {
        self.change(zone, r, false).await
    }

    async fn change(&self, zone: &str, r: &Record, present: bool) -> Result<(), DnsError> {
        match (&self.cfg.provider, &self.signer) {
            (DnsProvider::Rfc2136 { server, .. }, Some(signer)) => {
                wire::update(*server, zone, &r.fqdn, &r.value, present, signer).await
            }
            (DnsProvider::Exec { argv, timeout }, _) => {
                let action = if present { "present" } else { "cleanup" };
                exec::run(argv, *timeout, action, &r.fqdn, &r.value).await
            }
            (DnsProvider::Rfc2136 { .. }, None) => Err(DnsError::Protocol {
                server: "-".into(),
                what: "RFC 2136".into(),
                why: "no TSIG key loaded".into(),
            }),
        }
    }

    /// The authoritative nameservers of `zone`, each as (label, address:53).
    async fn authoritative(&self, zone: &str) -> Result<Vec<(String, SocketAddr)>, DnsError> {
        let (server, signer, recursion) = self.lookup_server()?;
        let mut out = Vec::new();
        for (host, glue) in wire::nameservers(server, zone, signer, recursion).await? {
            let addrs: Vec<IpAddr> = if glue.is_empty() {
                wire::addresses(server, &host, signer, recursion).await?
            } else {
                glue
            };
            if addrs.is_empty() {
                return Err(DnsError::ZoneNotFound {
                    name: zone.to_string(),
                    why: format!("its nameserver {host} has no address (asked {server})"),
                });
            }
            for ip in addrs {
                out.push((format!("{host} ({ip})"), SocketAddr::new(ip, 53)));
            }
        }
        Ok(out)
    }

    /// Waits until every authoritative nameserver of `zone` serves every record,
    /// reporting progress; at the deadline the error names the lagging ones.
    pub async fn await_propagation(
        &self,
        zone: &str,
        records: &[Record],
        mut report: impl FnMut(Vec<NsProgress>),
    ) -> Result<(), DnsError> {
        let timeout = self.cfg.propagation_timeout;
        let start = Instant::now();
        let servers = self.authoritative(zone).await?;
        loop {
            let mut progress = Vec::new();
            for (label, addr) in &servers {
                let mut has = true;
                let mut error = None;
                for r in records {
                    match wire::txt_values(*addr, &r.fqdn, label).await {
                        Ok(v) if v.contains(&r.value) => {}
                        Ok(_) => has = false,
                        Err(e) => {
                            has = false;
                            error = Some(e.to_string());
                        }
                    }
                }
                progress.push(NsProgress {
                    nameserver: label.clone(),
                    has_record: has,
                    error,
                });
            }
            let done = progress.iter().all(|p| p.has_record);
            report(progress.clone());
            if done {
                tracing::info!(
                    zone,
                    nameservers = servers.len(),
                    ms = start.elapsed().as_millis() as u64,
                    "TXT records served by every authoritative nameserver"
                );
                return Ok(());
            }
            if start.elapsed() >= timeout {
                let (have, lagging): (Vec<_>, Vec<_>) =
                    progress.into_iter().partition(|p| p.has_record);
                return Err(DnsError::Propagation {
                    zone: zone.to_string(),
                    timeout,
                    lagging: lagging
                        .into_iter()
                        .map(|p| match p.error {
                            Some(e) => format!("{} ({e})", p.nameserver),
                            None => p.nameserver,
                        })
                        .collect(),
                    have: have.into_iter().map(|p| p.nameserver).collect(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The first `nameserver` of /etc/resolv.conf, port 53.
fn system_resolver() -> Result<SocketAddr, DnsError> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
        .ok_or_else(|| DnsError::ZoneNotFound {
            name: "-".into(),
            why: "no resolver to find the zone and its nameservers: set acme.dns.resolver or acme.dns.zone + server, or list a nameserver in /etc/resolv.conf".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{certificate::KeyType, dns::ChallengeChoice};

    /// `www`: `*.example.com` and `example.com`.
    fn wildcard_and_apex() -> CertificateConfig {
        CertificateConfig {
            name: "www".into(),
            domains: vec!["*.example.com".into(), "example.com".into()],
            key: KeyType::EcdsaP256,
            reuse_key: false,
            challenge: ChallengeChoice::Auto,
            verify_rollout: false,
            source: crate::config::certificate::CertSource::Config,
        }
    }

    fn digest(n: u8) -> String {
        data_encoding::BASE64URL_NOPAD.encode(&[n; 32])
    }

    #[test]
    fn only_the_exact_digest_shape_is_a_value() {
        assert!(is_digest(&digest(7)));
        // 43 base64url characters whose last one carries bits a digest cannot have.
        assert!(!is_digest(&"a".repeat(43)));
        assert!(!is_digest(&format!("{}=", &digest(7)[..42])));
        assert!(!is_digest(&format!("+{}", &digest(7)[1..])));
        assert!(!is_digest(&digest(7)[..42]));
        assert!(!is_digest(&format!("{}A", digest(7))));
    }

    #[test]
    fn a_record_file_with_thousands_of_values_keeps_a_few_and_names_the_rest() {
        let cert = wildcard_and_apex();
        let records: Vec<String> = (0..12_000u32)
            .map(|i| {
                let v = data_encoding::BASE64URL_NOPAD.encode(&[i.to_be_bytes(); 8].concat());
                format!(r#"{{"fqdn":"_acme-challenge.example.com","value":"{v}"}}"#)
            })
            .chain([r#"{"fqdn":"_acme-challenge.example.com","value":"-rf"}"#.to_string()])
            .collect();
        let json = format!(r#"{{"node":"bad","records":[{}]}}"#, records.join(","));
        let (p, refused) = Presented::parse_checked(json.as_bytes(), &cert).unwrap();
        assert_eq!(p.records.len(), MAX_VALUES_PER_NAME);
        assert!(
            refused.iter().any(|r| r.contains("more than 4 values")),
            "{refused:?}"
        );
        assert!(refused.len() <= 8);
    }

    #[test]
    fn recorded_records_are_kept_only_when_this_config_could_have_made_them() {
        let cert = wildcard_and_apex();
        let v = digest(1);
        let json = format!(
            r#"{{"node":"lb0","records":[{{"fqdn":"_acme-challenge.example.com","value":"{v}"}},
            {{"fqdn":"_acme-challenge.other.org","value":"{v}"}},
            {{"fqdn":"_acme-challenge.example.com","value":"short"}}]}}"#
        );
        let p = Presented::parse_for(json.as_bytes(), &cert).unwrap();
        assert_eq!(
            p.records,
            vec![Record {
                fqdn: "_acme-challenge.example.com".into(),
                value: v
            }]
        );
        assert!(Presented::parse_for(b"not json", &cert).is_none());
        assert_eq!(challenge_name("*.a.example"), "_acme-challenge.a.example");
    }

    #[test]
    fn a_record_listed_twice_is_kept_once() {
        let cert = wildcard_and_apex();
        let (a, b) = (digest(1), digest(2));
        // The wildcard and the bare name share a challenge name with two values:
        // both stay; the exact repeat goes.
        let json = format!(
            r#"{{"node":"lb0","records":[{{"fqdn":"_acme-challenge.example.com","value":"{a}"}},
            {{"fqdn":"_acme-challenge.example.com","value":"{b}"}},
            {{"fqdn":"_acme-challenge.example.com","value":"{a}"}}]}}"#
        );
        let p = Presented::parse_for(json.as_bytes(), &cert).unwrap();
        let values: Vec<&str> = p.records.iter().map(|r| r.value.as_str()).collect();
        assert_eq!(values, [a.as_str(), b.as_str()]);
    }
}

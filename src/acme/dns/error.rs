//! What can go wrong with dns-01, each case worded so an operator knows what to fix.

use std::path::PathBuf;
use std::time::Duration;

/// A dns-01 failure.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The server did not accept our TSIG signature (RFC 8945 error named).
    #[error("{server}: TSIG refused: {code} for key {key:?} ({hint})")]
    Tsig {
        server: String,
        code: &'static str,
        key: String,
        hint: &'static str,
    },
    /// No zone that holds the name was found (or the server is not authoritative).
    #[error("zone not found for {name}: {why}")]
    ZoneNotFound { name: String, why: String },
    /// The server's update policy refused the change (REFUSED to an update).
    #[error(
        "{server}: update of {name} TXT refused by the server's policy (REFUSED) for key {key:?}; \
         the zone {zone} needs e.g. update-policy {{ grant {key} zonesub TXT; }};"
    )]
    UpdateRefused {
        server: String,
        name: String,
        zone: String,
        key: String,
    },
    /// The server did not answer at all.
    #[error("nameserver {server} unreachable: {why}")]
    Unreachable { server: String, why: String },
    /// An answer with an error code not covered above.
    #[error("{server}: {what}: the server answered {rcode}")]
    Rcode {
        server: String,
        what: String,
        rcode: String,
    },
    /// An answer that could not be used (malformed, wrong signature).
    #[error("{server}: {what}: {why}")]
    Protocol {
        server: String,
        what: String,
        why: String,
    },
    /// The TSIG secret file is unusable.
    #[error("acme.dns.tsig_secret_file {}: {why}", path.display())]
    Key { path: PathBuf, why: String },
    /// The exec provider failed.
    #[error("acme.dns.exec {argv:?} {action} {fqdn}: {why}")]
    Exec {
        argv: Vec<String>,
        action: &'static str,
        fqdn: String,
        why: String,
    },
    /// Not every authoritative nameserver served the record in time.
    #[error(
        "the TXT record(s) did not reach every authoritative nameserver of {zone} within {timeout:?} \
         (acme.dns.propagation_timeout): lagging: {}; have it: {}",
        lagging.join(", "),
        if have.is_empty() { "none".to_string() } else { have.join(", ") }
    )]
    Propagation {
        zone: String,
        timeout: Duration,
        lagging: Vec<String>,
        have: Vec<String>,
    },
}

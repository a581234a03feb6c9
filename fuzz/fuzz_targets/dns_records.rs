//! The dns-01 record file from the tree (`.certmesh/acme/dns/<certificate>`, any peer
//! writes it): what a renewer presented, read back to remove records it left. Only
//! well-formed challenge records of the certificate's own names survive, each once.
#![no_main]
use libfuzzer_sys::fuzz_target;

use certmesh::acme::dns::{challenge_name, Presented};
use certmesh::config::certificate::{CertSource, CertificateConfig, KeyType};
use certmesh::config::dns::ChallengeChoice;

fuzz_target!(|data: &[u8]| {
    let cert = CertificateConfig {
        name: "www".into(),
        domains: vec!["*.example.com".into(), "example.com".into()],
        key: KeyType::EcdsaP256,
        reuse_key: false,
        challenge: ChallengeChoice::Auto,
        verify_rollout: false,
        source: CertSource::Config,
    };
    if let Some(p) = Presented::parse_for(data, &cert) {
        for (i, r) in p.records.iter().enumerate() {
            assert_eq!(r.fqdn, challenge_name("example.com"));
            assert_eq!(r.value.len(), 43);
            assert!(!p.records[..i].contains(r), "a record kept twice");
        }
    }
});

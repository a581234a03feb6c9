//! A renewal lease file from the tree (`.certmesh/leases/<name>`, any peer writes it).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = certmesh::acme::schedule::RenewalLease::parse(data) {
        // What parses re-serialises to something that parses to the same lease.
        let again = certmesh::acme::schedule::RenewalLease::parse(&l.to_json());
        assert_eq!(again.as_ref(), Ok(&l));
    }
});

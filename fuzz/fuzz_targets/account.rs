//! The shared ACME account file from the tree (`.certmesh/acme/account.json`, any
//! peer writes it): parsed and checked against the configured directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = certmesh::acme::account::parse_account(data, "https://127.0.0.1:14000/dir");
});

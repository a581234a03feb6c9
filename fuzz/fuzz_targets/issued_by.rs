//! The issued-by record from the tree (`.certmesh/acme/issued/<certificate>`, any
//! peer writes it): which CA issued the live certificate, shown in `status`.
#![no_main]
use libfuzzer_sys::fuzz_target;

use certmesh::acme::ca::IssuedBy;

fuzz_target!(|data: &[u8]| {
    if let Some(r) = IssuedBy::parse(data) {
        assert!(r.directory.starts_with("https://"));
        assert!(r.directory.chars().all(|c| c.is_ascii_graphic()));
        assert!(r.serial.chars().all(|c| c.is_ascii_hexdigit() || c == ':'));
    }
});

//! Kept-version metadata (`.certmesh/kept/**/<version>.json`): local, but read back
//! by `restore` and repair, so it must never panic whatever it holds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = certmesh::disk::keep::parse_meta(data) {
        // What the parser accepts round-trips.
        let again = serde_json_roundtrip(&m);
        assert_eq!(again.as_ref(), Some(&m));
    }
});

fn serde_json_roundtrip(m: &certmesh::disk::keep::KeptMeta) -> Option<certmesh::disk::keep::KeptMeta> {
    let bytes = certmesh::disk::keep::to_meta_bytes(m).ok()?;
    certmesh::disk::keep::parse_meta(&bytes).ok()
}

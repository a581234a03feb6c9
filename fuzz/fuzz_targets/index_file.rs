//! The on-disk index log (a damaged or hostile state_dir/index.db).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut index = certmesh::core::index::Index::new(certmesh::core::device::ShortId(1));
    let _ = certmesh::disk::store::load_bytes(data, &mut index);
});

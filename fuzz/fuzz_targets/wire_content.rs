//! Content-request streams: the Request a peer sends us and the Response header it
//! answers with.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = certmesh::core::codec::pb::Request::decode(data) {
        let _ = certmesh::core::paths::RelPath::parse_shared(&req.path);
    }
    let _ = certmesh::core::codec::pb::Response::decode(data);
});

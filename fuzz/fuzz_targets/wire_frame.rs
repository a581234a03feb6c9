//! Control-stream frames as a peer sends them: decoding plus record validation
//! (paths, hashes, symlink targets, inline content) must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// `read_msg` bounds how long a started frame may take, so it needs tokio's timer.
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

fuzz_target!(|data: &[u8]| {
    use certmesh::core::codec::pb::frame::Body;
    // Barrier frames: validated, then their signatures checked (issue 25).
    match certmesh::net::wire::decode_frame(data).ok().and_then(|f| f.body) {
        Some(Body::Confirm(c)) => {
            if let Ok(c) = certmesh::net::wire::cluster::confirm_from_wire(c) {
                let _ = certmesh::core::cluster::verify_confirm(&c);
            }
        }
        Some(Body::Report(r)) => {
            if let Ok(r) = certmesh::net::wire::cluster::report_from_wire(r) {
                let _ = certmesh::core::cluster::verify_report(&r);
            }
        }
        _ => {}
    }
    // The length-prefixed reader: the limit is checked before allocating.
    let mut r: &[u8] = data;
    let _ = RT.with(|rt| {
        rt.block_on(certmesh::net::wire::read_msg::<_, certmesh::core::codec::pb::Frame>(
            &mut r,
            certmesh::net::wire::MAX_FRAME,
        ))
    });
});

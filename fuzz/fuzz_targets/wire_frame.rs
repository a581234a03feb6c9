//! Control-stream frames as a peer sends them: decoding plus record validation
//! (paths, hashes, symlink targets, inline content) must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = certmesh::wire::decode_frame(data);
    // The length-prefixed reader: the limit is checked before allocating.
    let mut r: &[u8] = data;
    let rt = tokio_free_block_on(certmesh::wire::read_msg::<_, certmesh::wire::pb::Frame>(&mut r, certmesh::wire::MAX_FRAME));
    let _ = rt;
});

/// Polls a future that never waits (reading from a slice) to completion.
fn tokio_free_block_on<F: std::future::Future>(f: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

//! Any bytes a peer sends as a frame: decoding never panics, and anything it accepts survives
//! its own encode/decode round trip.
//!
//! Run: `cd transport/fuzz && cargo +nightly fuzz run frame_decode corpus/frame_decode`.
//! `transport/tests/fuzz_corpus.rs` replays the corpus (and mutations of it) in the normal tests.

#![no_main]

use libfuzzer_sys::fuzz_target;
use raftwal_transport::{FrameLimits, decode, encode};

fuzz_target!(|data: &[u8]| {
    let limits = FrameLimits::default();
    if let Ok(msg) = decode(bytes::Bytes::copy_from_slice(data), &limits) {
        let again = decode(bytes::Bytes::from(encode(&msg).to_vec()), &limits);
        assert_eq!(again.as_ref(), Ok(&msg));
    }
});

//! Any bytes a client could send: the head parser never panics, gives the same answer
//! however the bytes arrive, never accepts two framings at once, and the body decoder (fed
//! in any pieces) never uses more than it is given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use server::http::body::Decoder;
use server::http::request::{parse, Framing, HeadLimits};

const LIMITS: HeadLimits = HeadLimits {
    max_head: 4096,
    max_headers: 64,
};

fuzz_target!(|input: (u8, &[u8])| {
    let (step, data) = input;
    let whole = parse(data, LIMITS);
    // Arriving in pieces: incomplete until the end of the head, then the same result.
    for cut in (0..data.len()).step_by(usize::from(step.max(1))) {
        if let Ok(Some((_, len))) = parse(&data[..cut], LIMITS) {
            let (head, whole_len) = whole.clone().unwrap().unwrap();
            assert_eq!(len, whole_len);
            assert!(head.content_length().is_some() || head.framing == Framing::Chunked);
            break;
        }
    }
    let Ok(Some((head, len))) = whole else {
        return;
    };
    let lengths = head.headers().filter(|(n, _)| *n == b"content-length").count();
    let chunked = head.headers().any(|(n, _)| n == b"transfer-encoding");
    assert!(lengths <= 1 && !(lengths == 1 && chunked));
    let mut decoder = match head.framing {
        Framing::Length(n) => Decoder::length(n),
        Framing::Chunked => Decoder::chunked(),
    };
    let mut rest = &data[len..];
    while !rest.is_empty() && !decoder.is_done() {
        let piece = &rest[..rest.len().min(usize::from(step.max(1)))];
        match decoder.decode(piece, &mut |_| {}) {
            Ok(s) => {
                assert!(s.used <= piece.len());
                if s.used == 0 {
                    break;
                }
                rest = &rest[s.used..];
            }
            Err(_) => return,
        }
    }
});

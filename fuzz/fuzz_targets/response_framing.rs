//! Any bytes a handler could send as a response, in any pieces: the framing watcher never
//! panics and never says the response ended beyond the bytes it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use server::http::framing::{Fed, ResponseFraming};

fuzz_target!(|input: (bool, u8, &[u8])| {
    let (is_head, step, data) = input;
    let mut framing = ResponseFraming::new(is_head);
    for piece in data.chunks(usize::from(step.max(1))) {
        match framing.feed(piece) {
            Fed::More => {}
            Fed::Complete(n) => {
                assert!(n <= piece.len());
                return;
            }
        }
    }
});

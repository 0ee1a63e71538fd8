//! Any bytes a ZeroMQ peer could send, split at any points: the decoder never panics, never
//! keeps more than its cap of a message, and a message it returns is within the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmtp::{Decoder, Event};

fuzz_target!(|input: (u16, u8, &[u8])| {
    let (cap, step, data) = input;
    let cap = u64::from(cap);
    let mut decoder = Decoder::new(cap);
    let mut buffered = Vec::new();
    for piece in data.chunks(usize::from(step.max(1))) {
        buffered.extend_from_slice(piece);
        loop {
            match decoder.decode(&buffered) {
                Err(_) => return,
                Ok((used, event)) => {
                    assert!(used <= buffered.len());
                    buffered.drain(..used);
                    if let Some(Event::Message(m)) = &event {
                        assert!(m.len() as u64 <= cap);
                    }
                    if used == 0 && event.is_none() {
                        break;
                    }
                }
            }
        }
    }
});

//! Any bytes mongrel2 (or anything on its socket) could send: parsing must never panic,
//! and whatever parses must classify and re-encode a reply without panicking either, and
//! agree with the one-header lookup the broker uses (`find_header`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use m2wire::{encode_reply, find_header, parse_address, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::parse(data) {
        let _ = req.kind();
        let _ = req.upload();
        let _ = req.declares_body();
        for (name, value) in req.headers.iter() {
            let _ = (name, value.joined(b", "));
            assert_eq!(find_header(data, name).as_deref(), req.header(name));
        }
        let reply = encode_reply(req.sender, &[req.conn_id], req.body).expect("a parsed sender is a valid reply UUID");
        assert!(reply.starts_with(req.sender));
    }
    let _ = parse_address(data);
    let _ = find_header(data, b"DIRECT");
});

//! ZMTP 3.0 framing, pure: bytes in, events or bytes out (RFC 23 and 37).
//!
//! The decoder is incremental and never needs more memory than the message cap: a message
//! over the cap is skipped as it streams past, and only its first bytes are kept, so that
//! the caller can answer the connection it names.

const SIGNATURE_END: u8 = 0x7F;
pub const FLAG_MORE: u8 = 0x01;
pub const FLAG_LONG: u8 = 0x02;
pub const FLAG_COMMAND: u8 = 0x04;

/// Commands are small (READY's metadata, PING's context); a larger one is a broken peer.
const MAX_COMMAND: u64 = 64 * 1024;
/// How much of an oversized message is kept: enough for mongrel2's `UUID ID PATH `.
pub const OVERSIZED_HEAD: usize = 512;

/// Our greeting: signature, version 3.0, mechanism NULL, as-server 0, filler.
pub fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xFF;
    g[8] = 1;
    g[9] = SIGNATURE_END;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Checks a peer's greeting: a ZMTP 3.x peer using the NULL mechanism.
pub fn check_greeting(g: &[u8]) -> Result<(), String> {
    if g.len() < 64 || g[0] != 0xFF || g[9] != SIGNATURE_END {
        return Err("not a ZeroMQ peer".into());
    }
    if g[10] < 3 {
        return Err("peer speaks ZMTP before 3.0".into());
    }
    if &g[12..16] != b"NULL" || g[16..32].iter().any(|&b| b != 0) {
        return Err("peer wants a security mechanism other than NULL".into());
    }
    Ok(())
}

/// Appends a frame header (flags + size) for a body of `body_len` bytes.
pub fn push_frame(out: &mut Vec<u8>, flags: u8, body_len: usize) {
    if body_len <= 255 {
        out.extend_from_slice(&[flags, body_len as u8]);
    } else {
        out.push(flags | FLAG_LONG);
        out.extend_from_slice(&(body_len as u64).to_be_bytes());
    }
}

/// Appends a command frame: `name` then `data`.
pub fn push_command(out: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    push_frame(out, FLAG_COMMAND, 1 + name.len() + data.len());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(data);
}

/// Our READY command: `Socket-Type: <socket_type>`.
pub fn ready_command(socket_type: &[u8]) -> Vec<u8> {
    let mut data = vec![11];
    data.extend_from_slice(b"Socket-Type");
    data.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    data.extend_from_slice(socket_type);
    let mut out = Vec::with_capacity(data.len() + 8);
    push_command(&mut out, b"READY", &data);
    out
}

/// A property of a READY command's metadata (`name-len name value-len(4, BE) value`...),
/// by name, compared as ASCII without case (RFC 37); `Err` when the metadata is malformed.
pub fn ready_property<'a>(data: &'a [u8], wanted: &[u8]) -> Result<Option<&'a [u8]>, String> {
    let mut rest = data;
    while let Some((&len, after)) = rest.split_first() {
        let (name, after) = after
            .split_at_checked(len as usize)
            .ok_or("a malformed READY: short property name")?;
        let (len, after) = after
            .split_first_chunk::<4>()
            .ok_or("a malformed READY: short property length")?;
        let (value, after) = after
            .split_at_checked(u32::from_be_bytes(*len) as usize)
            .ok_or("a malformed READY: short property value")?;
        if name.eq_ignore_ascii_case(wanted) {
            return Ok(Some(value));
        }
        rest = after;
    }
    Ok(None)
}

/// A command's name and data.
pub fn split_command(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = *body.first()? as usize;
    (body.len() > len).then(|| (&body[1..1 + len], &body[1 + len..]))
}

/// The PONG that answers a PING's body (RFC 37: the PING's context, echoed).
pub fn pong_for(ping_data: &[u8]) -> Vec<u8> {
    let context = ping_data.get(2..).unwrap_or_default();
    let mut out = Vec::with_capacity(context.len() + 8);
    push_command(&mut out, b"PONG", &context[..context.len().min(16)]);
    out
}

/// What the decoder found.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A whole message, its frames joined.
    Message(Vec<u8>),
    /// A command frame's body (name length, name, data).
    Command(Vec<u8>),
    /// A message over the cap, skipped: its first bytes and its whole size.
    Oversized { head: Vec<u8>, size: u64 },
}

/// An incremental decoder of frames into messages and commands.
#[derive(Debug)]
pub struct Decoder {
    max_message: u64,
    /// Frames of the message so far (all but the last had MORE).
    parts: Vec<u8>,
    /// The message in progress is over the cap: what was kept of it, and its size so far.
    oversized: Option<(Vec<u8>, u64)>,
    /// Bytes of the current (oversized) frame still to skip, and whether MORE follows it.
    skipping: u64,
    more_after_skip: bool,
}

impl Decoder {
    pub fn new(max_message: u64) -> Decoder {
        Decoder {
            max_message,
            parts: Vec::new(),
            oversized: None,
            skipping: 0,
            more_after_skip: false,
        }
    }

    /// Decodes from the start of `input`: returns how many bytes it consumed, and an event
    /// when one completed. `(0, None)` means more input is needed. Call again after any
    /// other result. An error means the stream is broken and the connection must end.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Event>), String> {
        if self.skipping > 0 {
            let n = self.skipping.min(input.len() as u64);
            self.skipping -= n;
            let done = self.skipping == 0 && !self.more_after_skip;
            return Ok((n as usize, if done { self.take_oversized() } else { None }));
        }
        let Some((flags, len, header)) = frame_header(input) else {
            return Ok((0, None));
        };
        if flags & FLAG_COMMAND != 0 {
            if len > MAX_COMMAND {
                return Err(format!("a command frame of {len} bytes"));
            }
            if !self.parts.is_empty() || self.oversized.is_some() {
                return Err("a command inside a multi-frame message".into());
            }
            let end = header + len as usize;
            return Ok(match input.get(header..end) {
                Some(body) => (end, Some(Event::Command(body.to_vec()))),
                None => (0, None),
            });
        }
        let more = flags & FLAG_MORE != 0;
        let so_far = match &self.oversized {
            Some((_, size)) => *size,
            None => self.parts.len() as u64,
        };
        if self.oversized.is_some() || so_far.saturating_add(len) > self.max_message {
            // Over the cap: keep the message's first bytes, skip the rest as it comes.
            let (head, size) = self.oversized.get_or_insert_with(|| {
                let mut head = std::mem::take(&mut self.parts);
                head.truncate(OVERSIZED_HEAD);
                (head, 0)
            });
            *size = so_far.saturating_add(len);
            let available = &input[header..];
            let keep = (OVERSIZED_HEAD.saturating_sub(head.len()) as u64)
                .min(len)
                .min(available.len() as u64) as usize;
            head.extend_from_slice(&available[..keep]);
            self.skipping = len - keep as u64;
            self.more_after_skip = more;
            let done = self.skipping == 0 && !more;
            return Ok((
                header + keep,
                if done { self.take_oversized() } else { None },
            ));
        }
        let end = header + len as usize;
        let Some(body) = input.get(header..end) else {
            return Ok((0, None));
        };
        if more {
            self.parts.extend_from_slice(body);
            return Ok((end, None));
        }
        let message = if self.parts.is_empty() {
            body.to_vec()
        } else {
            let mut parts = std::mem::take(&mut self.parts);
            parts.extend_from_slice(body);
            parts
        };
        Ok((end, Some(Event::Message(message))))
    }

    /// How many bytes the frame at the start of `input` needs in all, when it is a frame
    /// that must arrive whole (to size a read buffer).
    pub fn wanted(&self, input: &[u8]) -> Option<usize> {
        if self.skipping > 0 {
            return None;
        }
        let (_, len, header) = frame_header(input)?;
        Some(header + len.min(self.max_message) as usize)
    }

    fn take_oversized(&mut self) -> Option<Event> {
        let (head, size) = self.oversized.take()?;
        Some(Event::Oversized { head, size })
    }
}

/// A frame's flags, body length and header length, once the header is complete.
fn frame_header(input: &[u8]) -> Option<(u8, u64, usize)> {
    let flags = *input.first()?;
    if flags & FLAG_LONG != 0 {
        let len = u64::from_be_bytes(input.get(1..9)?.try_into().ok()?);
        Some((flags, len, 9))
    } else {
        Some((flags, u64::from(*input.get(1)?), 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_frame(&mut out, flags, body.len());
        out.extend_from_slice(body);
        out
    }

    /// Feeds `input` to a decoder in pieces of `step` bytes, as reads would deliver it.
    fn feed(decoder: &mut Decoder, input: &[u8], step: usize) -> Result<Vec<Event>, String> {
        let mut events = Vec::new();
        let mut buffered = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buffered.extend_from_slice(piece);
            loop {
                let (used, event) = decoder.decode(&buffered)?;
                buffered.drain(..used);
                events.extend(event);
                if used == 0 {
                    break;
                }
            }
        }
        Ok(events)
    }

    #[test]
    fn frames_short_and_long() {
        let mut out = Vec::new();
        push_frame(&mut out, 0, 3);
        assert_eq!(out, [0, 3]);
        out.clear();
        push_frame(&mut out, 0, 300);
        assert_eq!(out, [FLAG_LONG, 0, 0, 0, 0, 0, 0, 1, 44]);
    }

    #[test]
    fn greets_as_zmtp_30_null() {
        let g = greeting();
        check_greeting(&g).unwrap();
        let mut other = g;
        other[12..16].copy_from_slice(b"PLAI");
        assert!(check_greeting(&other).is_err());
        let ready = ready_command(b"PUB");
        assert_eq!(&ready[..2], &[FLAG_COMMAND, 25]);
        assert!(ready.ends_with(b"Socket-Type\x00\x00\x00\x03PUB"));
    }

    #[test]
    fn reads_ready_properties() {
        let ready = ready_command(b"PUSH");
        let (name, data) = split_command(&ready[2..]).unwrap();
        assert_eq!(name, b"READY");
        assert_eq!(ready_property(data, b"socket-type"), Ok(Some(&b"PUSH"[..])));
        assert_eq!(ready_property(data, b"Identity"), Ok(None));
        let mut two = b"\x08Identity\x00\x00\x00\x00".to_vec();
        two.extend_from_slice(data);
        assert_eq!(ready_property(&two, b"Socket-Type"), Ok(Some(&b"PUSH"[..])));
        assert!(ready_property(&data[..data.len() - 1], b"Socket-Type").is_err());
        assert!(ready_property(b"\x0bSocket-Type\x00\x00", b"Socket-Type").is_err());
    }

    #[test]
    fn pong_echoes_the_ping_context() {
        let (name, data) = split_command(b"\x04PING\x00\x0aabc").unwrap();
        assert_eq!((name, data), (&b"PING"[..], &b"\x00\x0aabc"[..]));
        assert_eq!(pong_for(data), frame(FLAG_COMMAND, b"\x04PONGabc"));
    }

    #[test]
    fn joins_frames_and_passes_commands() {
        let mut input = frame(FLAG_COMMAND, b"\x04PING\x00\x01");
        input.extend(frame(FLAG_MORE, b"ab"));
        input.extend(frame(0, b"cd"));
        let events = feed(&mut Decoder::new(100), &input, 1).unwrap();
        assert_eq!(
            events,
            [
                Event::Command(b"\x04PING\x00\x01".to_vec()),
                Event::Message(b"abcd".to_vec())
            ]
        );
    }

    #[test]
    fn skips_an_oversized_message_and_goes_on() {
        let big = vec![b'x'; 5000];
        let mut input = frame(FLAG_MORE, b"uuid 7 /p ");
        input.extend(frame(FLAG_MORE, &big));
        input.extend(frame(0, &big));
        input.extend(frame(0, b"next"));
        let mut decoder = Decoder::new(1000);
        let events = feed(&mut decoder, &input, 333).unwrap();
        let Event::Oversized { head, size } = &events[0] else {
            panic!("{events:?}")
        };
        assert!(head.starts_with(b"uuid 7 /p xxx"));
        assert_eq!(head.len(), OVERSIZED_HEAD);
        assert_eq!(*size, 10 + 10000);
        assert_eq!(events[1], Event::Message(b"next".to_vec()));
        assert!(decoder.parts.is_empty());
    }

    /// Found by the fuzzer: a 64-bit frame length near the top overflowed the cap check.
    #[test]
    fn a_frame_length_near_u64_max_is_oversized_not_an_overflow() {
        let mut input = vec![FLAG_LONG];
        input.extend_from_slice(&(u64::MAX - 1).to_be_bytes());
        input.extend_from_slice(b"uuid 1 /x ");
        let mut decoder = Decoder::new(100);
        let mut parts = Decoder::new(100);
        let (used, event) = decoder.decode(&input).unwrap();
        assert_eq!((used, event), (input.len(), None));
        // Also when earlier frames of the same message count towards the cap.
        let mut more = vec![FLAG_MORE, 2, b'a', b'b', FLAG_LONG];
        more.extend_from_slice(&u64::MAX.to_be_bytes());
        let (used, _) = parts.decode(&more).unwrap();
        assert_eq!(used, 4);
        assert!(parts.decode(&more[4..]).is_ok());
    }

    #[test]
    fn refuses_huge_commands() {
        let mut input = vec![FLAG_COMMAND | FLAG_LONG];
        input.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(Decoder::new(10).decode(&input).is_err());
    }

    proptest! {
        /// Whatever the read sizes, messages come out whole and in order; those over the
        /// cap come out as Oversized with their true size.
        #[test]
        fn any_split_gives_the_same_messages(
            messages in prop::collection::vec(
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..400), 1..4), 1..8),
            step in 1usize..700,
            cap in 1u64..1200,
        ) {
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for parts in &messages {
                for (i, part) in parts.iter().enumerate() {
                    let more = if i + 1 < parts.len() { FLAG_MORE } else { 0 };
                    input.extend(frame(more, part));
                }
                let whole: Vec<u8> = parts.concat();
                expected.push(if whole.len() as u64 > cap {
                    (None, whole.len() as u64)
                } else {
                    (Some(whole.clone()), whole.len() as u64)
                });
            }
            let events = feed(&mut Decoder::new(cap), &input, step).unwrap();
            prop_assert_eq!(events.len(), expected.len());
            for (event, (whole, size)) in events.iter().zip(&expected) {
                match (event, whole) {
                    (Event::Message(m), Some(w)) => prop_assert_eq!(m, w),
                    (Event::Oversized { size: s, .. }, None) => prop_assert_eq!(s, size),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }

        /// Garbage never panics the decoder.
        #[test]
        fn garbage_never_panics(input in prop::collection::vec(any::<u8>(), 0..600), cap in 0u64..300) {
            let _ = feed(&mut Decoder::new(cap), &input, 7);
        }
    }
}

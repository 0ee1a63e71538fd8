//! Where a handler's response ends.
//!
//! mongrel2 handlers send raw HTTP bytes, in as many messages as they like, with nothing that
//! marks the end of a response. To keep pipelined responses in order, and to know when a
//! connection may take its next request, the front end follows the response's own framing
//! (RFC 9112 §6.3): a head (1xx heads are followed by another), then a body delimited by
//! `Content-Length`, by chunks, by nothing (HEAD, 204, 304), or by the connection's close.
//! The bytes are passed through untouched; this only watches them.

use super::body::Decoder;

/// Longest response head we wait for before giving up on framing it.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
pub struct ResponseFraming {
    request_is_head: bool,
    state: State,
    /// Head bytes gathered across messages.
    head: Vec<u8>,
    /// The response asked to close the connection after it.
    close: bool,
    /// The final head's status code, once seen (for the access log).
    status: u16,
}

#[derive(Debug)]
enum State {
    Head,
    Body(Decoder),
    /// No framing: the response lasts until the connection closes.
    UntilClose,
    Done,
}

/// What one call to [`ResponseFraming::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// All of the input belongs to the response, which goes on.
    More,
    /// The response ends after this many bytes of the input.
    Complete(usize),
}

impl ResponseFraming {
    pub fn new(request_is_head: bool) -> ResponseFraming {
        ResponseFraming {
            request_is_head,
            state: State::Head,
            head: Vec::new(),
            close: false,
            status: 0,
        }
    }

    /// The response must be followed by a close: it said so, or it has no framing.
    pub fn close_after(&self) -> bool {
        self.close || matches!(self.state, State::UntilClose)
    }

    /// The final status code, 0 until the head is seen (or when it is not HTTP).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Whether the response's head has been seen whole.
    pub fn head_seen(&self) -> bool {
        !matches!(self.state, State::Head)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Follows `input`, the next bytes of the response.
    pub fn feed(&mut self, input: &[u8]) -> Fed {
        let mut at = 0;
        loop {
            match &mut self.state {
                State::Done => return Fed::Complete(at),
                State::UntilClose => return Fed::More,
                State::Body(decoder) => {
                    match decoder.decode(&input[at..], &mut |_| {}) {
                        Ok(step) => {
                            at += step.used;
                            if step.done {
                                self.state = State::Done;
                                continue;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("a handler's chunked response is malformed ({}): the connection closes after it", e.0);
                            self.state = State::UntilClose;
                        }
                    }
                    if at >= input.len() {
                        return Fed::More;
                    }
                }
                State::Head => {
                    let before = self.head.len();
                    let parsed = if before == 0 {
                        // Usually the head arrives whole, with the body after it: parsed
                        // where it lies, never copied.
                        self.parse_head(&input[at..])
                    } else {
                        let mut gathered = std::mem::take(&mut self.head);
                        gathered.extend_from_slice(&input[at..]);
                        let parsed = self.parse_head(&gathered);
                        self.head = gathered;
                        parsed
                    };
                    match parsed {
                        Some(head_len) => {
                            at += head_len - before;
                            self.head.clear();
                        }
                        None => {
                            if before == 0 {
                                self.head.extend_from_slice(&input[at..]);
                            }
                            if self.head.len() > MAX_HEAD {
                                self.unframed("response head too large");
                            }
                            return Fed::More;
                        }
                    }
                }
            }
        }
    }

    /// Parses a head at the start of `bytes`: its length once complete (all of `bytes`
    /// when it cannot be framed), with the state it leads to.
    fn parse_head(&mut self, bytes: &[u8]) -> Option<usize> {
        // 64 slots on the stack, zeroed for every response; more only for a head that needs them.
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut many;
        let mut response = httparse::Response::new(&mut slots);
        let mut parsed = response.parse(bytes);
        if parsed == Err(httparse::Error::TooManyHeaders) {
            many = vec![httparse::EMPTY_HEADER; 1024];
            response = httparse::Response::new(&mut many);
            parsed = response.parse(bytes);
        }
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(e) => {
                self.unframed(&format!("malformed response head: {e}"));
                return Some(bytes.len());
            }
        };
        let code = response.code.unwrap_or(0);
        let mut length = None;
        let mut chunked = false;
        let mut close = response.version == Some(0);
        for h in response.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let parsed = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if parsed.is_none() || length.is_some_and(|l| Some(l) != parsed) {
                    self.unframed("malformed Content-Length in a response");
                    return Some(len);
                }
                length = parsed;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h
                    .value
                    .split(|&b| b == b',')
                    .next_back()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                for option in h.value.split(|&b| b == b',') {
                    let option = option.trim_ascii();
                    if option.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive")
                        && response.version == Some(0)
                    {
                        close = false;
                    }
                }
            }
        }
        self.state = if (100..200).contains(&code) && code != 101 {
            State::Head
        } else {
            self.close |= close;
            self.status = code;
            if self.request_is_head || code == 204 || code == 304 {
                State::Done
            } else if chunked {
                State::Body(Decoder::chunked())
            } else if let Some(n) = length {
                State::Body(Decoder::length(n))
            } else {
                State::UntilClose
            }
        };
        if let State::Body(d) = &self.state {
            if d.is_done() {
                self.state = State::Done;
            }
        }
        Some(len)
    }

    fn unframed(&mut self, why: &str) {
        tracing::warn!("{why}: the connection closes after this response");
        self.state = State::UntilClose;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_all(f: &mut ResponseFraming, input: &[u8], step: usize) -> Option<usize> {
        let mut at = 0;
        for piece in input.chunks(step.max(1)) {
            match f.feed(piece) {
                Fed::Complete(n) => return Some(at + n),
                Fed::More => at += piece.len(),
            }
        }
        None
    }

    #[test]
    fn content_length_chunked_and_bodyless() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        assert_eq!(
            feed_all(&mut ResponseFraming::new(false), r, 1000),
            Some(r.len() - 5)
        );
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(
            feed_all(&mut ResponseFraming::new(false), r, 3),
            Some(r.len())
        );
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            feed_all(&mut ResponseFraming::new(true), r, 1000),
            Some(r.len())
        );
        let r = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            feed_all(&mut ResponseFraming::new(false), r, 1000),
            Some(r.len())
        );
        let r = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            feed_all(&mut ResponseFraming::new(false), r, 2),
            Some(r.len())
        );
    }

    #[test]
    fn unframed_responses_last_until_close() {
        let mut f = ResponseFraming::new(false);
        assert_eq!(
            feed_all(&mut f, b"HTTP/1.0 200 OK\r\n\r\nbody...", 1000),
            None
        );
        assert!(f.close_after());
        let mut f = ResponseFraming::new(false);
        assert_eq!(feed_all(&mut f, b"garbage\r\n\r\n", 1000), None);
        assert!(f.close_after());
        let mut f = ResponseFraming::new(false);
        feed_all(
            &mut f,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            1000,
        )
        .unwrap();
        assert!(f.close_after());
    }

    proptest! {
        /// A chunked response of any body, fed in any pieces, ends exactly at its end.
        #[test]
        fn chunked_ends_exactly(body in proptest::collection::vec(any::<u8>(), 0..500), step in 1usize..50) {
            let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for c in body.chunks(37) {
                r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                r.extend_from_slice(c);
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"0\r\n\r\n");
            prop_assert_eq!(feed_all(&mut ResponseFraming::new(false), &r, step), Some(r.len()));
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..300), step in 1usize..40) {
            let _ = feed_all(&mut ResponseFraming::new(false), &input, step);
        }
    }
}

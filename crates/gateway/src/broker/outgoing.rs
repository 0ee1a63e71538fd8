//! Replies on their way to mongrel2, per client connection: merged, paced, and sent as
//! mongrel2's flow control allows.
//!
//! mongrel2 disconnects a client with more than 16 replies queued for it (reference §8.5),
//! and it reads its handler socket in bursts, so a generator of many small chunks, sent as
//! they come, is cut after a few. Without flow control, a connection here has at most
//! `WINDOW_MESSAGES` messages sent in any `WINDOW`; what the app yields meanwhile merges
//! into the next message. A stall of mongrel2 longer than two windows while the client reads
//! can still trip its limit: that is what remains without flow control.
//!
//! With `download.flow_control=1`, mongrel2 grants each connection 100 KiB of credits
//! (`DOWNLOAD_CREDITS` on its first request) and gives back what it wrote to the client
//! (credits notices). Then a connection is sent no more than its credits, so any client,
//! however slow, receives the whole response, and the worker waits (its stream is not read)
//! instead of buffering.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use m2wire::{encode_prefix, ConnId};
use rustc_hash::{FxHashMap, FxHashSet};
use server::front::lend::{BACK, CLOSE, DONE, HELD, KEEP_ALIVE};

/// At most this many messages to one connection in any `WINDOW` (mongrel2 allows 16 queued).
pub const WINDOW_MESSAGES: usize = 8;
pub const WINDOW: Duration = Duration::from_millis(20);
/// Flow-control state of a connection nothing was sent to for this long is forgotten.
const CREDITS_KEPT: Duration = Duration::from_secs(600);
const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// What becomes of a connection whose response a worker wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    KeepAlive,
    Close,
    /// The worker keeps it, and reads its next requests itself.
    Held,
}

struct ConnOut {
    /// `UUID LEN:ID, `.
    prefix: Vec<u8>,
    pending: Vec<u8>,
    /// `ctl` replies to the front end, in order, once `pending` is sent: a response a
    /// worker wrote to the client itself is complete, a held connection is given back.
    ctls: Vec<Vec<u8>>,
    /// Close the connection once `pending` is sent.
    close: bool,
    /// A `ctl` reply (`done: close`) says so already: no close message follows it (the
    /// front end would find the connection closing, and warn of a stray reply).
    close_told: bool,
    /// When the last messages were sent, oldest first (at most `WINDOW_MESSAGES`).
    sent: VecDeque<Instant>,
    /// Bytes mongrel2 accepts now, under flow control.
    credits: Option<u64>,
    touched: Instant,
}

impl ConnOut {
    /// When this connection may be sent its next message without flow control.
    fn window_opens(&self) -> Option<Instant> {
        (self.sent.len() >= WINDOW_MESSAGES).then(|| self.sent[0] + WINDOW)
    }

    fn idle(&self, now: Instant) -> bool {
        self.pending.is_empty()
            && !self.close
            && self.ctls.is_empty()
            && match self.credits {
                Some(_) => now >= self.touched + CREDITS_KEPT,
                None => self.sent.back().is_none_or(|&t| now >= t + WINDOW),
            }
    }
}

/// Where `flush` sends a message: `(prefix, payload)`; `false` when it takes no more now.
pub trait Sender {
    fn send(&mut self, prefix: &[u8], payload: &[u8]) -> bool;
}

#[derive(Default)]
pub struct Outgoing {
    conns: FxHashMap<ConnId, ConnOut>,
    /// Connections with something to send.
    dirty: FxHashSet<ConnId>,
    last_sweep: Option<Instant>,
}

impl Outgoing {
    fn entry(&mut self, sender: &[u8], conn: ConnId) -> Option<&mut ConnOut> {
        use std::collections::hash_map::Entry;
        match self.conns.entry(conn) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(e) => {
                let mut prefix = Vec::with_capacity(sender.len() + 16);
                if let Err(err) = encode_prefix(&mut prefix, sender, &[conn]) {
                    tracing::warn!(conn, "cannot reply: {err}");
                    return None;
                }
                Some(e.insert(ConnOut {
                    prefix,
                    pending: Vec::new(),
                    ctls: Vec::new(),
                    close: false,
                    close_told: false,
                    sent: VecDeque::with_capacity(WINDOW_MESSAGES),
                    credits: None,
                    touched: Instant::now(),
                }))
            }
        }
    }

    /// Appends reply bytes for `conn`, and closes it after them when `close`. Nothing is
    /// added after a close: it would reach the client as part of the previous response.
    pub fn push(&mut self, sender: &[u8], conn: ConnId, data: &[u8], close: bool) {
        if let Some(out) = self.entry(sender, conn) {
            if out.close {
                if !data.is_empty() {
                    tracing::debug!(conn, "dropped a reply to a connection being closed");
                }
                return;
            }
            out.pending.extend_from_slice(data);
            out.close |= close;
            if !out.pending.is_empty() || out.close {
                self.dirty.insert(conn);
            }
        }
    }

    /// The response in service on `conn` was written to the client by its worker (the
    /// front end lent the connection): the front end is told, after anything queued before.
    pub fn push_done(&mut self, sender: &[u8], conn: ConnId, after: After) {
        let value: &[u8] = match after {
            After::KeepAlive => KEEP_ALIVE,
            After::Close => CLOSE,
            After::Held => HELD,
        };
        self.push_ctl(sender, conn, DONE, value, after == After::Close);
    }

    /// A held connection goes back to the front end, with what its worker read of it.
    pub fn push_back(&mut self, sender: &[u8], conn: ConnId, read: &[u8]) {
        self.push_ctl(sender, conn, BACK, read, false);
    }

    fn push_ctl(&mut self, sender: &[u8], conn: ConnId, key: &[u8], value: &[u8], close: bool) {
        let ctl = match m2wire::encode_ctl(sender, &[conn], &[(key, value)]) {
            Ok(ctl) => ctl,
            Err(err) => return tracing::warn!(conn, "cannot reply: {err}"),
        };
        if let Some(out) = self.entry(sender, conn) {
            if out.close {
                return;
            }
            out.ctls.push(ctl);
            out.close = close;
            out.close_told = close;
            self.dirty.insert(conn);
        }
    }

    /// A request arrived on `conn` while nothing was in service for it: its client has read
    /// the previous responses (it did not pipeline), so none of our messages wait in
    /// mongrel2 for it, and the window starts afresh. Without this, a keep-alive client
    /// would be held to `WINDOW_MESSAGES` responses per `WINDOW`.
    pub fn fresh_request(&mut self, conn: ConnId) {
        if let Some(out) = self.conns.get_mut(&conn) {
            if out.pending.is_empty() {
                out.sent.clear();
            }
        }
    }

    /// Flow control: mongrel2's initial grant (`initial`) or credits given back.
    pub fn grant(&mut self, sender: &[u8], conn: ConnId, credits: u64, initial: bool) {
        if let Some(out) = self.entry(sender, conn) {
            out.credits = Some(match out.credits {
                Some(have) if !initial => have.saturating_add(credits),
                _ => credits,
            });
            out.touched = Instant::now();
            if !out.pending.is_empty() || out.close {
                self.dirty.insert(conn);
            }
        }
    }

    /// The client went away: what waits for it is dropped. Returns the bytes dropped.
    pub fn forget(&mut self, conn: ConnId) -> usize {
        self.dirty.remove(&conn);
        self.conns.remove(&conn).map_or(0, |out| out.pending.len())
    }

    /// A new epoch: everything is dropped. Returns the bytes dropped.
    pub fn clear(&mut self) -> usize {
        self.dirty.clear();
        self.conns.drain().map(|(_, out)| out.pending.len()).sum()
    }

    /// Bytes waiting for `conn`.
    pub fn pending(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |out| out.pending.len())
    }

    /// Nothing waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Sends what may go now; returns when to call again for what must wait for its window
    /// (data waiting for credits waits for a `grant`).
    pub fn flush(&mut self, now: Instant, sender: &mut impl Sender) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut done = Vec::new();
        for &conn in &self.dirty {
            let out = self.conns.get_mut(&conn).expect("dirty connections exist");
            match send_what_may_go(out, now, sender) {
                Flushed::Blocked => break,
                Flushed::Wait(at) => next = Some(next.map_or(at, |n| n.min(at))),
                Flushed::Credits => {}
                Flushed::All => done.push(conn),
            }
        }
        for conn in done {
            self.dirty.remove(&conn);
            if self.conns.get(&conn).is_some_and(|out| out.close) {
                self.conns.remove(&conn);
            }
        }
        if self.last_sweep.is_none_or(|t| now >= t + SWEEP_EVERY) {
            self.last_sweep = Some(now);
            self.conns.retain(|_, out| !out.idle(now));
        }
        next
    }
}

enum Flushed {
    /// Everything sent (the close too).
    All,
    /// The rest may go at this time.
    Wait(Instant),
    /// The rest waits for credits.
    Credits,
    /// The sender takes no more now.
    Blocked,
}

fn send_what_may_go(out: &mut ConnOut, now: Instant, sender: &mut impl Sender) -> Flushed {
    while !out.pending.is_empty() {
        let take = match out.credits {
            Some(0) => return Flushed::Credits,
            Some(credits) => out.pending.len().min(credits as usize),
            None => match out.window_opens() {
                Some(at) if now < at => return Flushed::Wait(at),
                _ => out.pending.len(),
            },
        };
        if !sender.send(&out.prefix, &out.pending[..take]) {
            return Flushed::Blocked;
        }
        note_sent(out, now);
        if let Some(credits) = out.credits.as_mut() {
            *credits -= take as u64;
        }
        if take == out.pending.len() {
            // Idle connections keep no buffer.
            out.pending = Vec::new();
        } else {
            out.pending.drain(..take);
        }
    }
    while let Some(ctl) = out.ctls.first() {
        if !sender.send(ctl, b"") {
            return Flushed::Blocked;
        }
        out.ctls.remove(0);
    }
    if out.close && !out.close_told {
        if let (None, Some(at)) = (out.credits, out.window_opens()) {
            if now < at {
                return Flushed::Wait(at);
            }
        }
        if !sender.send(&out.prefix, b"") {
            return Flushed::Blocked;
        }
    }
    Flushed::All
}

fn note_sent(out: &mut ConnOut, now: Instant) {
    if out.sent.len() == WINDOW_MESSAGES {
        out.sent.pop_front();
    }
    out.sent.push_back(now);
    out.touched = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        sent: Vec<(Vec<u8>, Vec<u8>)>,
        refuse: bool,
    }

    impl Sender for Recorder {
        fn send(&mut self, prefix: &[u8], payload: &[u8]) -> bool {
            if self.refuse {
                return false;
            }
            self.sent.push((prefix.to_vec(), payload.to_vec()));
            true
        }
    }

    #[test]
    fn a_direct_response_is_announced_after_what_was_queued_before_it() {
        let (mut out, mut rec) = (Outgoing::default(), Recorder::default());
        let now = Instant::now();
        out.push(b"u", 7, b"relayed", false);
        out.push_done(b"u", 7, After::KeepAlive);
        out.push_done(b"u", 8, After::Close);
        out.push(b"u", 8, b"after a close", false);
        out.push_done(b"u", 9, After::Held);
        out.push_back(b"u", 9, b"GET");
        assert_eq!(out.flush(now, &mut rec), None);
        let mut sent = rec.sent.clone();
        sent.sort();
        let keep: &[u8] = b"u 3:X 7, 31:3:ctl,21:4:done,10:keep-alive,}]";
        // The ctl reply closes: no close message after it, nor anything else.
        let close: &[u8] = b"u 3:X 8, 25:3:ctl,15:4:done,5:close,}]";
        let held: &[u8] = b"u 3:X 9, 24:3:ctl,14:4:done,4:held,}]";
        let back: &[u8] = b"u 3:X 9, 23:3:ctl,13:4:back,3:GET,}]";
        assert_eq!(
            sent,
            [
                (b"u 1:7, ".to_vec(), b"relayed".to_vec()),
                (keep.to_vec(), vec![]),
                (close.to_vec(), vec![]),
                (back.to_vec(), vec![]),
                (held.to_vec(), vec![]),
            ]
        );
        let order = |m: &[u8]| rec.sent.iter().position(|(p, _)| p == m).unwrap();
        assert!(order(b"u 1:7, ") < order(keep));
        assert!(order(held) < order(back));
        assert!(out.is_empty());
    }

    #[test]
    fn many_small_pieces_merge_past_the_window() {
        let (mut out, mut rec) = (Outgoing::default(), Recorder::default());
        let start = Instant::now();
        for i in 0..600u32 {
            out.push(b"u", 7, &i.to_le_bytes(), false);
            out.flush(start, &mut rec);
        }
        assert_eq!(rec.sent.len(), WINDOW_MESSAGES);
        assert_eq!(rec.sent[0].0, b"u 1:7, ");
        let at = out.flush(start, &mut rec).expect("waits for its window");
        assert_eq!(at, start + WINDOW);
        out.push(b"u", 7, b"", true);
        assert_eq!(out.flush(at, &mut rec), None);
        // One merged message with the rest, then the close.
        assert_eq!(rec.sent.len(), WINDOW_MESSAGES + 2);
        let body: Vec<u8> = rec.sent[..WINDOW_MESSAGES + 1]
            .iter()
            .flat_map(|m| m.1.clone())
            .collect();
        let expected: Vec<u8> = (0..600u32).flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(body, expected);
        assert_eq!(rec.sent.last().unwrap().1, b"");
        assert!(out.is_empty());
    }

    #[test]
    fn a_fresh_request_opens_the_window() {
        let (mut out, mut rec) = (Outgoing::default(), Recorder::default());
        let now = Instant::now();
        for _ in 0..WINDOW_MESSAGES {
            out.push(b"u", 4, b"response", false);
            out.flush(now, &mut rec);
        }
        out.push(b"u", 4, b"held", false);
        assert!(out.flush(now, &mut rec).is_some());
        assert_eq!(rec.sent.len(), WINDOW_MESSAGES);
        out.flush(now + WINDOW, &mut rec);
        out.fresh_request(4);
        out.push(b"u", 4, b"next", false);
        assert_eq!(out.flush(now + WINDOW, &mut rec), None);
        assert_eq!(rec.sent.last().unwrap().1, b"next");
    }

    #[test]
    fn credits_bound_what_is_sent() {
        let (mut out, mut rec) = (Outgoing::default(), Recorder::default());
        let now = Instant::now();
        out.grant(b"u", 3, 1000, true);
        out.push(b"u", 3, &[b'x'; 2500], true);
        assert_eq!(out.flush(now, &mut rec), None);
        assert_eq!(rec.sent.len(), 1);
        assert_eq!(rec.sent[0].1.len(), 1000);
        assert_eq!(out.pending(3), 1500);
        out.grant(b"u", 3, 600, false);
        out.flush(now, &mut rec);
        assert_eq!(rec.sent[1].1.len(), 600);
        out.grant(b"u", 3, 5000, false);
        out.flush(now, &mut rec);
        assert_eq!(rec.sent[2].1.len(), 900);
        assert_eq!(rec.sent[3].1, b"");
        assert!(out.is_empty());
        assert_eq!(out.pending(3), 0);
    }

    #[test]
    fn a_blocked_sender_keeps_everything_and_order_holds() {
        let (mut out, mut rec) = (Outgoing::default(), Recorder::default());
        let now = Instant::now();
        rec.refuse = true;
        out.push(b"u", 1, b"ab", false);
        out.flush(now, &mut rec);
        out.push(b"u", 1, b"cd", false);
        rec.refuse = false;
        out.flush(now, &mut rec);
        assert_eq!(rec.sent, [(b"u 1:1, ".to_vec(), b"abcd".to_vec())]);
        // Nothing goes out after a close.
        out.push(b"u", 1, b"", true);
        out.push(b"u", 1, b"late", false);
        out.flush(now, &mut rec);
        assert_eq!(rec.sent.last().unwrap().1, b"");
        assert!(!rec.sent.iter().any(|m| m.1 == b"late"));
        assert_eq!(out.forget(1), 0);
        out.push(b"u", 2, b"lost", false);
        assert_eq!(out.clear(), 4);
        assert!(out.is_empty());
    }
}

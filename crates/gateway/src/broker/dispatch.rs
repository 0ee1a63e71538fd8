//! Requests on their way to the workers: the shared queue, the requests in flight, and the
//! per-connection order of pipelined requests.

use std::collections::VecDeque;
use std::rc::Rc;

use m2wire::{find_header, is_notice, parse_address, ConnId, Request};
use rustc_hash::{FxHashMap, FxHashSet};
use server::front::lend::{Lent, BODY_PIPE, DIRECT};
use server::inproc::Lend;

use crate::link::{BrokerChannels, Lendings};

/// Most messages held back (behind a connection in service, or by a full queue); past
/// this, new requests are answered 503. Reading from mongrel2 never pauses: its credits
/// and disconnect notices must get through, and a heartbeating peer's PINGs answered.
pub const MAX_WAITING: usize = 1024;
/// Most requests held back for one connection, and for all connections together; past
/// these the connection is closed, so that held requests never stop the reading.
const PIPELINE_LIMIT: usize = 16;
const MAX_HELD: usize = MAX_WAITING / 2;
/// Most closed connections remembered (a bound on memory; ids only grow within an epoch).
const MAX_CLOSED: usize = 1 << 16;

/// A queued request, until its worker has sent the last piece of its response.
pub struct InFlight {
    pub conn: ConnId,
    pub sender: Rc<[u8]>,
    /// The epoch it arrived in: its replies go out only in the same epoch.
    pub epoch: u64,
    /// The worker that took it (its stream's descriptor), once its record has been read.
    pub taker: Option<i32>,
}

/// A connection to close (after what is already on its way to it), for the caller to do.
pub struct Close(pub Rc<[u8]>, pub ConnId);

#[derive(Default)]
pub struct Requests {
    /// Messages read from mongrel2 and not queued yet, oldest first.
    pub waiting: VecDeque<Vec<u8>>,
    /// The last `dispatch` found the queue full.
    pub queue_full: bool,
    next_seq: u64,
    pub in_flight: FxHashMap<u64, InFlight>,
    /// Requests in flight per connection: its next messages wait, so that the responses to
    /// pipelined requests go out in order even with several workers.
    busy: FxHashMap<ConnId, u32>,
    /// Connections to close once their requests in flight are answered; their other
    /// requests are dropped.
    closing: FxHashMap<ConnId, Rc<[u8]>>,
    /// Connections closed in this epoch: what else they sent is dropped (mongrel2 does not
    /// reuse an id before it restarts).
    closed: FxHashSet<ConnId>,
    /// The handler's UUID, shared by the requests that carry it.
    sender: Option<Rc<[u8]>>,
    /// Upload ends of connections that are gone: only their temp files are to be removed.
    discards: VecDeque<Vec<u8>>,
}

impl Requests {
    /// Whether a request of `conn` is in flight.
    pub fn is_busy(&self, conn: ConnId) -> bool {
        self.busy.contains_key(&conn)
    }

    /// Requests of the current epoch not yet answered in full.
    pub fn unanswered(&self, epoch: u64) -> usize {
        self.in_flight.values().filter(|f| f.epoch == epoch).count()
    }

    /// A sequence number for something other than a request (a probe).
    pub fn reserve_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// A new epoch: nothing held or waiting is worth serving; connections are all new.
    pub fn forget_epoch(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        self.discards
            .extend(waiting.into_iter().filter_map(upload_done));
        self.busy.clear();
        self.closing.clear();
        self.closed.clear();
    }

    /// `conn` is closed (or its client gone): nothing more is served on it.
    pub fn mark_closed(&mut self, conn: ConnId) {
        if self.closed.len() >= MAX_CLOSED {
            self.closed.clear();
        }
        self.closed.insert(conn);
        self.drop_waiting(conn);
    }

    /// The client of `conn` went away (mongrel2 said so): its id is done with.
    pub fn forget_conn(&mut self, conn: ConnId) {
        self.closed.remove(&conn);
    }

    fn shared_sender(&mut self, sender: &[u8]) -> Rc<[u8]> {
        match &self.sender {
            Some(s) if &s[..] == sender => s.clone(),
            _ => {
                let s: Rc<[u8]> = Rc::from(sender);
                self.sender = Some(s.clone());
                s
            }
        }
    }

    /// The response to `seq` is complete (or will never come). Returns the connection to
    /// close, when it was waiting for that. A request of an earlier epoch frees nothing:
    /// its connection id may belong to a new client now.
    pub fn finish(&mut self, seq: u64, epoch: u64) -> Option<Close> {
        let done = self.in_flight.remove(&seq)?;
        if done.epoch != epoch {
            return None;
        }
        let count = self.busy.get_mut(&done.conn)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.busy.remove(&done.conn);
        let sender = self.closing.remove(&done.conn)?;
        self.mark_closed(done.conn);
        Some(Close(sender, done.conn))
    }

    /// Drops the requests waiting for `conn` (it is being closed); an upload's end among
    /// them still has its temp file removed.
    pub fn drop_waiting(&mut self, conn: ConnId) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for msg in self.waiting.drain(..) {
            if is_notice(&msg) || parse_address(&msg).is_none_or(|(_, c)| c != conn) {
                kept.push_back(msg);
            } else {
                self.discards.extend(upload_done(msg));
            }
        }
        self.waiting = kept;
    }

    /// An upload's end that will not be served still has its temp file removed.
    pub fn discard(&mut self, msg: Vec<u8>) {
        self.discards.extend(upload_done(msg));
    }

    /// Closes `conn` once what is in flight for it is answered, and drops what waits.
    pub fn close_when_done(&mut self, sender: &[u8], conn: ConnId) -> Option<Close> {
        self.drop_waiting(conn);
        let sender = self.shared_sender(sender);
        if self.busy.contains_key(&conn) {
            self.closing.insert(conn, sender);
            None
        } else {
            self.mark_closed(conn);
            Some(Close(sender, conn))
        }
    }

    /// Queues the waiting requests, oldest first: those for a connection still in service
    /// are passed over, or refused past the pipelining limits. Notices are returned to the
    /// caller (they answer nothing), as are the connections to close.
    pub fn dispatch(
        &mut self,
        channels: &BrokerChannels,
        epoch: u64,
        notices: &mut Vec<Vec<u8>>,
        verdicts: &mut Vec<Close>,
        lend: Option<&mut dyn Lend>,
    ) {
        let mut pass = Pass {
            channels,
            epoch,
            lend,
            notices,
            verdicts,
            held: FxHashMap::default(),
            held_total: 0,
            full: false,
        };
        let mut i = 0;
        while i < self.waiting.len() {
            i = self.dispatch_at(i, &mut pass);
        }
        // Last: the pass may have added some (requests of closed connections).
        while let Some(msg) = self.discards.front().filter(|_| !pass.full) {
            match channels.discard(self.next_seq, msg) {
                Ok(true) => self.next_seq += 1,
                Ok(false) => {
                    pass.full = true;
                    break;
                }
                Err(e) => tracing::error!("cannot queue an upload's removal: {e}"),
            }
            self.discards.pop_front();
        }
        self.queue_full = pass.full;
    }

    /// Handles the waiting message at `i`: passes over it, drops it or queues it. Returns
    /// the index of the next message to look at.
    fn dispatch_at(&mut self, i: usize, pass: &mut Pass<'_, '_>) -> usize {
        if is_notice(&self.waiting[i]) {
            pass.notices.extend(self.waiting.remove(i));
            return i;
        }
        let Some((sender_len, conn)) =
            parse_address(&self.waiting[i]).map(|(s, conn)| (s.len(), conn))
        else {
            tracing::warn!("a message from mongrel2 without an address, dropped");
            self.waiting.remove(i);
            return i;
        };
        // A closed connection's requests are dropped, but an upload's end has its temp
        // file removed (mongrel2 sends it even after we refused the upload's start).
        if self.closing.contains_key(&conn) || self.closed.contains(&conn) {
            let msg = self.waiting.remove(i).expect("index in range");
            self.discard(msg);
            return i;
        }
        if self.busy.contains_key(&conn) {
            return self.hold(i, conn, sender_len, pass);
        }
        if pass.full {
            // Queue full: requests wait, but notices behind them are still handled.
            return i + 1;
        }
        self.enqueue(i, conn, sender_len, pass)
    }

    /// A request of a connection in service waits its turn, unless the connection has
    /// pipelined past the limits (its held requests must not fill what we hold for
    /// everyone): then it is closed once its requests in flight are answered, and what it
    /// sent since is dropped.
    fn hold(
        &mut self,
        i: usize,
        conn: ConnId,
        sender_len: usize,
        pass: &mut Pass<'_, '_>,
    ) -> usize {
        let count = pass.held.entry(conn).or_default();
        *count += 1;
        pass.held_total += 1;
        if *count <= PIPELINE_LIMIT && pass.held_total <= MAX_HELD {
            return i + 1;
        }
        // Its requests passed over earlier in this pass are before `i`, and go too.
        let earlier = *count - 1;
        pass.held_total -= *count;
        pass.held.remove(&conn);
        tracing::warn!(
            conn,
            "closing a connection that pipelined too many requests"
        );
        let msg = self.waiting.remove(i).expect("index in range");
        pass.verdicts
            .extend(self.close_when_done(&msg[..sender_len], conn));
        i - earlier
    }

    /// Queues the request at `i` for the workers (with its client's connection, when it is
    /// lent), and notes it in flight.
    fn enqueue(
        &mut self,
        i: usize,
        conn: ConnId,
        sender_len: usize,
        pass: &mut Pass<'_, '_>,
    ) -> usize {
        let seq = self.next_seq;
        let msg = &self.waiting[i];
        let lendings = match pass.lend.as_deref() {
            Some(lend) => lendings(lend, conn, msg),
            None => Some(Lendings::default()),
        };
        let Some(lendings) = lendings else {
            // Its body went with its client: nobody to serve, no worker to wake.
            tracing::debug!(conn, "a request whose client left with its body, dropped");
            let msg = self.waiting.remove(i).expect("index in range");
            pass.verdicts
                .extend(self.close_when_done(&msg[..sender_len], conn));
            return i;
        };
        let piped = lendings.body.is_some();
        match pass.channels.enqueue(seq, msg, lendings) {
            Ok(true) => {
                if let Some(lend) = pass.lend.as_deref_mut().filter(|_| piped) {
                    lend.body_sent(conn);
                }
            }
            Ok(false) => {
                pass.full = true;
                return i + 1;
            }
            Err(e) => {
                tracing::error!(conn, "cannot queue a request ({e}); closing its connection");
                let msg = self.waiting.remove(i).expect("index in range");
                pass.verdicts
                    .extend(self.close_when_done(&msg[..sender_len], conn));
                return i;
            }
        }
        self.next_seq += 1;
        let msg = self.waiting.remove(i).expect("index in range");
        *self.busy.entry(conn).or_default() += 1;
        let sender = self.shared_sender(&msg[..sender_len]);
        self.in_flight.insert(
            seq,
            InFlight {
                conn,
                sender,
                epoch: pass.epoch,
                taker: None,
            },
        );
        i
    }
}

/// One pass of `dispatch` over the waiting messages: where requests go, and what the pass
/// has held back so far.
struct Pass<'a, 'l> {
    channels: &'a BrokerChannels,
    epoch: u64,
    lend: Option<&'a mut (dyn Lend + 'l)>,
    notices: &'a mut Vec<Vec<u8>>,
    verdicts: &'a mut Vec<Close>,
    /// Requests passed over per connection in service, and in all.
    held: FxHashMap<ConnId, usize>,
    held_total: usize,
    /// The queue is full: requests wait for the next pass.
    full: bool,
}

/// What goes with `conn`'s request `msg` to its worker: the client's connection, when the
/// front end marked the request `DIRECT`, and the body pipe the request names. None when
/// the request names a pipe that went with its client (it left before the request was
/// queued).
fn lendings<'a>(lend: &'a dyn Lend, conn: ConnId, msg: &[u8]) -> Option<Lendings<'a>> {
    let direct = find_header(msg, DIRECT).is_some_and(|v| Lent::of(&v).is_some());
    let body = find_header(msg, BODY_PIPE).as_deref().and_then(serial_of);
    let lendings = Lendings {
        client: lend.client(conn).filter(|_| direct),
        body: body.and_then(|serial| lend.body(conn, serial)),
    };
    if body.is_some() && lendings.body.is_none() {
        if !lend.is_open(conn) {
            return None;
        }
        tracing::warn!(
            conn,
            "a request's body pipe did not come: its worker refuses it"
        );
    }
    Some(lendings)
}

fn serial_of(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The message, when it is a genuine upload's end (mongrel2's upload-done).
fn upload_done(msg: Vec<u8>) -> Option<Vec<u8>> {
    let done =
        Request::parse(&msg).is_ok_and(|r| matches!(r.upload(), m2wire::UploadMarker::Done(_)));
    done.then_some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(conn: ConnId, n: usize) -> Vec<u8> {
        let headers = r#"{"METHOD":"GET","VERSION":"HTTP/1.1"}"#;
        format!("uuid {conn} /{n} {}:{headers},0:,", headers.len()).into_bytes()
    }

    fn queued_conns(requests: &Requests) -> Vec<ConnId> {
        let mut conns: Vec<_> = requests.in_flight.values().map(|f| f.conn).collect();
        conns.sort();
        conns
    }

    #[test]
    fn pipelined_requests_wait_for_their_connection_and_others_pass_them() {
        let channels = BrokerChannels::new().unwrap();
        let mut requests = Requests::default();
        requests
            .waiting
            .extend([request(1, 0), request(1, 1), request(2, 0), request(1, 2)]);
        let (mut notices, mut closes) = (Vec::new(), Vec::new());
        requests.dispatch(&channels, 1, &mut notices, &mut closes, None);
        assert_eq!(queued_conns(&requests), [1, 2]);
        assert_eq!(requests.waiting, [request(1, 1), request(1, 2)]);
        assert!(closes.is_empty());
    }

    #[test]
    fn a_connection_pipelining_past_the_limit_is_closed_and_no_other_request_is_passed_over() {
        let channels = BrokerChannels::new().unwrap();
        let mut requests = Requests::default();
        requests
            .waiting
            .extend((0..=PIPELINE_LIMIT + 1).map(|n| request(1, n)));
        requests.waiting.extend([request(2, 0), request(3, 0)]);
        let (mut notices, mut closes) = (Vec::new(), Vec::new());
        requests.dispatch(&channels, 1, &mut notices, &mut closes, None);
        // Connection 1's first request is in service; it is closed once that is answered.
        assert!(closes.is_empty());
        assert_eq!(queued_conns(&requests), [1, 2, 3]);
        assert!(requests.waiting.is_empty());
        let seq = requests
            .in_flight
            .iter()
            .find(|(_, f)| f.conn == 1)
            .map(|(s, _)| *s);
        let close = requests
            .finish(seq.unwrap(), 1)
            .expect("closed once answered");
        assert_eq!(close.1, 1);
    }

    /// A front end's lending with one connection, 7, whose next body pipe is serial 2.
    struct OneConn {
        stream: std::os::unix::net::UnixStream,
        pipe: Option<std::os::fd::OwnedFd>,
    }

    impl Lend for OneConn {
        fn is_open(&self, id: u64) -> bool {
            id == 7
        }
        fn client(&self, id: u64) -> Option<std::os::fd::BorrowedFd<'_>> {
            use std::os::fd::AsFd;
            (id == 7).then(|| self.stream.as_fd())
        }
        fn body(&self, id: u64, serial: u64) -> Option<std::os::fd::BorrowedFd<'_>> {
            use std::os::fd::AsFd;
            self.pipe
                .as_ref()
                .filter(|_| (id, serial) == (7, 2))
                .map(|p| p.as_fd())
        }
        fn body_sent(&mut self, _: u64) {
            self.pipe = None;
        }
    }

    fn with_headers(conn: ConnId, headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        m2wire::encode_request(
            &mut out,
            b"front",
            conn,
            b"/",
            m2wire::HeaderEncoding::Tnetstring,
            headers,
            b"",
        );
        out
    }

    #[test]
    fn a_request_carries_its_client_only_when_direct_and_only_the_pipe_it_names() {
        let (stream, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (pipe, _write) = nix::unistd::pipe().unwrap();
        let lend = OneConn {
            stream,
            pipe: Some(pipe),
        };
        let direct: (&[u8], &[u8]) = (DIRECT, b"1");
        let got = |msg: &[u8], conn| {
            let l = lendings(&lend, conn, msg).expect("lendings");
            (l.client.is_some(), l.body.is_some())
        };
        assert_eq!(got(&with_headers(7, &[]), 7), (false, false));
        assert_eq!(got(&with_headers(7, &[direct]), 7), (true, false));
        assert_eq!(got(&with_headers(8, &[direct]), 8), (false, false));
        assert_eq!(
            got(&with_headers(7, &[(BODY_PIPE, b"2")]), 7),
            (false, true)
        );
        assert_eq!(
            got(&with_headers(7, &[(BODY_PIPE, b"1")]), 7),
            (false, false)
        );
        // Connection 8 is gone: its request, which named a pipe, is not for a worker.
        assert!(lendings(&lend, 8, &with_headers(8, &[(BODY_PIPE, b"2")])).is_none());
    }

    #[test]
    fn a_queued_requests_pipe_is_let_go_by_the_front_end() {
        let (stream, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (pipe, _write) = nix::unistd::pipe().unwrap();
        let mut lend = OneConn {
            stream,
            pipe: Some(pipe),
        };
        let channels = BrokerChannels::new().unwrap();
        let mut requests = Requests::default();
        requests
            .waiting
            .push_back(with_headers(7, &[(BODY_PIPE, b"2"), (DIRECT, b"1")]));
        let (mut notices, mut closes) = (Vec::new(), Vec::new());
        requests.dispatch(&channels, 1, &mut notices, &mut closes, Some(&mut lend));
        assert_eq!(queued_conns(&requests), [7]);
        assert!(lend.pipe.is_none());
    }
}

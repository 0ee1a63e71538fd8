//! Connections this worker holds between requests (one-command mode). The front end offers
//! a connection with a request when nothing of the next request has come yet
//! (`server::front::lend::Lent::MayHold`); once the response went out whole and the client
//! keeps the connection, the worker keeps its copy and reads the next requests itself, as
//! the front end would (`server::http`), so that under load a request crosses no process
//! and no queue: no hand-over to the front end, the broker and back.
//!
//! What keeps request-level balancing (design note 3): while the worker serves a request it
//! reads none of its held connections, and it notes each request in service in its ring
//! (`records::Ring::busy`), without a system call. The broker looks every two milliseconds;
//! a worker seen busy with the same request twice loses its held connections (but that
//! request's), which the broker gives back to the front end, whose next requests then go
//! to the shared queue and an idle worker. The broker takes them with a compare-and-swap,
//! so a connection is never read by both: the worker reads a held connection only between
//! requests, and learns it lost them when its request is over (`Ring::idle`).
//!
//! What the worker does not serve itself goes back to the front end with the bytes it read:
//! a request with a body, one not whole in one read, pipelined requests, an upgrade, a
//! malformed one (which the front end then refuses as it would have), the client's close.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use m2wire::request::{HeaderEncoding, Request};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use rustc_hash::FxHashMap;
use server::front::lend::Lent;
use server::http::message::{self, Origin};
use server::http::request::{self as http, Framing, HeadLimits};

use crate::link::{Piece, Replier};

/// At most this many connections held by one worker, and a quarter of its open files
/// limit; past it, responses end as before.
const MOST_HELD: u64 = 1024;
/// A held connection with no request for this long goes back to the front end, whose
/// keep-alive timeout then applies.
const IDLE: Duration = Duration::from_secs(2);
/// The most read from a held connection at once: a request head that fits the front end's
/// limit, and then some (a larger read is given back whole).
const READ: usize = 16 << 10;

/// What the front end said of a connection's requests, kept to say the same of the next.
pub struct Said {
    conn: u64,
    sender: Vec<u8>,
    encoding: HeaderEncoding,
    remote_ip: String,
    scheme: Vec<u8>,
    pattern: Vec<u8>,
}

impl Said {
    /// What request `req` says, when its connection is offered to keep.
    pub fn offered(req: &Request<'_>) -> Option<Said> {
        let lent = req.header(server::front::lend::DIRECT).and_then(Lent::of);
        if lent != Some(Lent::MayHold) {
            return None;
        }
        let text = |name: &[u8]| req.header(name).map(<[u8]>::to_vec);
        Some(Said {
            conn: req.conn_id,
            sender: req.sender.to_vec(),
            encoding: req.encoding,
            remote_ip: String::from_utf8(text(b"REMOTE_ADDR")?).ok()?,
            scheme: text(b"URL_SCHEME")?,
            pattern: text(b"PATTERN")?,
        })
    }
}

struct HeldConn {
    fd: Rc<OwnedFd>,
    said: Said,
    since: Instant,
    /// In `Holding::ready`, waiting to be served (the wait, level-triggered, reports it
    /// again until it is read).
    queued: bool,
}

/// A request read from a held connection, as the front end would have sent it.
pub struct HeldRequest {
    pub conn: u64,
    pub msg: Vec<u8>,
    pub fd: Rc<OwnedFd>,
}

/// What reading a held connection gave.
pub enum Read {
    Request(HeldRequest),
    /// Nothing to serve here (given back, closed, or not ready after all).
    Nothing,
}

pub struct Holding {
    conns: FxHashMap<u64, HeldConn>,
    /// Held connections the last wait found readable, not served yet, in that order; a
    /// connection let go meanwhile is skipped when its turn comes.
    ready: VecDeque<u64>,
    /// At most this many held: `MOST_HELD`, or a quarter of the open files limit.
    most: usize,
    /// Told to hold no more (the front end stops).
    closed: bool,
    limits: HeadLimits,
    no_clobber_xff: bool,
    buf: Vec<u8>,
    next_sweep: Option<Instant>,
}

/// Epoll tokens of held connections are their ids; the worker's own are below any id.
pub const FIRST_TOKEN: u64 = 3;

impl Default for Holding {
    fn default() -> Holding {
        let (limits, no_clobber_xff) = server::local::held_requests();
        Holding {
            conns: FxHashMap::default(),
            ready: VecDeque::new(),
            most: (server::run::raise_fd_limit() / 4).min(MOST_HELD) as usize,
            closed: false,
            limits,
            no_clobber_xff,
            buf: vec![0; READ],
            next_sweep: None,
        }
    }
}

impl Holding {
    /// Keeps the connection of a request just answered on it; false when it cannot be
    /// kept, and the response ends as any other.
    pub fn keep(&mut self, epoll: &Epoll, said: Said, fd: Rc<OwnedFd>) -> bool {
        let conn = said.conn;
        if self.closed
            || self.conns.len() >= self.most
            || conn < FIRST_TOKEN
            || self.conns.contains_key(&conn)
        {
            return false;
        }
        let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, conn);
        if epoll.add(fd.as_fd(), event).is_err() {
            return false;
        }
        let since = Instant::now();
        self.next_sweep.get_or_insert(since + IDLE);
        self.conns.insert(
            conn,
            HeldConn {
                fd,
                said,
                since,
                queued: false,
            },
        );
        true
    }

    /// Notes what a wait found readable.
    pub fn woke(&mut self, token: u64) {
        if let Some(held) = self.conns.get_mut(&token) {
            if !std::mem::replace(&mut held.queued, true) {
                self.ready.push_back(token);
            }
        }
    }

    /// A held connection the last wait found readable.
    pub fn next_ready(&mut self) -> Option<u64> {
        while let Some(conn) = self.ready.pop_front() {
            match self.conns.get_mut(&conn) {
                Some(held) if held.queued => {
                    held.queued = false;
                    return Some(conn);
                }
                // Let go since (or served already, from an earlier place in the queue).
                _ => {}
            }
        }
        None
    }

    /// Reads held connection `conn`'s next request. Call only while the worker is marked
    /// busy with it (`Ring::busy`): only then may the broker not take it back.
    pub fn read(&mut self, epoll: &Epoll, conn: u64, replier: &Replier) -> Read {
        let Some(held) = self.conns.get(&conn) else {
            return Read::Nothing;
        };
        let n = match nix::unistd::read(held.fd.as_fd(), &mut self.buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Read::Nothing,
            // Reset, say: the front end finds out for itself.
            Err(_) => 0,
        };
        let read = &self.buf[..n];
        let whole = match http::parse(read, self.limits) {
            Ok(Some((head, len))) if len == n && served_here(&head) => Some(head),
            _ => None,
        };
        let Some(head) = whole else {
            // The client closed, or a request for the front end to serve.
            replier.give_back(conn, read, Piece::Last);
            self.forget(epoll, conn);
            return Read::Nothing;
        };
        let held = self.conns.get_mut(&conn).expect("held");
        held.since = Instant::now();
        let origin = Origin {
            sender: &held.said.sender,
            conn_id: conn,
            encoding: held.said.encoding,
            remote_ip: &held.said.remote_ip,
            scheme: &held.said.scheme,
            pattern: &held.said.pattern,
            no_clobber_xff: self.no_clobber_xff,
        };
        let mut msg = Vec::new();
        message::encode(
            &mut msg,
            &origin,
            &head,
            None,
            &[(server::front::lend::DIRECT, Lent::MayHold.value())],
            b"",
        );
        Read::Request(HeldRequest {
            conn,
            msg,
            fd: held.fd.clone(),
        })
    }

    /// Lets connection `conn` go (our copy closes with the last `Rc`).
    pub fn forget(&mut self, epoll: &Epoll, conn: u64) {
        if let Some(held) = self.conns.remove(&conn) {
            let _ = epoll.delete(held.fd.as_fd());
        }
    }

    /// Drops every held connection but `serving`'s, unread: the broker took them back
    /// while that request was in service, or is gone with its front end.
    pub fn let_go(&mut self, epoll: &Epoll, serving: Option<u64>) {
        let gone: Vec<u64> = self
            .conns
            .keys()
            .copied()
            .filter(|&c| Some(c) != serving)
            .collect();
        for conn in gone {
            self.forget(epoll, conn);
        }
    }

    /// Holds no more connections.
    pub fn close(&mut self) {
        self.closed = true;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Gives every held connection back (the worker stops, or the front end).
    pub fn give_back_all(&mut self, epoll: &Epoll, replier: &Replier) {
        let all: Vec<u64> = self.conns.keys().copied().collect();
        for conn in all {
            self.forget(epoll, conn);
            replier.give_back(conn, &[], Piece::Last);
        }
    }

    /// Gives back the connections idle for `IDLE`, when a sweep is due. Call only between
    /// requests.
    pub fn sweep(&mut self, epoll: &Epoll, replier: &Replier) {
        let now = Instant::now();
        if self.next_sweep.is_none_or(|at| now < at) {
            return;
        }
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, h)| now.duration_since(h.since) >= IDLE)
            .map(|(&c, _)| c)
            .collect();
        for conn in idle {
            self.forget(epoll, conn);
            replier.give_back(conn, &[], Piece::Last);
        }
        self.next_sweep = (!self.conns.is_empty()).then(|| now + IDLE / 2);
    }

    /// When `sweep` is due.
    pub fn deadline(&self) -> Option<Instant> {
        self.next_sweep
    }
}

/// Whether the worker serves this request itself: one without a body, an upgrade or an
/// expectation, which the front end handles.
fn served_here(head: &http::Head) -> bool {
    head.framing == Framing::Length(0)
        && !head.expects_continue
        && head.header(b"upgrade").is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(wire: &str) -> http::Head {
        let (limits, _) = server::local::held_requests();
        http::parse(wire.as_bytes(), limits).unwrap().unwrap().0
    }

    #[test]
    fn only_requests_without_a_body_upgrade_or_expectation_are_served_here() {
        assert!(served_here(&head("GET / HTTP/1.1\r\nHost: x\r\n\r\n")));
        assert!(served_here(&head("HEAD /a?b HTTP/1.0\r\n\r\n")));
        for wire in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            assert!(!served_here(&head(wire)), "{wire}");
        }
    }

    fn message(direct: &[u8]) -> Vec<u8> {
        message_for(77, direct)
    }

    fn message_for(conn_id: u64, direct: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        let origin = Origin {
            sender: b"wsgid-local",
            conn_id,
            encoding: HeaderEncoding::Tnetstring,
            remote_ip: "10.0.0.1",
            scheme: b"http",
            pattern: b"/",
            no_clobber_xff: true,
        };
        let head = head("GET /x HTTP/1.1\r\nHost: x\r\n\r\n");
        message::encode(&mut msg, &origin, &head, None, &[(b"DIRECT", direct)], b"");
        msg
    }

    #[test]
    fn a_connection_is_kept_only_when_offered_and_says_the_same_again() {
        let offered = |direct| Said::offered(&Request::parse(&message(direct)).unwrap());
        assert!(offered(b"1").is_none());
        let said = offered(b"2").unwrap();
        assert_eq!(
            (said.conn, &said.sender[..], &said.remote_ip[..]),
            (77, &b"wsgid-local"[..], "10.0.0.1")
        );
        assert_eq!(
            (&said.scheme[..], &said.pattern[..]),
            (&b"http"[..], &b"/"[..])
        );
    }

    #[test]
    fn ready_connections_are_served_once_each_in_order_and_never_after_being_let_go() {
        use nix::sys::epoll::EpollCreateFlags;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let mut holding = Holding::default();
        let mut peers = Vec::new();
        for conn in [10, 11, 12] {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            peers.push(theirs);
            let said = Said::offered(&Request::parse(&message_for(conn, b"2")).unwrap()).unwrap();
            assert!(holding.keep(&epoll, said, Rc::new(OwnedFd::from(ours))));
        }
        // A level-triggered wait reports a connection again until it is read.
        for token in [11, 10, 11, 12, 10, 99] {
            holding.woke(token);
        }
        holding.forget(&epoll, 12);
        assert_eq!(holding.next_ready(), Some(11));
        assert_eq!(holding.next_ready(), Some(10));
        assert_eq!(holding.next_ready(), None);
        // Let go while queued, then kept anew: served once, as any other.
        holding.woke(11);
        holding.forget(&epoll, 11);
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let said = Said::offered(&Request::parse(&message_for(11, b"2")).unwrap()).unwrap();
        assert!(holding.keep(&epoll, said, Rc::new(OwnedFd::from(ours))));
        holding.woke(11);
        assert_eq!(holding.next_ready(), Some(11));
        assert_eq!(holding.next_ready(), None);
    }
}

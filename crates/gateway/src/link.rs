//! The broker ↔ worker link.
//!
//! Requests travel through one *shared queue*: a `SOCK_SEQPACKET` socket pair whose reading
//! end every worker holds. A worker takes the next request only when it is idle, so a fast
//! request never waits behind a slow one (design note 3), and a worker that stops simply stops
//! taking: nothing was assigned to it ahead of time, so nothing is lost (note 2). Under load a
//! worker finds its next request already queued and takes it without sleeping or asking.
//!
//! A worker notes what it *took* in a ring of memory shared with the broker (`records`).
//!
//! A worker connects to the broker's abstract Unix stream socket, and the broker answers with
//! a greeting carrying the queue and the worker's ring (`SCM_RIGHTS`). The worker then writes
//! its *replies* on that stream, framed by `ReplyHeader`: the broker alone talks to mongrel2,
//! over one connection, so a connection's responses reach mongrel2 in the order the broker
//! forwards them, whichever workers made them (mongrel2 fair-queues between connections:
//! design note 10). The stream's end tells either side that the other is gone. A request
//! may carry its client's connection (one-command mode, `server::inproc`): its worker writes
//! the response there and sends the broker only a `Done` frame saying it is complete; it may
//! then keep the connection and read its next requests itself (`crate::hold`).

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;

use nix::errno::Errno;

use crate::records::Ring;
use nix::sys::socket::{
    recv, recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockFlag, SockType,
};
pub use wsgi::response::Piece;

/// Environment variable carrying the link's name from the master to the workers.
pub const LINK_ENV: &str = "WSGID_LINK";
/// Environment variable carrying the listening socket's descriptor from the master to the
/// broker (or to the front end it runs inside): the master binds the name once and holds
/// it, so it is never free for another local user to take while a broker restarts.
pub const LISTENER_FD_ENV: &str = "WSGID_LINK_FD";

/// The broker's greeting, which carries the channels.
const WELCOME: u8 = b'w';
/// The broker's order, later on the same stream: give every held connection back, and hold
/// no more (the front end stops, and waits for its connections).
const GIVE_BACK: u8 = b'g';

/// Largest message carried in the queue itself. A datagram must fit the socket's send buffer
/// (`net.core.wmem_default`, 208 KiB here), so larger ones travel in a memfd.
const INLINE_MAX: usize = 64 * 1024;
/// A queued request: kind, sequence number (u64 LE), then the message when inline.
const INLINE: u8 = b'm';
const IN_FILE: u8 = b'f';
/// The same, with the body in a pipe. A frame's descriptors are, in this order: the
/// message's memfd (`IN_FILE`), the body's pipe (these two), the client's connection.
const INLINE_WITH_BODY: u8 = b'M';
const IN_FILE_WITH_BODY: u8 = b'F';
/// Not a request: the worker that takes it only records it (see `BrokerChannels::probe`).
const PROBE: u8 = b'p';
/// An upload's end for a connection that is gone: its temp file is removed, the app is not
/// called, and nothing is answered.
const DISCARD: u8 = b'd';
const QUEUE_HEADER: usize = 9;

/// The largest reply payload in one frame: a worker splits larger writes, so the broker
/// never holds more than this of one worker's reply at a time.
pub const MAX_REPLY_PIECE: usize = 256 * 1024;

/// A reply frame's header: the request's sequence number (u64 LE), the payload's length
/// (u32 LE), the piece kind, the frame's kind, two spare bytes; the payload follows.
pub struct ReplyHeader {
    /// The request's sequence number; a connection's id in a `Back` frame.
    pub seq: u64,
    pub len: u32,
    pub piece: Piece,
    pub frame: Frame,
}

/// What a reply frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Response bytes, for the broker to forward.
    Relayed,
    /// The worker wrote the response to the client's connection itself (see
    /// `Taken::Request::client`); this frame, which carries no payload, ends it.
    Done,
    /// The same, and the worker keeps the connection (`crate::hold`).
    DoneHeld,
    /// A held connection goes back to the front end with what the worker read of it (the
    /// payload); with `LastThenClose`, to be closed.
    Back,
}

/// What a response ends, for `Replier::finish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// A request taken from the queue, by its sequence number.
    Queued(u64),
    /// A request read from a held connection, by the connection's id.
    Held(u64),
}

impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ticket::Queued(seq) => write!(f, "request {seq}"),
            Ticket::Held(conn) => write!(f, "a request of held connection {conn}"),
        }
    }
}

impl ReplyHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12] = match self.piece {
            Piece::Middle => 0,
            Piece::Last => 1,
            Piece::LastThenClose => 2,
        };
        out[13] = match self.frame {
            Frame::Relayed => 0,
            Frame::Done => 1,
            Frame::DoneHeld => 2,
            Frame::Back => 3,
        };
        out
    }

    /// The header at the start of `input`; an error for a header no worker writes.
    pub fn decode(input: &[u8]) -> Option<Result<ReplyHeader, String>> {
        let raw: &[u8; Self::LEN] = input.get(..Self::LEN)?.try_into().ok()?;
        let seq = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let piece = match raw[12] {
            0 => Piece::Middle,
            1 => Piece::Last,
            2 => Piece::LastThenClose,
            other => return Some(Err(format!("a reply frame of kind {other}"))),
        };
        let frame = match raw[13] {
            0 => Frame::Relayed,
            1 if piece != Piece::Middle && len == 0 => Frame::Done,
            2 if piece == Piece::Last && len == 0 => Frame::DoneHeld,
            3 if piece != Piece::Middle => Frame::Back,
            _ => return Some(Err("a malformed direct reply frame".to_string())),
        };
        if len as usize > MAX_REPLY_PIECE {
            return Some(Err(format!("a reply frame of {len} bytes")));
        }
        Some(Ok(ReplyHeader {
            seq,
            len,
            piece,
            frame,
        }))
    }
}

/// A fresh name for a master's link: abstract, so nothing on disk to clean up or to reach
/// from inside a chroot; random, so nobody can take it ahead of us.
pub fn new_name(master_pid: u32) -> String {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(master_pid);
    format!("wsgid-{master_pid}-{random:016x}")
}

fn address(name: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(name.as_bytes())
}

pub fn listen(name: &str) -> io::Result<UnixListener> {
    UnixListener::bind_addr(&address(name)?)
}

/// The listener the master passed to its broker (or front end).
pub fn inherited_listener() -> io::Result<UnixListener> {
    let fd: RawFd = std::env::var(LISTENER_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no link listener: the broker is started by the master"))?;
    Ok(UnixListener::from(take_inherited(fd)?))
}

/// Takes ownership of a descriptor the master left open for this process (named in the
/// environment), and closes it on exec again, so that nothing we start inherits it.
pub fn take_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the master left this descriptor open for us; nothing else here owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}

/// The peer of a link runs as us: the broker accepts only our workers, a worker talks only
/// to our broker. Other local users cannot read requests or feed forged ones. Returns the
/// peer's pid. A worker sees the credentials of whoever bound the listener: the master,
/// which may be root (`--chroot` keeps it root while its children drop to the folder's
/// owner); root is trusted.
pub fn check_peer(stream: &UnixStream) -> io::Result<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let us = nix::unistd::geteuid().as_raw();
    if peer.uid() != us && peer.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("link peer runs as uid {}, not {us}", peer.uid()),
        ));
    }
    Ok(peer.pid())
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

/// Non-blocking send of one datagram; `Ok(false)` when the socket is full.
fn send_datagram(fd: &OwnedFd, parts: &[IoSlice<'_>], fds: &[RawFd]) -> io::Result<bool> {
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs = if fds.is_empty() { &[][..] } else { &cmsgs[..] };
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    match sendmsg::<()>(fd.as_raw_fd(), parts, cmsgs, flags, None) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The broker's side: both ends of the queue. It keeps the workers' end open too, so
/// requests in the queue outlive any worker and wait for the next one.
pub struct BrokerChannels {
    queue: OwnedFd,
    queue_for_workers: OwnedFd,
}

impl BrokerChannels {
    pub fn new() -> io::Result<BrokerChannels> {
        let (queue, queue_for_workers) = seqpacket_pair()?;
        Ok(BrokerChannels {
            queue,
            queue_for_workers,
        })
    }

    /// The queue's writing end, to poll for room.
    pub fn queue_fd(&self) -> &OwnedFd {
        &self.queue
    }

    /// Greets a new worker with the queue and its own ring.
    pub fn welcome(&self, stream: &UnixStream, ring: &OwnedFd) -> io::Result<()> {
        let greeting = [WELCOME];
        let fds = [self.queue_for_workers.as_raw_fd(), ring.as_raw_fd()];
        let cmsgs = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&greeting)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// Orders the worker on `stream` to give back the connections it holds, for good.
    pub fn order_give_back(&self, stream: &UnixStream) {
        // Non-blocking; nothing else goes this way after the greeting, so there is room.
        let _ = (&*stream).write(&[GIVE_BACK]);
    }

    /// Queues an upload's end whose connection is gone, for a worker to remove its file.
    pub fn discard(&self, seq: u64, msg: &[u8]) -> io::Result<bool> {
        self.send_frame(DISCARD, seq, &msg[..msg.len().min(INLINE_MAX)], &[])
    }

    /// Queues a request, with what the front end lent for it; `Ok(false)` when the queue is
    /// full (poll `queue_fd` for room).
    pub fn enqueue(&self, seq: u64, msg: &[u8], lendings: Lendings) -> io::Result<bool> {
        let with_body = lendings.body.is_some();
        let file = if msg.len() <= INLINE_MAX {
            None
        } else {
            let mut file: File = nix::sys::memfd::memfd_create(
                c"wsgid-request",
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )?
            .into();
            file.write_all(msg)?;
            Some(file)
        };
        // In the frame's order (see `IN_FILE_WITH_BODY`), on the stack: every request.
        let mut fds = [0 as RawFd; 3];
        let mut n = 0;
        let lent = lendings.body.into_iter().chain(lendings.client);
        for fd in file
            .as_ref()
            .map(AsRawFd::as_raw_fd)
            .into_iter()
            .chain(lent.map(|fd| fd.as_raw_fd()))
        {
            fds[n] = fd;
            n += 1;
        }
        let (kind, msg) = match (&file, with_body) {
            (None, false) => (INLINE, msg),
            (None, true) => (INLINE_WITH_BODY, msg),
            (Some(_), false) => (IN_FILE, &[][..]),
            (Some(_), true) => (IN_FILE_WITH_BODY, &[][..]),
        };
        self.send_frame(kind, seq, msg, &fds[..n])
    }

    /// Queues a probe: once a worker records it as taken, every request queued before it
    /// has been taken too (the queue is first in, first out). A worker that died while
    /// taking leaves a request nobody recorded; the probe tells which one.
    pub fn probe(&self, seq: u64) -> io::Result<bool> {
        self.send_frame(PROBE, seq, &[], &[])
    }

    /// One frame of the queue: kind, sequence number, payload (see the constants).
    fn send_frame(&self, kind: u8, seq: u64, payload: &[u8], fds: &[RawFd]) -> io::Result<bool> {
        let mut header = [kind; QUEUE_HEADER];
        header[1..].copy_from_slice(&seq.to_le_bytes());
        send_datagram(
            &self.queue,
            &[IoSlice::new(&header), IoSlice::new(payload)],
            fds,
        )
    }
}

/// What the front end lent for a request (one-command mode), to travel with it.
#[derive(Default)]
pub struct Lendings<'a> {
    /// The client's connection, for the worker to write the response to.
    pub client: Option<BorrowedFd<'a>>,
    /// The pipe holding the body.
    pub body: Option<BorrowedFd<'a>>,
}

/// A worker's side of the link.
pub struct WorkerChannels {
    /// The stream to the broker: its end means the broker is gone.
    stream: UnixStream,
    replier: Arc<Replier>,
    queue: OwnedFd,
    ring: Ring,
    buf: Box<[u8]>,
}

/// What the broker said on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orders {
    None,
    /// Give back the held connections, and hold no more.
    GiveBack,
    /// The stream ended: the broker is gone, or let us go.
    Ended,
}

/// What taking from the queue gave.
pub enum Taken {
    Request {
        seq: u64,
        msg: Vec<u8>,
        /// The client's connection, when the front end lent it for this request: the
        /// response is written to it directly, not relayed (one-command mode).
        client: Option<OwnedFd>,
        /// The pipe holding the body, when it came in one (one-command mode).
        body: Option<OwnedFd>,
    },
    /// An upload's end whose connection is gone: remove its file, answer nothing.
    Discard { msg: Vec<u8> },
    /// Nothing queued now.
    Empty,
    /// Nothing queued, ever again: the broker is gone.
    Closed,
}

/// A worker's replies, written on its stream to the broker.
pub struct Replier {
    stream: UnixStream,
}

impl Replier {
    /// Sends one piece of the reply to request `seq` (blocking: the broker reads our
    /// stream only while the client's connection keeps up, which is the back-pressure).
    pub fn reply(&self, seq: u64, payload: &[u8], piece: Piece) -> io::Result<()> {
        let mut pieces = payload.chunks(MAX_REPLY_PIECE).peekable();
        if pieces.peek().is_none() {
            return self.send(Frame::Relayed, seq, piece, &[]);
        }
        while let Some(part) = pieces.next() {
            let this = if pieces.peek().is_some() {
                Piece::Middle
            } else {
                piece
            };
            self.send(Frame::Relayed, seq, this, part)?;
        }
        Ok(())
    }

    /// Tells the broker that a response written to the client directly is complete
    /// (`piece` says whether the connection is to close); a held connection goes back to
    /// the front end with it. When the broker is gone (in one-command mode, with its front
    /// end), the response went out all the same, and the client's connection is closed with
    /// our copy: nothing more to do but say so.
    pub fn finish(&self, ticket: Ticket, piece: Piece) {
        let seq = match ticket {
            Ticket::Queued(seq) => seq,
            Ticket::Held(conn) => return self.give_back(conn, &[], piece),
        };
        if let Err(e) = self.send(Frame::Done, seq, piece, &[]) {
            tracing::info!("the broker is gone ({e}): a response went out untold");
        }
    }

    /// Request `seq`'s response is complete, and its connection kept (`crate::hold`).
    pub fn finish_held(&self, seq: u64) {
        if let Err(e) = self.send(Frame::DoneHeld, seq, Piece::Last, &[]) {
            tracing::info!(seq, "the broker is gone ({e}): a response went out untold");
        }
    }

    /// Gives held connection `conn` back to the front end, with what was read of it
    /// (`LastThenClose`: to be closed).
    pub fn give_back(&self, conn: u64, read: &[u8], piece: Piece) {
        if let Err(e) = self.send(Frame::Back, conn, piece, read) {
            tracing::info!(
                conn,
                "the broker is gone ({e}): a held connection goes with it"
            );
        }
    }

    /// One frame to the broker: its header, then `payload` (the connection's number for
    /// `Back`, the request's for the others).
    fn send(&self, frame: Frame, seq: u64, piece: Piece, payload: &[u8]) -> io::Result<()> {
        let header = ReplyHeader {
            seq,
            len: payload.len() as u32,
            piece,
            frame,
        };
        self.write_header_and(&header.encode(), payload)
    }

    fn write_header_and(&self, header: &[u8], payload: &[u8]) -> io::Result<()> {
        let mut parts = [IoSlice::new(header), IoSlice::new(payload)];
        let mut parts = &mut parts[..];
        let mut stream = &self.stream;
        while !parts.is_empty() {
            match stream.write_vectored(parts) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Connects a worker to the link. The master holds the listener, also while its broker
/// (re)starts: the greeting comes when a broker accepts (poll the stream for it).
pub fn connect(name: &str) -> io::Result<UnixStream> {
    let stream = UnixStream::connect_addr(&address(name)?)?;
    check_peer(&stream)?;
    Ok(stream)
}

impl WorkerChannels {
    /// Receives the channels: reads the broker's greeting (blocking).
    pub fn receive(stream: UnixStream) -> io::Result<WorkerChannels> {
        let mut greeting = [0u8; 1];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut greeting)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let (fds, received) = (owned_fds(&msg)?, msg.bytes);
        let [queue, ring]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|_| io::Error::other("the broker's greeting lacks its channels"))?;
        if received != greeting.len() || greeting[0] != WELCOME {
            return Err(io::Error::other("unexpected greeting from the broker"));
        }
        Ok(WorkerChannels {
            replier: Arc::new(Replier {
                stream: stream.try_clone()?,
            }),
            stream,
            queue,
            ring: Ring::open(&ring)?,
            buf: vec![0u8; QUEUE_HEADER + INLINE_MAX].into_boxed_slice(),
        })
    }

    /// The stream, to poll for the broker's orders (`orders`).
    pub fn stream_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Reads the broker's orders.
    pub fn orders(&self) -> Orders {
        let mut orders = [0u8; 16];
        match recv(self.stream.as_raw_fd(), &mut orders, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => Orders::Ended,
            Ok(n) if orders[..n].contains(&GIVE_BACK) => Orders::GiveBack,
            Ok(_) | Err(_) => Orders::None,
        }
    }

    /// Where replies go.
    pub fn replier(&self) -> Arc<Replier> {
        self.replier.clone()
    }

    /// The queue's reading end, to poll for requests.
    pub fn queue_fd(&self) -> &OwnedFd {
        &self.queue
    }

    /// Takes the next request if one is queued (non-blocking), and records it as taken.
    /// While it runs, the ring says "taking": a worker killed inside leaves that mark.
    pub fn take(&mut self) -> io::Result<Taken> {
        self.ring.set_taking(true);
        let taken = self.take_unmarked();
        self.ring.set_taking(false);
        taken
    }

    fn take_unmarked(&mut self) -> io::Result<Taken> {
        loop {
            let mut cmsg = nix::cmsg_space!([RawFd; 3]);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let (len, truncated, fds) = {
                let mut iov = [IoSliceMut::new(&mut self.buf)];
                let msg =
                    match recvmsg::<()>(self.queue.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                        Ok(msg) => msg,
                        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Taken::Empty),
                        Err(e) => return Err(e.into()),
                    };
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                (msg.bytes, truncated, owned_fds(&msg))
            };
            if len == 0 {
                return Ok(Taken::Closed);
            }
            if len < QUEUE_HEADER {
                tracing::error!("a short frame in the request queue, skipped");
                continue;
            }
            // Taken: recorded before anything else can fail, so the broker never waits on
            // a request that nobody serves.
            let seq = u64::from_le_bytes(self.buf[1..QUEUE_HEADER].try_into().expect("8 bytes"));
            self.record(seq);
            if self.buf[0] == PROBE {
                continue;
            }
            if self.buf[0] == DISCARD {
                return Ok(Taken::Discard {
                    msg: self.buf[QUEUE_HEADER..len].to_vec(),
                });
            }
            match self.unpack(len, truncated, fds) {
                Ok((msg, body, client)) => {
                    return Ok(Taken::Request {
                        seq,
                        msg,
                        client,
                        body,
                    })
                }
                Err(e) => {
                    tracing::error!("a queued request was lost: {e}");
                    self.replier.reply(seq, &[], Piece::LastThenClose)?;
                }
            }
        }
    }

    /// The message of a request frame, and the body pipe and client connection it carries.
    fn unpack(
        &self,
        len: usize,
        truncated: bool,
        fds: io::Result<Vec<OwnedFd>>,
    ) -> io::Result<(Vec<u8>, Option<OwnedFd>, Option<OwnedFd>)> {
        let malformed = || io::Error::other("a malformed frame");
        if truncated {
            return Err(io::Error::other("the frame overran its buffer"));
        }
        let kind = self.buf[0];
        let mut fds = fds?.into_iter();
        let msg = match kind {
            INLINE | INLINE_WITH_BODY => self.buf[QUEUE_HEADER..len].to_vec(),
            IN_FILE | IN_FILE_WITH_BODY => {
                let mut file = File::from(fds.next().ok_or_else(malformed)?);
                file.rewind()?;
                let mut msg = Vec::new();
                file.read_to_end(&mut msg)?;
                msg
            }
            _ => return Err(malformed()),
        };
        let body = match kind {
            INLINE_WITH_BODY | IN_FILE_WITH_BODY => Some(fds.next().ok_or_else(malformed)?),
            _ => None,
        };
        let client = fds.next();
        if fds.next().is_some() {
            return Err(malformed());
        }
        Ok((msg, body, client))
    }

    /// Records a request as taken. A full ring means the broker has read none of our
    /// replies for a thousand requests: it is gone, or about to read.
    fn record(&self, seq: u64) {
        for _ in 0..1000 {
            if self.ring.write(seq) || self.broker_gone() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        tracing::error!(
            seq,
            "the broker reads no records; a request went unrecorded"
        );
    }

    /// A request is in service (see `records::Ring::busy`).
    pub fn busy(&self, generation: u64, serving: u64) {
        self.ring.busy(generation, serving);
    }

    /// The request in service is over; false when the broker took our held connections
    /// back meanwhile (see `records::Ring::idle`).
    pub fn idle(&self, generation: u64) -> bool {
        self.ring.idle(generation)
    }

    /// Whether the broker has gone (its end of the stream closed).
    pub fn broker_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(
            recv(
                self.stream.as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK
            ),
            Err(Errno::EAGAIN)
        )
    }
}

/// Takes ownership of the descriptors a message carried, so none leaks.
fn owned_fds(msg: &nix::sys::socket::RecvMsg<'_, '_, ()>) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now, and
            // nothing else refers to them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RingReader;
    use std::os::fd::AsFd;

    fn pair() -> (BrokerChannels, WorkerChannels, RingReader, UnixStream) {
        let name = format!(
            "wsgid-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let listener = listen(&name).unwrap();
        let broker = BrokerChannels::new().unwrap();
        let (reader, ring) = RingReader::create().unwrap();
        let joined = std::thread::spawn(move || connect(&name).and_then(WorkerChannels::receive));
        let (stream, _) = listener.accept().unwrap();
        assert_eq!(check_peer(&stream).unwrap() as u32, std::process::id());
        broker.welcome(&stream, &ring).unwrap();
        let worker = joined.join().unwrap().unwrap();
        (broker, worker, reader, stream)
    }

    fn take(worker: &mut WorkerChannels) -> (u64, Vec<u8>) {
        match worker.take().unwrap() {
            Taken::Request {
                seq,
                msg,
                client: None,
                body: None,
            } => (seq, msg),
            _ => panic!("nothing taken, or a client with it"),
        }
    }

    /// Reads reply frames from the broker's end of the stream: (seq, payload, piece).
    fn replies(stream: &mut UnixStream, count: usize) -> Vec<(u64, Vec<u8>, Piece)> {
        let mut out = Vec::new();
        while out.len() < count {
            let mut header = [0u8; ReplyHeader::LEN];
            stream.read_exact(&mut header).unwrap();
            let h = ReplyHeader::decode(&header).unwrap().unwrap();
            let mut payload = vec![0u8; h.len as usize];
            stream.read_exact(&mut payload).unwrap();
            out.push((h.seq, payload, h.piece));
        }
        out
    }

    #[test]
    fn requests_inline_and_in_a_file_arrive_in_order_with_records_and_replies() {
        let (broker, mut worker, reader, mut stream) = pair();
        let big: Vec<u8> = (0..INLINE_MAX * 3).map(|i| (i % 251) as u8).collect();
        assert!(broker.enqueue(1, b"small", Lendings::default()).unwrap());
        assert!(broker.enqueue(2, &big, Lendings::default()).unwrap());
        assert_eq!(take(&mut worker), (1, b"small".to_vec()));
        worker.replier().reply(1, b"hello", Piece::Last).unwrap();
        let (seq, msg) = take(&mut worker);
        assert_eq!((seq, msg == big), (2, true));
        assert!(matches!(worker.take().unwrap(), Taken::Empty));
        let mut records = Vec::new();
        reader.read(&mut |r| records.push(r));
        assert_eq!(records, [1, 2]);
        // A reply larger than a frame is split; only its last piece ends the response.
        let big: Vec<u8> = (0..MAX_REPLY_PIECE + 1000)
            .map(|i| (i % 253) as u8)
            .collect();
        let replier = worker.replier();
        let sent = big.clone();
        let writer = std::thread::spawn(move || replier.reply(2, &sent, Piece::LastThenClose));
        let got = replies(&mut stream, 2);
        assert_eq!(got[0], (1, b"hello".to_vec(), Piece::Last));
        assert_eq!(
            (got[1].0, got[1].1.len(), got[1].2),
            (2, MAX_REPLY_PIECE, Piece::Middle)
        );
        let rest = replies(&mut stream, 1);
        writer.join().unwrap().unwrap();
        assert_eq!(rest[0].2, Piece::LastThenClose);
        assert_eq!([&got[1].1[..], &rest[0].1[..]].concat(), big);
        // The broker is gone (the link's stream was closed); queued requests remain.
        assert!(!worker.broker_gone());
        assert!(broker.enqueue(3, b"last", Lendings::default()).unwrap());
        drop(stream);
        drop(broker);
        assert!(worker.broker_gone());
        assert_eq!(take(&mut worker), (3, b"last".to_vec()));
        assert!(matches!(worker.take().unwrap(), Taken::Closed));
        assert!(worker.replier().reply(3, b"x", Piece::Last).is_err());
    }

    #[test]
    fn a_full_queue_says_so_and_loses_nothing() {
        let (broker, mut worker, _reader, _stream) = pair();
        let msg = vec![7u8; 1000];
        let mut queued = 0u64;
        while broker.enqueue(queued, &msg, Lendings::default()).unwrap() {
            queued += 1;
            assert!(queued < 100_000, "the queue never filled");
        }
        for seq in 0..queued {
            assert_eq!(take(&mut worker).0, seq);
        }
        assert!(matches!(worker.take().unwrap(), Taken::Empty));
    }

    #[test]
    fn a_lent_client_connection_and_body_pipe_travel_with_their_request_inline_or_in_a_file() {
        let (broker, mut worker, _reader, mut stream) = pair();
        let big = vec![3u8; INLINE_MAX + 1];
        let mut seq = 0;
        for msg in [&b"small"[..], &big[..]] {
            for (with_client, with_body) in [(true, false), (false, true), (true, true)] {
                seq += 1;
                let (ours, theirs) = UnixStream::pair().unwrap();
                let (body_read, body_write) = UnixStream::pair().unwrap();
                let lendings = Lendings {
                    client: with_client.then(|| ours.as_fd()),
                    body: with_body.then(|| body_read.as_fd()),
                };
                assert!(broker.enqueue(seq, msg, lendings).unwrap());
                drop((ours, body_read));
                let Taken::Request {
                    seq: got,
                    msg: got_msg,
                    client,
                    body,
                } = worker.take().unwrap()
                else {
                    panic!("no request");
                };
                assert_eq!((got, got_msg == msg), (seq, true));
                assert_eq!((client.is_some(), body.is_some()), (with_client, with_body));
                // The very sockets: what is written at one end is read at the other.
                if let Some(body) = body {
                    (&body_write).write_all(b"body").unwrap();
                    let mut read = [0u8; 4];
                    (&UnixStream::from(body)).read_exact(&mut read).unwrap();
                    assert_eq!(&read, b"body");
                }
                if let Some(client) = client {
                    UnixStream::from(client).write_all(b"direct").unwrap();
                    let mut read = [0u8; 6];
                    (&theirs).read_exact(&mut read).unwrap();
                    assert_eq!(&read, b"direct");
                }
                worker.replier().finish(Ticket::Queued(seq), Piece::Last);
                let h = replies_headers(&mut stream, 1).remove(0);
                assert_eq!(
                    (h.seq, h.len, h.piece, h.frame == Frame::Done),
                    (seq, 0, Piece::Last, true)
                );
            }
        }
    }

    fn replies_headers(stream: &mut UnixStream, count: usize) -> Vec<ReplyHeader> {
        (0..count)
            .map(|_| {
                let mut header = [0u8; ReplyHeader::LEN];
                stream.read_exact(&mut header).unwrap();
                ReplyHeader::decode(&header).unwrap().unwrap()
            })
            .collect()
    }

    #[test]
    fn reply_headers_round_trip_and_refuse_nonsense() {
        for piece in [Piece::Middle, Piece::Last, Piece::LastThenClose] {
            let raw = ReplyHeader {
                seq: 9,
                len: 77,
                piece,
                frame: Frame::Relayed,
            }
            .encode();
            let h = ReplyHeader::decode(&raw).unwrap().unwrap();
            assert_eq!(
                (h.seq, h.len, h.piece, h.frame),
                (9, 77, piece, Frame::Relayed)
            );
        }
        // A direct frame ends a response and carries nothing.
        let mut direct = ReplyHeader {
            seq: 1,
            len: 0,
            piece: Piece::Last,
            frame: Frame::Done,
        }
        .encode();
        assert_eq!(
            ReplyHeader::decode(&direct).unwrap().unwrap().frame,
            Frame::Done
        );
        direct[12] = 0;
        assert!(ReplyHeader::decode(&direct).unwrap().is_err());
        // Keeping the connection ends a response whole; giving one back may carry bytes.
        direct[12] = 2;
        direct[13] = 2;
        assert!(ReplyHeader::decode(&direct).unwrap().is_err());
        direct[12] = 1;
        assert_eq!(
            ReplyHeader::decode(&direct).unwrap().unwrap().frame,
            Frame::DoneHeld
        );
        let back = ReplyHeader {
            seq: 5,
            len: 3,
            piece: Piece::LastThenClose,
            frame: Frame::Back,
        }
        .encode();
        assert_eq!(
            ReplyHeader::decode(&back).unwrap().unwrap().frame,
            Frame::Back
        );
        let mut raw = ReplyHeader {
            seq: 1,
            len: 1,
            piece: Piece::Last,
            frame: Frame::Relayed,
        }
        .encode();
        assert!(ReplyHeader::decode(&raw[..15]).is_none());
        raw[12] = 9;
        assert!(ReplyHeader::decode(&raw).unwrap().is_err());
        let raw = ReplyHeader {
            seq: 1,
            len: u32::MAX,
            piece: Piece::Last,
            frame: Frame::Relayed,
        }
        .encode();
        assert!(ReplyHeader::decode(&raw).unwrap().is_err());
    }
}

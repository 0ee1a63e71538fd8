//! One ZMTP connection, driven by the caller's poll loop: either one we dial to a bound
//! libzmq socket (a handler's side), or one a bound socket of ours accepted (a front end's).
//!
//! Nothing here blocks: connecting, the handshake, reading and writing all progress when the
//! caller says the socket is ready, and a peer that stalls mid-frame holds up nothing but
//! itself. A lost dialed connection becomes `Down` and is retried with backoff (100 ms
//! doubling to 2 s, as libzmq's `reconnect_ivl`), as a state of the loop: the caller goes on
//! supervising while mongrel2 is away. A lost accepted connection is over: the peer dials
//! again, and the caller drops this one ([`Peer::is_dead`]).

use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, TcpKeepalive, Type};

use crate::codec::{self, Decoder, Event};
use crate::readbuf::ReadBuf;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// A handshake not done by then is abandoned (a port that accepts but never speaks).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP: probes after 10 s idle, every 5 s, 3 of them; unacknowledged data gives up after 20 s.
/// mongrel2 sends no heartbeats, so without these a cut peer would go unnoticed for hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Most bytes read in one `drive` call, so one busy peer cannot starve the loop.
const READ_BUDGET: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    Pull,
    Pub,
    Push,
    Sub,
}

impl SocketType {
    /// Whether a peer socket of type `other` (READY's `Socket-Type`) may talk to us (RFC 28:
    /// PUSH with PULL, PUB with SUB, and the X variants). Anything else, our own type
    /// included (a TCP connection that met itself), is refused.
    fn accepts(self, other: &[u8]) -> bool {
        let names: &[&[u8]] = match self {
            SocketType::Pull => &[b"PUSH"],
            SocketType::Push => &[b"PULL"],
            SocketType::Pub => &[b"SUB", b"XSUB"],
            SocketType::Sub => &[b"PUB", b"XPUB"],
        };
        names.iter().any(|n| n.eq_ignore_ascii_case(other))
    }

    fn name(self) -> &'static [u8] {
        match self {
            SocketType::Pull => b"PULL",
            SocketType::Pub => b"PUB",
            SocketType::Push => b"PUSH",
            SocketType::Sub => b"SUB",
        }
    }
}

/// What happened on a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The handshake completed.
    Up,
    /// The connection ended (or never came up); the reason, for a log line.
    Down(String),
    /// A message (a PULL's requests).
    Message(Vec<u8>),
    /// A message over the cap was skipped: its first bytes and its size.
    Oversized { head: Vec<u8>, size: u64 },
    /// A SUB peer subscribed to this prefix: only now may a PUB's messages reach it.
    Subscribed(Vec<u8>),
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    Connecting,
    Greeting,
    Ready,
    /// Ready and half-closed by us: reading what the peer still sends.
    Draining,
}

struct Connection {
    socket: Socket,
    stage: Stage,
    since: Instant,
}

pub struct Peer {
    spec: String,
    kind: SocketType,
    connection: Option<Connection>,
    retry_at: Instant,
    backoff: Duration,
    rbuf: ReadBuf,
    /// Output not yet written, from `wpos` on.
    wbuf: Vec<u8>,
    wpos: usize,
    decoder: Decoder,
    max_message: u64,
    /// When the last bytes arrived.
    last_input: Instant,
    /// The peer's greeting has been read.
    greeted: bool,
    /// Since when the peer has not been up, and whether we said so.
    down_since: Instant,
    warned: bool,
    /// Accepted by a bound socket of ours: never redialed, dead once lost.
    accepted: bool,
    dead: bool,
    /// The last read stopped at its budget, not at an empty socket.
    unread: bool,
}

impl Peer {
    /// A peer of `kind` for the socket bound at `spec` (`tcp://host:port` or `ipc://path`);
    /// it connects on the first `drive`. Messages over `max_message` bytes are skipped.
    pub fn new(spec: &str, kind: SocketType, max_message: u64) -> io::Result<Peer> {
        endpoint(spec)?;
        Ok(Peer::blank(spec, kind, max_message, false))
    }

    fn blank(spec: &str, kind: SocketType, max_message: u64, accepted: bool) -> Peer {
        Peer {
            spec: spec.to_string(),
            kind,
            connection: None,
            retry_at: Instant::now(),
            backoff: FIRST_RETRY,
            rbuf: ReadBuf::new(256 * 1024),
            wbuf: Vec::with_capacity(64 * 1024),
            wpos: 0,
            decoder: Decoder::new(max_message),
            max_message,
            last_input: Instant::now(),
            greeted: false,
            down_since: Instant::now(),
            warned: false,
            accepted,
            dead: false,
            unread: false,
        }
    }

    /// A peer over a connection that a bound socket of ours accepted; `name` is for logs
    /// (the bound endpoint). Our greeting is queued at once.
    pub fn accepted(
        socket: Socket,
        name: &str,
        kind: SocketType,
        max_message: u64,
    ) -> io::Result<Peer> {
        socket.set_nonblocking(true)?;
        if !socket.local_addr()?.is_unix() {
            tune_tcp(&socket)?;
        }
        let mut peer = Peer::blank(name, kind, max_message, true);
        peer.connection = Some(Connection {
            socket,
            stage: Stage::Greeting,
            since: Instant::now(),
        });
        peer.queue_greeting();
        Ok(peer)
    }

    /// The last `drive` left input unread (its budget ran out): with an edge-triggered
    /// poll, the caller must drive it again without waiting for readiness.
    pub fn has_unread(&self) -> bool {
        self.unread
    }

    /// Writes what `send` queued (the caller may queue several messages, then flush once).
    pub fn flush(&mut self, events: &mut Vec<PeerEvent>) {
        if let Err(e) = self.flush_now_checked() {
            self.reset(&e, events);
        }
    }

    /// An accepted connection that ended: the caller drops it.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Queues a PING (RFC 37, no TTL, no context). A live libzmq peer answers with PONG,
    /// which moves [`Peer::last_input`]: how a front end notices a handler host that was cut
    /// off without closing its connections.
    pub fn ping(&mut self) {
        if matches!(
            self.connection.as_ref().map(|c| &c.stage),
            Some(Stage::Ready)
        ) {
            codec::push_command(&mut self.wbuf, b"PING", &[0, 0]);
        }
    }

    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Handshake done (and not ended).
    pub fn is_up(&self) -> bool {
        matches!(
            self.connection.as_ref().map(|c| &c.stage),
            Some(Stage::Ready | Stage::Draining)
        )
    }

    /// The descriptor to poll and the events wanted, while there is a connection.
    pub fn poll_interest(&self) -> Option<(RawFd, bool, bool)> {
        let c = self.connection.as_ref()?;
        let write = c.stage == Stage::Connecting || self.wpos < self.wbuf.len();
        let read = c.stage != Stage::Connecting;
        Some((c.socket.as_raw_fd(), read, write))
    }

    /// When `drive` must be called even if the socket says nothing: a retry or a timeout.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.connection {
            None => Some(self.retry_at),
            Some(c) if c.stage == Stage::Connecting || c.stage == Stage::Greeting => {
                Some(c.since + HANDSHAKE_TIMEOUT)
            }
            Some(_) => None,
        }
    }

    /// When bytes last arrived.
    pub fn last_input(&self) -> Instant {
        self.last_input
    }

    /// Bytes queued for the peer and not yet written.
    pub fn backlog(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Queues one single-frame message made of `parts`; `false` when not connected.
    pub fn send(&mut self, parts: &[&[u8]]) -> bool {
        if !matches!(
            self.connection.as_ref().map(|c| &c.stage),
            Some(Stage::Ready)
        ) {
            return false;
        }
        let len = parts.iter().map(|p| p.len()).sum();
        codec::push_frame(&mut self.wbuf, 0, len);
        for part in parts {
            self.wbuf.extend_from_slice(part);
        }
        true
    }

    /// Half-closes the connection: the peer stops sending to us once it sees our end, and
    /// what it had sent can still be read.
    /// Queued output goes first: the half-close happens once it is written.
    pub fn shutdown_write(&mut self) {
        match self.connection.as_mut() {
            Some(c) if c.stage == Stage::Ready => c.stage = Stage::Draining,
            Some(_) => self.connection = None,
            None => {}
        }
        self.flush_now();
    }

    /// Drops the connection, if there is one, and connects anew after the backoff.
    pub fn restart(&mut self, reason: &str, events: &mut Vec<PeerEvent>) {
        if self.connection.is_some() {
            self.reset(reason, events);
        }
    }

    /// Drops the connection now (and retries later). `Down` is reported only for a
    /// connection that was up; failed attempts are logged once they last 2 s.
    pub fn reset(&mut self, reason: &str, events: &mut Vec<PeerEvent>) {
        if self.accepted {
            if !self.dead {
                events.push(PeerEvent::Down(reason.to_string()));
            }
            self.dead = true;
            self.connection = None;
            self.wbuf = Vec::new();
            self.wpos = 0;
            return;
        }
        if self.is_up() {
            events.push(PeerEvent::Down(reason.to_string()));
            self.down_since = Instant::now();
            self.warned = false;
        } else if !self.warned && self.down_since.elapsed() > Duration::from_secs(2) {
            tracing::warn!(spec = %self.spec, "waiting for the peer: {reason}");
            self.warned = true;
        } else {
            tracing::debug!(spec = %self.spec, "cannot connect: {reason}");
        }
        self.connection = None;
        self.greeted = false;
        self.rbuf.clear();
        self.wbuf.clear();
        self.wpos = 0;
        self.decoder = Decoder::new(self.max_message);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
    }

    /// Makes progress: connects when due, completes the handshake, reads what arrived (up
    /// to a budget; only when `readable`, as the caller's poll said, so that an idle
    /// connection costs no system call) and writes what is queued. Events are appended to
    /// `events`.
    pub fn drive(&mut self, events: &mut Vec<PeerEvent>, readable: bool) {
        let now = Instant::now();
        if self.dead {
            return;
        }
        if self.connection.is_none() {
            if now < self.retry_at {
                return;
            }
            match connect(&self.spec) {
                Ok(socket) => {
                    self.connection = Some(Connection {
                        socket,
                        stage: Stage::Connecting,
                        since: now,
                    })
                }
                Err(e) => return self.reset(&e.to_string(), events),
            }
        }
        if let Err(e) = self.progress(events, readable) {
            self.reset(&e, events);
        }
    }

    fn progress(&mut self, events: &mut Vec<PeerEvent>, readable: bool) -> Result<(), String> {
        let c = self.connection.as_mut().expect("connected");
        if c.stage == Stage::Connecting {
            match c.socket.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return Err(format!("cannot connect: {e}")),
            }
            // Not connected yet: writing the greeting would fail with ENOTCONN.
            if c.socket.peer_addr().is_err() {
                if c.since.elapsed() > HANDSHAKE_TIMEOUT {
                    return Err("connect timed out".into());
                }
                return Ok(());
            }
            c.stage = Stage::Greeting;
            c.since = Instant::now();
            self.queue_greeting();
        }
        self.flush_now_checked()?;
        let greeting_stage = self.connection.as_ref().map(|c| &c.stage) == Some(&Stage::Greeting);
        if greeting_stage
            && self.connection.as_ref().expect("connected").since.elapsed() > HANDSHAKE_TIMEOUT
        {
            return Err("handshake timed out".into());
        }
        if readable {
            self.read_and_decode(events)?;
        }
        self.flush_now_checked()
    }

    fn read_and_decode(&mut self, events: &mut Vec<PeerEvent>) -> Result<(), String> {
        let mut budget = READ_BUDGET;
        self.unread = false;
        loop {
            self.decode_buffered(events)?;
            if self.connection.is_none() {
                return Ok(());
            }
            if budget == 0 {
                self.unread = true;
                return Ok(());
            }
            // Room for the frame in progress, or a good read's worth.
            let wanted = self
                .decoder
                .wanted(self.rbuf.data())
                .map_or(0, |w| w.saturating_sub(self.rbuf.data().len()))
                .clamp(64 * 1024, budget.max(64 * 1024));
            let c = self.connection.as_mut().expect("connected");
            let space = self.rbuf.space(wanted);
            let asked = space.len();
            match (&c.socket).read(space) {
                Ok(0) => return Err("the peer closed the connection".into()),
                Ok(n) => {
                    self.rbuf.filled(n);
                    budget = budget.saturating_sub(n);
                    self.last_input = Instant::now();
                    if n < asked {
                        // The socket is drained: no read just to hear EAGAIN.
                        return self.decode_buffered(events);
                    }
                }
                Err(e) => {
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(()),
                        io::ErrorKind::Interrupted => continue,
                        _ => Err(format!("read: {e}")),
                    };
                }
            }
        }
    }

    fn decode_buffered(&mut self, events: &mut Vec<PeerEvent>) -> Result<(), String> {
        loop {
            let stage = match self.connection.as_ref() {
                Some(c) => &c.stage,
                None => return Ok(()),
            };
            if *stage == Stage::Greeting && !self.greeted {
                if self.rbuf.data().len() < 64 {
                    return Ok(());
                }
                codec::check_greeting(&self.rbuf.data()[..64])?;
                self.rbuf.consume(64);
                self.greeted = true;
                continue;
            }
            let (used, event) = self.decoder.decode(self.rbuf.data())?;
            self.rbuf.consume(used);
            match event {
                Some(event) => self.on_event(event, events)?,
                None if used == 0 => return Ok(()),
                None => {}
            }
        }
    }

    fn on_event(&mut self, event: Event, events: &mut Vec<PeerEvent>) -> Result<(), String> {
        let stage = &mut self.connection.as_mut().expect("connected").stage;
        match event {
            Event::Command(body) => {
                let (name, data) =
                    codec::split_command(&body).ok_or("a malformed command from the peer")?;
                match name {
                    b"READY" if *stage == Stage::Greeting => {
                        match codec::ready_property(data, b"Socket-Type")? {
                            Some(other) if !self.kind.accepts(other) => {
                                return Err(format!(
                                    "the peer is a {} socket, which a {} cannot talk to",
                                    String::from_utf8_lossy(other),
                                    String::from_utf8_lossy(self.kind.name())
                                ));
                            }
                            _ => {}
                        }
                        *stage = Stage::Ready;
                        self.backoff = FIRST_RETRY;
                        if self.warned {
                            tracing::info!(spec = %self.spec, "connected");
                        }
                        self.warned = false;
                        events.push(PeerEvent::Up);
                    }
                    // Half-closed by us: nothing more may be written (the peer drains us).
                    b"PING" if *stage == Stage::Draining => {}
                    b"PING" => self.wbuf.extend_from_slice(&codec::pong_for(data)),
                    b"ERROR" => {
                        let reason = data.get(1..).unwrap_or_default();
                        return Err(format!(
                            "the peer sent ERROR: {}",
                            String::from_utf8_lossy(reason)
                        ));
                    }
                    b"SUBSCRIBE" if self.kind == SocketType::Pub => {
                        events.push(PeerEvent::Subscribed(data.to_vec()))
                    }
                    _ => {} // PONG, CANCEL, and commands of later versions: nothing to do.
                }
            }
            _ if *stage == Stage::Greeting => {
                return Err("a message before the peer's READY".into());
            }
            Event::Message(body) if self.kind == SocketType::Pub => {
                // ZMTP 3.0 subscriptions: 1 + prefix subscribes, 0 + prefix cancels.
                if body.first() == Some(&1) {
                    events.push(PeerEvent::Subscribed(body[1..].to_vec()));
                }
            }
            Event::Message(body) => events.push(PeerEvent::Message(body)),
            Event::Oversized { head, size } => events.push(PeerEvent::Oversized { head, size }),
        }
        Ok(())
    }

    fn queue_greeting(&mut self) {
        self.wbuf.clear();
        self.wpos = 0;
        self.wbuf.extend_from_slice(&codec::greeting());
        self.wbuf
            .extend_from_slice(&codec::ready_command(self.kind.name()));
    }

    /// Writes what is queued, as far as the socket takes it.
    fn flush_now(&mut self) {
        if let Err(e) = self.flush_now_checked() {
            tracing::debug!(spec = %self.spec, "write failed: {e}");
        }
    }

    fn flush_now_checked(&mut self) -> Result<(), String> {
        let Some(c) = self.connection.as_ref() else {
            return Ok(());
        };
        if c.stage == Stage::Connecting {
            return Ok(());
        }
        while self.wpos < self.wbuf.len() {
            match (&c.socket).write(&self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
            if c.stage == Stage::Draining {
                // Idempotent: repeated on each flush of a draining connection.
                let _ = c.socket.shutdown(std::net::Shutdown::Write);
            }
        } else if self.wpos > 1 << 20 && self.wpos >= self.wbuf.len() / 2 {
            // Only once the written part is at least half: each byte is moved at most once
            // on average (compacting at every MiB moved a backlog of many MiB again and
            // again, and 1 MiB request bodies from 64 clients cost 60 % of the front end).
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(())
    }
}

/// No Nagle delay; keepalive probes and a user timeout, so that a vanished host is noticed.
fn tune_tcp(socket: &Socket) -> io::Result<()> {
    socket.set_nodelay(true)?;
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(3),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// Binds `spec` for peers to dial (a front end's PUSH and SUB sockets), non-blocking. An
/// `ipc://` path left by a previous run is removed first, as libzmq does.
pub fn bind(spec: &str) -> io::Result<Socket> {
    let address = endpoint(spec)?;
    let domain = if address.is_unix() {
        if let Some(path) = address.as_pathname() {
            let _ = std::fs::remove_file(path);
        }
        Domain::UNIX
    } else {
        Domain::for_address(address.as_socket().expect("an IP address"))
    };
    let socket = Socket::new(domain, Type::STREAM.cloexec(), None)?;
    if !address.is_unix() {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&address)?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Where `spec` points.
fn endpoint(spec: &str) -> io::Result<SockAddr> {
    if let Some(address) = spec.strip_prefix("tcp://") {
        let address = address
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("{spec}: no address")))?;
        Ok(SockAddr::from(address))
    } else if let Some(path) = spec.strip_prefix("ipc://") {
        SockAddr::unix(path)
    } else {
        Err(io::Error::other(format!(
            "{spec}: a tcp:// or ipc:// endpoint is needed"
        )))
    }
}

/// Starts a non-blocking connection, with keepalive and a user timeout on TCP.
fn connect(spec: &str) -> io::Result<Socket> {
    let address = endpoint(spec)?;
    let domain = if address.is_unix() {
        Domain::UNIX
    } else {
        Domain::for_address(address.as_socket().expect("an IP address"))
    };
    let socket = Socket::new(domain, Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    if !address.is_unix() {
        tune_tcp(&socket)?;
    }
    match socket.connect(&address) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

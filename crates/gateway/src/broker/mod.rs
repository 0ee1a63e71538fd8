//! The broker: the part of a wsgid instance that talks to mongrel2 (a process of its own),
//! or in one-command mode to the front end it runs inside. It pulls requests into the
//! queue that idle workers take from (see `link`), and forwards the workers' replies over
//! one connection.
//!
//! mongrel2's PUSH assigns a request to a connected peer before that peer reads it, and a
//! peer that disconnects loses what was assigned to it and still in flight (design note 2).
//! Workers connected to mongrel2 directly would therefore drop requests on every reload and
//! queue fast requests behind slow ones (note 3). The broker stays connected while workers
//! come and go; a request waits in the shared queue until a worker is free to take it.
//!
//! In one-command mode the broker runs inside the front end's process (`InprocBroker`, see
//! `server::inproc`): requests and replies pass in memory, a request goes to its worker
//! with its client's connection, and the worker writes the response to its client itself;
//! only its end passes through here, in order with the rest. Otherwise replies pass through
//! here too, for three reasons that each lost responses when every worker had its own
//! connection: mongrel2 fair-queues between connections, so a connection's next response
//! could overtake the tail of the previous one (note 10); only the broker sees mongrel2's
//! flow-control credits and restarts; and a worker with a response for a mongrel2 that is
//! away now hands it over and lives on.
//!
//! **Epochs.** Every time either connection to mongrel2 is lost, a new epoch begins: what
//! was waiting, held or in service is never delivered over the new connections (mongrel2
//! restarts its connection ids at 1, note 9: an old reply would reach a new client).
//!
//! The maps keyed by connection ids and sequence numbers hash with FxHash: the keys are
//! numbered by the front end or mongrel2, never chosen by a client, so SipHash's defence
//! against chosen collisions bought nothing here, for a few percent of the broker's time.

mod dispatch;
mod held;
mod outgoing;
mod workers;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use m2wire::{parse_address, MessageKind, Request};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use zmtp::{Peer, PeerEvent, SocketType};

use crate::config::Settings;
use crate::link::BrokerChannels;
use dispatch::{Close, Requests, MAX_WAITING};
use outgoing::Outgoing;
use server::inproc::Lend;
use workers::{Probe, Workers};

/// Most bytes queued on the reply connection before the broker stops moving replies to it.
const MAX_REPLY_BACKLOG: usize = 4 << 20;
/// Largest request message when `--max-body-size` does not say: mongrel2 spools bodies over
/// its `limits.content_length` to files, so messages stay small unless that is raised far.
const DEFAULT_MAX_MESSAGE: u64 = 64 << 20;
/// A draining broker waits this long for mongrel2 to close the request connection.
const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// The signals the broker reacts to.
struct Signals {
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    wake: UnixStream,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let signals = Signals {
            stop: Arc::default(),
            quit: Arc::default(),
            wake,
        };
        for (sig, flag) in [
            (signal_hook::consts::SIGTERM, &signals.stop),
            (signal_hook::consts::SIGINT, &signals.stop),
            (signal_hook::consts::SIGQUIT, &signals.quit),
        ] {
            signal_hook::flag::register(sig, flag.clone())?;
            signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
        }
        signal_hook::flag::register(
            signal_hook::consts::SIGHUP,
            Arc::new(AtomicBool::new(false)),
        )?;
        Ok(signals)
    }

    fn drain(&self) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// Where requests come from and replies go.
enum Upstream {
    /// mongrel2 (or `wsgid server`) over ZMTP: its PUSH (requests) and SUB (replies).
    Zmtp {
        requests: Box<Peer>,
        replies: Box<Peer>,
    },
    /// The front end in this process: the replies for it to take after a turn, and the
    /// descriptors for its loop to poll from now on.
    Inproc {
        replies: Vec<Vec<u8>>,
        fresh: Vec<RawFd>,
    },
}

struct Broker {
    upstream: Upstream,
    /// mongrel2 has subscribed on the reply connection: replies reach it.
    subscribed: bool,
    /// Bumped whenever a connection to mongrel2 is lost.
    epoch: u64,
    channels: BrokerChannels,
    queue: Requests,
    workers: Workers,
    outgoing: Outgoing,
    /// Stopping: by when, and whether mongrel2 has closed the request connection.
    draining: Option<Instant>,
    requests_closed: bool,
    /// When paced replies are due.
    next_flush: Option<Instant>,
    /// When to look in on the workers' processes again (see `check_workers`).
    next_liveness_check: Instant,
    /// Following a worker that died while taking a request (see `settle_probe`).
    probe: Option<Probe>,
    /// Connections the workers hold between requests (one-command mode).
    held: held::Held,
}

pub fn run(settings: &Settings, listener: UnixListener) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    listener.set_nonblocking(true)?;
    let max_message = settings
        .max_body_size
        .map_or(DEFAULT_MAX_MESSAGE, |b| b.saturating_add(1 << 20));
    let mut broker = Broker::new(Upstream::Zmtp {
        requests: Box::new(
            Peer::new(&settings.recv, SocketType::Pull, max_message)
                .with_context(|| format!("--recv {}", settings.recv))?,
        ),
        replies: Box::new(
            Peer::new(&settings.send, SocketType::Pub, 1 << 16)
                .with_context(|| format!("--send {}", settings.send))?,
        ),
    })?;
    tracing::info!(recv = %settings.recv, send = %settings.send, "broker ready");
    let graceful = Duration::from_secs(settings.graceful_timeout);
    loop {
        if signals.quit.load(Ordering::Relaxed) {
            tracing::info!("quit: stopping now");
            break;
        }
        if signals.stop.load(Ordering::Relaxed) && broker.draining.is_none() {
            broker.start_draining(graceful);
        }
        if broker.drained() {
            break;
        }
        broker.turn(&listener, &signals)?;
    }
    tracing::info!(
        unqueued = broker.queue.waiting.len(),
        unanswered = broker.queue.unanswered(broker.epoch),
        "broker stopped"
    );
    Ok(())
}

impl Broker {
    fn new(upstream: Upstream) -> anyhow::Result<Broker> {
        Ok(Broker {
            subscribed: matches!(upstream, Upstream::Inproc { .. }),
            upstream,
            epoch: 1,
            channels: BrokerChannels::new().context("cannot create the request queue")?,
            queue: Requests::default(),
            workers: Workers::default(),
            outgoing: Outgoing::default(),
            draining: None,
            requests_closed: false,
            next_flush: None,
            next_liveness_check: Instant::now(),
            probe: None,
            held: held::Held::default(),
        })
    }

    /// Stopping: the request connection is half-closed, so mongrel2 stops sending to us and
    /// closes its side; what it had sent is still read, queued and answered. Half the
    /// graceful timeout is ours; the workers, stopped after us, need the rest.
    fn start_draining(&mut self, graceful: Duration) {
        tracing::info!("stopping: no new requests from mongrel2, serving those sent");
        match &mut self.upstream {
            Upstream::Zmtp { requests, .. } if requests.is_up() => requests.shutdown_write(),
            // Not connected now: nothing was sent to us that we have not read.
            _ => self.requests_closed = true,
        }
        self.draining = Some(Instant::now() + graceful / 2);
    }

    /// Stopping, and nothing is left to do (or time is up).
    fn drained(&self) -> bool {
        let Some(deadline) = self.draining else {
            return false;
        };
        if Instant::now() >= deadline {
            tracing::warn!("graceful timeout: stopping with requests unanswered");
            return true;
        }
        let Upstream::Zmtp { requests, replies } = &self.upstream else {
            return true;
        };
        let quiet = self.requests_closed
            || !requests.is_up()
            || requests.last_input().elapsed() >= DRAIN_IDLE;
        quiet
            && self.queue.waiting.is_empty()
            && self.queue.unanswered(self.epoch) == 0
            && self.outgoing.is_empty()
            && replies.backlog() == 0
    }

    /// One turn of the loop: wait for something to happen, then do all there is to do.
    fn turn(&mut self, listener: &UnixListener, signals: &Signals) -> anyhow::Result<()> {
        self.forward_unblocked(None);
        let ready = self.wait(listener, Some(signals), None)?;
        if ready.signal {
            signals.drain();
        }
        self.serve(listener, &ready, None);
        Ok(())
    }

    /// Workers whose connections have room again: their buffered replies go first.
    fn forward_unblocked(&mut self, lend: Option<&mut dyn Lend>) {
        let unblocked = self.workers.unblocked(&self.outgoing);
        for &fd in &unblocked {
            if let Err(e) = self.take_frames(fd, false) {
                self.remove_worker(fd, &e);
            }
        }
        if !unblocked.is_empty() {
            // What they forwarded goes out now, not at the next wake-up.
            self.dispatch(lend);
            self.flush();
        }
    }

    /// Does all there is to do about what `wait` found ready.
    fn serve(&mut self, listener: &UnixListener, ready: &Ready, lend: Option<&mut dyn Lend>) {
        if ready.accept {
            while let Ok((stream, _)) = listener.accept() {
                if self.held.wanted_back {
                    self.channels.order_give_back(&stream);
                }
                let accepted = self.workers.accept(stream, &self.channels);
                if let (Some(fd), Upstream::Inproc { fresh, .. }) = (accepted, &mut self.upstream) {
                    fresh.push(fd);
                }
            }
        }
        // Replies first: they free connections whose next requests wait.
        self.read_replies(&ready.workers);
        self.check_workers();
        self.look_at_holders();
        self.settle_probe();
        self.drive_replies(ready.replies);
        if let (false, Upstream::Zmtp { requests, .. }) = (self.requests_closed, &mut self.upstream)
        {
            let mut events = Vec::new();
            requests.drive(&mut events, ready.requests);
            for event in events {
                self.on_request_event(event);
            }
        }
        self.dispatch(lend);
        self.flush();
    }

    /// Polls for what is ready: until something is, or the next deadline (`timeout`
    /// overrides it: zero when the front end's loop has already waited for us).
    fn wait(
        &mut self,
        listener: &UnixListener,
        signals: Option<&Signals>,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Ready> {
        let streams = self.workers.readable_fds();
        let mut polled = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let signal_at = polled.len();
        if let Some(signals) = signals {
            polled.push(PollFd::new(signals.wake.as_fd(), PollFlags::POLLIN));
        }
        if self.queue.queue_full {
            polled.push(PollFd::new(
                self.channels.queue_fd().as_fd(),
                PollFlags::POLLOUT,
            ));
        }
        let (requests, replies) = match &self.upstream {
            Upstream::Zmtp { requests, replies } => (
                (!self.requests_closed).then_some(&**requests),
                Some(&**replies),
            ),
            Upstream::Inproc { .. } => (None, None),
        };
        // Where each peer's entry is, if it is polled.
        let mut peer_at = [None, None];
        for (i, peer) in [requests, replies].into_iter().enumerate() {
            // A socket polled for nothing still reports hang-ups, and would spin the loop.
            if let Some((fd, read @ true, write) | (fd, read, write @ true)) =
                peer.and_then(Peer::poll_interest)
            {
                let mut flags = PollFlags::empty();
                flags.set(PollFlags::POLLIN, read);
                flags.set(PollFlags::POLLOUT, write);
                peer_at[i] = Some(polled.len());
                polled.push(PollFd::new(borrow(fd), flags));
            }
        }
        let workers_at = polled.len();
        polled.extend(
            streams
                .iter()
                .map(|&fd| PollFd::new(borrow(fd), PollFlags::POLLIN)),
        );
        let timeout = match timeout {
            Some(wait) => wait,
            None => self.deadline().map_or(Duration::MAX, |at| {
                at.saturating_duration_since(Instant::now())
            }),
        };
        // Rounded up: waking early only to find nothing due would spin.
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(60_000);
        let timeout = PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut polled, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let hit = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
        let peer_hit = |at: Option<usize>| at.is_some_and(|i| hit(&polled[i]));
        Ok(Ready {
            accept: hit(&polled[0]),
            signal: signals.is_some() && hit(&polled[signal_at]),
            more: polled.iter().any(hit),
            requests: peer_hit(peer_at[0]),
            replies: peer_hit(peer_at[1]),
            workers: streams
                .iter()
                .zip(&polled[workers_at..])
                .filter(|(_, p)| hit(p))
                .map(|(&fd, _)| fd)
                .collect(),
        })
    }

    /// When something is due even if nothing is ready: a peer's heartbeat, paced replies,
    /// a look in on the workers (`check_workers`), the drain, a probe, a full queue.
    fn deadline(&self) -> Option<Instant> {
        let peers = match &self.upstream {
            Upstream::Zmtp { requests, replies } => [
                requests.deadline().filter(|_| !self.requests_closed),
                replies.deadline(),
            ],
            Upstream::Inproc { .. } => [None, None],
        };
        let now = Instant::now();
        let tick = if self.probe.is_some() {
            Some(10)
        } else if self.queue.queue_full && matches!(self.upstream, Upstream::Inproc { .. }) {
            // Not polled for room there: looked at again soon.
            Some(1)
        } else if self.draining.is_some() {
            Some(50)
        } else if !self.queue.in_flight.is_empty() {
            Some(1000)
        } else {
            None
        };
        let tick = tick.map(|ms| now + Duration::from_millis(ms));
        peers
            .into_iter()
            .chain([self.next_flush, tick, self.held.deadline()])
            .flatten()
            .min()
    }

    /// A new epoch: nothing from before may reach the new connections. Both connections
    /// start anew, so that no byte read from here on comes from the old mongrel2.
    fn new_epoch(&mut self, why: &str) {
        let mut ignored = Vec::new();
        if let Upstream::Zmtp { requests, replies } = &mut self.upstream {
            requests.restart(why, &mut ignored);
            replies.restart(why, &mut ignored);
        }
        self.subscribed = false;
        if self.draining.is_some() {
            self.requests_closed = true;
        }
        self.epoch += 1;
        let waiting = self.queue.waiting.len();
        let unanswered = self.queue.unanswered(self.epoch - 1);
        let dropped = self.outgoing.clear();
        self.queue.forget_epoch();
        if waiting + unanswered + dropped > 0 {
            tracing::warn!(
                waiting,
                unanswered,
                reply_bytes = dropped,
                "{why}: a new epoch; what belonged to the old connection is dropped"
            );
        } else {
            tracing::info!("{why}: a new epoch");
        }
    }

    fn drive_replies(&mut self, readable: bool) {
        let Upstream::Zmtp { replies, .. } = &mut self.upstream else {
            return;
        };
        let mut events = Vec::new();
        replies.drive(&mut events, readable);
        let spec = replies.spec().to_string();
        for event in events {
            match event {
                PeerEvent::Subscribed(prefix) => {
                    if !self.subscribed {
                        tracing::info!(send = %spec, "the front end (mongrel2 or ours) listens for replies");
                    }
                    self.subscribed = true;
                    if !prefix.is_empty() {
                        tracing::warn!(
                            subscribed = %String::from_utf8_lossy(&prefix),
                            "mongrel2 drops replies that do not start with its recv_ident; \
                             set the handler's recv_ident to '' or to a prefix of its send_ident"
                        );
                    }
                }
                PeerEvent::Down(reason) => {
                    self.subscribed = false;
                    self.new_epoch(&format!("reply connection to mongrel2 lost ({reason})"));
                }
                _ => {}
            }
        }
    }

    fn on_request_event(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::Message(msg) => {
                self.note_initial_credits(&msg);
                if let Some((_, conn)) = parse_address(&msg).filter(|_| !m2wire::is_notice(&msg)) {
                    if !self.queue.is_busy(conn) {
                        self.outgoing.fresh_request(conn);
                    }
                }
                if self.queue.waiting.len() >= MAX_WAITING && !m2wire::is_notice(&msg) {
                    self.refuse(&msg, SERVICE_UNAVAILABLE, "too many requests waiting: 503");
                } else {
                    self.queue.waiting.push_back(msg);
                }
            }
            PeerEvent::Oversized { head, size } => self.refuse_oversized(&head, size),
            PeerEvent::Down(_) if self.draining.is_some() => self.requests_closed = true,
            PeerEvent::Down(reason) => {
                self.new_epoch(&format!("request connection to mongrel2 lost ({reason})"))
            }
            PeerEvent::Up | PeerEvent::Subscribed(_) => {}
        }
    }

    /// A request over the message cap: answered 413 and closed, never read into memory.
    fn refuse_oversized(&mut self, head: &[u8], size: u64) {
        tracing::warn!(size, "a request message over the size cap");
        self.refuse(
            head,
            PAYLOAD_TOO_LARGE,
            "request message over the size cap: 413",
        );
    }

    /// Answers a request the broker will not queue with `response`, and closes its
    /// connection (after what is in flight for it, when it is busy).
    fn refuse(&mut self, msg: &[u8], response: &[u8], why: &str) {
        let Some((sender, conn)) = parse_address(msg) else {
            return tracing::warn!("{why}; the message has no address");
        };
        tracing::warn!(conn, "{why}");
        // A busy connection is closed once its requests in flight are answered.
        if let Some(Close(sender, conn)) = self.queue.close_when_done(sender, conn) {
            self.outgoing.push(&sender, conn, response, true);
        }
        self.queue.discard(msg.to_vec());
    }

    /// Queues what waits, handles mongrel2's notices, and closes what must be closed. Not
    /// before mongrel2 has subscribed: until then its replies would be lost.
    fn dispatch(&mut self, lend: Option<&mut dyn Lend>) {
        if !self.subscribed {
            return;
        }
        let (mut notices, mut closes) = (Vec::new(), Vec::new());
        self.queue
            .dispatch(&self.channels, self.epoch, &mut notices, &mut closes, lend);
        for notice in notices {
            self.on_notice(&notice);
        }
        for Close(sender, conn) in closes {
            self.outgoing.push(&sender, conn, b"", true);
        }
    }

    /// mongrel2's notices: credits give a connection room; a disconnect drops what waits.
    fn on_notice(&mut self, msg: &[u8]) {
        let Ok(notice) = Request::parse(msg) else {
            return tracing::warn!("a malformed notice from mongrel2");
        };
        match notice.kind() {
            MessageKind::Credits => match credits_of(&notice) {
                Some(n) => self.outgoing.grant(notice.sender, notice.conn_id, n, false),
                None => tracing::warn!(conn = notice.conn_id, "a credits notice without credits"),
            },
            MessageKind::Disconnect => {
                let dropped = self.outgoing.forget(notice.conn_id);
                self.queue.drop_waiting(notice.conn_id);
                self.queue.forget_conn(notice.conn_id);
                tracing::debug!(conn = notice.conn_id, dropped, "client disconnected");
            }
            other => tracing::debug!(conn = notice.conn_id, kind = ?other, "notice"),
        }
    }

    /// The first request of a connection under flow control carries its initial credits.
    /// A request is parsed here only when its headers name them.
    fn note_initial_credits(&mut self, msg: &[u8]) {
        if !m2wire::raw_headers(msg).is_some_and(|h| contains(h, b"DOWNLOAD_CREDITS")) {
            return;
        }
        if let Ok(req) = Request::parse(msg) {
            if req.kind() == MessageKind::Http {
                if let Some(n) = credits_of(&req) {
                    self.outgoing.grant(req.sender, req.conn_id, n, true);
                }
            }
        }
    }

    /// Sends what the pacing and the credits allow.
    fn flush(&mut self) {
        struct ToMongrel2<'a>(&'a mut Peer);
        impl outgoing::Sender for ToMongrel2<'_> {
            fn send(&mut self, prefix: &[u8], payload: &[u8]) -> bool {
                self.0.backlog() < MAX_REPLY_BACKLOG && self.0.send(&[prefix, payload])
            }
        }
        struct ToFrontEnd<'a>(&'a mut Vec<Vec<u8>>);
        impl outgoing::Sender for ToFrontEnd<'_> {
            fn send(&mut self, prefix: &[u8], payload: &[u8]) -> bool {
                self.0.push([prefix, payload].concat());
                true
            }
        }
        let now = Instant::now();
        let replies = match &mut self.upstream {
            Upstream::Inproc { replies, .. } => {
                self.next_flush = self.outgoing.flush(now, &mut ToFrontEnd(replies));
                return;
            }
            Upstream::Zmtp { replies, .. } => replies,
        };
        self.next_flush = self.outgoing.flush(now, &mut ToMongrel2(replies));
        if replies.backlog() > 0 {
            let mut events = Vec::new();
            replies.drive(&mut events, false);
            for event in events {
                if let PeerEvent::Down(reason) = event {
                    self.subscribed = false;
                    self.new_epoch(&format!("reply connection to mongrel2 lost ({reason})"));
                }
            }
        }
    }
}

/// One-command mode's broker, inside the front end's process (see `server::inproc`): the
/// same queue, workers and records, with the front end's loop doing the waiting.
pub struct InprocBroker {
    broker: Broker,
    /// The link's listener, where workers connect (the master's, inherited).
    listener: UnixListener,
}

impl InprocBroker {
    pub fn new(listener: UnixListener) -> anyhow::Result<InprocBroker> {
        listener.set_nonblocking(true)?;
        let broker = Broker::new(Upstream::Inproc {
            replies: Vec::new(),
            fresh: vec![listener.as_raw_fd()],
        })?;
        Ok(InprocBroker { broker, listener })
    }
}

impl server::inproc::Inproc for InprocBroker {
    fn push(&mut self, message: &[u8]) {
        self.broker
            .on_request_event(PeerEvent::Message(message.to_vec()));
    }

    fn turn(&mut self, woken: bool, lend: &mut dyn Lend, replies: &mut Vec<Vec<u8>>) -> bool {
        let broker = &mut self.broker;
        broker.forward_unblocked(Some(lend));
        let ready = if woken {
            match broker.wait(&self.listener, None, Some(Duration::ZERO)) {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::error!("polling the workers: {e}");
                    Ready::default()
                }
            }
        } else {
            Ready::default()
        };
        broker.serve(&self.listener, &ready, Some(lend));
        if let Upstream::Inproc { replies: made, .. } = &mut broker.upstream {
            replies.append(made);
        }
        ready.more
    }

    fn new_fds(&mut self, out: &mut Vec<RawFd>) {
        if let Upstream::Inproc { fresh, .. } = &mut self.broker.upstream {
            out.append(fresh);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.broker.deadline()
    }

    fn stopping(&mut self) {
        self.broker.want_held_back();
    }
}

const SERVICE_UNAVAILABLE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Retry-After: 1\r\nContent-Length: 21\r\nConnection: close\r\n\r\ntoo many requests\r\n\r\n";

const PAYLOAD_TOO_LARGE: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\n\
Content-Length: 24\r\nConnection: close\r\n\r\nrequest body too large\r\n";

/// The `DOWNLOAD_CREDITS` header of a request or notice.
fn credits_of(req: &Request<'_>) -> Option<u64> {
    std::str::from_utf8(req.header(b"DOWNLOAD_CREDITS")?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// What woke the loop.
#[derive(Default)]
struct Ready {
    accept: bool,
    signal: bool,
    /// Anything was ready (in one-command mode: look again at once).
    more: bool,
    /// mongrel2's connections have something to read (or an error to report).
    requests: bool,
    replies: bool,
    workers: Vec<RawFd>,
}

/// A descriptor for one poll call; its owner outlives the call and is not changed during it.
fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: every fd polled belongs to the broker (a peer's socket or a worker's stream),
    // and none is closed while the poll call that borrows it runs.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

//! The event loop: one thread, one `mio` poll over the HTTP listener, every client
//! connection, and the handlers' bound sockets and peers.
//!
//! A client's request goes through `Hub::start_request`: routed, then refused, served from a
//! Dir (`files`), or sent to its handler (`exchange`: the body first read inline or spooled).
//! A handler's reply is followed by its framing (`http::framing`) so that the connection
//! takes its next request only once the response is whole.

mod exchange;
mod files;
pub mod lend;
mod splice;

use std::io::Read;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use m2wire::{Notice, Reply};
use mio::{Events, Interest, Poll, Token};
use rustc_hash::FxHashMap;
use slab::Slab;
use zmtp::PeerEvent;

use crate::access_log::{AccessLog, Entry};
use crate::conn::{Conn, LogFacts, Phase, Sink};
use crate::dir::DirRoute;
use crate::handlers::{Aux, Handlers, Role, AUX_BASE};
use crate::http::body::Decoder;
use crate::http::canned;
use crate::http::request::{self, Framing, Head, HeadLimits};
use crate::http::Status;
use crate::mime::MimeTypes;
use crate::net::Listener;
use crate::routing::Router;
use crate::settings::Settings;
use splice::Moved;

/// Listeners' tokens: `LISTENERS + i`, below the handlers' (`AUX_BASE`).
const LISTENERS: usize = AUX_BASE - 1024;
/// The token of every descriptor of the broker in this process (see `crate::inproc`).
const INPROC: usize = LISTENERS - 1;
/// Most turns of the broker in this process per turn of the loop: replies free
/// connections whose next requests go to it in the next turn, until clients have to wait.
const INPROC_ROUNDS: usize = 4;
/// Credits a handler starts with on a connection (mongrel2's).
const FIRST_CREDITS: &[u8] = b"102400";
/// How long a closing connection reads and drops what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// Responses queued for a client past which its next pipelined request waits.
const PIPELINED_OUT: usize = 1 << 20;
/// Most body bytes read from one client in one turn of the loop.
const BODY_TURN: usize = 1 << 20;
/// How often timeouts and heartbeats are looked at.
const TICK: Duration = Duration::from_millis(100);

/// What a route leads to.
#[derive(Debug, Clone, Copy)]
pub enum RouteTarget {
    Handler(usize),
    Dir(usize),
    /// Not implemented yet: answered 501.
    Proxy,
}

/// Everything a request needs besides its connection.
pub struct Hub {
    pub handlers: Handlers,
    pub router: Router<RouteTarget>,
    pub dirs: Vec<DirRoute>,
    pub mime: MimeTypes,
    pub settings: Settings,
    pub access: Option<AccessLog>,
    /// The chroot as seen from here (`/` once chrooted): where upload files go.
    pub upload_root: PathBuf,
    pub scheme: &'static [u8],
    /// One-command mode: client connections are lent to the workers (see `lend`).
    pub lending: bool,
    /// One-command mode: spool files are kept and written again (see `SpoolPool`).
    pub pool: Option<crate::upload::SpoolPool>,
    /// One-command mode: bodies up to 1 MiB go to the workers in pipes (see `RequestPipes`).
    pub pipes: Option<crate::upload::RequestPipes>,
}

pub struct Front {
    poll: Poll,
    /// Empty once stopping.
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    /// Connection ids to slab keys; the ids are numbered here, so a fast hash is safe.
    ids: FxHashMap<u64, usize>,
    next_id: u64,
    hub: Hub,
    /// Handler peers that read input at their last turn: they may have more.
    hot: Vec<usize>,
    /// Clients that stopped reading at their budget, to be served again after the others.
    ready: Vec<usize>,
    /// Where client reads land first (zeroed once).
    scratch: Box<[u8]>,
    /// An accept failed (out of descriptors): connections may be waiting.
    accept_again: bool,
    /// Moves spooled bodies from sockets to files (none if the pipe could not be made).
    body_pipe: Option<splice::BodyPipe>,
    /// The broker in this process may have more to read at once.
    inproc_more: bool,
    /// Most client connections at once (see `limit_connections`), and whether they are
    /// reached (said once each time).
    max_conns: usize,
    at_capacity: bool,
}

/// Connection ids are never reused, not even across a restart of the server: they start
/// from the clock (microseconds, shifted), so a handler's late reply for a connection of
/// before the restart can name no connection of after it.
fn first_id() -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    (micros << 8).max(1)
}

impl Front {
    pub fn new(poll: Poll, mut listeners: Vec<Listener>, hub: Hub) -> anyhow::Result<Front> {
        anyhow::ensure!(
            listeners.len() <= 1024,
            "at most 1024 addresses to listen on"
        );
        for (i, listener) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(listener, Token(LISTENERS + i), Interest::READABLE)?;
        }
        Ok(Front {
            poll,
            listeners,
            conns: Slab::new(),
            ids: FxHashMap::default(),
            next_id: first_id(),
            hub,
            hot: Vec::new(),
            ready: Vec::new(),
            scratch: vec![0; 256 * 1024].into_boxed_slice(),
            accept_again: false,
            body_pipe: splice::BodyPipe::new()
                .inspect_err(|e| tracing::warn!("no pipe for spooling bodies ({e}): read instead"))
                .ok(),
            inproc_more: false,
            max_conns: usize::MAX,
            at_capacity: false,
        })
    }

    /// Serves until `stop` is set, then finishes the requests in service (up to `grace`).
    /// `reopen`: set on SIGHUP, when the logs are reopened (logrotate), as mongrel2 does,
    /// and the config is read again (`reload`), which mongrel2 does not do.
    pub fn run(
        &mut self,
        stop: Arc<AtomicBool>,
        reopen: Arc<AtomicBool>,
        reload: Option<&crate::run::Reload>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_tick = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            // Fixed before waiting: a deadline of the broker's that is a time from now (its
            // ticks) is due once the wait ends, though asked again it would be later still.
            let inproc_deadline = self.inproc_deadline();
            let timeout = if self.hot.is_empty() && !self.inproc_more {
                inproc_deadline.map_or(TICK, |at| {
                    at.saturating_duration_since(Instant::now()).min(TICK)
                })
            } else {
                Duration::ZERO
            };
            let mut inproc_woken = false;
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
            for event in events.iter() {
                let token = event.token();
                if token.0 == INPROC {
                    inproc_woken = true;
                } else if (LISTENERS..AUX_BASE).contains(&token.0) {
                    self.accept(token.0 - LISTENERS);
                } else if token.0 >= AUX_BASE {
                    self.aux_event(
                        token.0 - AUX_BASE,
                        event.is_readable() || event.is_read_closed(),
                    );
                } else if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.client_event(token.0, event.is_read_closed() || event.is_error());
                } else {
                    // Room to write: nothing to read (edge-triggered: a read would only
                    // hear EAGAIN).
                    self.settle(token.0);
                }
            }
            for index in std::mem::take(&mut self.hot) {
                self.aux_event(index, true);
            }
            for index in std::mem::take(&mut self.ready) {
                self.client_event(index, false);
            }
            let due = inproc_deadline.is_some_and(|at| at <= Instant::now());
            self.run_inproc(inproc_woken || self.inproc_more || due);
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick();
            }
            self.hub.handlers.flush();
            if reopen.swap(false, Ordering::Relaxed) {
                if let Some(a) = self.hub.access.as_mut() {
                    a.reopen();
                }
                crate::run::reopen_error_log();
                tracing::info!("SIGHUP: logs reopened");
                match reload.map(|r| r.apply(&mut self.hub, self.poll.registry())) {
                    None => {}
                    Some(Ok(())) => tracing::info!("SIGHUP: config reloaded"),
                    Some(Err(e)) => {
                        tracing::error!("SIGHUP: config not reloaded, the running one stays: {e:#}")
                    }
                }
            }
            if stop.load(Ordering::Relaxed) && stopping.is_none() {
                tracing::info!("stopping: no new connections; finishing the requests in service");
                stopping = Some(Instant::now());
                for mut l in std::mem::take(&mut self.listeners) {
                    let _ = self.poll.registry().deregister(&mut l);
                }
                if let Some((_, inproc)) = self.hub.handlers.inproc.as_mut() {
                    inproc.stopping();
                }
            }
            if let Some(since) = stopping {
                self.close_idle();
                if self.conns.is_empty() || since.elapsed() > grace {
                    if let Some(a) = self.hub.access.as_mut() {
                        a.flush();
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Keeps descriptors for work other than clients (a restarted worker's link, spool
    /// files, body pipes): past `most` connections, new clients wait in the listen backlog
    /// until one leaves, rather than take the last descriptor.
    pub fn limit_connections(&mut self, most: usize) {
        self.max_conns = most;
    }

    /// When the broker in this process wants a turn even if nothing signals.
    fn inproc_deadline(&self) -> Option<Instant> {
        self.hub.handlers.inproc.as_ref()?.1.deadline()
    }

    /// Gives the broker in this process its turns: when its descriptors signalled or may
    /// hold more, or its deadline passed (`woken`), and when requests were pushed to it.
    /// Its replies are delivered as any handler's are.
    fn run_inproc(&mut self, mut woken: bool) {
        let Some(handler) = self.hub.handlers.inproc.as_ref().map(|(h, _)| *h) else {
            return;
        };
        // Its first descriptors (the workers' listener) are polled before any request.
        self.poll_inproc_fds();
        for _ in 0..INPROC_ROUNDS {
            if !woken && !self.hub.handlers.pushed {
                return;
            }
            self.hub.handlers.pushed = false;
            let (_, inproc) = self.hub.handlers.inproc.as_mut().expect("checked above");
            let mut lending = lend::Lending {
                conns: &mut self.conns,
                ids: &self.ids,
            };
            let mut replies = Vec::new();
            self.inproc_more = inproc.turn(woken, &mut lending, &mut replies);
            self.poll_inproc_fds();
            woken = self.inproc_more;
            for msg in replies {
                self.on_reply(handler, msg);
            }
        }
    }

    /// Polls the descriptors the broker in this process opened since it was last asked.
    fn poll_inproc_fds(&mut self) {
        let Some((_, inproc)) = self.hub.handlers.inproc.as_mut() else {
            return;
        };
        let mut fds = Vec::new();
        inproc.new_fds(&mut fds);
        for fd in fds {
            let source = &mut mio::unix::SourceFd(&fd);
            if let Err(e) = self
                .poll
                .registry()
                .register(source, Token(INPROC), Interest::READABLE)
            {
                tracing::error!("cannot poll the broker's descriptor: {e}");
            }
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            if self.conns.len() >= self.max_conns {
                if !std::mem::replace(&mut self.at_capacity, true) {
                    tracing::warn!(
                        connections = self.conns.len(),
                        "at the most connections the open files limit allows: new ones wait"
                    );
                }
                // Looked at again at each tick (the edge that said connections wait is spent).
                self.accept_again = true;
                return;
            }
            self.at_capacity = false;
            let (mut stream, remote) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: logged, and retried at each tick (the edge that
                    // said connections wait is spent).
                    tracing::warn!("accept: {e}");
                    self.accept_again = true;
                    return;
                }
            };
            if self.hub.settings.tcp_keepalive {
                let _ = socket2::SockRef::from(&stream).set_keepalive(true);
            }
            let entry = self.conns.vacant_entry();
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(entry.key()),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("cannot poll a client connection: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.ids.insert(id, entry.key());
            entry.insert(Conn::new(id, stream, remote));
        }
    }

    /// Reads and serves a client. `hup`: the poll said the client shut down its side; a
    /// short read stops before the EOF, and no further readiness edge would show it, so it
    /// is remembered until the input is drained.
    fn client_event(&mut self, index: usize, hup: bool) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if matches!(conn.phase, Phase::Lingering { .. }) {
            conn.discard_input(&mut self.scratch);
            self.settle(index);
            return;
        }
        if conn.paused {
            // Its next request is for the worker to read (`lend::Lent::MayHold`).
            return;
        }
        let was_empty = conn.input.is_empty();
        conn.hup |= hup;
        if was_empty && matches!(conn.phase, Phase::Body { .. }) {
            self.read_body(index);
            return;
        }
        conn.fill(self.hub.settings.buffer_size, &mut self.scratch);
        if conn.hup && !conn.read_pending {
            // Everything before the shutdown has been read.
            conn.read_closed = true;
        }
        if was_empty && !conn.input.is_empty() {
            conn.progress = Instant::now();
        }
        self.hub.advance(conn);
        conn.trim_input();
        self.settle(index);
    }

    /// A body streaming in is read straight from the socket to its sink (an upload file,
    /// usually): no stop in the connection's buffer. One turn reads at most `BODY_TURN`.
    fn read_body(&mut self, index: usize) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        conn.read_pending = false;
        let mut budget = BODY_TURN;
        while matches!(conn.phase, Phase::Body { .. }) {
            if budget == 0 {
                break;
            }
            conn.read_pending = false;
            if let Some(pipe) = self.body_pipe.as_mut() {
                match pipe.move_body(conn, budget) {
                    Moved::NotApplicable => {}
                    Moved::Bytes(n) => {
                        budget = budget.saturating_sub(n);
                        conn.progress = Instant::now();
                        if matches!(
                            conn.phase,
                            Phase::Body {
                                decoder: Decoder::Length { remaining: 0 },
                                ..
                            }
                        ) {
                            self.hub.finish_body(conn);
                        }
                        // More may wait in the socket, and no new edge will say so.
                        conn.read_pending = true;
                        continue;
                    }
                    Moved::WouldBlock => break,
                    Moved::Closed | Moved::ClientFailed => {
                        conn.read_closed = true;
                        break;
                    }
                    Moved::SpoolFailed(e) => {
                        tracing::error!("writing an upload file: {e}");
                        self.hub.abandon_body(conn, Status::INTERNAL_ERROR);
                        break;
                    }
                    Moved::PipeFull => {
                        self.hub.spill_pipe(conn);
                        continue;
                    }
                }
            }
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    conn.read_closed = true;
                    break;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    let used = self.hub.feed_body_from(conn, &self.scratch[..n]);
                    // What follows the body: the next request, for later.
                    conn.input.extend_from_slice(&self.scratch[used.min(n)..n]);
                    if n < self.scratch.len() {
                        break; // drained
                    }
                    // A full read: more may wait in the socket, and no new edge will say so.
                    conn.read_pending = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    conn.read_closed = true;
                    break;
                }
            }
        }
        if conn.hup && !conn.read_pending {
            conn.read_closed = true;
        }
        self.hub.advance(conn);
        self.settle(index);
    }

    /// After anything happened to a connection: write, account credits, close when done.
    fn settle(&mut self, index: usize) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        conn.flush();
        // Pipelined requests held back while responses were queued (`advance`): served as
        // the client takes what is queued. Until the socket pushes back, no edge will come.
        while matches!(conn.phase, Phase::Head) && !conn.input.is_empty() && conn.out.is_empty() {
            let before = conn.input.len();
            self.hub.advance(conn);
            conn.flush();
            if conn.input.len() == before {
                break;
            }
        }
        if conn.written_for_credits > 0 {
            let n = std::mem::take(&mut conn.written_for_credits);
            if self.hub.settings.flow_control {
                if let Some(h) = conn.handler {
                    self.hub.notify(h, conn.id, Notice::Credits(n));
                }
            }
        }
        if conn.read_closed {
            match conn.phase {
                // The client went away mid-request: nobody is left to answer.
                Phase::Body { .. } | Phase::Handler { .. } | Phase::Queued { .. } => {
                    conn.write_failed = true;
                }
                Phase::Head if conn.out.is_empty() => conn.phase = Phase::Closing,
                _ => {}
            }
        }
        if conn.done_writing() {
            if conn.read_closed {
                conn.write_failed = true;
            } else {
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                conn.input = Vec::new();
                conn.phase = Phase::Lingering {
                    until: Instant::now() + LINGER,
                };
                conn.discard_input(&mut self.scratch);
            }
        }
        if conn.finished() {
            self.close(index);
            return;
        }
        // A held connection's requests wake its worker only; given back, it is polled again.
        let polled = !matches!(conn.phase, Phase::Held { .. });
        if polled != conn.polled {
            let registry = self.poll.registry();
            let done = if polled {
                registry.register(
                    &mut conn.stream,
                    Token(index),
                    Interest::READABLE | Interest::WRITABLE,
                )
            } else {
                registry.deregister(&mut conn.stream)
            };
            match done {
                Ok(()) => conn.polled = polled,
                Err(e) => {
                    tracing::warn!(conn = conn.id, "cannot poll a client connection: {e}");
                    conn.write_failed = true;
                    self.close(index);
                    return;
                }
            }
        }
        if conn.read_pending
            && conn.wants_input(self.hub.settings.buffer_size)
            && !self.ready.contains(&index)
        {
            self.ready.push(index);
        }
    }

    fn close(&mut self, index: usize) {
        let mut conn = self.conns.remove(index);
        self.ids.remove(&conn.id);
        if conn.polled {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        if conn.lent {
            // The broker (and maybe a worker) holds copies: the connection ends here.
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        if let Phase::Body {
            sink: Sink::Spool(spool),
            ..
        } = std::mem::replace(&mut conn.phase, Phase::Closing)
        {
            spool.remove();
        }
        self.hub.forget_upload(&mut conn);
        self.hub.orphan_upload(&mut conn);
        self.hub.finish_log(&mut conn);
        if let Some(h) = conn.handler {
            self.hub.notify(h, conn.id, Notice::Disconnect);
        }
    }

    fn aux_event(&mut self, index: usize, readable: bool) {
        match self.hub.handlers.aux.get(index) {
            Some(Aux::Bound { .. }) => {
                let registry = self.poll.registry();
                self.hub.handlers.accept(index, registry);
            }
            Some(Aux::Peer { .. }) => {
                // Known before driving: a peer that ends in this read is removed by it, and
                // the replies it sent just before ending must still be delivered.
                let Some((handler, role)) = self.hub.handlers.peer_of(index) else {
                    return;
                };
                let mut events = Vec::new();
                self.hub.handlers.drive(index, readable, &mut events);
                if let Some(Aux::Peer { peer, .. }) = self.hub.handlers.aux.get(index) {
                    if peer.has_unread() {
                        self.hot.push(index);
                    }
                }
                for event in events {
                    match event {
                        PeerEvent::Up if role == Role::Push => self.send_queued(handler),
                        PeerEvent::Message(msg) if role == Role::Sub => self.on_reply(handler, msg),
                        PeerEvent::Oversized { size, .. } => tracing::warn!(
                            "a reply of {size} bytes from a handler is over the 64 MiB cap: dropped"
                        ),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }

    fn on_reply(&mut self, handler: usize, msg: Vec<u8>) {
        let msg = Rc::new(msg);
        let recv_ident = self.hub.handlers.list[handler].config.recv_ident.as_bytes();
        if !msg.starts_with(recv_ident) {
            return;
        }
        let reply = match Reply::parse(&msg) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("a malformed reply from a handler ({e}): dropped");
                return;
            }
        };
        if reply.ids().count() > self.hub.settings.handler_targets {
            tracing::warn!("a reply to more than limits.handler_targets connections: dropped");
            return;
        }
        for id in reply.ids() {
            let Some(&index) = self.ids.get(&id) else {
                if reply.extended {
                    self.hub.orphan_done(id, reply.body);
                }
                self.hub.notify(handler, id, Notice::Disconnect);
                continue;
            };
            let conn = self.conns.get_mut(index).expect("ids and conns agree");
            if reply.extended {
                self.hub.control(conn, handler, reply.body);
            } else {
                let start = reply.body.as_ptr() as usize - msg.as_ptr() as usize;
                self.hub
                    .deliver(conn, handler, &msg, start..start + reply.body.len());
            }
            self.settle(index);
        }
    }

    fn send_queued(&mut self, handler: usize) {
        let queued: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Queued { .. }))
            .map(|(i, _)| i)
            .collect();
        for index in queued {
            if let Some(conn) = self.conns.get_mut(index) {
                self.hub.send_queued(conn, handler);
            }
            self.settle(index);
        }
    }

    fn tick(&mut self) {
        if std::mem::take(&mut self.accept_again) {
            for index in 0..self.listeners.len() {
                self.accept(index);
            }
        }
        self.hub.handlers.heartbeat();
        if let Some(a) = self.hub.access.as_mut() {
            a.tick();
        }
        let mut expired = Vec::new();
        for (index, conn) in self.conns.iter_mut() {
            if self.hub.expire(conn) {
                // A request answered here (503, 504) may have pipelined ones behind it.
                self.hub.advance(conn);
                expired.push(index);
            }
        }
        for index in expired {
            self.settle(index);
        }
    }

    fn close_idle(&mut self) {
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.phase, Phase::Head) && c.input.is_empty() && c.out.is_empty()
            })
            .map(|(i, _)| i)
            .collect();
        for index in idle {
            self.close(index);
        }
    }
}

impl Hub {
    fn limits(&self) -> HeadLimits {
        HeadLimits {
            max_head: self.settings.buffer_size,
            max_headers: self.settings.header_count,
        }
    }

    /// Serves the connection's buffered input as far as it goes (reading is the loop's:
    /// a client gets one read budget per turn, so a fast upload cannot starve the others).
    fn advance(&mut self, conn: &mut Conn) {
        loop {
            match &conn.phase {
                Phase::Head => {
                    // A client that pipelines and does not read is answered as far as
                    // `PIPELINED_OUT` of responses; the rest waits until it takes them.
                    if conn.input.is_empty()
                        || conn.out_bytes > PIPELINED_OUT
                        || conn.out.len() > 64
                    {
                        return;
                    }
                    match request::parse(&conn.input, self.limits()) {
                        Ok(Some((head, len))) => {
                            conn.input.drain(..len);
                            conn.progress = Instant::now();
                            self.start_request(conn, head);
                        }
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(conn = conn.id, "bad request: {}", e.reason);
                            conn.log = None;
                            self.refuse(conn, e.status, true, "");
                            return;
                        }
                    }
                }
                Phase::Body { .. } => {
                    self.feed_body(conn);
                    if matches!(conn.phase, Phase::Body { .. }) {
                        return;
                    }
                }
                Phase::Handler { .. }
                | Phase::Queued { .. }
                | Phase::Held { .. }
                | Phase::Closing
                | Phase::Lingering { .. } => return,
            }
        }
    }

    fn start_request(&mut self, conn: &mut Conn, head: Head) {
        conn.keep_alive = head.keep_alive;
        let routed = self.router.route(head.host(), head.path());
        // Only an access log needs these copies.
        conn.log = self.access.is_some().then(|| LogFacts {
            host: routed
                .as_ref()
                .map(|m| m.host.to_string())
                .unwrap_or_default(),
            method: head.method().to_vec(),
            path: head.path().to_vec(),
            version: head.version(),
            status: 0,
            bytes: 0,
        });
        let routed = routed.map(|m| (*m.target, m.key.to_string(), m.prefix_len));
        let has_body = head.framing != Framing::Length(0);
        if is_websocket_upgrade(&head) {
            tracing::info!(
                conn = conn.id,
                "a websocket upgrade: not implemented yet, 501"
            );
            return self.refuse(conn, Status::NOT_IMPLEMENTED, true, "");
        }
        match routed {
            None => self.refuse(conn, Status::NOT_FOUND, has_body, ""),
            Some((RouteTarget::Proxy, ..)) => {
                self.refuse(conn, Status::NOT_IMPLEMENTED, has_body, "")
            }
            Some((RouteTarget::Dir(d), key, prefix_len)) => {
                self.serve_dir(conn, &head, d, &key, prefix_len)
            }
            Some((RouteTarget::Handler(h), key, _)) => self.start_handler(conn, head, h, key),
        }
    }

    /// Answers with a canned error; the connection closes after it when `close`, or when
    /// the client asked.
    fn refuse(&mut self, conn: &mut Conn, status: Status, close: bool, extra: &str) {
        let close = close || !conn.keep_alive;
        conn.push(canned::error(status, close, extra));
        if let Some(log) = conn.log.as_mut() {
            log.status = status.0;
        }
        self.finish_log(conn);
        conn.phase = if close { Phase::Closing } else { Phase::Head };
    }

    pub fn finish_log(&mut self, conn: &mut Conn) {
        let (Some(log), Some(access)) = (conn.log.take(), self.access.as_mut()) else {
            return;
        };
        access.log(&Entry {
            host: &log.host,
            remote: conn.remote,
            remote_ip: &conn.remote_ip,
            method: &log.method,
            path: &log.path,
            version: log.version,
            status: log.status,
            bytes: log.bytes,
        });
    }

    /// Applies the timeouts; true when something changed.
    fn expire(&mut self, conn: &mut Conn) -> bool {
        let s = &self.settings;
        let since = conn.progress.elapsed();
        if !conn.out.is_empty() && conn.last_write.elapsed() > s.write_timeout {
            tracing::info!(
                conn = conn.id,
                "client took nothing for limits.write_timeout: closed"
            );
            conn.write_failed = true;
            return true;
        }
        match &conn.phase {
            Phase::Head if !conn.input.is_empty() && since > s.header_timeout => {
                conn.log = None;
                self.refuse(conn, Status::REQUEST_TIMEOUT, true, "");
                true
            }
            Phase::Head
                if conn.input.is_empty()
                    && conn.out.is_empty()
                    && conn.progress.max(conn.last_write).elapsed() > s.keepalive_timeout =>
            {
                conn.phase = Phase::Closing;
                true
            }
            Phase::Queued { handler, until, .. } if Instant::now() > *until => {
                let handler = *handler;
                self.forget_upload(conn);
                self.unavailable(conn, handler, false);
                true
            }
            Phase::Lingering { until } if Instant::now() > *until => {
                conn.read_closed = true;
                true
            }
            Phase::Body { .. } if since > s.body_timeout => {
                self.abandon_body(conn, Status::REQUEST_TIMEOUT);
                true
            }
            Phase::Handler {
                deadline: Some(d),
                framing,
                ..
            } if Instant::now() > *d => {
                if framing.head_seen() {
                    // Part of the response is out: all that can be done is to end it.
                    tracing::warn!(
                        conn = conn.id,
                        "the handler went silent mid-response for limits.handler_timeout: closed"
                    );
                    conn.phase = Phase::Closing;
                } else {
                    tracing::warn!(
                        conn = conn.id,
                        "no reply from the handler within limits.handler_timeout: 504"
                    );
                    self.refuse(conn, Status::GATEWAY_TIMEOUT, true, "");
                }
                true
            }
            _ => false,
        }
    }
}

/// An RFC 6455 upgrade request (mongrel2's test: `upgrade: websocket` and a `connection`
/// that lists `upgrade`).
fn is_websocket_upgrade(head: &Head) -> bool {
    head.header(b"upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case(b"websocket"))
        && head.header(b"connection").is_some_and(|c| {
            c.split(|&b| b == b',')
                .any(|o| o.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.id)
    }
}

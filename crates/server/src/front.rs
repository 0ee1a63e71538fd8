//! The event loop: one thread, one `mio` poll over the HTTP listener, every client
//! connection, and the handlers' bound sockets and peers.
//!
//! A client's request goes through `Hub::start_request`: routed, then refused, served from a
//! Dir, or sent to its handler (the body first read inline or spooled). A handler's reply is
//! followed by its framing (`http::framing`) so that the connection takes its next request
//! only once the response is whole.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use m2wire::{encode_notice, encode_request, Notice, Reply};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use zmtp::PeerEvent;

use crate::access_log::{AccessLog, Entry};
use crate::conn::{AfterBody, Conn, LogFacts, Phase, Sink};
use crate::dir::{self, Conditions, DirRoute, FileFacts, Plan, Resolved};
use crate::handlers::{Aux, Handlers, Role, AUX_BASE};
use crate::http::body::Decoder;
use crate::http::canned;
use crate::http::framing::{Fed, ResponseFraming};
use crate::http::request::{self, Framing, Head, HeadLimits};
use crate::http::Status;
use crate::mime::MimeTypes;
use crate::routing::Router;
use crate::settings::Settings;
use crate::upload::Spool;

const LISTENER: Token = Token(AUX_BASE - 1);
/// Credits a handler starts with on a connection (mongrel2's).
const FIRST_CREDITS: &[u8] = b"102400";
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
}

pub struct Front {
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    ids: HashMap<u64, usize>,
    next_id: u64,
    hub: Hub,
    /// Handler peers that read input at their last turn: they may have more.
    hot: Vec<usize>,
    /// Clients that stopped reading at their budget, to be served again after the others.
    ready: Vec<usize>,
    /// Where client reads land first (zeroed once).
    scratch: Box<[u8]>,
}

impl Front {
    pub fn new(poll: Poll, mut listener: TcpListener, hub: Hub) -> anyhow::Result<Front> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Front {
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            ids: HashMap::new(),
            next_id: 1,
            hub,
            hot: Vec::new(),
            ready: Vec::new(),
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
        })
    }

    /// Serves until `stop` is set, then finishes the requests in service (up to `grace`).
    pub fn run(&mut self, stop: Arc<AtomicBool>, grace: Duration) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_tick = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            let timeout = if self.hot.is_empty() {
                TICK
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
            for event in events.iter() {
                let token = event.token();
                if token == LISTENER {
                    self.accept();
                } else if token.0 >= AUX_BASE {
                    self.aux_event(
                        token.0 - AUX_BASE,
                        event.is_readable() || event.is_read_closed(),
                    );
                } else if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.client_event(token.0);
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
                self.client_event(index);
            }
            self.hub.handlers.flush();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick();
            }
            if stop.load(Ordering::Relaxed) && stopping.is_none() {
                tracing::info!("stopping: no new connections; finishing the requests in service");
                stopping = Some(Instant::now());
                if let Some(mut l) = self.listener.take() {
                    let _ = self.poll.registry().deregister(&mut l);
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

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (mut stream, remote) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: logged, and the loop goes on.
                    tracing::warn!("accept: {e}");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
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

    fn client_event(&mut self, index: usize) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        let was_empty = conn.input.is_empty();
        conn.fill(self.hub.settings.buffer_size, &mut self.scratch);
        if was_empty && !conn.input.is_empty() {
            conn.progress = Instant::now();
        }
        self.hub.advance(conn);
        conn.trim_input();
        self.settle(index);
    }

    /// After anything happened to a connection: write, account credits, close when done.
    fn settle(&mut self, index: usize) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        conn.flush();
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
        if conn.finished() {
            self.close(index);
        } else if conn.read_pending && conn.wants_input() && !self.ready.contains(&index) {
            self.ready.push(index);
        }
    }

    fn close(&mut self, index: usize) {
        let mut conn = self.conns.remove(index);
        self.ids.remove(&conn.id);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if let Phase::Body {
            sink: Sink::Spool(spool),
            ..
        } = std::mem::replace(&mut conn.phase, Phase::Closing)
        {
            spool.remove();
        }
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
                let mut events = Vec::new();
                self.hub.handlers.drive(index, readable, &mut events);
                let Some((handler, role)) = self.hub.handlers.peer_of(index) else {
                    return;
                };
                if let Some(Aux::Peer { peer, .. }) = self.hub.handlers.aux.get(index) {
                    if peer.has_unread() {
                        self.hot.push(index);
                    }
                }
                for event in events {
                    match event {
                        PeerEvent::Up if role == Role::Push => self.send_queued(handler),
                        PeerEvent::Message(msg) if role == Role::Sub => {
                            self.on_reply(handler, &msg)
                        }
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

    fn on_reply(&mut self, handler: usize, msg: &[u8]) {
        let recv_ident = self.hub.handlers.list[handler].config.recv_ident.as_bytes();
        if !msg.starts_with(recv_ident) {
            return;
        }
        let reply = match Reply::parse(msg) {
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
                self.hub.notify(handler, id, Notice::Disconnect);
                continue;
            };
            let conn = self.conns.get_mut(index).expect("ids and conns agree");
            if reply.extended {
                self.hub.control(conn, reply.body);
            } else {
                self.hub.deliver(conn, reply.body);
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
        self.hub.handlers.heartbeat();
        if let Some(a) = self.hub.access.as_mut() {
            a.tick();
        }
        let mut expired = Vec::new();
        for (index, conn) in self.conns.iter_mut() {
            if self.hub.expire(conn) {
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
                    if conn.input.is_empty() {
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
                Phase::Handler { .. } | Phase::Queued { .. } | Phase::Closing => return,
            }
        }
    }

    fn start_request(&mut self, conn: &mut Conn, head: Head) {
        conn.keep_alive = head.keep_alive;
        let routed = self.router.route(head.host(), head.path()).map(|m| {
            (
                *m.target,
                m.key.to_string(),
                m.host.to_string(),
                m.prefix_len,
            )
        });
        conn.log = Some(LogFacts {
            host: routed.as_ref().map(|r| r.2.clone()).unwrap_or_default(),
            method: head.method().to_vec(),
            path: head.path().to_vec(),
            version: head.version(),
            status: 0,
            bytes: 0,
        });
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
            Some((RouteTarget::Dir(d), key, _, prefix_len)) => {
                self.serve_dir(conn, &head, d, &key, prefix_len)
            }
            Some((RouteTarget::Handler(h), key, host, _)) => {
                self.start_handler(conn, head, h, key, host)
            }
        }
    }

    /// Answers with a canned error; the connection closes after it when `close`, or when
    /// the client asked.
    fn refuse(&mut self, conn: &mut Conn, status: Status, close: bool, extra: &str) {
        let close = close || !conn.keep_alive;
        conn.push(canned::error(status, close, extra), false);
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
            method: &log.method,
            path: &log.path,
            version: log.version,
            status: log.status,
            bytes: log.bytes,
        });
    }

    fn start_handler(
        &mut self,
        conn: &mut Conn,
        head: Head,
        handler: usize,
        key: String,
        host: String,
    ) {
        conn.handler = Some(handler);
        let limit = self.settings.content_length;
        let (decoder, sink) = match head.framing {
            Framing::Length(0) => {
                return self.dispatch(conn, handler, &head, &key, &[], Upload::None);
            }
            Framing::Length(n) if n <= limit => (
                Decoder::length(n),
                Sink::Inline(Vec::with_capacity(n as usize)),
            ),
            Framing::Length(n) => {
                if !self.handlers.available(handler) {
                    // An upload is announced at once: a handler must be there to hear it.
                    return self.unavailable(conn, handler, true);
                }
                let Some(spool) = self.spool(conn) else {
                    return;
                };
                self.announce_upload(conn, handler, &head, &key, &spool);
                (Decoder::length(n), Sink::Spool(spool))
            }
            Framing::Chunked => (Decoder::chunked(), Sink::Inline(Vec::new())),
        };
        if head.expects_continue && conn.input.is_empty() {
            conn.push(canned::CONTINUE.to_vec(), false);
        }
        conn.phase = Phase::Body {
            decoder,
            sink,
            then: AfterBody::Handler {
                handler,
                head: Box::new(head),
                key,
                host,
            },
        };
    }

    /// A file for a body over the limit, or a 413 (no upload.temp_store) or 500 answered.
    fn spool(&mut self, conn: &mut Conn) -> Option<Spool> {
        let Some(template) = self.settings.temp_store.as_deref() else {
            self.refuse(conn, Status::PAYLOAD_TOO_LARGE, true, "");
            return None;
        };
        match Spool::create(template, &self.upload_root, self.settings.temp_store_mode) {
            Ok(spool) => Some(spool),
            Err(e) => {
                tracing::error!("cannot create an upload file from {template}: {e}");
                self.refuse(conn, Status::INTERNAL_ERROR, true, "");
                None
            }
        }
    }

    fn announce_upload(
        &mut self,
        conn: &mut Conn,
        handler: usize,
        head: &Head,
        key: &str,
        spool: &Spool,
    ) {
        let message = self.message(
            conn,
            handler,
            head,
            key,
            &[],
            Upload::Start(&spool.message_path),
        );
        self.handlers.send(handler, &message);
    }

    /// Moves body bytes from the input to where they go.
    fn feed_body(&mut self, conn: &mut Conn) {
        let Phase::Body { decoder, sink, .. } = &mut conn.phase else {
            return;
        };
        let mut disk_error = None;
        let step = decoder.decode(&conn.input, &mut |data| match sink {
            Sink::Inline(v) => v.extend_from_slice(data),
            Sink::Spool(s) => {
                if let Err(e) = s.write(data) {
                    disk_error.get_or_insert(e);
                }
            }
            Sink::Discard => {}
        });
        let step = match step {
            Ok(step) => step,
            Err(e) => {
                tracing::debug!(conn = conn.id, "bad request body: {}", e.0);
                return self.abandon_body(conn, Status::BAD_REQUEST);
            }
        };
        if step.used > 0 {
            conn.input.drain(..step.used);
            conn.progress = Instant::now();
        }
        if let Some(e) = disk_error {
            tracing::error!("writing an upload file: {e}");
            return self.abandon_body(conn, Status::INTERNAL_ERROR);
        }
        let grown_past =
            matches!(sink, Sink::Inline(v) if v.len() as u64 > self.settings.content_length);
        if grown_past {
            self.spool_grown_body(conn);
        }
        if step.done && matches!(conn.phase, Phase::Body { .. }) {
            self.finish_body(conn);
        }
    }

    /// A chunked body past `limits.content_length` moves to an upload file.
    fn spool_grown_body(&mut self, conn: &mut Conn) {
        let Some(mut spool) = self.spool(conn) else {
            return;
        };
        let Phase::Body { sink, .. } = &mut conn.phase else {
            return spool.remove();
        };
        let Sink::Inline(buffered) = std::mem::replace(sink, Sink::Discard) else {
            return spool.remove();
        };
        if let Err(e) = spool.write(&buffered) {
            tracing::error!("writing an upload file: {e}");
            spool.remove();
            return self.abandon_body(conn, Status::INTERNAL_ERROR);
        }
        *sink = Sink::Spool(spool);
        let Phase::Body {
            then: AfterBody::Handler {
                handler, head, key, ..
            },
            sink: Sink::Spool(spool),
            ..
        } = &conn.phase
        else {
            return;
        };
        let message = self.message(
            conn,
            *handler,
            head,
            key,
            &[],
            Upload::Start(&spool.message_path),
        );
        self.handlers.send(*handler, &message);
    }

    fn abandon_body(&mut self, conn: &mut Conn, status: Status) {
        if let Phase::Body {
            sink: Sink::Spool(spool),
            ..
        } = std::mem::replace(&mut conn.phase, Phase::Head)
        {
            spool.remove();
        }
        self.refuse(conn, status, true, "");
    }

    fn finish_body(&mut self, conn: &mut Conn) {
        let Phase::Body { sink, then, .. } = std::mem::replace(&mut conn.phase, Phase::Head) else {
            return;
        };
        let AfterBody::Handler {
            handler, head, key, ..
        } = then
        else {
            conn.phase = if conn.keep_alive {
                Phase::Head
            } else {
                Phase::Closing
            };
            return;
        };
        match sink {
            Sink::Inline(body) => self.dispatch(conn, handler, &head, &key, &body, Upload::None),
            Sink::Spool(spool) => {
                let path = spool.message_path.clone();
                if let Err(e) = spool.finish() {
                    tracing::error!("writing an upload file: {e}");
                    return self.refuse(conn, Status::INTERNAL_ERROR, true, "");
                }
                self.dispatch(conn, handler, &head, &key, &[], Upload::Done(&path));
            }
            Sink::Discard => {}
        }
    }

    /// Sends the request to its handler and waits for the reply; with no handler
    /// connected, the request waits for one (`limits.handler_wait_ms`), then 503.
    fn dispatch(
        &mut self,
        conn: &mut Conn,
        handler: usize,
        head: &Head,
        key: &str,
        body: &[u8],
        upload: Upload,
    ) {
        let message = self.message(conn, handler, head, key, body, upload);
        conn.first_request = false;
        if self.handlers.send(handler, &message) {
            self.await_reply(conn, handler, head.is_head());
        } else {
            conn.phase = Phase::Queued {
                handler,
                message,
                is_head: head.is_head(),
                until: Instant::now() + self.settings.handler_wait,
            };
        }
    }

    fn await_reply(&mut self, conn: &mut Conn, handler: usize, is_head: bool) {
        conn.phase = Phase::Handler {
            handler,
            framing: ResponseFraming::new(is_head),
            deadline: Some(Instant::now() + self.settings.handler_timeout),
        };
    }

    /// A handler connected: the request waiting for it goes out.
    fn send_queued(&mut self, conn: &mut Conn, connected: usize) {
        let Phase::Queued {
            handler,
            message,
            is_head,
            ..
        } = &conn.phase
        else {
            return;
        };
        let (handler, is_head) = (*handler, *is_head);
        if handler == connected && self.handlers.send(handler, message) {
            self.await_reply(conn, handler, is_head);
        }
    }

    fn unavailable(&mut self, conn: &mut Conn, handler: usize, close: bool) {
        tracing::warn!(
            conn = conn.id,
            "no handler connected to {}: 503",
            self.handlers.list[handler].config.send_spec
        );
        self.refuse(conn, Status::UNAVAILABLE, close, "Retry-After: 1\r\n");
    }

    /// The request message, in mongrel2's format.
    fn message(
        &self,
        conn: &Conn,
        handler: usize,
        head: &Head,
        key: &str,
        body: &[u8],
        upload: Upload,
    ) -> Vec<u8> {
        let remote = conn.remote.ip().to_string();
        let inline_chunked = head.framing == Framing::Chunked && matches!(upload, Upload::None);
        let length = body.len().to_string();
        let mut client_xff = None;
        let mut headers: Vec<(&[u8], &[u8])> = Vec::with_capacity(24);
        headers.push((b"PATH", head.path()));
        for (name, value) in head.headers() {
            // No client may forge an upload, nor our framing.
            if name.starts_with(b"x-mongrel2-") || (inline_chunked && name == b"transfer-encoding")
            {
                continue;
            }
            if name == b"x-forwarded-for" {
                client_xff.get_or_insert(value);
                if !self.settings.no_clobber_xff {
                    continue;
                }
            }
            headers.push((name, value));
        }
        if inline_chunked {
            headers.push((b"content-length", length.as_bytes()));
        }
        if !(self.settings.no_clobber_xff && client_xff.is_some()) {
            headers.push((b"x-forwarded-for", remote.as_bytes()));
        }
        headers.push((b"METHOD", head.method()));
        headers.push((b"VERSION", head.version()));
        headers.push((b"URI", head.uri()));
        if let Some(q) = head.query() {
            headers.push((b"QUERY", q));
        }
        if let Some(f) = head.fragment() {
            headers.push((b"FRAGMENT", f));
        }
        headers.push((b"PATTERN", key.as_bytes()));
        headers.push((b"URL_SCHEME", self.scheme));
        headers.push((b"REMOTE_ADDR", remote.as_bytes()));
        if self.settings.flow_control && conn.first_request {
            headers.push((b"DOWNLOAD_CREDITS", FIRST_CREDITS));
        }
        match upload {
            Upload::None => {}
            Upload::Start(p) => headers.push((b"x-mongrel2-upload-start", p.as_bytes())),
            Upload::Done(p) => {
                headers.push((b"x-mongrel2-upload-start", p.as_bytes()));
                headers.push((b"x-mongrel2-upload-done", p.as_bytes()));
            }
        }
        let h = &self.handlers.list[handler];
        let mut out = Vec::with_capacity(256 + body.len() + 32 * headers.len());
        encode_request(
            &mut out,
            h.config.send_ident.as_bytes(),
            conn.id,
            head.path(),
            h.encoding,
            &headers,
            body,
        );
        out
    }

    /// A notice to a handler about a connection.
    fn notify(&mut self, handler: usize, id: u64, notice: Notice) {
        let h = &self.handlers.list[handler];
        let mut out = Vec::with_capacity(96);
        encode_notice(
            &mut out,
            h.config.send_ident.as_bytes(),
            id,
            h.encoding,
            notice,
        );
        self.handlers.send_notice(handler, &out);
    }

    /// A reply's bytes for a connection.
    fn deliver(&mut self, conn: &mut Conn, body: &[u8]) {
        if body.is_empty() {
            // The handler closes the connection (refusing an upload, if one is coming in).
            if let Phase::Body {
                sink: Sink::Spool(spool),
                ..
            } = std::mem::replace(&mut conn.phase, Phase::Closing)
            {
                spool.remove();
            }
            conn.phase = Phase::Closing;
            return;
        }
        if let Phase::Body {
            then: AfterBody::Handler { handler, head, .. },
            sink,
            ..
        } = &mut conn.phase
        {
            // An answer before the body is in: the handler refuses it. The response is
            // relayed, and the connection closes after it (the body is left unread).
            let (handler, is_head) = (*handler, head.is_head());
            if let Sink::Spool(spool) = std::mem::replace(sink, Sink::Discard) {
                spool.remove();
            }
            conn.keep_alive = false;
            conn.phase = Phase::Handler {
                handler,
                framing: ResponseFraming::new(is_head),
                deadline: None,
            };
        }
        let Phase::Handler {
            framing, deadline, ..
        } = &mut conn.phase
        else {
            tracing::warn!(
                conn = conn.id,
                "a reply for a connection with no request in service: dropped"
            );
            return;
        };
        *deadline = None;
        let fed = framing.feed(body);
        let status = framing.status();
        let framed_close = framing.close_after();
        match fed {
            Fed::More => conn.push(body.to_vec(), true),
            Fed::Complete(n) => {
                conn.push(body[..n].to_vec(), true);
                if n < body.len() {
                    tracing::warn!(
                        conn = conn.id,
                        "{} bytes after the end of a handler's response: dropped",
                        body.len() - n
                    );
                }
                let close = framed_close || !conn.keep_alive || conn.read_closed;
                if let Some(log) = conn.log.as_mut() {
                    log.status = status;
                }
                self.finish_log(conn);
                conn.phase = if close { Phase::Closing } else { Phase::Head };
                conn.progress = Instant::now();
                self.advance(conn);
            }
        }
        if conn.out_bytes > self.settings.client_buffer {
            tracing::warn!(
                conn = conn.id,
                "client too slow: more than limits.client_buffer bytes queued; dropped"
            );
            conn.write_failed = true;
        }
    }

    /// An extended reply (`X` ids): mongrel2's `ctl` commands.
    fn control(&mut self, conn: &mut Conn, body: &[u8]) {
        let command = m2wire::netstring::split_tagged(body, 0)
            .ok()
            .and_then(|(list, _, _)| m2wire::netstring::split_tagged(list, 0).ok())
            .map(|(name, _, args)| (name.to_vec(), args.to_vec()));
        match command {
            Some((name, args)) if name == b"ctl" && contains(&args, b"keep-alive") => {
                if let Phase::Handler {
                    deadline: Some(d), ..
                } = &mut conn.phase
                {
                    *d = Instant::now() + self.settings.handler_timeout;
                }
            }
            Some((name, args)) if name == b"ctl" && contains(&args, b"cancel") => {
                conn.phase = Phase::Closing
            }
            _ => {
                tracing::warn!(
                    conn = conn.id,
                    "an extended reply we do not implement: the client is closed, as mongrel2 does"
                );
                conn.phase = Phase::Closing;
            }
        }
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
                if conn.input.is_empty() && conn.out.is_empty() && since > s.keepalive_timeout =>
            {
                conn.phase = Phase::Closing;
                true
            }
            Phase::Queued { handler, until, .. } if Instant::now() > *until => {
                let handler = *handler;
                self.unavailable(conn, handler, false);
                true
            }
            Phase::Body { .. } if since > s.body_timeout => {
                self.abandon_body(conn, Status::REQUEST_TIMEOUT);
                true
            }
            Phase::Handler {
                deadline: Some(d), ..
            } if Instant::now() > *d => {
                tracing::warn!(
                    conn = conn.id,
                    "no reply from the handler within limits.handler_timeout: 504"
                );
                self.refuse(conn, Status::GATEWAY_TIMEOUT, true, "");
                true
            }
            _ => false,
        }
    }

    fn serve_dir(&mut self, conn: &mut Conn, head: &Head, d: usize, key: &str, prefix_len: usize) {
        let has_body = head.framing != Framing::Length(0);
        if head.method() != b"GET" && head.method() != b"HEAD" {
            return self.refuse(
                conn,
                Status::METHOD_NOT_ALLOWED,
                has_body,
                "Allow: GET, HEAD\r\n",
            );
        }
        let path = head.path();
        let rest = &path[prefix_len.min(path.len())..];
        // A prefix without a trailing slash matches whole segments only (mongrel2 served
        // `/st2a.txt` from route `/st2`), and the bare prefix is the directory.
        let resolved = if !key.ends_with('/') && rest.is_empty() {
            Resolved::AddSlash
        } else if !key.ends_with('/') && !rest.starts_with(b"/") {
            Resolved::NotFound
        } else {
            self.dirs[d].resolve(rest)
        };
        match resolved {
            Resolved::NotFound => return self.refuse(conn, Status::NOT_FOUND, has_body, ""),
            Resolved::AddSlash => {
                conn.push(dir::redirect_with_slash(path, head.query()), false);
                if let Some(log) = conn.log.as_mut() {
                    log.status = 301;
                }
            }
            Resolved::File {
                path: file_path,
                file,
                meta,
            } => {
                let facts = FileFacts::from_metadata(&meta);
                let conditions = Conditions {
                    method_is_head: head.is_head(),
                    if_match: head.header(b"if-match"),
                    if_none_match: head.header(b"if-none-match"),
                    if_modified_since: head.header(b"if-modified-since"),
                    if_unmodified_since: head.header(b"if-unmodified-since"),
                    range: head.header(b"range"),
                    if_range: head.header(b"if-range"),
                };
                let plan = dir::plan(&conditions, &facts);
                let ctype = self.dirs[d]
                    .content_type(&self.mime, &file_path)
                    .to_string();
                let keep_alive = conn.keep_alive && !has_body;
                conn.push(
                    dir::head(&plan, &facts, &ctype, keep_alive, SystemTime::now()),
                    false,
                );
                let status = match plan {
                    Plan::Full => 200,
                    Plan::Partial { .. } => 206,
                    Plan::NotModified => 304,
                    Plan::PreconditionFailed => 412,
                    Plan::RangeNotSatisfiable => 416,
                };
                if !head.is_head() {
                    match plan {
                        Plan::Full if facts.size > 0 => conn.push_file(file, 0, facts.size),
                        Plan::Partial {
                            start,
                            end_inclusive,
                        } => conn.push_file(file, start, end_inclusive + 1),
                        Plan::PreconditionFailed | Plan::RangeNotSatisfiable => {
                            conn.push(dir::error_body(&plan).to_vec(), false)
                        }
                        _ => {}
                    }
                }
                if let Some(log) = conn.log.as_mut() {
                    log.status = status;
                }
            }
        }
        self.finish_log(conn);
        conn.phase = if has_body {
            // The response is queued; the body is read and dropped, then the connection
            // closes (the response said so).
            conn.keep_alive = false;
            let decoder = match head.framing {
                Framing::Chunked => Decoder::chunked(),
                Framing::Length(n) => Decoder::length(n),
            };
            Phase::Body {
                decoder,
                sink: Sink::Discard,
                then: AfterBody::Nothing,
            }
        } else if conn.keep_alive {
            Phase::Head
        } else {
            Phase::Closing
        };
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

/// Whether a tnetstring dict's payload has `key` (a cheap look, for `ctl` commands).
fn contains(dict: &[u8], key: &[u8]) -> bool {
    let mut rest = dict;
    while let Ok((k, _, after)) = m2wire::netstring::split_tagged(rest, 0) {
        if k == key {
            return true;
        }
        match m2wire::netstring::split_tagged(after, 0) {
            Ok((_, _, next)) => rest = next,
            Err(_) => return false,
        }
    }
    false
}

/// Which upload message a request message is.
#[derive(Clone, Copy)]
enum Upload<'a> {
    None,
    Start(&'a str),
    Done(&'a str),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.id)
    }
}

//! A request's exchange with its handler: the body read inline or spooled to an upload file,
//! the request message in mongrel2's format, the wait for a handler, and the reply relayed
//! to the client as far as its framing goes.

use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use m2wire::{encode_notice, Headers, Notice};

use super::lend::{self, Lent};
use super::{Hub, FIRST_CREDITS};
use crate::conn::{AfterBody, Conn, LentBody, Phase, Sink};
use crate::http::body::Decoder;
use crate::http::canned;
use crate::http::framing::{Fed, ResponseFraming};
use crate::http::message::{self, Origin};
use crate::http::request::{Framing, Head};
use crate::http::Status;
use crate::upload::{RequestPipe, Spool};

impl Hub {
    pub(super) fn start_handler(
        &mut self,
        conn: &mut Conn,
        head: Head,
        handler: usize,
        key: String,
    ) {
        conn.handler = Some(handler);
        let limit = self.settings.content_length;
        let (decoder, sink) = match head.framing {
            Framing::Length(0) => {
                return self.dispatch(conn, handler, &head, &key, Payload::Inline(&[]));
            }
            // Capacity up to 1 MiB at once: a large limits.content_length must not let
            // a client's Content-Length alone reserve memory.
            Framing::Length(n) if n <= limit => (
                Decoder::length(n),
                Sink::Inline(Vec::with_capacity(n.min(1 << 20) as usize)),
            ),
            // A piped or pooled body (one-command mode, at most 1 MiB) is not announced:
            // the start would cost a trip through the broker and a worker's wake-up for
            // every such request, for a refusal the done message gives moments later. Its
            // request waits for a handler as one without a body does.
            Framing::Length(n) => {
                if let Some(pipe) = self.pipes.as_mut().and_then(|p| p.take(n)) {
                    (Decoder::length(n), Sink::Pipe(pipe))
                } else {
                    let Some(spool) = self.spool(conn, Some(n)) else {
                        return;
                    };
                    if !spool.is_pooled() {
                        if !self.handlers.available(handler) {
                            // An upload is announced at once: a handler must be there to
                            // hear it.
                            spool.remove();
                            return self.unavailable(conn, handler, true);
                        }
                        self.announce_upload(conn, handler, &head, &key, &spool);
                    }
                    (Decoder::length(n), Sink::Spool(spool))
                }
            }
            Framing::Chunked => (Decoder::chunked(), Sink::Inline(Vec::new())),
        };
        if head.expects_continue && conn.input.is_empty() {
            conn.push(canned::CONTINUE.to_vec());
        }
        conn.phase = Phase::Body {
            decoder,
            sink,
            then: AfterBody::Handler {
                handler,
                head: Box::new(head),
                key,
            },
        };
    }

    /// A file for a body over the limit, or a 413 (no upload.temp_store) or 500 answered.
    /// `len`: the body's, when known (a body of known length may go to a pooled file).
    pub(super) fn spool(&mut self, conn: &mut Conn, len: Option<u64>) -> Option<Spool> {
        let Some(template) = self.settings.temp_store.as_deref() else {
            self.refuse(conn, Status::PAYLOAD_TOO_LARGE, true, "");
            return None;
        };
        let (root, mode) = (&self.upload_root, self.settings.temp_store_mode);
        let created = match (self.pool.as_mut(), len) {
            (Some(pool), Some(len)) => pool.take(template, root, mode, len),
            _ => Spool::create(template, root, mode),
        };
        match created {
            Ok(spool) => Some(spool),
            Err(e) => {
                tracing::error!("cannot create an upload file from {template}: {e}");
                self.refuse(conn, Status::INTERNAL_ERROR, true, "");
                None
            }
        }
    }

    /// Tells the handler a body is being spooled (mongrel2's upload start).
    pub(super) fn announce_upload(
        &mut self,
        conn: &Conn,
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
            Payload::UploadStart(&spool.message_path),
            None,
        );
        self.handlers.send(handler, &message);
    }

    /// Moves body bytes from the input to where they go.
    pub(super) fn feed_body(&mut self, conn: &mut Conn) {
        let input = std::mem::take(&mut conn.input);
        let used = self.feed_body_from(conn, &input);
        conn.input = input;
        conn.input.drain(..used);
    }

    /// Moves body bytes from `input` (the connection's buffered input, or bytes just read
    /// from the socket) to where they go; how many were used.
    pub(super) fn feed_body_from(&mut self, conn: &mut Conn, input: &[u8]) -> usize {
        let Phase::Body { decoder, sink, .. } = &mut conn.phase else {
            return 0;
        };
        let mut disk_error = None;
        let step = decoder.decode(input, &mut |data| match sink {
            Sink::Inline(v) => v.extend_from_slice(data),
            Sink::Spool(s) => {
                if let Err(e) = s.write(data) {
                    disk_error.get_or_insert(e);
                }
            }
            Sink::Pipe(p) => {
                if let Err(e) = p.write(data) {
                    disk_error.get_or_insert(e);
                }
            }
            Sink::Discard => {}
        });
        let step = match step {
            Ok(step) => step,
            Err(e) => {
                tracing::debug!(conn = conn.id, "bad request body: {}", e.0);
                self.abandon_body(conn, Status::BAD_REQUEST);
                return input.len();
            }
        };
        if step.used > 0 {
            conn.progress = Instant::now();
        }
        if let Some(e) = disk_error {
            tracing::error!("writing an upload file: {e}");
            self.abandon_body(conn, Status::INTERNAL_ERROR);
            return input.len();
        }
        let grown_past =
            matches!(sink, Sink::Inline(v) if v.len() as u64 > self.settings.content_length);
        if grown_past {
            self.spool_grown_body(conn);
        }
        if step.done && matches!(conn.phase, Phase::Body { .. }) {
            self.finish_body(conn);
        }
        step.used
    }

    /// A chunked body past `limits.content_length` moves to an upload file.
    pub(super) fn spool_grown_body(&mut self, conn: &mut Conn) {
        let Some(mut spool) = self.spool(conn, None) else {
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
        self.announce_upload(conn, *handler, head, key, spool);
    }

    /// A body's pipe filled before the body was in: the body goes on in a file.
    pub(super) fn spill_pipe(&mut self, conn: &mut Conn) {
        let Phase::Body {
            decoder: Decoder::Length { remaining },
            sink: Sink::Pipe(pipe),
            ..
        } = &conn.phase
        else {
            return;
        };
        let len = pipe.written + remaining;
        let Some(mut spool) = self.spool(conn, Some(len)) else {
            return;
        };
        let Phase::Body { sink, .. } = &mut conn.phase else {
            return spool.remove();
        };
        let Sink::Pipe(pipe) = std::mem::replace(sink, Sink::Discard) else {
            return spool.remove();
        };
        tracing::debug!(
            conn = conn.id,
            in_pipe = pipe.written,
            "a body's pipe filled up: spooled to a file"
        );
        if let Err(e) = pipe.spill(&mut spool) {
            tracing::error!("writing an upload file: {e}");
            spool.remove();
            return self.abandon_body(conn, Status::INTERNAL_ERROR);
        }
        *sink = Sink::Spool(spool);
    }

    pub(super) fn abandon_body(&mut self, conn: &mut Conn, status: Status) {
        if let Phase::Body {
            sink: Sink::Spool(spool),
            ..
        } = std::mem::replace(&mut conn.phase, Phase::Head)
        {
            spool.remove();
        }
        self.refuse(conn, status, true, "");
    }

    pub(super) fn finish_body(&mut self, conn: &mut Conn) {
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
            Sink::Inline(body) => self.dispatch(conn, handler, &head, &key, Payload::Inline(&body)),
            Sink::Spool(spool) => self.dispatch_spooled(conn, handler, &head, &key, spool),
            Sink::Pipe(pipe) => self.dispatch_pipe(conn, handler, &head, &key, pipe),
            Sink::Discard => {}
        }
    }

    /// The upload-done message for a spooled body.
    fn dispatch_spooled(
        &mut self,
        conn: &mut Conn,
        handler: usize,
        head: &Head,
        key: &str,
        spool: Spool,
    ) {
        let path = spool.message_path.clone();
        match spool.finish() {
            Ok(lent) => conn.upload_lent = lent.map(LentBody::File),
            Err(e) => {
                tracing::error!("writing an upload file: {e}");
                return self.refuse(conn, Status::INTERNAL_ERROR, true, "");
            }
        }
        self.dispatch(conn, handler, head, key, Payload::UploadDone(&path));
    }

    /// A body in a pipe goes with its request to its worker: the broker (in this process:
    /// pipes are one-command mode's) takes the pipe's read end from the connection when it
    /// queues the request.
    fn dispatch_pipe(
        &mut self,
        conn: &mut Conn,
        handler: usize,
        head: &Head,
        key: &str,
        pipe: RequestPipe,
    ) {
        let serial = pipe.serial;
        let (ticket, output) = pipe.finish();
        conn.upload_lent = Some(LentBody::Pipe(ticket));
        conn.body_pipe = Some((serial, output));
        self.dispatch(conn, handler, head, key, Payload::Pipe(serial));
    }

    /// Sends the request to its handler and waits for the reply; with no handler
    /// connected, the request waits for one (`limits.handler_wait_ms`), then 503.
    pub(super) fn dispatch(
        &mut self,
        conn: &mut Conn,
        handler: usize,
        head: &Head,
        key: &str,
        body: Payload,
    ) {
        // Lent only when nothing of ours is queued for the client, which the worker's
        // bytes would overtake (a 100 Continue, say).
        let direct = (!matches!(body, Payload::UploadStart(_))
            && conn.out.is_empty()
            && self.lending)
            .then(|| {
                // Held only when nothing of the next request is here or due here.
                let bodiless = matches!(body, Payload::Inline(b) if b.is_empty())
                    && head.framing == Framing::Length(0);
                let idle = conn.input.is_empty() && !conn.read_pending && !conn.hup;
                if bodiless && idle && conn.keep_alive && !conn.read_closed {
                    Lent::MayHold
                } else {
                    Lent::Once
                }
            });
        conn.lent |= direct.is_some();
        conn.paused = direct == Some(Lent::MayHold);
        let message = self.message(conn, handler, head, key, body, direct);
        conn.first_request = false;
        if self.handlers.send(handler, &message) {
            self.await_reply(conn, handler, head.is_head(), direct.is_some());
        } else {
            let upload = match body {
                Payload::UploadDone(path) => {
                    Some(self.upload_root.join(path.trim_start_matches('/')))
                }
                _ => None,
            };
            conn.phase = Phase::Queued {
                handler,
                message,
                is_head: head.is_head(),
                until: Instant::now() + self.settings.handler_wait,
                upload,
                direct,
            };
        }
    }

    /// A queued request that will never be sent: its body is nobody else's. A pooled file
    /// or a pipe goes now (dropped: a pooled file removes itself, and the pool makes
    /// another), as does an upload file.
    pub(super) fn forget_upload(&mut self, conn: &mut Conn) {
        let Phase::Queued { upload, .. } = &conn.phase else {
            return;
        };
        if conn.upload_lent.take().is_some() {
            return;
        }
        if let Some(path) = upload {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }

    /// A handler connected: the request waiting for it goes out.
    pub(super) fn send_queued(&mut self, conn: &mut Conn, connected: usize) {
        let Phase::Queued {
            handler,
            message,
            is_head,
            direct,
            ..
        } = &conn.phase
        else {
            return;
        };
        let (handler, is_head, direct) = (*handler, *is_head, direct.is_some());
        if handler == connected && self.handlers.send(handler, message) {
            self.await_reply(conn, handler, is_head, direct);
        }
    }

    /// A response written directly takes as long as its client reads: no deadline here.
    pub(super) fn await_reply(
        &mut self,
        conn: &mut Conn,
        handler: usize,
        is_head: bool,
        direct: bool,
    ) {
        conn.phase = Phase::Handler {
            handler,
            framing: ResponseFraming::new(is_head),
            direct,
            deadline: (!direct).then(|| Instant::now() + self.settings.handler_timeout),
        };
    }

    pub(super) fn unavailable(&mut self, conn: &mut Conn, handler: usize, close: bool) {
        tracing::warn!(
            conn = conn.id,
            "no handler connected to {}: 503",
            self.handlers.list[handler].config.send_spec
        );
        self.refuse(conn, Status::UNAVAILABLE, close, "Retry-After: 1\r\n");
    }

    /// The request message, in mongrel2's format.
    pub(super) fn message(
        &self,
        conn: &Conn,
        handler: usize,
        head: &Head,
        key: &str,
        payload: Payload,
        direct: Option<Lent>,
    ) -> Vec<u8> {
        let body = match payload {
            Payload::Inline(body) => body,
            Payload::UploadStart(_) | Payload::UploadDone(_) | Payload::Pipe(_) => &[],
        };
        let inline_chunked =
            head.framing == Framing::Chunked && matches!(payload, Payload::Inline(_));
        let mut length = itoa::Buffer::new();
        let length = length.format(body.len());
        let mut serial = itoa::Buffer::new();
        let pipe_serial = match payload {
            Payload::Pipe(n) => serial.format(n),
            _ => "",
        };
        let mut extra: Vec<(&[u8], &[u8])> = Vec::with_capacity(4);
        if self.settings.flow_control && conn.first_request {
            extra.push((b"DOWNLOAD_CREDITS", FIRST_CREDITS));
        }
        if let Some(lending) = direct {
            extra.push((lend::DIRECT, lending.value()));
        }
        match payload {
            Payload::Inline(_) => {}
            Payload::UploadStart(p) => extra.push((b"x-mongrel2-upload-start", p.as_bytes())),
            Payload::UploadDone(p) => {
                extra.push((b"x-mongrel2-upload-start", p.as_bytes()));
                extra.push((b"x-mongrel2-upload-done", p.as_bytes()));
                if matches!(conn.upload_lent, Some(LentBody::File(_))) {
                    extra.push((lend::UPLOAD_LENT, b"1"));
                }
            }
            Payload::Pipe(_) => extra.push((lend::BODY_PIPE, pipe_serial.as_bytes())),
        }
        let h = &self.handlers.list[handler];
        let origin = Origin {
            sender: h.config.send_ident.as_bytes(),
            conn_id: conn.id,
            encoding: h.encoding,
            remote_ip: &conn.remote_ip,
            scheme: self.scheme,
            pattern: key.as_bytes(),
            no_clobber_xff: self.settings.no_clobber_xff,
        };
        let mut out = Vec::new();
        message::encode(
            &mut out,
            &origin,
            head,
            inline_chunked.then_some(length.as_bytes()),
            &extra,
            body,
        );
        out
    }

    /// A notice to a handler about a connection.
    pub(super) fn notify(&mut self, handler: usize, id: u64, notice: Notice) {
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
    /// `message[body]` is the reply's body: it is queued for the client as a range of the
    /// message, shared by every connection the reply names, never copied.
    pub(super) fn deliver(
        &mut self,
        conn: &mut Conn,
        from: usize,
        message: &Rc<Vec<u8>>,
        body: Range<usize>,
    ) {
        if !self.serves(conn, from) {
            tracing::warn!(
                conn = conn.id,
                "a reply from a handler that is not serving this connection's request: dropped"
            );
            return;
        }
        let (start, body) = (body.start, &message[body]);
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
            conn.paused = false;
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
                direct: false,
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
        // A response in progress gets the same time again for each message.
        *deadline = Some(Instant::now() + self.settings.handler_timeout);
        // What the client had not taken before this message: one large message is not a
        // slow client, a queue that keeps growing is.
        let behind = conn.out_bytes;
        let fed = framing.feed(body);
        let status = framing.status();
        let framed_close = framing.close_after();
        match fed {
            Fed::More => conn.push_shared(message, start..start + body.len()),
            Fed::Complete(n) => {
                conn.push_shared(message, start..start + n);
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
                // Complete by its framing, which its worker may reach before it is done
                // (and before it stops reading the body): a lent upload file is not reused.
                conn.upload_lent = None;
                self.finish_log(conn);
                conn.phase = if close { Phase::Closing } else { Phase::Head };
                conn.progress = Instant::now();
                self.advance(conn);
            }
        }
        if behind > self.settings.client_buffer {
            tracing::warn!(
                conn = conn.id,
                "client too slow: more than limits.client_buffer bytes queued; dropped"
            );
            conn.write_failed = true;
        }
    }

    /// Whether `handler` may answer the connection now: the request in service is its, or
    /// an upload announced to it is coming in (a reply then refuses the upload). A reply
    /// from another handler, or for a request not yet sent, is stale: it would land in the
    /// wrong response.
    fn serves(&self, conn: &Conn, handler: usize) -> bool {
        match &conn.phase {
            Phase::Handler { handler: h, .. } => *h == handler,
            Phase::Body {
                sink: Sink::Spool(_),
                then: AfterBody::Handler { handler: h, .. },
                ..
            } => *h == handler,
            // A 0-length reply closes an idle connection (a handler's close after its
            // response, as mongrel2 allows).
            Phase::Head | Phase::Closing => conn.handler == Some(handler),
            Phase::Held { handler: h } => *h == handler,
            _ => false,
        }
    }

    /// An extended reply (`X` ids): mongrel2's `ctl` commands, and `done` (see `lend`).
    pub(super) fn control(&mut self, conn: &mut Conn, from: usize, body: &[u8]) {
        let command = ctl_args(body);
        let arg = |key: &[u8]| command.as_ref().and_then(|args| args.get(key));
        let has = |key: &[u8]| arg(key).is_some();
        if let Some(value) = arg(lend::DONE) {
            let value = value.first().unwrap_or_default();
            return self.done_directly(conn, from, value);
        }
        if let Some(read) = arg(lend::BACK) {
            return self.taken_back(conn, from, read.first().unwrap_or_default());
        }
        match command {
            Some(_) if has(b"keep-alive") => {
                if let Phase::Handler {
                    deadline: Some(d), ..
                } = &mut conn.phase
                {
                    *d = Instant::now() + self.settings.handler_timeout;
                }
            }
            Some(_) if has(b"cancel") => conn.phase = Phase::Closing,
            _ => {
                tracing::warn!(
                    conn = conn.id,
                    "an extended reply we do not implement: the client is closed, as mongrel2 does"
                );
                conn.phase = Phase::Closing;
            }
        }
    }

    /// A connection closes with a lent upload file: its request went out (`forget_upload`
    /// took the file of one that did not), and a worker may not have opened the file yet,
    /// so it stays until that worker is done with it.
    pub(super) fn orphan_upload(&mut self, conn: &mut Conn) {
        let Some(LentBody::File(file)) = conn.upload_lent.take() else {
            return;
        };
        if let Some(pool) = self.pool.as_mut() {
            pool.orphan(conn.id, file);
        }
    }

    /// A `done` for a connection that is gone: its orphaned upload file may be reused.
    pub(super) fn orphan_done(&mut self, id: u64, body: &[u8]) {
        let done = ctl_args(body).is_some_and(|args| args.get(lend::DONE).is_some());
        if let (true, Some(pool)) = (done, self.pool.as_mut()) {
            pool.claim_orphan(id);
        }
    }

    /// `done` came: the worker has finished the request, and stopped reading a lent upload
    /// file before it said so; the file may take the next body.
    fn give_back_upload(&mut self, conn: &mut Conn) {
        if let (Some(pool), Some(LentBody::File(file))) =
            (self.pool.as_mut(), conn.upload_lent.take())
        {
            pool.give_back(file);
        }
    }

    /// `done`: a worker wrote the response to the client; the connection is ours again.
    /// Accepted only for a request that went out `DIRECT` to this handler and of which no
    /// byte was relayed: anything else would leave the response unframed, so it closes.
    fn done_directly(&mut self, conn: &mut Conn, from: usize, value: &[u8]) {
        let lent_response = matches!(
            &conn.phase,
            Phase::Handler { handler, direct: true, framing, .. }
                if *handler == from && !framing.head_seen()
        );
        if !lent_response {
            tracing::warn!(
                conn = conn.id,
                "a 'done' for a response that was not lent: the client is closed"
            );
            conn.phase = Phase::Closing;
            return;
        }
        self.give_back_upload(conn);
        self.finish_log(conn);
        conn.progress = Instant::now();
        if value == lend::HELD {
            if !conn.paused {
                tracing::warn!(
                    conn = conn.id,
                    "a worker held a connection it was not offered: the client is closed"
                );
                conn.phase = Phase::Closing;
                return;
            }
            conn.phase = Phase::Held { handler: from };
            return;
        }
        let close = value == lend::CLOSE || !conn.keep_alive || conn.read_closed;
        conn.phase = if close { Phase::Closing } else { Phase::Head };
        self.resume_reading(conn);
        self.advance(conn);
    }

    /// `back`: the worker that held the connection gives it back, with what it read of the
    /// next request (a request it leaves to us: one with a body, say, or not whole yet).
    fn taken_back(&mut self, conn: &mut Conn, from: usize, read: &[u8]) {
        if !matches!(conn.phase, Phase::Held { handler } if handler == from) {
            tracing::warn!(
                conn = conn.id,
                "a connection given back that was not held: the client is closed"
            );
            conn.phase = Phase::Closing;
            return;
        }
        conn.phase = Phase::Head;
        conn.input.extend_from_slice(read);
        conn.progress = Instant::now();
        self.resume_reading(conn);
        self.advance(conn);
    }

    /// Reading resumes after a pause: what came meanwhile raised no edge we saw.
    fn resume_reading(&mut self, conn: &mut Conn) {
        if std::mem::take(&mut conn.paused) {
            conn.read_pending = true;
        }
    }
}

/// The keys and values of a `["ctl", {...}]` extended reply (a tnetstring list: the name,
/// then a dict), read with m2wire's tnetstring dict parser; None for anything else.
fn ctl_args(body: &[u8]) -> Option<Headers<'_>> {
    let (list, b']', _) = m2wire::netstring::split_tagged(body, 0).ok()? else {
        return None;
    };
    let (name, _, rest) = m2wire::netstring::split_tagged(list, 0).ok()?;
    let (dict, b'}', _) = m2wire::netstring::split_tagged(rest, 0).ok()? else {
        return None;
    };
    if name != b"ctl" {
        return None;
    }
    m2wire::tnetstring::parse_header_dict(dict, 0).ok()
}

/// Where a request message's body is: in the message, or in an upload file (the upload's
/// start is announced before the body is in, its end once it is).
#[derive(Clone, Copy)]
pub(super) enum Payload<'a> {
    Inline(&'a [u8]),
    UploadStart(&'a str),
    UploadDone(&'a str),
    /// In a pipe sent ahead (see `RequestPipes`), named by its serial number.
    Pipe(u64),
}

#[cfg(test)]
mod tests {
    use super::ctl_args;

    fn keys(body: &[u8]) -> Option<Vec<Vec<u8>>> {
        ctl_args(body).map(|args| args.iter().map(|(k, _)| k.to_vec()).collect())
    }

    #[test]
    fn ctl_replies_are_read_as_mongrel2_writes_them() {
        // Captured (mongrel2-protocol.md §4.5): ["ctl", {"keep-alive": true}].
        let got = keys(b"31:3:ctl,21:10:keep-alive,4:true!}]").unwrap();
        assert_eq!(got, [b"keep-alive".to_vec()]);
        assert_eq!(
            keys(b"23:3:ctl,13:6:cancel,1:1#}]").unwrap(),
            [b"cancel".to_vec()]
        );
        assert!(keys(b"28:8:sendfile,13:6:cancel,1:1#}]").is_none());
        assert!(keys(b"garbage").is_none());
        // The broker's, as m2wire encodes it.
        let done = m2wire::encode_ctl(b"u", &[1], &[(b"done", b"close")]).unwrap();
        let body = m2wire::Reply::parse(&done).unwrap().body;
        assert_eq!(keys(body).unwrap(), [b"done".to_vec()]);
        assert_eq!(ctl_args(body).unwrap().first(b"done"), Some(&b"close"[..]));
    }
}

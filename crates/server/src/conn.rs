//! One client connection: what has been read and not yet parsed, what is queued for the
//! client (bytes, or a file range sent with `sendfile`), and the phase of the request in
//! service. Requests are served one at a time, in order: the next pipelined one is parsed
//! only when the previous response has been queued whole, so responses can never overtake
//! one another, whatever served them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

use crate::http::body::Decoder;
use crate::http::framing::ResponseFraming;
use crate::http::request::Head;
use crate::net::Stream;
use crate::upload::{PipeTicket, PooledFile, RequestPipe, Spool};

/// Pipelined input buffered beyond the head limit while a response is pending: past this,
/// reading stops until the connection takes its next request.
const READ_AHEAD: usize = 64 * 1024;

pub enum Out {
    /// The server's own bytes (heads, errors): they count for no handler's credits.
    Bytes {
        data: Vec<u8>,
        pos: usize,
    },
    /// A range of a handler's reply message, which several connections may share.
    Shared {
        data: Rc<Vec<u8>>,
        pos: usize,
        end: usize,
    },
    File {
        file: File,
        pos: u64,
        end: u64,
    },
}

/// Where a request body goes.
pub enum Sink {
    Inline(Vec<u8>),
    Spool(Spool),
    /// One-command mode: a pipe of its own, sent to the worker with the request.
    Pipe(RequestPipe),
    /// Read and dropped (a Dir request with a body).
    Discard,
}

/// What happens once a body is in.
pub enum AfterBody {
    /// Send the request to the handler (inline body), or the upload-done message.
    Handler {
        handler: usize,
        head: Box<Head>,
        key: String,
    },
    /// Nothing: the response is already queued.
    Nothing,
}

pub enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    Body {
        decoder: Decoder,
        sink: Sink,
        then: AfterBody,
    },
    /// The request message waits for a handler to connect (after a restart of either
    /// side); 503 at `until`.
    Queued {
        handler: usize,
        message: Vec<u8>,
        is_head: bool,
        until: Instant,
        /// The upload file an upload-done message names: removed if it is never sent.
        upload: Option<std::path::PathBuf>,
        /// The message is marked `DIRECT` (see `Phase::Handler`).
        direct: Option<crate::front::lend::Lent>,
    },
    /// Waiting for, or relaying, a handler's response.
    Handler {
        handler: usize,
        framing: ResponseFraming,
        /// The request went out marked `DIRECT`: its worker may write the response to the
        /// client itself, and then ends it with a `done` reply.
        direct: bool,
        /// No reply by then: 504.
        deadline: Option<Instant>,
    },
    /// A worker holds the connection between requests and reads them itself (see
    /// `lend::Lent::MayHold`); it gives the connection back (`lend::BACK`) or closes it. It
    /// is not polled here meanwhile.
    Held { handler: usize },
    /// Nothing more is served; the connection closes once its output is written.
    Closing,
    /// Written and half-closed: what the client still sends (the rest of a refused body)
    /// is read and dropped until it closes or `until`, so that closing with unread input
    /// does not reset the connection and destroy the response it has not read yet.
    Lingering { until: Instant },
}

/// What the access log needs about the request in service.
pub struct LogFacts {
    pub host: String,
    pub method: Vec<u8>,
    pub path: Vec<u8>,
    pub version: &'static [u8],
    pub status: u16,
    pub bytes: u64,
}

pub struct Conn {
    pub id: u64,
    pub stream: Stream,
    pub remote: SocketAddr,
    /// `remote`'s address as every request message spells it, written once.
    pub remote_ip: String,
    pub input: Vec<u8>,
    pub out: VecDeque<Out>,
    pub out_bytes: usize,
    pub phase: Phase,
    /// The handler this connection last used: told when the client goes away.
    pub handler: Option<usize>,
    /// The client asked to keep the connection after the request in service.
    pub keep_alive: bool,
    pub first_request: bool,
    /// Reading stopped before the socket said WouldBlock: try again when input is wanted.
    pub read_pending: bool,
    /// The client closed its end (or the socket failed).
    pub read_closed: bool,
    /// The poll reported the client's shutdown; it becomes `read_closed` once the input
    /// before it is read.
    pub hup: bool,
    pub write_failed: bool,
    /// When the phase last made progress, for the timeouts.
    pub progress: Instant,
    pub last_write: Instant,
    /// Handler bytes written since credits were last sent.
    pub written_for_credits: u64,
    pub log: Option<LogFacts>,
    /// A request went out `DIRECT` on it (see `front::lend`): workers may hold copies.
    pub lent: bool,
    /// Not read here: its request went out `Lent::MayHold` (the worker may read the next
    /// one), or a worker holds it. `polled` follows it (see `Front::settle`).
    pub paused: bool,
    /// Registered with the poll; a paused connection is taken off it once it is held.
    pub polled: bool,
    /// The read end of the next request's body pipe and its serial number, until the
    /// broker queues the request with it.
    pub body_pipe: Option<(u64, std::os::fd::OwnedFd)>,
    /// What holds the body of the request in service, lent with it: given back when its
    /// response is complete.
    pub upload_lent: Option<LentBody>,
}

/// A body lent to a worker with its request.
pub enum LentBody {
    /// A pooled file (see `SpoolPool`): reused once the response is complete, removed if the
    /// connection closes first.
    File(PooledFile),
    /// A pipe's place among those allowed (see `RequestPipes`).
    Pipe(PipeTicket),
}

impl Conn {
    pub fn new(id: u64, stream: Stream, remote: SocketAddr) -> Conn {
        let now = Instant::now();
        Conn {
            id,
            stream,
            remote,
            remote_ip: remote.ip().to_string(),
            input: Vec::new(),
            out: VecDeque::new(),
            out_bytes: 0,
            phase: Phase::Head,
            handler: None,
            keep_alive: true,
            first_request: true,
            read_pending: false,
            read_closed: false,
            hup: false,
            write_failed: false,
            progress: now,
            last_write: now,
            written_for_credits: 0,
            log: None,
            lent: false,
            paused: false,
            polled: true,
            body_pipe: None,
            upload_lent: None,
        }
    }

    /// Reads what the socket has, up to what the phase can use: all of a body as it
    /// streams, but only `head_limit` + read-ahead while a head or a response is pending.
    /// `scratch` is the loop's read buffer: a connection keeps only the bytes it holds, so
    /// an idle one costs next to nothing.
    pub fn fill(&mut self, head_limit: usize, scratch: &mut [u8]) {
        self.read_pending = false;
        let cap = match self.phase {
            Phase::Body { .. } => 256 * 1024,
            _ => head_limit + READ_AHEAD,
        };
        loop {
            if self.input.len() >= cap {
                self.read_pending = true;
                return;
            }
            let want = scratch.len().min(cap - self.input.len());
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => {
                    self.read_closed = true;
                    return;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&scratch[..n]);
                    if n < want {
                        // Drained: no read just to hear EAGAIN.
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.read_closed = true;
                    return;
                }
            }
        }
    }

    /// Gives back the memory of a burst once it is consumed.
    pub fn trim_input(&mut self) {
        if self.input.is_empty() && self.input.capacity() > 16 * 1024 {
            self.input = Vec::new();
        }
    }

    pub fn push(&mut self, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        self.out_bytes += data.len();
        if let Some(log) = self.log.as_mut() {
            log.bytes += data.len() as u64;
        }
        self.out.push_back(Out::Bytes { data, pos: 0 });
    }

    /// Queues `data[range]`, a handler's bytes.
    pub fn push_shared(&mut self, data: &Rc<Vec<u8>>, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.out_bytes += range.len();
        if let Some(log) = self.log.as_mut() {
            log.bytes += range.len() as u64;
        }
        self.out.push_back(Out::Shared {
            data: Rc::clone(data),
            pos: range.start,
            end: range.end,
        });
    }

    pub fn push_file(&mut self, file: File, start: u64, end: u64) {
        if let Some(log) = self.log.as_mut() {
            log.bytes += end - start;
        }
        self.out.push_back(Out::File {
            file,
            pos: start,
            end,
        });
    }

    /// Writes what is queued, as far as the socket takes it.
    pub fn flush(&mut self) {
        while let Some(front) = self.out.front_mut() {
            let result = match front {
                Out::Bytes { data, pos } => match self.stream.write(&data[*pos..]) {
                    Ok(n) => {
                        *pos += n;
                        self.out_bytes -= n;
                        Ok(*pos == data.len())
                    }
                    Err(e) => Err(e),
                },
                Out::Shared { data, pos, end } => match self.stream.write(&data[*pos..*end]) {
                    Ok(n) => {
                        *pos += n;
                        self.out_bytes -= n;
                        self.written_for_credits += n as u64;
                        Ok(*pos == *end)
                    }
                    Err(e) => Err(e),
                },
                Out::File { file, pos, end } => send_file(&self.stream, file, pos, *end),
            };
            match result {
                Ok(true) => {
                    self.out.pop_front();
                    self.last_write = Instant::now();
                }
                Ok(false) => self.last_write = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.write_failed = true;
                    self.out.clear();
                    self.out_bytes = 0;
                    return;
                }
            }
        }
    }

    /// Whether reading more is of use now: a body is coming in, or a head is awaited and
    /// the buffered input is under its cap (over it, nothing is read until requests are
    /// taken from it: reading again would only spin).
    pub fn wants_input(&self, head_limit: usize) -> bool {
        match self.phase {
            Phase::Body { .. } => true,
            Phase::Head => self.input.len() < head_limit + READ_AHEAD,
            _ => false,
        }
    }

    /// Done with: closing and flushed, or unable to go on.
    pub fn finished(&self) -> bool {
        self.write_failed || (matches!(self.phase, Phase::Lingering { .. }) && self.read_closed)
    }

    /// Closing, written, and the client may still be sending: time to linger.
    pub fn done_writing(&self) -> bool {
        matches!(self.phase, Phase::Closing) && self.out.is_empty()
    }

    /// Reads and drops what a lingering client sends.
    pub fn discard_input(&mut self, scratch: &mut [u8]) {
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    self.read_closed = true;
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.read_closed = true;
                    return;
                }
            }
        }
    }
}

/// One `sendfile` step: true once the range is sent.
fn send_file(stream: &Stream, file: &File, pos: &mut u64, end: u64) -> io::Result<bool> {
    let mut offset = *pos as libc::off_t;
    let count = (end - *pos).min(1 << 30) as usize;
    // SAFETY: both descriptors are open for the call; `offset` is a valid pointer.
    let n = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 && count > 0 {
        return Err(io::Error::other("file shrank while being sent"));
    }
    *pos = offset as u64;
    Ok(*pos >= end)
}

//! The workers as the broker sees them: their link streams, on which their replies arrive,
//! and their rings of records (what each took, to know whose requests die with it).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use m2wire::ConnId;
use rustc_hash::FxHashMap;

use super::dispatch::Close;
use super::outgoing::{After, Outgoing};
use super::Broker;
use crate::link::{self, BrokerChannels, Frame, Piece, ReplyHeader};
use crate::records::RingReader;
use zmtp::ReadBuf;

/// A connection with this much waiting for mongrel2 stops the reading of the worker that
/// writes to it: the worker then blocks on its stream (flat memory for slow clients).
const PENDING_CAP: usize = 1 << 20;
/// Most bytes read from one worker in one turn of the loop.
const READ_BUDGET: usize = 1 << 20;
/// A worker's read buffer: a whole reply frame fits, and a few hello replies per read.
const READ_BUFFER: usize = ReplyHeader::LEN + link::MAX_REPLY_PIECE + 64 * 1024;

struct Worker {
    stream: UnixStream,
    pid: i32,
    ring: RingReader,
    /// Bytes read and not yet a whole frame.
    rbuf: ReadBuf,
    /// The connection whose backlog stopped our reading, if any.
    blocked_on: Option<ConnId>,
}

#[derive(Default)]
pub struct Workers {
    by_fd: FxHashMap<RawFd, Worker>,
}

impl Workers {
    /// Greets a worker that connected; its stream's descriptor, when it is taken on.
    pub fn accept(&mut self, stream: UnixStream, channels: &BrokerChannels) -> Option<RawFd> {
        let pid = match link::check_peer(&stream) {
            Ok(pid) => pid,
            Err(e) => {
                tracing::warn!("refused a connection to the worker link: {e}");
                return None;
            }
        };
        let welcomed = RingReader::create().and_then(|(ring, file)| {
            channels.welcome(&stream, &file)?;
            stream.set_nonblocking(true)?;
            Ok(ring)
        });
        match welcomed {
            Ok(ring) => {
                let worker = Worker {
                    stream,
                    pid,
                    ring,
                    rbuf: ReadBuf::new(READ_BUFFER),
                    blocked_on: None,
                };
                let fd = worker.stream.as_raw_fd();
                self.by_fd.insert(fd, worker);
                Some(fd)
            }
            // A worker that gave up waiting while no broker ran: nothing lost.
            Err(e) => {
                tracing::debug!(pid, "cannot greet a worker: {e}");
                None
            }
        }
    }

    /// Unblocks the workers whose connection has room again; returns those that have
    /// frames buffered, to be forwarded before anything else is read.
    pub fn unblocked(&mut self, outgoing: &Outgoing) -> Vec<RawFd> {
        let mut ready = Vec::new();
        for (&fd, w) in &mut self.by_fd {
            if let Some(conn) = w.blocked_on {
                if outgoing.pending(conn) < PENDING_CAP / 2 {
                    w.blocked_on = None;
                    if !w.rbuf.is_empty() {
                        ready.push(fd);
                    }
                }
            }
        }
        ready
    }

    /// Orders every worker to give back the connections it holds, and to hold no more.
    pub fn order_give_back(&self, channels: &BrokerChannels) {
        for w in self.by_fd.values() {
            channels.order_give_back(&w.stream);
        }
    }

    /// What each worker is busy with now (`RingReader::busy`).
    pub fn busy(&self) -> FxHashMap<RawFd, Option<u64>> {
        self.by_fd
            .iter()
            .map(|(&fd, w)| (fd, w.ring.busy()))
            .collect()
    }

    pub fn ring(&self, fd: RawFd) -> Option<&RingReader> {
        self.by_fd.get(&fd).map(|w| &w.ring)
    }

    /// The streams to read: all but those whose connection is still backed up.
    pub fn readable_fds(&self) -> Vec<RawFd> {
        self.by_fd
            .iter()
            .filter(|(_, w)| w.blocked_on.is_none())
            .map(|(&fd, _)| fd)
            .collect()
    }

    /// Workers whose process is gone although their stream is open: a child the app forked
    /// holds it (multiprocessing's fork start method does).
    fn vanished(&self) -> Vec<RawFd> {
        use nix::sys::signal::kill;
        use nix::unistd::Pid;
        self.by_fd
            .iter()
            .filter(|(_, w)| kill(Pid::from_raw(w.pid), None) == Err(nix::errno::Errno::ESRCH))
            .map(|(&fd, _)| fd)
            .collect()
    }
}

/// What reading a worker's stream found.
enum Stream {
    /// Keep reading it later.
    Open,
    /// It ended (or broke): the worker is gone.
    Gone(String),
}

impl Broker {
    /// Reads and forwards the replies of the workers whose streams are readable.
    pub(super) fn read_replies(&mut self, fds: &[RawFd]) {
        for &fd in fds {
            if let Stream::Gone(why) = self.read_worker(fd, false) {
                self.remove_worker(fd, &why);
            }
        }
    }

    /// Reads worker `fd`'s stream and forwards whole frames, until it would block, its
    /// connection backs up (`ignore_cap` false), or the budget is spent.
    fn read_worker(&mut self, fd: RawFd, ignore_cap: bool) -> Stream {
        let mut budget = READ_BUDGET;
        loop {
            let Some(worker) = self.workers.by_fd.get_mut(&fd) else {
                return Stream::Open;
            };
            if (worker.blocked_on.is_some() && !ignore_cap) || budget == 0 {
                return Stream::Open;
            }
            let space = worker.rbuf.space(64 * 1024);
            let asked = space.len();
            let drained = match worker.stream.read(space) {
                Ok(0) => return Stream::Gone("its stream ended".into()),
                Ok(n) => {
                    worker.rbuf.filled(n);
                    budget = budget.saturating_sub(n);
                    // A short read drained the stream: no read just to hear EAGAIN.
                    n < asked && !ignore_cap
                }
                Err(e) => {
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Stream::Open,
                        io::ErrorKind::Interrupted => continue,
                        _ => Stream::Gone(format!("reading its stream failed: {e}")),
                    };
                }
            };
            // Records first: they say which requests this worker holds.
            self.read_records(fd);
            if let Err(e) = self.take_frames(fd, ignore_cap) {
                return Stream::Gone(e);
            }
            if drained {
                return Stream::Open;
            }
        }
    }

    /// Reads worker `fd`'s records: who took what, and whether it took the probe.
    fn read_records(&mut self, fd: RawFd) {
        let Some(worker) = self.workers.by_fd.get(&fd) else {
            return;
        };
        let in_flight = &mut self.queue.in_flight;
        let probe = &mut self.probe;
        worker.ring.read(&mut |seq| {
            if let Some(p) = probe.as_mut().filter(|p| p.seq == seq) {
                p.taken = true;
            } else if let Some(f) = in_flight.get_mut(&seq) {
                f.taker = Some(fd);
            }
        });
    }

    /// Forwards every whole frame read from worker `fd`, stopping where its connection
    /// backs up unless `ignore_cap` (a worker that is gone: what it sent is all there is).
    pub(super) fn take_frames(&mut self, fd: RawFd, ignore_cap: bool) -> Result<(), String> {
        let mut rbuf = match self.workers.by_fd.get_mut(&fd) {
            Some(w) => std::mem::replace(&mut w.rbuf, ReadBuf::new(0)),
            None => return Ok(()),
        };
        let mut at = 0;
        let mut result = Ok(());
        while let Some(header) = ReplyHeader::decode(&rbuf.data()[at..]) {
            let header = match header {
                Ok(h) => h,
                Err(e) => {
                    result = Err(format!("it wrote a broken reply frame ({e})"));
                    break;
                }
            };
            let end = at + ReplyHeader::LEN + header.len as usize;
            if rbuf.data().len() < end {
                break;
            }
            let blocked = self.on_reply(fd, &header, &rbuf.data()[at + ReplyHeader::LEN..end]);
            at = end;
            if let Some(conn) = blocked.filter(|_| !ignore_cap) {
                if let Some(w) = self.workers.by_fd.get_mut(&fd) {
                    w.blocked_on = Some(conn);
                }
                break;
            }
        }
        rbuf.consume(at);
        if let Some(w) = self.workers.by_fd.get_mut(&fd) {
            w.rbuf = rbuf;
        }
        result
    }

    /// One reply piece: forwarded when its request belongs to this epoch. Returns the
    /// connection when its backlog should stop the worker's reading.
    fn on_reply(&mut self, fd: RawFd, header: &ReplyHeader, payload: &[u8]) -> Option<ConnId> {
        let close = header.piece == Piece::LastThenClose;
        if header.frame == Frame::Back {
            self.on_back(fd, header.seq, payload, close);
            return None;
        }
        let Some(f) = self.queue.in_flight.get(&header.seq) else {
            tracing::warn!(seq = header.seq, "a reply to no request in flight, dropped");
            return None;
        };
        let last = header.piece != Piece::Middle;
        if f.epoch != self.epoch {
            if last {
                tracing::warn!(
                    conn = f.conn,
                    "dropped the reply to a request of an earlier epoch (mongrel2 reconnected)"
                );
                self.queue.finish(header.seq, self.epoch);
            }
            return None;
        }
        let (sender, conn) = (f.sender.clone(), f.conn);
        if header.frame == Frame::DoneHeld {
            self.on_held(fd, &sender, conn);
        } else if header.frame == Frame::Done {
            let after = if close {
                After::Close
            } else {
                After::KeepAlive
            };
            self.outgoing.push_done(&sender, conn, after);
        } else if !payload.is_empty() || close {
            self.outgoing.push(&sender, conn, payload, close);
        }
        if last {
            if let Some(Close(sender, conn)) = self.queue.finish(header.seq, self.epoch) {
                self.outgoing.push(&sender, conn, b"", true);
            }
            if close {
                self.queue.mark_closed(conn);
            }
        }
        (self.outgoing.pending(conn) >= PENDING_CAP).then_some(conn)
    }

    /// Drops workers whose process has gone while their stream stays open.
    pub(super) fn check_workers(&mut self) {
        let due = self.next_liveness_check <= std::time::Instant::now();
        if !due || (self.queue.in_flight.is_empty() && self.held.is_empty()) {
            return;
        }
        self.next_liveness_check = std::time::Instant::now() + std::time::Duration::from_secs(1);
        for fd in self.workers.vanished() {
            self.remove_worker(fd, "its process is gone");
        }
    }

    /// A worker is gone: what it took and did not finish will never be answered, so those
    /// connections are closed (a later response would answer the wrong request).
    pub(super) fn remove_worker(&mut self, fd: RawFd, why: &str) {
        // What it wrote before it went is forwarded first: its last responses may be whole.
        if self.workers.by_fd.contains_key(&fd) {
            let _ = self.read_worker(fd, true);
            let _ = self.take_frames(fd, true);
        }
        self.read_records(fd);
        let Some(worker) = self.workers.by_fd.remove(&fd) else {
            return;
        };
        let serving = worker.ring.busy().map(|_| worker.ring.serving());
        self.release_held(fd, serving.filter(|&conn| conn != 0));
        let lost: Vec<u64> = self
            .queue
            .in_flight
            .iter()
            .filter(|(_, f)| f.taker == Some(fd))
            .map(|(&seq, _)| seq)
            .collect();
        if lost.is_empty() {
            tracing::debug!(pid = worker.pid, "a worker left: {why}");
        } else {
            tracing::warn!(
                pid = worker.pid,
                requests = lost.len(),
                "a worker died while serving ({why}); closing those connections"
            );
        }
        self.lose(lost);
        if worker.ring.taking() {
            // It may have taken a request it never recorded: a probe will tell. A new probe
            // replaces one on its way (it is queued later, so it covers what that one did).
            tracing::warn!(pid = worker.pid, "a worker died while taking a request");
            self.probe = Some(Probe {
                seq: self.queue.reserve_seq(),
                queued: false,
                taken: false,
            });
        }
    }

    /// Requests that will never be answered: their connections are closed.
    fn lose(&mut self, seqs: Vec<u64>) {
        for seq in seqs {
            let Some(f) = self.queue.in_flight.get(&seq) else {
                continue;
            };
            let (sender, conn, current) = (f.sender.clone(), f.conn, f.epoch == self.epoch);
            self.queue.finish(seq, self.epoch);
            if current {
                self.queue.mark_closed(conn);
                self.outgoing.push(&sender, conn, b"", true);
            }
        }
    }

    /// Follows the probe queued after a worker died while taking: once a live worker has
    /// taken it, and none is in the middle of taking, every request queued before it that
    /// nobody recorded was the dead worker's.
    pub(super) fn settle_probe(&mut self) {
        let Some(probe) = self.probe.as_mut() else {
            return;
        };
        if !probe.queued {
            match self.channels.probe(probe.seq) {
                Ok(true) => probe.queued = true,
                Ok(false) => return,
                Err(e) => {
                    tracing::error!("cannot queue a probe: {e}");
                    self.probe = None;
                    return;
                }
            }
        }
        let fds: Vec<RawFd> = self.workers.by_fd.keys().copied().collect();
        for &fd in &fds {
            self.read_records(fd);
        }
        let taken = self.probe.as_ref().is_some_and(|p| p.taken);
        if !taken || self.workers.by_fd.values().any(|w| w.ring.taking()) {
            return;
        }
        // No worker is taking: what any of them took is recorded by now; read it last.
        for &fd in &fds {
            self.read_records(fd);
        }
        let probe_seq = self.probe.take().map_or(0, |p| p.seq);
        let lost: Vec<u64> = self
            .queue
            .in_flight
            .iter()
            .filter(|(&seq, f)| seq < probe_seq && f.taker.is_none())
            .map(|(&seq, _)| seq)
            .collect();
        if !lost.is_empty() {
            tracing::warn!(
                requests = lost.len(),
                "requests taken by a worker that died while taking them; closing their connections"
            );
        }
        self.lose(lost);
    }
}

/// A probe in the queue (see `settle_probe`).
pub struct Probe {
    seq: u64,
    queued: bool,
    taken: bool,
}

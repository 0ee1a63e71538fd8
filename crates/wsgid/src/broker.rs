//! The broker: the one process of a wsgid instance that pulls requests from mongrel2, and
//! puts them in the queue that idle workers take from (see `link`).
//!
//! mongrel2's PUSH assigns a request to a connected peer before that peer reads it, and a
//! peer that disconnects loses what was assigned to it and still in flight (design note 2).
//! Workers connected to mongrel2 directly would therefore drop requests on every reload and
//! queue fast requests behind slow ones (note 3). The broker stays connected while workers
//! come and go; a request waits in the shared queue until a worker is free to take it, and a
//! stopping worker takes no more, so it loses nothing.
//!
//! Replies do not pass through here: workers publish them to mongrel2 themselves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Settings;
use crate::link::{self, BrokerChannels};
use crate::records::{self, Record};
use crate::zmtp::Puller;
use m2wire::{is_notice, parse_address, ConnId};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Most messages held back (behind a connection in service, or by a full queue) before
/// reading from mongrel2 pauses.
const MAX_WAITING: usize = 256;
/// Most requests held back for one connection, and for all connections together; more are
/// refused (their connections closed), so that held requests never stop the reading.
const PIPELINE_LIMIT: usize = 16;
const MAX_HELD: usize = MAX_WAITING / 2;

/// A queued request that belongs to a connection, until a worker has done it.
struct InFlight {
    conn: ConnId,
    /// `sender conn_id`, to close the connection if the request is lost.
    address: Vec<u8>,
    /// The ring of the worker that took it, once its record has been read.
    taker: Option<usize>,
}

struct Worker {
    stream: UnixStream,
    pid: i32,
    ring: usize,
}

/// Workers, and requests on their way to them.
struct Dispatch {
    channels: BrokerChannels,
    /// The workers' link streams (silent: their end means the worker is gone), with their
    /// pids and rings.
    workers: HashMap<RawFd, Worker>,
    /// Messages read from mongrel2 and not queued yet, oldest first.
    waiting: VecDeque<Vec<u8>>,
    /// The last `enqueue` found the queue full.
    queue_full: bool,
    next_seq: u64,
    in_flight: HashMap<u64, InFlight>,
    /// Requests in flight per connection: its next messages wait, so that the responses to
    /// pipelined requests go out in order even with several workers.
    busy: HashMap<ConnId, u32>,
    /// Connections to close (addresses), for a worker to do: their request in flight was
    /// lost with its worker, and a later response would answer the wrong request.
    to_close: VecDeque<Vec<u8>>,
}

impl Dispatch {
    fn new() -> std::io::Result<Dispatch> {
        Ok(Dispatch {
            channels: BrokerChannels::new()?,
            workers: HashMap::new(),
            waiting: VecDeque::new(),
            queue_full: false,
            next_seq: 1,
            in_flight: HashMap::new(),
            busy: HashMap::new(),
            to_close: VecDeque::new(),
        })
    }

    fn accept(&mut self, stream: UnixStream) {
        let pid = match link::check_peer(&stream) {
            Ok(pid) => pid,
            Err(e) => return tracing::warn!("refused a connection to the worker link: {e}"),
        };
        let Some(ring) = self.channels.rings.allocate() else {
            return tracing::error!(pid, "refused a worker: {} is the most", records::SLOTS);
        };
        match self.channels.welcome(&stream, ring) {
            Ok(()) => {
                let worker = Worker { stream, pid, ring };
                self.workers.insert(worker.stream.as_raw_fd(), worker);
            }
            Err(e) => {
                // A worker that gave up waiting while no broker ran: nothing lost.
                tracing::debug!(pid, "cannot greet a worker: {e}");
                self.channels.rings.release(ring);
            }
        }
    }

    /// Workers whose process is gone although their stream is open: a child the app forked
    /// holds it (multiprocessing's fork start method does).
    fn vanished(&self) -> Vec<RawFd> {
        use nix::sys::signal::kill;
        use nix::unistd::Pid;
        self.workers
            .iter()
            .filter(|(_, w)| kill(Pid::from_raw(w.pid), None) == Err(nix::errno::Errno::ESRCH))
            .map(|(&fd, _)| fd)
            .collect()
    }

    /// A worker's stream ended: it exited or was killed. What it took and did not finish
    /// will never be answered; its connections are freed.
    fn remove(&mut self, fd: RawFd) {
        let Some(Worker { pid, ring, .. }) = self.workers.remove(&fd) else {
            return;
        };
        self.read_ring(ring);
        self.channels.rings.release(ring);
        let lost: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.taker == Some(ring))
            .map(|(&seq, _)| seq)
            .collect();
        if !lost.is_empty() {
            tracing::warn!(
                pid,
                requests = lost.len(),
                "a worker died while serving; closing those connections"
            );
        }
        for seq in lost {
            let Some(address) = self.in_flight.get(&seq).map(|f| f.address.clone()) else {
                continue;
            };
            if let Some((_, conn)) = parse_address(&address) {
                self.waiting
                    .retain(|m| is_notice(m) || parse_address(m).is_none_or(|(_, c)| c != conn));
            }
            self.finish(seq);
            self.to_close.push_back(address);
        }
    }

    fn finish(&mut self, seq: u64) {
        if let Some(done) = self.in_flight.remove(&seq) {
            if let Some(count) = self.busy.get_mut(&done.conn) {
                *count -= 1;
                if *count == 0 {
                    self.busy.remove(&done.conn);
                }
            }
        }
    }

    /// Reads every worker's records; returns whether there were any.
    fn read_records(&mut self) -> bool {
        let rings: Vec<usize> = self.workers.values().map(|w| w.ring).collect();
        let mut any = false;
        for ring in rings {
            any |= self.read_ring(ring);
        }
        any
    }

    fn read_ring(&mut self, ring: usize) -> bool {
        let mut records = Vec::new();
        self.channels.rings.read(ring, &mut |r| records.push(r));
        for record in &records {
            match *record {
                Record::Took(seq) => {
                    if let Some(f) = self.in_flight.get_mut(&seq) {
                        f.taker = Some(ring);
                    }
                }
                Record::Done(seq) => self.finish(seq),
            }
        }
        !records.is_empty()
    }

    /// Queues the closes of connections whose worker died, then the waiting messages, oldest
    /// first: those for a connection still in service are passed over, or refused past the
    /// pipelining limits.
    fn dispatch(&mut self) {
        while let Some(address) = self.to_close.front() {
            match self.channels.refuse(self.next_seq, address) {
                Ok(false) => {
                    self.queue_full = true;
                    return;
                }
                Ok(true) => self.next_seq += 1,
                Err(e) => tracing::error!("cannot queue a connection's close: {e}"),
            }
            self.to_close.pop_front();
        }
        let mut held: HashMap<ConnId, usize> = HashMap::new();
        let mut held_total = 0;
        let mut refused = HashSet::new();
        let mut i = 0;
        while i < self.waiting.len() {
            // mongrel2's notices (disconnect, credits) answer nothing: no order to keep.
            let address = parse_address(&self.waiting[i])
                .filter(|_| !is_notice(&self.waiting[i]))
                .map(|(sender, conn)| (sender.len(), conn));
            let conn = address.map(|(_, conn)| conn);
            let seq = self.next_seq;
            // Only a request that is served keeps its connection busy, not a refusal.
            let (queued, served) = match conn.filter(|c| self.busy.contains_key(c)) {
                None => (self.channels.enqueue(seq, &self.waiting[i]), true),
                Some(conn) => {
                    let count = held.entry(conn).or_default();
                    *count += 1;
                    held_total += 1;
                    if *count <= PIPELINE_LIMIT && held_total <= MAX_HELD {
                        i += 1;
                        continue;
                    }
                    // Pipelining clients must not fill what we hold for everyone.
                    held_total -= 1;
                    if refused.insert(conn) {
                        tracing::warn!(
                            conn,
                            "closing a connection that pipelined too many requests"
                        );
                    }
                    (self.channels.refuse(seq, &self.waiting[i]), false)
                }
            };
            match queued {
                Ok(true) => {}
                Ok(false) => {
                    self.queue_full = true;
                    return;
                }
                Err(e) => {
                    tracing::error!("cannot queue a request, dropped: {e}");
                    self.waiting.remove(i);
                    continue;
                }
            }
            self.next_seq += 1;
            let msg = self.waiting.remove(i).expect("index in range");
            if let Some((sender_len, conn)) = address.filter(|_| served) {
                *self.busy.entry(conn).or_default() += 1;
                let address = [&msg[..sender_len], format!(" {conn} @*").as_bytes()].concat();
                let taker = None;
                self.in_flight.insert(
                    seq,
                    InFlight {
                        conn,
                        address,
                        taker,
                    },
                );
            }
        }
        self.queue_full = false;
    }
}

pub fn run(settings: &Settings, listener: std::os::unix::net::UnixListener) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let (wake, notify) = UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    for (sig, flag) in [
        (signal_hook::consts::SIGTERM, &stop),
        (signal_hook::consts::SIGINT, &stop),
        (signal_hook::consts::SIGQUIT, &quit),
    ] {
        signal_hook::flag::register(sig, flag.clone())?;
        signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
    }
    signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(AtomicBool::new(false)),
    )?;

    listener.set_nonblocking(true)?;
    let give_up = || stop.load(Ordering::Relaxed) || quit.load(Ordering::Relaxed);
    let mut requests = Puller::connect(&settings.recv, give_up)?;
    tracing::info!(recv = %settings.recv, "broker ready");

    let mut d = Dispatch::new().context("cannot create the request queue")?;
    // Stopping: the request connection is half-closed, so mongrel2 stops sending to us and
    // closes its side; what it had sent is still read and queued, then the broker exits (the
    // queue outlives it: the workers serve what is in it before they stop).
    let mut draining: Option<Instant> = None;
    let mut closed = false;
    let mut next_liveness_check = Instant::now();
    loop {
        if quit.load(Ordering::Relaxed) {
            tracing::info!("quit: stopping now");
            break;
        }
        if stop.load(Ordering::Relaxed) && draining.is_none() {
            tracing::info!("stopping: no new requests from mongrel2, queueing those sent");
            requests.shutdown_write();
            // Half the graceful timeout: the workers, stopped after us, need time to serve
            // what we queued before the master's deadline.
            let half = Duration::from_secs(settings.graceful_timeout) / 2;
            draining = Some(Instant::now() + half);
        }
        if let Some(deadline) = draining {
            if (closed && d.waiting.is_empty()) || Instant::now() >= deadline {
                break;
            }
        }
        let want = !closed && d.waiting.len() < MAX_WAITING;
        // Held-back messages wait for a worker's record that their connection is free: the
        // workers ring the doorbell while we sleep. Records written before they saw the
        // flag are read now.
        let held_back = !d.waiting.is_empty() && !d.queue_full;
        if d.channels.rings.want_wake(held_back) && d.read_records() {
            d.dispatch();
            continue;
        }
        let fds: Vec<RawFd> = d.workers.keys().copied().collect();
        let (pull_ready, accept, woken, rung, ended) = {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|&fd| unsafe_borrow(fd)).collect();
            let room = if d.queue_full {
                PollFlags::POLLOUT
            } else {
                PollFlags::empty()
            };
            // Workers ring only when asked to, or when their ring is full.
            let mut polled = vec![
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                PollFd::new(d.channels.queue_fd().as_fd(), room),
                PollFd::new(d.channels.doorbell_fd().as_fd(), PollFlags::POLLIN),
            ];
            // A connection at its end reports a hang-up whatever is asked: polled only
            // when we would read it.
            if want {
                polled.push(PollFd::new(requests.as_fd(), PollFlags::POLLIN));
            }
            let first_worker = polled.len();
            polled.extend(
                borrowed
                    .iter()
                    .map(|fd| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            let timeout = if want && requests.buffered() {
                PollTimeout::ZERO
            } else if draining.is_some() {
                PollTimeout::from(100u16)
            } else if !d.in_flight.is_empty() {
                // Requests in flight: look in on their workers now and then (`vanished`).
                PollTimeout::from(1000u16)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut polled, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let hit = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            let ended: Vec<RawFd> = fds
                .iter()
                .zip(&polled[first_worker..])
                .filter(|(_, p)| hit(p))
                .map(|(fd, _)| *fd)
                .collect();
            let pull_ready = want && hit(&polled[4]);
            (
                pull_ready,
                hit(&polled[0]),
                hit(&polled[1]),
                hit(&polled[3]),
                ended,
            )
        };
        if woken {
            let mut sink = [0u8; 64];
            while matches!((&wake).read(&mut sink), Ok(n) if n > 0) {}
        }
        if accept {
            while let Ok((stream, _)) = listener.accept() {
                stream.set_nonblocking(false)?;
                d.accept(stream);
            }
        }
        if rung {
            d.channels.quiet_doorbell();
        }
        if Instant::now() >= next_liveness_check {
            next_liveness_check = Instant::now() + Duration::from_secs(1);
            for fd in d.vanished() {
                d.remove(fd);
            }
        }
        for fd in ended {
            d.remove(fd);
        }
        // Read what poll saw arrive, then whatever is already buffered.
        let mut may_read = want && pull_ready;
        while want && d.waiting.len() < MAX_WAITING && (may_read || requests.buffered()) {
            may_read = false;
            match requests.recv() {
                Ok(Some(msg)) => d.waiting.push_back(msg),
                Ok(None) | Err(_) if draining.is_some() => {
                    closed = true;
                    break;
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("mongrel2 closed the request connection; reconnecting");
                    requests = Puller::connect(&settings.recv, give_up)?;
                    break;
                }
            }
        }
        // Records cost the workers no wake-up of ours: they are read whenever we are awake,
        // last thing before queueing, so that a keep-alive connection's next request finds
        // its previous one done.
        d.read_records();
        d.dispatch();
    }
    tracing::info!(unqueued = d.waiting.len(), "broker stopped");
    Ok(())
}

/// A worker's stream for one poll call; the map that owns it outlives the call.
fn unsafe_borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fd belongs to a `Worker` in the broker's map, which is not modified
    // while the borrowed fds are in use (they are dropped before the map changes).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

//! The broker: the one process of a wsgid instance that pulls requests from mongrel2, and
//! hands each to an idle worker.
//!
//! mongrel2's PUSH assigns a request to a connected peer before that peer reads it, and a
//! peer that disconnects loses what was assigned to it and still in flight (design note 2).
//! Workers connected to mongrel2 directly would therefore drop requests on every reload and
//! queue fast requests behind slow ones (note 3). The broker stays connected while workers
//! come and go, and gives a request only to a worker that asked for one, over the `link`
//! (READY, then one request; BYE, answered by ACK, after which nothing follows). So a
//! stopping worker serves what it was given and loses nothing.
//!
//! Replies do not pass through here: workers publish them to mongrel2 themselves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Settings;
use crate::link;
use crate::zmtp::Puller;
use m2wire::{parse_address, ConnId};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

struct Worker {
    stream: UnixStream,
    /// The connection whose request this worker is serving.
    serving: Option<ConnId>,
}

/// Most messages held back (behind a connection in service) before reading pauses.
const MAX_WAITING: usize = 256;

/// Workers, and requests on their way to them.
#[derive(Default)]
struct Dispatch {
    workers: HashMap<RawFd, Worker>,
    idle: VecDeque<RawFd>,
    /// Connections being served: their next messages wait, so that the responses to
    /// pipelined requests go out in order even with several workers.
    busy: HashSet<ConnId>,
    /// Messages read from mongrel2 and not given to a worker yet, oldest first.
    waiting: VecDeque<Vec<u8>>,
}

impl Dispatch {
    fn accept(&mut self, stream: UnixStream) {
        self.workers.insert(
            stream.as_raw_fd(),
            Worker {
                stream,
                serving: None,
            },
        );
    }

    /// Frees the connection a worker was serving (it answered READY, or died).
    fn release(&mut self, fd: RawFd) {
        if let Some(conn) = self.workers.get_mut(&fd).and_then(|w| w.serving.take()) {
            self.busy.remove(&conn);
        }
    }

    fn remove(&mut self, fd: RawFd) {
        self.release(fd);
        self.workers.remove(&fd);
        self.idle.retain(|&w| w != fd);
    }

    /// Reads what a worker wrote: READY, BYE; end of stream when it is gone.
    fn read_worker(&mut self, fd: RawFd) {
        let Some(worker) = self.workers.get_mut(&fd) else {
            return;
        };
        let mut frames = [0u8; 64];
        let n = match (&worker.stream).read(&mut frames) {
            Ok(n) if n > 0 => n,
            _ => return self.remove(fd), // exited or killed
        };
        for &frame in &frames[..n] {
            match frame {
                link::READY => {
                    self.release(fd);
                    if !self.idle.contains(&fd) {
                        self.idle.push_back(fd);
                    }
                }
                link::BYE => {
                    self.idle.retain(|&w| w != fd);
                    if let Some(worker) = self.workers.get_mut(&fd) {
                        let _ = worker.stream.write_all(&[link::ACK]);
                    }
                }
                other => tracing::warn!("unknown frame {other:#x} from a worker"),
            }
        }
    }

    /// Hands waiting messages to idle workers, oldest first, passing over those for a
    /// connection still in service.
    fn dispatch(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() && !self.idle.is_empty() {
            let conn = parse_address(&self.waiting[i]).map(|(_, conn)| conn);
            if conn.is_some_and(|c| self.busy.contains(&c)) {
                i += 1;
                continue;
            }
            let msg = self.waiting.remove(i).expect("index checked");
            if let Some(undelivered) = self.give(msg, conn) {
                self.waiting.insert(i, undelivered);
                return;
            }
        }
    }

    /// Gives a message to the oldest idle worker; one that died since its READY is dropped
    /// and the next one tried. Returns the message if no worker could take it.
    fn give(&mut self, msg: Vec<u8>, conn: Option<ConnId>) -> Option<Vec<u8>> {
        while let Some(fd) = self.idle.pop_front() {
            let Some(worker) = self.workers.get_mut(&fd) else {
                continue;
            };
            if link::send_request(&mut worker.stream, &msg).is_ok() {
                worker.serving = conn;
                if let Some(conn) = conn {
                    self.busy.insert(conn);
                }
                return None;
            }
            self.remove(fd);
        }
        Some(msg)
    }
}

pub fn run(settings: &Settings, link_name: &str) -> anyhow::Result<()> {
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

    let listener = link::listen(link_name)
        .with_context(|| format!("cannot listen on the worker link @{link_name}"))?;
    listener.set_nonblocking(true)?;
    let give_up = || stop.load(Ordering::Relaxed) || quit.load(Ordering::Relaxed);
    let mut requests = Puller::connect(&settings.recv, give_up)?;
    tracing::info!(recv = %settings.recv, "broker ready");

    let mut d = Dispatch::default();
    // Stopping: the request connection is half-closed, so mongrel2 stops sending to us and
    // closes its side; what it had sent is still read and served, then the broker exits.
    let mut draining: Option<Instant> = None;
    let mut closed = false;
    loop {
        if quit.load(Ordering::Relaxed) {
            tracing::info!("quit: stopping now");
            break;
        }
        if stop.load(Ordering::Relaxed) && draining.is_none() {
            tracing::info!("stopping: no new requests from mongrel2, serving those sent");
            requests.shutdown_write();
            draining = Some(Instant::now() + Duration::from_secs(settings.graceful_timeout));
        }
        if let Some(deadline) = draining {
            if (closed && d.waiting.is_empty()) || Instant::now() >= deadline {
                break;
            }
        }
        let want = !closed && !d.idle.is_empty() && d.waiting.len() < MAX_WAITING;
        let fds: Vec<RawFd> = d.workers.keys().copied().collect();
        let (pull_ready, accept, woken, readable) = {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|&fd| unsafe_borrow(fd)).collect();
            let mut polled = vec![
                PollFd::new(
                    requests.as_fd(),
                    if want {
                        PollFlags::POLLIN
                    } else {
                        PollFlags::empty()
                    },
                ),
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            polled.extend(
                borrowed
                    .iter()
                    .map(|fd| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            let timeout = if want && requests.buffered() {
                PollTimeout::ZERO
            } else if draining.is_some() {
                PollTimeout::from(100u16)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut polled, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let hit = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            let readable: Vec<RawFd> = fds
                .iter()
                .zip(&polled[3..])
                .filter(|(_, p)| hit(p))
                .map(|(fd, _)| *fd)
                .collect();
            (hit(&polled[0]), hit(&polled[1]), hit(&polled[2]), readable)
        };
        if woken {
            let mut sink = [0u8; 64];
            while matches!((&wake).read(&mut sink), Ok(n) if n > 0) {}
        }
        if accept {
            while let Ok((stream, _)) = listener.accept() {
                if let Err(e) = link::check_peer(&stream) {
                    tracing::warn!("refused a connection to the worker link: {e}");
                    continue;
                }
                stream.set_nonblocking(false)?;
                d.accept(stream);
            }
        }
        for fd in readable {
            d.read_worker(fd);
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
        d.dispatch();
    }
    tracing::info!(unserved = d.waiting.len(), "broker stopped");
    Ok(())
}

/// A worker's socket for one poll call; the map that owns it outlives the call.
fn unsafe_borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fd belongs to a `Worker` in the broker's map, which is not modified
    // while the borrowed fds are in use (they are dropped before the map changes).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

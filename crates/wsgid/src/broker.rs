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

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;

use crate::config::Settings;
use crate::link;
use crate::zmtp::Puller;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

struct Worker {
    stream: UnixStream,
}

pub fn run(settings: &Settings, link_name: &str) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let (wake, notify) = UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
    ] {
        signal_hook::flag::register(sig, stop.clone())?;
        signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
    }
    signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(AtomicBool::new(false)),
    )?;

    let listener = link::listen(link_name)
        .with_context(|| format!("cannot listen on the worker link @{link_name}"))?;
    listener.set_nonblocking(true)?;
    let give_up = || stop.load(Ordering::Relaxed);
    let mut requests = Puller::connect(&settings.recv, give_up)?;
    tracing::info!(recv = %settings.recv, "broker ready");

    let mut workers: HashMap<RawFd, Worker> = HashMap::new();
    let mut idle: VecDeque<RawFd> = VecDeque::new();
    let mut held: Option<Vec<u8>> = None;
    while !stop.load(Ordering::Relaxed) {
        // Requests already read (and idle workers for them) need no waiting.
        let ready_now = !idle.is_empty() && (held.is_some() || requests.buffered());
        let fds: Vec<RawFd> = workers.keys().copied().collect();
        let (pull_ready, accept, woken, readable) = {
            let pull_events = if idle.is_empty() {
                PollFlags::empty()
            } else {
                PollFlags::POLLIN
            };
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|&fd| unsafe_borrow(fd)).collect();
            let mut polled = vec![
                PollFd::new(requests.as_fd(), pull_events),
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            polled.extend(
                borrowed
                    .iter()
                    .map(|fd| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            let timeout = if ready_now {
                PollTimeout::ZERO
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
                workers.insert(stream.as_raw_fd(), Worker { stream });
            }
        }
        for fd in readable {
            let Some(worker) = workers.get_mut(&fd) else {
                continue;
            };
            let mut frames = [0u8; 64];
            let n = match (&worker.stream).read(&mut frames) {
                Ok(0) | Err(_) => {
                    // The worker is gone (exited or killed).
                    workers.remove(&fd);
                    idle.retain(|&w| w != fd);
                    continue;
                }
                Ok(n) => n,
            };
            for &frame in &frames[..n] {
                match frame {
                    link::READY if !idle.contains(&fd) => idle.push_back(fd),
                    link::READY => {}
                    link::BYE => {
                        idle.retain(|&w| w != fd);
                        let _ = std::io::Write::write_all(&mut worker.stream, &[link::ACK]);
                    }
                    other => tracing::warn!("unknown frame {other:#x} from a worker"),
                }
            }
        }
        // Take requests while workers are idle: what poll saw arrive, then what is buffered.
        let mut may_read = pull_ready;
        while !idle.is_empty() {
            let msg = match held.take() {
                Some(msg) => msg,
                None if may_read || requests.buffered() => {
                    may_read = false;
                    match requests.recv()? {
                        Some(msg) => msg,
                        None => {
                            tracing::warn!("mongrel2 closed the request connection; reconnecting");
                            requests = Puller::connect(&settings.recv, give_up)?;
                            break;
                        }
                    }
                }
                None => break,
            };
            if let Some(undelivered) = dispatch(msg, &mut workers, &mut idle) {
                held = Some(undelivered);
                break;
            }
        }
    }
    tracing::info!(held = held.is_some(), "broker stopping");
    Ok(())
}

/// Gives a request to the oldest idle worker; one that died since its READY is dropped
/// and the next one tried. Returns the request if no worker could take it.
fn dispatch(
    msg: Vec<u8>,
    workers: &mut HashMap<RawFd, Worker>,
    idle: &mut VecDeque<RawFd>,
) -> Option<Vec<u8>> {
    while let Some(fd) = idle.pop_front() {
        let Some(worker) = workers.get_mut(&fd) else {
            continue;
        };
        if link::send_request(&mut worker.stream, &msg).is_ok() {
            return None;
        }
        workers.remove(&fd);
    }
    Some(msg)
}

/// A worker's socket for one poll call; the map that owns it outlives the call.
fn unsafe_borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fd belongs to a `Worker` in the broker's map, which is not modified
    // while the borrowed fds are in use (they are dropped before the map changes).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

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
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;

use crate::config::Settings;
use crate::link;

/// Requests the broker takes from mongrel2 ahead of need: few, so that with several
/// wsgid instances (hosts) on one mongrel2, a busy one does not sit on requests.
const RECV_HWM: i32 = 4;

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
    let context = zmq::Context::new();
    let requests = context.socket(zmq::PULL)?;
    requests.set_rcvhwm(RECV_HWM)?;
    requests
        .connect(&settings.recv)
        .with_context(|| format!("cannot connect to {}", settings.recv))?;
    tracing::info!(recv = %settings.recv, "broker ready");

    let mut workers: HashMap<RawFd, Worker> = HashMap::new();
    let mut idle: VecDeque<RawFd> = VecDeque::new();
    let mut held: Option<zmq::Message> = None;
    while !stop.load(Ordering::Relaxed) {
        let fds: Vec<RawFd> = workers.keys().copied().collect();
        let mut items = vec![
            requests.as_poll_item(if idle.is_empty() {
                zmq::PollEvents::empty()
            } else {
                zmq::POLLIN
            }),
            zmq::PollItem::from_fd(listener.as_raw_fd(), zmq::POLLIN),
            zmq::PollItem::from_fd(wake.as_raw_fd(), zmq::POLLIN),
        ];
        items.extend(
            fds.iter()
                .map(|&fd| zmq::PollItem::from_fd(fd, zmq::POLLIN)),
        );
        match zmq::poll(&mut items, -1) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let readable: Vec<RawFd> = fds
            .iter()
            .zip(&items[3..])
            .filter(|(_, item)| item.is_readable() || item.is_error())
            .map(|(&fd, _)| fd)
            .collect();
        if items[2].is_readable() {
            let mut sink = [0u8; 64];
            while matches!((&wake).read(&mut sink), Ok(n) if n > 0) {}
        }
        if items[1].is_readable() {
            while let Ok((stream, _)) = listener.accept() {
                stream.set_nonblocking(false)?;
                workers.insert(stream.as_raw_fd(), Worker { stream });
            }
        }
        drop(items);
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
        dispatch(&requests, &mut workers, &mut idle, &mut held)?;
    }
    tracing::info!(held = held.is_some(), "broker stopping");
    Ok(())
}

/// Gives queued requests to idle workers, oldest idle first. A request a worker could not
/// take (it died after saying READY) goes to the next one, or waits in `held`.
fn dispatch(
    requests: &zmq::Socket,
    workers: &mut HashMap<RawFd, Worker>,
    idle: &mut VecDeque<RawFd>,
    held: &mut Option<zmq::Message>,
) -> anyhow::Result<()> {
    while !idle.is_empty() {
        let msg = match held.take() {
            Some(msg) => msg,
            None => match requests.recv_msg(zmq::DONTWAIT) {
                Ok(msg) => msg,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        };
        let mut delivered = false;
        while let Some(fd) = idle.pop_front() {
            let Some(worker) = workers.get_mut(&fd) else {
                continue;
            };
            match link::send_request(&mut worker.stream, &msg) {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                // Gone since its READY (killed): try the next idle worker.
                Err(_) => {
                    workers.remove(&fd);
                }
            }
        }
        if !delivered {
            *held = Some(msg);
            return Ok(());
        }
    }
    Ok(())
}

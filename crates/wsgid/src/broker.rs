//! The broker: the one process of a wsgid instance that pulls requests from mongrel2, and
//! hands each to an idle worker.
//!
//! mongrel2's PUSH assigns a request to a connected peer before that peer reads it, and a
//! peer that disconnects loses what was assigned to it and still in flight (design note 2).
//! Workers connected to mongrel2 directly would therefore drop requests on every reload and
//! queue fast requests behind slow ones (note 3). The broker stays connected while workers
//! come and go, and gives a request only to a worker that asked for one:
//!
//! * worker → broker `READY`: idle, send me one request (repeated while idle, so a restarted
//!   broker learns about it);
//! * broker → worker: one mongrel2 message, verbatim;
//! * worker → broker `BYE`: stopping; the broker answers with an empty frame, and nothing
//!   follows it, so a stopping worker serves what it was given and loses nothing.
//!
//! Replies do not pass through here: workers publish them to mongrel2 themselves.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;

use crate::config::Settings;

/// Environment variable carrying the broker's endpoint to the broker and the workers.
pub const BROKER_ENV: &str = "WSGID_BROKER";
pub const READY: &[u8] = b"READY";
pub const BYE: &[u8] = b"BYE";

/// Requests the broker takes from mongrel2 ahead of need: few, so that with several
/// wsgid instances (hosts) on one mongrel2, a busy one does not sit on requests.
const RECV_HWM: i32 = 4;

/// A private endpoint per master: Linux abstract socket, nothing on disk to clean up.
pub fn endpoint(master_pid: u32) -> String {
    format!("ipc://@wsgid-broker-{master_pid}")
}

pub fn run(settings: &Settings, endpoint: &str) -> anyhow::Result<()> {
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

    let context = zmq::Context::new();
    let workers = context.socket(zmq::ROUTER)?;
    workers.set_router_mandatory(true)?;
    workers.set_linger(0)?;
    workers
        .bind(endpoint)
        .with_context(|| format!("cannot bind the broker endpoint {endpoint}"))?;
    let requests = context.socket(zmq::PULL)?;
    requests.set_rcvhwm(RECV_HWM)?;
    requests
        .connect(&settings.recv)
        .with_context(|| format!("cannot connect to {}", settings.recv))?;
    tracing::info!(recv = %settings.recv, "broker ready");

    let mut idle: VecDeque<Vec<u8>> = VecDeque::new();
    let mut held: Option<zmq::Message> = None;
    while !stop.load(Ordering::Relaxed) {
        let take_requests = !idle.is_empty();
        let mut items = [
            workers.as_poll_item(zmq::POLLIN),
            requests.as_poll_item(if take_requests {
                zmq::POLLIN
            } else {
                zmq::PollEvents::empty()
            }),
            zmq::PollItem::from_fd(wake.as_raw_fd(), zmq::POLLIN),
        ];
        match zmq::poll(&mut items, -1) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if items[2].is_readable() {
            let mut sink = [0u8; 64];
            while matches!(std::io::Read::read(&mut &wake, &mut sink), Ok(n) if n > 0) {}
        }
        while let Ok(frames) = workers.recv_multipart(zmq::DONTWAIT) {
            let [id, kind] = frames.as_slice() else {
                tracing::warn!("malformed message from a worker");
                continue;
            };
            if kind == READY {
                if !idle.contains(id) {
                    idle.push_back(id.clone());
                }
            } else if kind == BYE {
                idle.retain(|w| w != id);
                let _ = workers.send_multipart([id.as_slice(), b""], zmq::DONTWAIT);
            }
        }
        dispatch(&workers, &requests, &mut idle, &mut held)?;
    }
    tracing::info!(held = held.is_some(), "broker stopping");
    Ok(())
}

/// Gives queued requests to idle workers, oldest idle first. A request a worker could not
/// take (it died after saying READY) goes to the next one, or waits in `held`.
fn dispatch(
    workers: &zmq::Socket,
    requests: &zmq::Socket,
    idle: &mut VecDeque<Vec<u8>>,
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
        let mut msg = Some(msg);
        while let Some(id) = idle.pop_front() {
            match workers.send(&id, zmq::SNDMORE | zmq::DONTWAIT) {
                Ok(()) => {
                    workers.send(msg.take().expect("one request"), zmq::DONTWAIT)?;
                    break;
                }
                // Gone since its READY (killed): try the next idle worker.
                Err(zmq::Error::EHOSTUNREACH) | Err(zmq::Error::EAGAIN) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if msg.is_some() {
            *held = msg;
            return Ok(());
        }
    }
    Ok(())
}

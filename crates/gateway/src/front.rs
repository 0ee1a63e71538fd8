//! One-command mode's front end process (`wsgid front`, started by the master): the
//! `server` crate's HTTP side on the master's listeners, with the broker running inside it
//! as its one handler (`broker::InprocBroker`, `server::inproc`).
//!
//! Why HTTP in a process apart from the workers' and the queue beside it, rather than the
//! broker in a process of its own: the broker's wake-ups and its two ZMTP hops per request
//! cost more than its work (measured in the README, "One command"); requests and replies now
//! pass in memory, and a request takes its client's connection straight into the queue.

use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use anyhow::Context;

use crate::config::Settings;

/// Environment variable carrying the listening sockets' descriptors to the front end.
pub const HTTP_FDS_ENV: &str = "WSGID_HTTP_FDS";

/// Bodies up to this travel in the request message (through memory to a worker); larger
/// ones are spooled to disk by the front end and read from there, so memory stays flat
/// whatever the size. Measured with 64 clients POSTing 1 MiB (`bench/run --workloads post`):
/// inline up to 1 MiB, 775 req/s (the body is copied five times on its way and every
/// request maps fresh pages); spooled past 64 KiB, 2,250 req/s.
const INLINE_BODY: u64 = 64 << 10;

pub fn run(settings: &Settings) -> anyhow::Result<()> {
    let listeners = inherited_listeners()?;
    let broker = crate::broker::InprocBroker::new(crate::link::inherited_listener()?)?;
    let temp_store = settings
        .upload_temp_store
        .clone()
        .context("no upload.temp_store: the master sets one")?;
    server::local::run(server::local::Local {
        listeners,
        broker: Box::new(broker),
        temp_store,
        inline_body: INLINE_BODY,
        grace: Duration::from_secs(settings.graceful_timeout),
    })
}

fn inherited_listeners() -> anyhow::Result<Vec<OwnedFd>> {
    let list = std::env::var(HTTP_FDS_ENV)
        .context("no listeners: the front end is started by the master")?;
    list.split(',')
        .map(|fd| {
            let fd: RawFd = fd.parse().context("malformed listener list")?;
            Ok(crate::link::take_inherited(fd)?)
        })
        .collect()
}

//! Connections the workers hold between requests (one-command mode, `crate::hold`), as the
//! broker sees them: which worker holds which, and the looks that take them back from a
//! worker busy with one request for too long, or busy all along while another is idle all
//! along, so that their next requests go to the shared queue and an idle worker (design
//! note 3). Taken back, connections are held again by whichever worker serves them next:
//! the held connections spread over the workers as the load does.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use m2wire::ConnId;
use rustc_hash::FxHashMap;

use super::outgoing::After;
use super::Broker;

/// How often the workers are looked at while connections are held. One seen busy with the
/// same request at two looks loses its held connections (a request on one of them waits at
/// most two looks behind a slow one), as does one seen busy at two looks while another was
/// idle at both (requests of a few hundred microseconds, all on one worker's connections).
pub const LOOK_EVERY: Duration = Duration::from_millis(2);

#[derive(Default)]
pub struct Held {
    by_conn: FxHashMap<ConnId, Holder>,
    /// What each worker was busy with at the last look (`RingReader::busy`).
    seen: FxHashMap<RawFd, Option<u64>>,
    next_look: Option<Instant>,
    /// The front end stops: no worker may hold a connection any more.
    pub wanted_back: bool,
}

struct Holder {
    worker: RawFd,
    sender: Vec<u8>,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }

    /// When the next look is due, while any connection is held.
    pub fn deadline(&self) -> Option<Instant> {
        self.next_look.filter(|_| !self.by_conn.is_empty())
    }

    fn of(&self, worker: RawFd) -> Vec<ConnId> {
        self.by_conn
            .iter()
            .filter(|(_, h)| h.worker == worker)
            .map(|(&conn, _)| conn)
            .collect()
    }
}

impl Broker {
    /// The front end stops: the workers give back what they hold (and hold no more), so
    /// that it can close the idle ones.
    pub(super) fn want_held_back(&mut self) {
        self.held.wanted_back = true;
        self.workers.order_give_back(&self.channels);
    }

    /// Worker `fd` wrote the response on `conn` and keeps the connection.
    pub(super) fn on_held(&mut self, fd: RawFd, sender: &[u8], conn: ConnId) {
        self.outgoing.push_done(sender, conn, After::Held);
        let holder = Holder {
            worker: fd,
            sender: sender.to_vec(),
        };
        self.held.by_conn.insert(conn, holder);
        self.held
            .next_look
            .get_or_insert_with(|| Instant::now() + LOOK_EVERY);
    }

    /// Worker `fd` gives held connection `conn` back, with what it read of it, or has it
    /// closed (`close`).
    pub(super) fn on_back(&mut self, fd: RawFd, conn: ConnId, read: &[u8], close: bool) {
        match self.held.by_conn.get(&conn) {
            Some(h) if h.worker == fd => {}
            // Taken back from it already (it read nothing of it since: see `look`).
            _ => return,
        }
        let holder = self.held.by_conn.remove(&conn).expect("just seen");
        if close {
            self.outgoing.push(&holder.sender, conn, b"", true);
        } else {
            self.outgoing.push_back(&holder.sender, conn, read);
        }
    }

    /// Takes held connections back (but the one of the request in service) from the
    /// workers busy with one request since the last look, and from those busy at both
    /// looks while another worker was idle at both.
    pub(super) fn look_at_holders(&mut self) {
        let now = Instant::now();
        if self.held.next_look.is_none_or(|at| at > now) {
            return;
        }
        self.held.next_look = Some(now + LOOK_EVERY);
        let seen = self.workers.busy();
        let before = std::mem::replace(&mut self.held.seen, seen.clone());
        let idle_all_along =
            |fd: &RawFd| seen.get(fd) == Some(&None) && before.get(fd) == Some(&None);
        let mut holders: Vec<RawFd> = self.held.by_conn.values().map(|h| h.worker).collect();
        holders.sort_unstable();
        holders.dedup();
        for fd in holders {
            let (Some(&Some(mark)), Some(&Some(was))) = (seen.get(&fd), before.get(&fd)) else {
                continue;
            };
            let slow = mark == was;
            if !slow
                && !seen
                    .keys()
                    .any(|other| *other != fd && idle_all_along(other))
            {
                continue;
            }
            let Some(ring) = self.workers.ring(fd) else {
                continue;
            };
            let serving = ring.serving();
            if !ring.take_back(mark) {
                continue;
            }
            let conns = self.held.of(fd);
            tracing::debug!(
                conns = conns.len(),
                slow,
                "held connections taken back from a busy worker"
            );
            for conn in conns.into_iter().filter(|&c| c != serving) {
                let holder = self.held.by_conn.remove(&conn).expect("held");
                self.outgoing.push_back(&holder.sender, conn, b"");
            }
        }
    }

    /// Worker `fd` is gone: the connections it held go back to the front end, but the one
    /// whose request it was serving, which is closed (its response will never come).
    pub(super) fn release_held(&mut self, fd: RawFd, serving: Option<ConnId>) {
        for conn in self.held.of(fd) {
            let holder = self.held.by_conn.remove(&conn).expect("held");
            if Some(conn) == serving {
                self.outgoing.push(&holder.sender, conn, b"", true);
            } else {
                self.outgoing.push_back(&holder.sender, conn, b"");
            }
        }
        self.held.seen.remove(&fd);
    }
}

//! One-command mode: client connections lent to the workers, so that a worker writes a
//! response to its client itself instead of relaying it through the broker and here.
//!
//! The broker runs in this process (`crate::inproc`): when it queues a request it takes the
//! client's connection (and the request's body pipe) from here by the connection's id
//! (`Lend`), and the kernel passes a copy with the request to whichever worker takes it. A
//! request may be answered directly only if nothing of an earlier response still waits here
//! for its client: the request says so with the `DIRECT` header. Such a response ends with
//! a `ctl` reply, `done`. A body that fits a pipe goes the same way, in a pipe of its own
//! (`BODY_PIPE`, with the pipe's serial number, so that a pipe can only go with its own
//! request). While a worker writes a response this side only reads the connection; closing
//! it shuts it down, so that the copies elsewhere end with it.
//!
//! A keep-alive connection may stay with its worker after the response (`Lent::MayHold`,
//! `Phase::Held`): the worker then reads its next requests itself and this side does not
//! poll it, until the worker gives it back (`BACK`, with what it read and did not serve),
//! has it closed, or the broker takes it back from a worker busy too long (the gateway's
//! `hold` module says how that keeps request-level balancing).

use std::os::fd::{AsFd, BorrowedFd};

use rustc_hash::FxHashMap;
use slab::Slab;

use crate::conn::Conn;
use crate::inproc::Lend;

/// The request header that lets the worker write to the connection; uppercase like the
/// other headers of the server's own, which no client header can be.
pub const DIRECT: &[u8] = b"DIRECT";
/// The request header saying the upload file is lent from a pool: the handler reads it but
/// neither removes it nor shows its name to the app.
pub const UPLOAD_LENT: &[u8] = b"UPLOAD_LENT";
/// The request header of a body in a pipe of its own; its value is the pipe's serial
/// number, which the broker matches.
pub const BODY_PIPE: &[u8] = b"BODY_PIPE";
/// The `ctl` key of the reply that ends a response written directly; its value says what
/// becomes of the connection: `keep-alive`, `close`, or `held` (`Lent::MayHold`).
pub const DONE: &[u8] = b"done";
pub const KEEP_ALIVE: &[u8] = b"keep-alive";
pub const CLOSE: &[u8] = b"close";
pub const HELD: &[u8] = b"held";
/// The `ctl` key of the reply that gives a held connection back; its value is what the
/// worker read from it and did not serve (the start of a request it leaves to us).
pub const BACK: &[u8] = b"back";

/// How a request's connection is lent (the value of its `DIRECT` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lent {
    /// For this response only.
    Once,
    /// The worker may keep the connection after the response and read the next requests
    /// itself (`Phase::Held`): nothing of the next request was read here, and the request
    /// had no body still coming. Under load most requests then cross no process at all.
    MayHold,
}

impl Lent {
    pub fn value(self) -> &'static [u8] {
        match self {
            Lent::Once => b"1",
            Lent::MayHold => b"2",
        }
    }

    /// A `DIRECT` header's value, read back.
    pub fn of(value: &[u8]) -> Option<Lent> {
        [Lent::Once, Lent::MayHold]
            .into_iter()
            .find(|lent| lent.value() == value)
    }
}

/// The front end's connections, as the broker looks them up (see `Lend`).
pub struct Lending<'a> {
    pub conns: &'a mut Slab<Conn>,
    pub ids: &'a FxHashMap<u64, usize>,
}

impl Lending<'_> {
    fn conn(&self, id: u64) -> Option<&Conn> {
        self.conns.get(*self.ids.get(&id)?)
    }
}

impl Lend for Lending<'_> {
    fn is_open(&self, id: u64) -> bool {
        self.conn(id).is_some()
    }

    fn client(&self, id: u64) -> Option<BorrowedFd<'_>> {
        self.conn(id).filter(|c| c.lent).map(|c| c.stream.as_fd())
    }

    fn body(&self, id: u64, serial: u64) -> Option<BorrowedFd<'_>> {
        match &self.conn(id)?.body_pipe {
            Some((s, pipe)) if *s == serial => Some(pipe.as_fd()),
            _ => None,
        }
    }

    fn body_sent(&mut self, id: u64) {
        if let Some(&index) = self.ids.get(&id) {
            if let Some(conn) = self.conns.get_mut(index) {
                conn.body_pipe = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Stream;
    use std::os::fd::OwnedFd;

    fn conn(id: u64) -> Conn {
        let (ours, _theirs) = mio::net::UnixStream::pair().unwrap();
        Conn::new(id, Stream::Unix(ours), "127.0.0.1:1".parse().unwrap())
    }

    fn pipe_end() -> OwnedFd {
        nix::unistd::pipe().unwrap().0
    }

    #[test]
    fn a_connection_is_lent_once_direct_and_a_pipe_only_by_its_serial() {
        let mut conns = Slab::new();
        let mut ids = FxHashMap::default();
        let mut first = conn(10);
        first.body_pipe = Some((3, pipe_end()));
        ids.insert(10, conns.insert(first));
        ids.insert(11, conns.insert(conn(11)));
        let mut lending = Lending {
            conns: &mut conns,
            ids: &ids,
        };
        // Not lent before a request went out DIRECT on it.
        assert!(lending.client(10).is_none());
        lending.conns[ids[&10]].lent = true;
        assert!(lending.client(10).is_some());
        // Gone, or never here: nothing.
        assert!(lending.is_open(11) && !lending.is_open(12));
        assert!(lending.client(12).is_none() && lending.body(12, 3).is_none());
        // A pipe goes only with its own serial, of its own connection.
        assert!(lending.body(10, 2).is_none() && lending.body(11, 3).is_none());
        assert!(lending.body(10, 3).is_some());
        lending.body_sent(10);
        assert!(lending.body(10, 3).is_none());
    }
}

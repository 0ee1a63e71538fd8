//! A handler inside the front end's own process: one-command mode's broker, the gateway's
//! queue to its workers. Requests and replies pass in memory, where a handler elsewhere
//! costs two ZMTP hops and another process's wake-ups for every request; and the client's
//! connection and body pipe go with a request straight from here, where a broker elsewhere
//! needed copies of them lent ahead (one descriptor per keep-alive client).
//!
//! The broker's own descriptors (its workers' streams, its link's listener) are polled by
//! the front end's loop, which runs a `turn` whenever one of them signals, a request was
//! pushed, or the broker's deadline passes.

use std::os::fd::{BorrowedFd, RawFd};
use std::time::Instant;

pub trait Inproc {
    /// A request or notice message, as a PUSH peer would take it.
    fn push(&mut self, message: &[u8]);
    /// Does what is due: reads its descriptors when `woken` (one of them signalled, or the
    /// last turn found more), queues the requests pushed (with what `lend` gives them), and
    /// adds the replies made to `replies`, each as a SUB peer would deliver it. Returns
    /// whether its descriptors may hold more (the loop then comes back at once).
    fn turn(&mut self, woken: bool, lend: &mut dyn Lend, replies: &mut Vec<Vec<u8>>) -> bool;
    /// Descriptors opened since the last call, for the loop to poll for reading; one leaves
    /// the poll set when it is closed.
    fn new_fds(&mut self, out: &mut Vec<RawFd>);
    /// When a turn is due even if nothing signals.
    fn deadline(&self) -> Option<Instant>;
    /// The front end stops: the connections workers hold are wanted back, to be closed
    /// when idle (see `front::lend::Lent::MayHold`).
    fn stopping(&mut self);
}

/// What the front end lends a request that goes to a worker, looked up when the request is
/// queued: by the connection's id, which is never reused, so a request can only ever carry
/// its own client's connection, whatever was closed or accepted since it was read.
pub trait Lend {
    /// Whether connection `id` is still open.
    fn is_open(&self, id: u64) -> bool;
    /// Connection `id`'s socket, while it is open and was lent (`DIRECT`).
    fn client(&self, id: u64) -> Option<BorrowedFd<'_>>;
    /// The read end of body pipe `serial`, while it is connection `id`'s next.
    fn body(&self, id: u64, serial: u64) -> Option<BorrowedFd<'_>>;
    /// Connection `id`'s body pipe went with its request: it is let go here.
    fn body_sent(&mut self, id: u64);
}

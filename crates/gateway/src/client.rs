//! A client's connection lent to a worker (one-command mode): the worker writes the
//! response to it itself, so the bytes cross no other process (measured in the README:
//! a 64 KiB response relayed through the broker and the front end costs them more than the
//! app does).
//!
//! The descriptor is shared with the front end, which neither reads nor writes a
//! connection while a worker holds it, and takes it back when the broker forwards the
//! worker's "done". It is non-blocking (a file status shared by every copy).
//!
//! A client slower than the app must not hold its worker: what its socket cannot take yet
//! is kept here (`pending`), up to `HELD_MAX` for all of a worker's clients together, and
//! the worker serves other requests while it goes out (`Backlog`: its "done" waits for the
//! last byte). Past that bound the worker waits on the client, as it must for a response
//! larger than any buffer; a client that takes nothing for `STALLED` is dropped.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};

use crate::link::{Piece, Replier};

/// A client that takes none of the response for this long is dropped.
pub const STALLED: Duration = Duration::from_secs(60);
/// The most bytes of responses a worker keeps for its slow clients, all together.
pub const HELD_MAX: usize = 4 << 20;

/// A write to the client failed: it went away, or took nothing for `STALLED`. What stops
/// its response then is the client, not us, and it is logged as such (gunicorn ignores
/// EPIPE and ECONNRESET the same way).
#[derive(Debug)]
pub struct ClientGone(io::Error);

impl std::fmt::Display for ClientGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client went away ({})", self.0)
    }
}

impl std::error::Error for ClientGone {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Marks `e`, an error of a write to the client, as the client's doing.
pub fn gone(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), ClientGone(e))
}

/// Whether what failed was a write to a client that went away (see `gone`).
pub fn went_away(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>()?.get_ref())
        .any(|inner| inner.is::<ClientGone>())
}

pub struct Client {
    fd: OwnedFd,
    /// A write failed: nothing more goes to this client, and its connection is to close.
    broken: bool,
    /// What the client's socket could not take yet is `pending[sent..]`, in order before
    /// anything later (the sent bytes are let go in halves, not moved on every send).
    pending: Vec<u8>,
    sent: usize,
    /// The bytes pending for all of this worker's clients.
    held: Rc<Cell<usize>>,
    /// When the client last took something (or was first kept waiting).
    progress: Instant,
}

impl Client {
    fn new(fd: OwnedFd, held: Rc<Cell<usize>>) -> Client {
        Client {
            fd,
            broken: false,
            pending: Vec::new(),
            sent: 0,
            held,
            progress: Instant::now(),
        }
    }

    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Whether bytes wait for the client.
    pub fn has_pending(&self) -> bool {
        self.unsent() > 0
    }

    fn unsent(&self) -> usize {
        self.pending.len() - self.sent
    }

    /// Writes all of `data`, or keeps what the client cannot take yet when the worker's
    /// bound allows; otherwise waits while the client's socket is full.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.flush()?;
        let rest = if !self.has_pending() {
            self.send_some(data)?
        } else {
            data
        };
        if rest.is_empty() {
            return Ok(());
        }
        if self.held.get() + rest.len() <= HELD_MAX {
            if !self.has_pending() {
                self.progress = Instant::now();
            }
            self.keep(rest);
            return Ok(());
        }
        // Too much kept already: wait for the client, what was kept first.
        self.drain()?;
        let mut rest = rest;
        while !rest.is_empty() {
            self.wait_writable()?;
            rest = self.send_some(rest)?;
        }
        Ok(())
    }

    /// Sends what is pending without waiting.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.has_pending() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending);
        let unsent = pending.len() - self.sent;
        let sent = self
            .send_some(&pending[self.sent..])
            .map(|rest| unsent - rest.len());
        if let Ok(n @ 1..) = sent {
            self.progress = Instant::now();
            self.sent += n;
            self.held.set(self.held.get() - n);
            if self.sent == pending.len() {
                pending.clear();
                self.sent = 0;
            } else if self.sent > pending.len() / 2 {
                pending.drain(..self.sent);
                self.sent = 0;
            }
        }
        self.pending = pending;
        sent.map(drop)
    }

    /// Sends what is pending, waiting for the client.
    pub fn drain(&mut self) -> io::Result<()> {
        loop {
            self.flush()?;
            if !self.has_pending() {
                return Ok(());
            }
            self.wait_writable()?;
        }
    }

    /// When the client will have been too slow, if it takes nothing more.
    pub fn deadline(&self) -> Instant {
        self.progress + STALLED
    }

    fn keep(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        self.held.set(self.held.get() + data.len());
    }

    /// Sends what the socket takes now; what it did not take.
    fn send_some<'a>(&mut self, mut data: &'a [u8]) -> io::Result<&'a [u8]> {
        while !data.is_empty() {
            match send(
                self.fd.as_raw_fd(),
                data,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => data = &data[n..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
        Ok(data)
    }

    fn wait_writable(&mut self) -> io::Result<()> {
        let timeout = PollTimeout::try_from(STALLED).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
        loop {
            match poll(&mut fds, timeout) {
                Ok(0) => {
                    self.broken = true;
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client took nothing for {} s", STALLED.as_secs()),
                    ));
                }
                // Writable, or failed: the next send says which.
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.held.set(self.held.get() - self.unsent());
    }
}

/// Responses the app has finished whose clients have not taken them all yet: written as
/// their sockets take them, between and around the worker's requests. Each one's "done"
/// goes to the broker after its last byte, so the front end reads the connection's next
/// request only then.
#[derive(Default)]
pub struct Backlog {
    waiting: Vec<Finished>,
    /// The bytes kept for all the worker's clients, those still in service included.
    held: Rc<Cell<usize>>,
}

struct Finished {
    client: Client,
    seq: u64,
    piece: Piece,
    replier: Arc<Replier>,
}

impl Backlog {
    /// A client lent with a request, under this worker's bound.
    pub fn client(&self, fd: OwnedFd) -> Client {
        Client::new(fd, self.held.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Keeps the rest of response `seq`, ended by `piece`.
    pub fn add(&mut self, client: Client, seq: u64, piece: Piece, replier: Arc<Replier>) {
        self.waiting.push(Finished {
            client,
            seq,
            piece,
            replier,
        });
    }

    /// Writes what the clients take now; ends the responses that are out, or whose client
    /// failed or stalled.
    pub fn advance(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.waiting.len() {
            let client = &mut self.waiting[i].client;
            let failed = client.flush().is_err() || now >= client.deadline();
            if client.has_pending() && !failed {
                i += 1;
                continue;
            }
            end(self.waiting.swap_remove(i), failed);
        }
    }

    /// Writes everything, waiting for each client (a worker that stops).
    pub fn finish(&mut self) {
        for mut f in std::mem::take(&mut self.waiting) {
            let failed = f.client.drain().is_err();
            end(f, failed);
        }
    }

    /// The clients to wait for, and until when.
    pub fn watch(&self) -> (Vec<BorrowedFd<'_>>, Option<Instant>) {
        let fds = self.waiting.iter().map(|f| f.client.as_fd()).collect();
        let deadline = self.waiting.iter().map(|f| f.client.deadline()).min();
        (fds, deadline)
    }
}

/// Says response `seq` is out; our copy of the connection is closed first, as for any
/// response written directly.
fn end(f: Finished, failed: bool) {
    let Finished {
        client,
        seq,
        piece,
        replier,
    } = f;
    drop(client);
    let piece = if failed {
        tracing::debug!(seq, "a slow client is gone or stalled: closed");
        Piece::LastThenClose
    } else {
        piece
    };
    if let Err(e) = replier.direct_done(seq, piece) {
        tracing::error!(seq, "cannot tell the broker a response is out: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Client, UnixStream, Rc<Cell<usize>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let held = Rc::new(Cell::new(0));
        (Client::new(ours.into(), held.clone()), theirs, held)
    }

    #[test]
    fn keeps_what_a_full_socket_cannot_take_and_sends_it_in_order_later() {
        let (mut client, mut theirs, held) = pair();
        let first: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        client.write_all(&first).unwrap();
        client.write_all(b"and then").unwrap();
        assert!(
            client.has_pending(),
            "a 1 MiB response did not fit the socket"
        );
        assert_eq!(held.get(), client.unsent());
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; (1 << 20) + 8];
            theirs.read_exact(&mut got).unwrap();
            got
        });
        client.drain().unwrap();
        let got = reader.join().unwrap();
        assert!(got[..1 << 20] == first[..] && &got[1 << 20..] == b"and then");
        assert_eq!(held.get(), 0);
    }

    #[test]
    fn past_the_bound_waits_for_the_client_and_fails_once_it_is_gone() {
        let (mut client, mut theirs, held) = pair();
        let big: Vec<u8> = (0..HELD_MAX + (1 << 20)).map(|i| (i % 251) as u8).collect();
        let len = big.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; len];
            theirs.read_exact(&mut got).unwrap();
            (got, theirs)
        });
        client.write_all(&big).unwrap();
        assert!(held.get() <= HELD_MAX);
        client.drain().unwrap();
        let (got, theirs) = reader.join().unwrap();
        assert!(got == big);
        drop(theirs);
        assert!(client.write_all(b"more").is_err());
        assert!(client.broken());
        assert!(client.write_all(b"").is_err());
    }

    #[test]
    fn a_dropped_client_gives_its_bytes_back_to_the_bound() {
        let (mut client, _theirs, held) = pair();
        client.write_all(&vec![7u8; 1 << 20]).unwrap();
        assert!(held.get() > 0);
        drop(client);
        assert_eq!(held.get(), 0);
    }
}

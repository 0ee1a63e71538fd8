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
//! last byte). Past that bound the rest goes to an unnamed file beside the spooled request
//! bodies (`Spill`), up to `SPILL_MAX` for the worker, and is sent from there with
//! `sendfile` as the client takes it, as nginx buffers a response to a temp file for a slow
//! client (its `proxy_max_temp_file_size` is 1 GiB too). Only past both bounds, or when no
//! file can be made, does the worker wait on the client. A client that takes nothing for
//! `STALLED` is dropped.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};

use crate::link::{Piece, Replier, Ticket};

/// A client that takes none of the response for this long is dropped.
pub const STALLED: Duration = Duration::from_secs(60);
/// The most bytes of responses a worker keeps in memory for its slow clients, all together.
pub const HELD_MAX: usize = 4 << 20;
/// The most bytes of responses a worker keeps on disk for its slow clients, all together.
pub const SPILL_MAX: u64 = 1 << 30;
/// A client past the memory bound that takes less than this per second (measured over
/// `RATE_WINDOW` at least) has the rest of its response spilled; a faster one is waited
/// for. On loopback curl takes gigabytes a second, and spilling its download cost a
/// quarter of its time.
const SPILL_RATE: u64 = 32 << 20;
const RATE_WINDOW: Duration = Duration::from_millis(5);

/// What a worker keeps for its slow clients, all together, and where it spills to disk.
pub struct Bounds {
    /// Bytes in memory (`Client::pending`), up to `HELD_MAX`.
    held: Cell<usize>,
    /// Bytes in spill files, up to `SPILL_MAX`.
    spilled: Cell<u64>,
    /// The directory spill files are made in; none: responses are not spilled.
    dir: Option<PathBuf>,
    /// A spill file could not be made (said once).
    failed: Cell<bool>,
}

impl Bounds {
    pub fn new(dir: Option<PathBuf>) -> Bounds {
        Bounds {
            held: Cell::new(0),
            spilled: Cell::new(0),
            dir,
            failed: Cell::new(false),
        }
    }

    fn hold(&self, n: usize) {
        self.held.set(self.held.get() + n);
    }

    fn release(&self, n: usize) {
        self.held.set(self.held.get() - n);
    }

    /// A new spill file, if one can be made.
    fn spill_file(&self) -> Option<File> {
        let dir = self.dir.as_ref()?;
        match tempfile::tempfile_in(dir) {
            Ok(file) => Some(file),
            Err(e) => {
                if !self.failed.replace(true) {
                    tracing::warn!(
                        "cannot make a file in {} for a slow client's response ({e}); \
                         such clients hold their worker",
                        dir.display()
                    );
                }
                None
            }
        }
    }
}

/// The part of a response past the memory bound, in an unnamed file: `file[at..end]` is
/// still to go, after everything in memory.
struct Spill {
    file: File,
    at: u64,
    end: u64,
}

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
    /// Shared with the held connection it may be (`hold`): closed with the last copy.
    fd: Rc<OwnedFd>,
    /// A write failed: nothing more goes to this client, and its connection is to close.
    broken: bool,
    /// What the client's socket could not take yet is `pending[sent..]`, in order before
    /// anything later (the sent bytes are let go in halves, not moved on every send).
    pending: Vec<u8>,
    sent: usize,
    /// What comes after `pending`, once it would pass the memory bound.
    spill: Option<Spill>,
    /// The worker's bounds, shared by its clients.
    bounds: Rc<Bounds>,
    /// When the client last took something (or was first kept waiting).
    progress: Instant,
}

impl Client {
    fn new(fd: Rc<OwnedFd>, bounds: Rc<Bounds>) -> Client {
        Client {
            fd,
            broken: false,
            pending: Vec::new(),
            sent: 0,
            spill: None,
            bounds,
            progress: Instant::now(),
        }
    }

    /// The connection, to keep after this response (`hold`).
    pub fn share(&self) -> Rc<OwnedFd> {
        self.fd.clone()
    }

    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Whether bytes wait for the client.
    pub fn has_pending(&self) -> bool {
        self.unsent() > 0
    }

    fn unsent(&self) -> usize {
        self.pending.len() - self.sent + self.spill.as_ref().map_or(0, |s| (s.end - s.at) as usize)
    }

    /// Writes all of `data`, or keeps what the client cannot take yet when the worker's
    /// bounds allow; otherwise waits while the client's socket is full.
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
        if !self.has_pending() {
            self.progress = Instant::now();
        }
        // Once spilling, everything goes after the spilled bytes, never before them.
        if self.spill.is_some() && self.spill_out(rest)? {
            return Ok(());
        }
        self.keep_or_wait(rest)
    }

    /// Keeps `rest` in memory when the bound allows. Past it, waits while the client keeps
    /// up (a fast download must not take a detour through the disk), and spills what is
    /// left once it proves slower than `SPILL_RATE`, or waits on, past the disk bound too.
    fn keep_or_wait(&mut self, mut rest: &[u8]) -> io::Result<()> {
        let since = Instant::now();
        let mut taken = 0;
        loop {
            if self.spill.is_none() && self.bounds.held.get() + rest.len() <= HELD_MAX {
                self.keep(rest);
                return Ok(());
            }
            let waited = since.elapsed();
            let slow =
                waited >= RATE_WINDOW && (taken as f64) < SPILL_RATE as f64 * waited.as_secs_f64();
            if slow && self.spill_out(rest)? {
                return Ok(());
            }
            if slow || self.spill.is_some() || self.bounds.dir.is_none() {
                // Nowhere to spill: the client is waited for, as long as it takes anything.
                self.wait_writable()?;
            } else {
                // Deciding: the client has until the end of the window to show its rate.
                self.writable_within(
                    RATE_WINDOW
                        .saturating_sub(waited)
                        .max(Duration::from_millis(1)),
                )?;
            }
            let before = self.unsent() + rest.len();
            self.flush()?;
            if !self.has_pending() {
                rest = self.send_some(rest)?;
            }
            taken += before - (self.unsent() + rest.len());
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    /// Sends what is pending without waiting: what is in memory, then what was spilled.
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_memory()?;
        if self.pending.is_empty() {
            self.flush_spill()?;
        }
        Ok(())
    }

    fn flush_memory(&mut self) -> io::Result<()> {
        if self.pending.len() == self.sent {
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
            self.bounds.release(n);
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
        self.bounds.hold(data.len());
    }

    /// Appends `data` to the spill file (made now if there is none); false when the disk
    /// bound has no room or no file can be made.
    fn spill_out(&mut self, data: &[u8]) -> io::Result<bool> {
        let bounds = &self.bounds;
        if bounds.spilled.get() + data.len() as u64 > SPILL_MAX {
            return Ok(false);
        }
        if self.spill.is_none() {
            let Some(file) = bounds.spill_file() else {
                return Ok(false);
            };
            self.spill = Some(Spill {
                file,
                at: 0,
                end: 0,
            });
        }
        let spill = self.spill.as_mut().expect("made above");
        // Written at the end (the file's own offset); `sendfile` reads at `at`.
        spill.file.write_all(data)?;
        spill.end += data.len() as u64;
        bounds.spilled.set(bounds.spilled.get() + data.len() as u64);
        Ok(true)
    }

    /// Sends spilled bytes while the socket takes them; the file goes once all are out.
    fn flush_spill(&mut self) -> io::Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let mut took = false;
        while spill.at < spill.end {
            let mut offset = spill.at as i64;
            let count = (spill.end - spill.at).min(1 << 30) as usize;
            match nix::sys::sendfile::sendfile(&*self.fd, &spill.file, Some(&mut offset), count) {
                Ok(0) => break,
                Ok(n) => {
                    spill.at += n as u64;
                    took = true;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
        if took {
            self.progress = Instant::now();
        }
        if spill.at == spill.end {
            self.drop_spill();
        }
        Ok(())
    }

    /// Lets the spill file go, and its bytes back to the bound.
    fn drop_spill(&mut self) {
        if let Some(spill) = self.spill.take() {
            self.bounds
                .spilled
                .set(self.bounds.spilled.get() - spill.end);
        }
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
        if self.writable_within(STALLED)? {
            return Ok(());
        }
        self.broken = true;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took nothing for {} s", STALLED.as_secs()),
        ))
    }

    /// Whether the client's socket has room (or failed: the next send says which) within
    /// `wait`.
    fn writable_within(&self, wait: Duration) -> io::Result<bool> {
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
        loop {
            match poll(&mut fds, timeout) {
                Ok(n) => return Ok(n > 0),
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
        self.bounds.release(self.pending.len() - self.sent);
        self.drop_spill();
    }
}

/// Responses the app has finished whose clients have not taken them all yet: written as
/// their sockets take them, between and around the worker's requests. Each one's "done"
/// goes to the broker after its last byte, so the front end reads the connection's next
/// request only then.
pub struct Backlog {
    waiting: Vec<Finished>,
    /// What is kept for all the worker's clients, those still in service included.
    bounds: Rc<Bounds>,
}

struct Finished {
    client: Client,
    ticket: Ticket,
    piece: Piece,
    replier: Arc<Replier>,
}

impl Backlog {
    /// `spill_dir`: where responses past the memory bound go (see `Bounds`).
    pub fn new(spill_dir: Option<PathBuf>) -> Backlog {
        Backlog {
            waiting: Vec::new(),
            bounds: Rc::new(Bounds::new(spill_dir)),
        }
    }

    /// A client lent with a request, under this worker's bounds.
    pub fn client(&self, fd: Rc<OwnedFd>) -> Client {
        Client::new(fd, self.bounds.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Keeps the rest of the response to `ticket`, ended by `piece`.
    pub fn add(&mut self, client: Client, ticket: Ticket, piece: Piece, replier: Arc<Replier>) {
        self.waiting.push(Finished {
            client,
            ticket,
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

/// Says the response to `ticket` is out; our copy of the connection is closed first, as for any
/// response written directly.
fn end(f: Finished, failed: bool) {
    let Finished {
        client,
        ticket,
        piece,
        replier,
    } = f;
    drop(client);
    let piece = if failed {
        tracing::debug!("a slow client ({ticket}) is gone or stalled: closed");
        Piece::LastThenClose
    } else {
        piece
    };
    replier.finish(ticket, piece);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn pair(spill_dir: Option<PathBuf>) -> (Client, UnixStream, Rc<Bounds>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let bounds = Rc::new(Bounds::new(spill_dir));
        (
            Client::new(Rc::new(ours.into()), bounds.clone()),
            theirs,
            bounds,
        )
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Reads `len` bytes on another thread.
    fn read_all(
        mut theirs: UnixStream,
        len: usize,
    ) -> std::thread::JoinHandle<(Vec<u8>, UnixStream)> {
        std::thread::spawn(move || {
            let mut got = vec![0u8; len];
            theirs.read_exact(&mut got).unwrap();
            (got, theirs)
        })
    }

    #[test]
    fn keeps_what_a_full_socket_cannot_take_and_sends_it_in_order_later() {
        let (mut client, theirs, bounds) = pair(None);
        let first = pattern(1 << 20);
        client.write_all(&first).unwrap();
        client.write_all(b"and then").unwrap();
        assert!(
            client.has_pending(),
            "a 1 MiB response did not fit the socket"
        );
        assert_eq!(bounds.held.get(), client.unsent());
        let reader = read_all(theirs, (1 << 20) + 8);
        client.drain().unwrap();
        let (got, _) = reader.join().unwrap();
        assert!(got[..1 << 20] == first[..] && &got[1 << 20..] == b"and then");
        assert_eq!(bounds.held.get(), 0);
    }

    #[test]
    fn past_the_bound_with_nowhere_to_spill_waits_for_the_client_and_fails_once_it_is_gone() {
        let (mut client, theirs, bounds) = pair(None);
        let big = pattern(HELD_MAX + (1 << 20));
        let reader = read_all(theirs, big.len());
        client.write_all(&big).unwrap();
        assert!(bounds.held.get() <= HELD_MAX);
        client.drain().unwrap();
        let (got, theirs) = reader.join().unwrap();
        assert!(got == big);
        drop(theirs);
        assert!(client.write_all(b"more").is_err());
        assert!(client.broken());
        assert!(client.write_all(b"").is_err());
    }

    #[test]
    fn past_the_memory_bound_the_rest_goes_to_a_file_and_out_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, theirs, bounds) = pair(Some(dir.path().to_path_buf()));
        // Nobody reads yet: without the file, the second write would wait forever.
        let first = pattern(HELD_MAX + (3 << 20));
        client.write_all(&first).unwrap();
        client.write_all(b"the end").unwrap();
        assert!(bounds.held.get() <= HELD_MAX);
        assert!(bounds.spilled.get() > 0);
        let reader = read_all(theirs, first.len() + 7);
        client.drain().unwrap();
        let (got, _) = reader.join().unwrap();
        assert!(got[..first.len()] == first[..] && &got[first.len()..] == b"the end");
        assert_eq!((bounds.held.get(), bounds.spilled.get()), (0, 0));
        assert!(client.spill.is_none());
    }

    #[test]
    fn a_dropped_client_gives_its_bytes_back_to_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, _theirs, bounds) = pair(Some(dir.path().to_path_buf()));
        client.write_all(&vec![7u8; 1 << 20]).unwrap();
        client.write_all(&vec![8u8; HELD_MAX]).unwrap();
        assert!(bounds.held.get() > 0 && bounds.spilled.get() > 0);
        drop(client);
        assert_eq!((bounds.held.get(), bounds.spilled.get()), (0, 0));
    }
}

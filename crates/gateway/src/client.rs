//! A client's connection lent to a worker (one-command mode): the worker writes the
//! response to it itself, so the bytes cross no other process (measured in the README:
//! a 64 KiB response relayed through the broker and the front end costs them more than the
//! app does).
//!
//! The descriptor is shared with the front end, which neither reads nor writes a
//! connection while a worker holds it, and takes it back when the broker forwards the
//! worker's "done". It is non-blocking (a file status shared by every copy), so writes here
//! wait with `poll`, and give up on a client that takes nothing for `STALLED`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};

/// A client that takes none of the response for this long is dropped.
const STALLED: Duration = Duration::from_secs(60);

pub struct Client {
    fd: OwnedFd,
    /// A write failed: nothing more goes to this client, and its connection is to close.
    broken: bool,
}

impl Client {
    pub fn new(fd: OwnedFd) -> Client {
        Client { fd, broken: false }
    }

    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Writes all of `data`, waiting while the client's socket is full.
    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        while !data.is_empty() {
            match send(
                self.fd.as_raw_fd(),
                data,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => data = &data[n..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    if !self.writable_within(STALLED)? {
                        self.broken = true;
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the client took nothing for {} s", STALLED.as_secs()),
                        ));
                    }
                }
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    fn writable_within(&self, wait: Duration) -> io::Result<bool> {
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
        loop {
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(false),
                // Writable, or failed: the next send says which.
                Ok(_) => return Ok(true),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn writes_everything_through_a_full_socket_and_fails_once_the_client_is_gone() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut client = Client::new(ours.into());
        let big: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4 << 20];
            theirs.read_exact(&mut got).unwrap();
            (got, theirs)
        });
        client.write_all(&big).unwrap();
        let (got, theirs) = reader.join().unwrap();
        assert!(got == big);
        drop(theirs);
        assert!(client.write_all(b"more").is_err());
        assert!(client.broken());
        assert!(client.write_all(b"").is_err());
    }
}

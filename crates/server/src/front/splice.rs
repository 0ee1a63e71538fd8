//! A body of known length going to a spool file moves from the client's socket to the file
//! through a pipe (`splice`): the kernel hands the socket's pages to the pipe and copies
//! them once into the file, where `read` then `write` would copy twice, through our memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

use crate::conn::{Conn, Phase, Sink};
use crate::http::body::Decoder;

/// The pipe's size, asked for (Linux's default ceiling for an unprivileged process).
const PIPE_SIZE: usize = 1 << 20;

pub struct BodyPipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

/// What one move did.
pub enum Moved {
    /// Not a body this applies to: read it the usual way.
    NotApplicable,
    Bytes(usize),
    /// The client closed its end.
    Closed,
    /// The socket has nothing now.
    WouldBlock,
    /// The socket failed: the client is gone.
    ClientFailed,
    /// The file could not be written: the body is lost (the pipe was emptied).
    SpoolFailed(io::Error),
    /// The body's own pipe is full before the body is in: it goes to a file instead.
    PipeFull,
}

impl BodyPipe {
    pub fn new() -> io::Result<BodyPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))? as usize;
        Ok(BodyPipe { read, write, size })
    }

    /// Moves what the socket has of `conn`'s body (at most `budget`) into its spool file,
    /// or straight into its own pipe.
    pub fn move_body(&mut self, conn: &mut Conn, budget: usize) -> Moved {
        let Phase::Body {
            decoder: Decoder::Length { remaining },
            sink: sink @ (Sink::Spool(_) | Sink::Pipe(_)),
            ..
        } = &mut conn.phase
        else {
            return Moved::NotApplicable;
        };
        if !conn.input.is_empty() || *remaining == 0 {
            return Moved::NotApplicable;
        }
        let want = (*remaining).min(budget.min(self.size) as u64) as usize;
        let to = match sink {
            Sink::Pipe(pipe) => pipe.input(),
            _ => self.write.as_fd(),
        };
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let n = match splice(conn.stream.as_fd(), None, to, None, want, flags) {
            Ok(0) => return Moved::Closed,
            Ok(n) => n,
            // Either end may be what blocks: the shared pipe is always emptied, a body's own
            // may fill up with part-used pages.
            Err(Errno::EAGAIN)
                if matches!(sink, Sink::Pipe(_)) && has_input(conn.stream.as_fd()) =>
            {
                return Moved::PipeFull
            }
            Err(Errno::EAGAIN) => return Moved::WouldBlock,
            Err(Errno::EINTR) => return Moved::Bytes(0),
            Err(_) => return Moved::ClientFailed,
        };
        match sink {
            Sink::Pipe(pipe) => pipe.written += n as u64,
            Sink::Spool(spool) => {
                if let Err(e) = spool.splice_from(self.read.as_fd(), n) {
                    self.empty();
                    return Moved::SpoolFailed(e);
                }
            }
            _ => unreachable!("matched above"),
        }
        *remaining -= n as u64;
        Moved::Bytes(n)
    }

    /// Drops what a failed write left in the pipe, so that no byte of one body reaches
    /// another's file.
    fn empty(&mut self) {
        if let Ok(fresh) = BodyPipe::new() {
            *self = fresh;
        }
    }
}

/// Whether the socket has bytes to read.
fn has_input(socket: BorrowedFd<'_>) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given, which outlives the call.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    r == 0 && n > 0
}

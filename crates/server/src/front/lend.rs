//! One-command mode: client connections lent to the gateway's broker, so that a worker
//! writes a response to its client itself instead of relaying it through the broker and
//! here (the receiving side, and why, is `gateway::broker::lent`).
//!
//! A connection is lent once (its descriptor and id, on a Unix `SOCK_SEQPACKET` socket,
//! before its first request goes out), and a request may then be answered directly only if
//! nothing of an earlier response still waits here for its client: the request says so with
//! the `DIRECT` header. Such a response ends with a `ctl` reply, `done`. A body that fits a
//! pipe goes the same way, in a pipe of its own, just before its request (`BODY_PIPE`, with
//! the pipe's serial number, so that a pipe can only go with its own request). While a
//! worker holds a connection this side only reads it; closing it shuts it down, so that the
//! copies elsewhere end with it.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

use crate::conn::Conn;

/// The request header that lets the worker write to the connection; uppercase like the
/// other headers of the server's own, which no client header can be.
pub const DIRECT: &[u8] = b"DIRECT";
/// The 9th byte of a datagram that carries a body pipe: 8 bytes of connection id before it,
/// 8 of the pipe's serial number after.
pub const BODY: u8 = b'B';
/// The request header saying the upload file is lent from a pool: the handler reads it but
/// neither removes it nor shows its name to the app.
pub const UPLOAD_LENT: &[u8] = b"UPLOAD_LENT";
/// The request header of a body sent in a pipe of its own, ahead of the request; its value
/// is the pipe's serial number, which the broker matches.
pub const BODY_PIPE: &[u8] = b"BODY_PIPE";
/// The `ctl` key of the reply that ends a response written directly.
pub const DONE: &[u8] = b"done";
/// How long to wait before trying a broker that could not be reached again.
const RETRY: Duration = Duration::from_secs(1);

pub struct Lender {
    path: PathBuf,
    to: Option<OwnedFd>,
    /// Counts the connections to a broker: a connection lent to an earlier broker is lent
    /// again (`Conn::lent` holds the generation it was lent under).
    generation: u64,
    next_try: Instant,
}

impl Lender {
    pub fn new(path: PathBuf) -> Lender {
        Lender {
            path,
            to: None,
            generation: 0,
            next_try: Instant::now(),
        }
    }

    /// Lends `conn`'s connection to the broker unless it has it; whether it has.
    pub fn lend(&mut self, conn: &mut Conn) -> bool {
        if self.to.is_none() && !self.connect() {
            return false;
        }
        if conn.lent == self.generation {
            return true;
        }
        let lent = self.send(&conn.id.to_le_bytes(), &conn.stream);
        if lent {
            conn.lent = self.generation;
        }
        lent
    }

    /// Sends the body pipe of `id`'s next request ahead of it (`BODY_PIPE`); whether it went.
    pub fn lend_body(&mut self, id: u64, serial: u64, body: BorrowedFd<'_>) -> bool {
        if self.to.is_none() && !self.connect() {
            return false;
        }
        let mut datagram = [BODY; 17];
        datagram[..8].copy_from_slice(&id.to_le_bytes());
        datagram[9..].copy_from_slice(&serial.to_le_bytes());
        self.send(&datagram, &body)
    }

    fn send(&mut self, datagram: &[u8], fd: &impl AsRawFd) -> bool {
        let to = self.to.as_ref().expect("connected");
        let fds = [fd.as_raw_fd()];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match sendmsg::<()>(
            to.as_raw_fd(),
            &[IoSlice::new(datagram)],
            &[ControlMessage::ScmRights(&fds)],
            flags,
            None,
        ) {
            Ok(_) => true,
            // The broker is behind: the request goes the other way (relayed, or its body
            // in a file).
            Err(Errno::EAGAIN) => false,
            Err(e) => {
                tracing::info!("the broker's lending socket is gone ({e}); reconnecting");
                self.to = None;
                self.next_try = Instant::now();
                false
            }
        }
    }

    fn connect(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next_try {
            return false;
        }
        self.next_try = now + RETRY;
        let attempt = || -> nix::Result<OwnedFd> {
            let fd = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )?;
            connect(fd.as_raw_fd(), &UnixAddr::new(&self.path)?)?;
            Ok(fd)
        };
        match attempt() {
            Ok(fd) => {
                self.to = Some(fd);
                self.generation += 1;
                tracing::debug!("lending connections to the broker");
                true
            }
            Err(e) => {
                tracing::debug!("cannot reach the broker's lending socket: {e}");
                false
            }
        }
    }
}

//! Client connections the front end lends to the workers (one-command mode).
//!
//! The front end sends each connection's descriptor here once, with its id, over a Unix
//! `SOCK_SEQPACKET` socket in its private directory, before the connection's first request;
//! a request it marks `DIRECT` (nothing of an earlier response is still queued for its
//! client) goes into the workers' queue with the descriptor, and its worker writes the
//! response to the client itself. Only the descriptor travels, never a number to look up,
//! so a response can reach no other connection than its request's, whatever was closed or
//! accepted meanwhile. The front end shuts a connection down when it closes it, so that the
//! copies here and in a worker cannot keep it open; the copy here is dropped when the front
//! end says the client disconnected, when a new front end connects, and at a new epoch.
//!
//! A body that fits a pipe comes the same way, in a pipe of its own (9 bytes: the id, then
//! `B`), just before its request (marked `BODY_PIPE`), and goes on with it to the worker.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use m2wire::{ConnId, Request};

use crate::link::{Lendings, BODY_PIPE};
use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, recvmsg, socket, sockopt, AddressFamily, Backlog,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The request header (set by the front end, never by a client) that lets a worker write
/// the response to the client's connection.
pub const DIRECT: &[u8] = b"DIRECT";
/// The last byte of a datagram that carries a body pipe.
const BODY: u8 = b'B';

pub struct Lent {
    listener: OwnedFd,
    /// The front end's connection.
    from: Option<OwnedFd>,
    conns: HashMap<ConnId, OwnedFd>,
    /// Body pipes of requests not queued yet (one per connection at most: its next).
    bodies: HashMap<ConnId, OwnedFd>,
    /// Most connections held: the rest of the descriptors stay for the broker's own work
    /// (workers' links, request files); a connection past this is relayed.
    most: usize,
}

impl Lent {
    /// Listens at `path` (a stale socket of an earlier broker is replaced). The open files
    /// limit is raised, and a quarter of it (at least 64) kept from lent connections.
    pub fn listen(path: &Path) -> io::Result<Lent> {
        let limit = usize::try_from(server::run::raise_fd_limit()).unwrap_or(usize::MAX);
        let most = limit.saturating_sub((limit / 4).max(64));
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        bind(listener.as_raw_fd(), &UnixAddr::new(path)?)?;
        listen(&listener, Backlog::new(4)?)?;
        Ok(Lent {
            listener,
            from: None,
            conns: HashMap::new(),
            bodies: HashMap::new(),
            most,
        })
    }

    /// What to poll for reading: the listener, then the front end's connection.
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        std::iter::once(self.listener.as_fd()).chain(self.from.as_ref().map(AsFd::as_fd))
    }

    /// A front end connects: the connections of any earlier one are forgotten.
    pub fn accept(&mut self) {
        loop {
            let fd = match accept4(
                self.listener.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            };
            match getsockopt(&fd, sockopt::PeerCredentials) {
                Ok(cred) if cred.uid() == nix::unistd::geteuid().as_raw() || cred.uid() == 0 => {
                    tracing::debug!("the front end lends its connections");
                    self.clear();
                    self.from = Some(fd);
                }
                _ => tracing::warn!("refused a connection to the lending socket from another user"),
            }
        }
    }

    /// Takes the connections the front end has sent.
    pub fn receive(&mut self) {
        while let Some(from) = &self.from {
            let mut id = [0u8; 9];
            let mut cmsg = nix::cmsg_space!([RawFd; 1]);
            let mut iov = [IoSliceMut::new(&mut id)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let msg = match recvmsg::<()>(from.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(msg) => msg,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!("the front end's lending socket failed: {e}");
                    return self.disconnect();
                }
            };
            if msg.bytes == 0 {
                tracing::debug!("the front end closed its lending socket");
                return self.disconnect();
            }
            let bytes = msg.bytes;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: SCM_RIGHTS installed these descriptors in this process
                        // just now, and nothing else refers to them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            match (bytes, fds.pop(), fds.is_empty()) {
                (8, Some(_), true) if self.conns.len() >= self.most => {
                    tracing::debug!("lent connections at their limit: this one is relayed");
                }
                (8, Some(fd), true) => {
                    self.conns.insert(conn_id(&id), fd);
                }
                (9, Some(fd), true) if id[8] == BODY => {
                    self.bodies.insert(conn_id(&id), fd);
                }
                _ => tracing::warn!("a malformed message on the lending socket, dropped"),
            }
        }
    }

    /// What goes with a request to its worker: the connection it may be answered on
    /// directly (the front end marked it so and lent it), and its body's pipe.
    pub fn lendings_for(&mut self, conn: ConnId, msg: &[u8]) -> Lendings<'_> {
        if self.from.is_none() {
            return Lendings::default();
        }
        let (direct, body) = match Request::parse(msg) {
            Ok(req) => (
                req.header(DIRECT) == Some(b"1"),
                req.header(BODY_PIPE) == Some(b"1"),
            ),
            Err(_) => (false, false),
        };
        if (direct && !self.conns.contains_key(&conn)) || (body && !self.bodies.contains_key(&conn))
        {
            // Sent before the request, so it is there to read.
            self.receive();
        }
        if body && !self.bodies.contains_key(&conn) {
            tracing::warn!(
                conn,
                "a request's body pipe did not come: its worker refuses it"
            );
        }
        Lendings {
            client: self.conns.get(&conn).filter(|_| direct).map(AsFd::as_fd),
            body: self.bodies.get(&conn).filter(|_| body).map(AsFd::as_fd),
        }
    }

    /// The request of `conn` is queued: its body pipe went with it.
    pub fn queued(&mut self, conn: ConnId) {
        self.bodies.remove(&conn);
    }

    pub fn forget(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.bodies.remove(&conn);
    }

    fn disconnect(&mut self) {
        self.from = None;
        self.clear();
    }

    /// A new epoch or a new front end: every connection lent before is dropped.
    pub fn clear(&mut self) {
        self.conns.clear();
        self.bodies.clear();
    }
}

fn conn_id(datagram: &[u8; 9]) -> ConnId {
    u64::from_le_bytes(datagram[..8].try_into().expect("8 bytes"))
}

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

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use m2wire::{ConnId, Request};
use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, recvmsg, socket, sockopt, AddressFamily, Backlog,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The request header (set by the front end, never by a client) that lets a worker write
/// the response to the client's connection.
pub const DIRECT: &[u8] = b"DIRECT";

pub struct Lent {
    listener: OwnedFd,
    /// The front end's connection.
    from: Option<OwnedFd>,
    conns: HashMap<ConnId, OwnedFd>,
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
            let mut id = [0u8; 8];
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
                    self.conns.insert(u64::from_le_bytes(id), fd);
                }
                _ => tracing::warn!("a malformed message on the lending socket, dropped"),
            }
        }
    }

    /// The connection a request may be answered on directly: the front end marked it so
    /// and lent it.
    pub fn client_for(&mut self, conn: ConnId, msg: &[u8]) -> Option<BorrowedFd<'_>> {
        self.from.as_ref()?;
        let direct = Request::parse(msg).is_ok_and(|req| req.header(DIRECT) == Some(b"1"));
        if !direct {
            return None;
        }
        if !self.conns.contains_key(&conn) {
            // Sent before the request, so it is there to read.
            self.receive();
        }
        self.conns.get(&conn).map(AsFd::as_fd)
    }

    pub fn forget(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    fn disconnect(&mut self) {
        self.from = None;
        self.clear();
    }

    /// A new epoch or a new front end: every connection lent before is dropped.
    pub fn clear(&mut self) {
        self.conns.clear();
    }
}

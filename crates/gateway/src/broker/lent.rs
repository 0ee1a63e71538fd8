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
//! A body that fits a pipe comes the same way, in a pipe of its own (17 bytes: the id, `B`,
//! the pipe's serial number), just before its request, which names the pipe (`BODY_PIPE:
//! serial`); it goes on with that request only, to its worker.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use m2wire::{find_header, ConnId};
use rustc_hash::FxHashMap;

use crate::link::Lendings;
use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, recvmsg, socket, sockopt, AddressFamily, Backlog,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use server::front::lend::{BODY, BODY_PIPE, DIRECT};

/// Most body pipes held: the front end has no more out at once. Past it (pipes whose
/// requests were dropped, say) the oldest goes.
const MAX_BODIES: usize = server::upload::MAX_PIPES;

pub struct Lent {
    listener: OwnedFd,
    /// The front end's connection.
    from: Option<OwnedFd>,
    conns: FxHashMap<ConnId, OwnedFd>,
    /// Body pipes of requests not queued yet, with their serial numbers (one per
    /// connection at most: its next).
    bodies: FxHashMap<ConnId, (u64, OwnedFd)>,
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
            conns: FxHashMap::default(),
            bodies: FxHashMap::default(),
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
            let mut id = [0u8; 17];
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
                (17, Some(fd), true) if id[8] == BODY => {
                    let serial = u64::from_le_bytes(id[9..].try_into().expect("8 bytes"));
                    self.hold_body(conn_id(&id), serial, fd);
                }
                _ => tracing::warn!("a malformed message on the lending socket, dropped"),
            }
        }
    }

    fn hold_body(&mut self, conn: ConnId, serial: u64, pipe: OwnedFd) {
        if self.bodies.len() >= MAX_BODIES && !self.bodies.contains_key(&conn) {
            let oldest = self
                .bodies
                .iter()
                .min_by_key(|(_, (s, _))| *s)
                .map(|(c, _)| *c);
            if let Some(oldest) = oldest {
                tracing::warn!(
                    conn = oldest,
                    "a body pipe whose request never came, dropped"
                );
                self.bodies.remove(&oldest);
            }
        }
        self.bodies.insert(conn, (serial, pipe));
    }

    /// What goes with a request to its worker: the connection it may be answered on
    /// directly (the front end marked it so and lent it), and the body pipe it names.
    pub fn lendings_for(&mut self, conn: ConnId, msg: &[u8]) -> Lendings<'_> {
        let direct = find_header(msg, DIRECT).as_deref() == Some(b"1");
        let body = find_header(msg, BODY_PIPE).as_deref().and_then(serial_of);
        if self.from.is_none() && body.is_some() {
            // The front end's lending connection may not be taken yet: the pipe is on it.
            self.accept();
        }
        if self.from.is_none() {
            return Lendings::default();
        }
        let has_body =
            |l: &Lent| body.is_none_or(|s| l.bodies.get(&conn).is_some_and(|(h, _)| *h == s));
        if (direct && !self.conns.contains_key(&conn)) || !has_body(self) {
            // Sent before the request, so it is there to read.
            self.receive();
            if self.from.is_none() && body.is_some() {
                // The front end's connection ended just now: a new one may wait, with it.
                self.accept();
                self.receive();
            }
        }
        if !has_body(self) {
            tracing::warn!(
                conn,
                "a request's body pipe did not come: its worker refuses it"
            );
        }
        Lendings {
            client: self.conns.get(&conn).filter(|_| direct).map(AsFd::as_fd),
            body: self
                .bodies
                .get(&conn)
                .filter(|(held, _)| Some(*held) == body)
                .map(|(_, pipe)| pipe.as_fd()),
        }
    }

    /// The request of `conn` that named its body pipe is queued: the pipe went with it.
    pub fn queued_body(&mut self, conn: ConnId) {
        self.bodies.remove(&conn);
    }

    /// The client of `conn` disconnected. A body pipe sent before the front end said so is
    /// taken first, so that it goes too.
    pub fn forget(&mut self, conn: ConnId) {
        self.receive();
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

fn conn_id(datagram: &[u8; 17]) -> ConnId {
    u64::from_le_bytes(datagram[..8].try_into().expect("8 bytes"))
}

fn serial_of(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{connect, sendmsg, ControlMessage};
    use std::fs::File;
    use std::io::IoSlice;
    use std::os::unix::fs::MetadataExt;

    /// A broker's `Lent` and the front end's side of its lending socket.
    fn lent_and_front(name: &str) -> (Lent, OwnedFd) {
        let path = std::env::temp_dir().join(format!("wsgid-lent-{}-{name}", std::process::id()));
        let mut lent = Lent::listen(&path).unwrap();
        let front = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(front.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        lent.accept();
        std::fs::remove_file(&path).unwrap();
        (lent, front)
    }

    /// Sends a new pipe's read end for `conn` as serial `serial`; returns its inode.
    fn send_body(front: &OwnedFd, conn: ConnId, serial: u64) -> u64 {
        let (read, _write) = nix::unistd::pipe().unwrap();
        let mut datagram = [BODY; 17];
        datagram[..8].copy_from_slice(&conn.to_le_bytes());
        datagram[9..].copy_from_slice(&serial.to_le_bytes());
        let fds = [read.as_raw_fd()];
        sendmsg::<()>(
            front.as_raw_fd(),
            &[IoSlice::new(&datagram)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        inode(read.as_fd())
    }

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .unwrap()
            .ino()
    }

    fn request(conn: ConnId, serial: Option<u64>) -> Vec<u8> {
        let serial = serial.map(|s| s.to_string());
        let mut headers: Vec<(&[u8], &[u8])> = vec![(b"METHOD", b"POST")];
        if let Some(s) = &serial {
            headers.push((BODY_PIPE, s.as_bytes()));
        }
        let mut out = Vec::new();
        m2wire::encode_request(
            &mut out,
            b"front",
            conn,
            b"/",
            m2wire::HeaderEncoding::Json,
            &headers,
            b"",
        );
        out
    }

    fn body_of(lent: &mut Lent, conn: ConnId, serial: Option<u64>) -> Option<u64> {
        let msg = request(conn, serial);
        lent.lendings_for(conn, &msg).body.map(inode)
    }

    #[test]
    fn a_pipe_goes_only_with_the_request_that_names_it() {
        let (mut lent, front) = lent_and_front("names");
        let first = send_body(&front, 7, 1);
        // A request naming a later pipe does not get an earlier, stale one.
        assert_eq!(body_of(&mut lent, 7, Some(2)), None);
        let second = send_body(&front, 7, 2);
        assert_ne!(first, second);
        // A request without a body pipe gets none, though one is held for its connection.
        assert_eq!(body_of(&mut lent, 7, None), None);
        // Another connection's request naming the same serial gets nothing.
        assert_eq!(body_of(&mut lent, 8, Some(2)), None);
        assert_eq!(body_of(&mut lent, 7, Some(2)), Some(second));
        lent.queued_body(7);
        assert_eq!(body_of(&mut lent, 7, Some(2)), None);
    }

    #[test]
    fn a_pipe_sent_before_its_client_left_is_dropped_with_it() {
        let (mut lent, front) = lent_and_front("forget");
        send_body(&front, 9, 1);
        lent.forget(9);
        lent.receive();
        assert!(lent.bodies.is_empty());
    }

    #[test]
    fn pipes_whose_requests_never_came_are_held_at_most_as_many_as_the_front_end_has() {
        let (mut lent, front) = lent_and_front("cap");
        for conn in 0..MAX_BODIES as u64 + 3 {
            send_body(&front, conn, conn + 1);
        }
        lent.receive();
        assert_eq!(lent.bodies.len(), MAX_BODIES);
        // The oldest went.
        assert!((0..3).all(|conn| !lent.bodies.contains_key(&conn)));
        let last = MAX_BODIES as u64 + 2;
        assert!(body_of(&mut lent, last, Some(last + 1)).is_some());
    }
}

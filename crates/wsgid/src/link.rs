//! The broker ↔ worker link.
//!
//! Requests travel through one *shared queue*: a `SOCK_SEQPACKET` socket pair whose reading
//! end every worker holds. A worker takes the next request only when it is idle, so a fast
//! request never waits behind a slow one (design note 3), and a worker that stops simply stops
//! taking: nothing was assigned to it ahead of time, so nothing is lost (note 2). Under load a
//! worker finds its next request already queued and takes it without sleeping or asking.
//!
//! Workers note what they *took* and what they have *done* in a ring of memory shared with
//! the broker (`records`), and ring a *doorbell* (a second shared pair) only when the broker
//! waits for a record.
//!
//! A worker connects to the broker's abstract Unix stream socket, and the broker answers with
//! its ring's number, carrying the queue, the doorbell and the rings' file (`SCM_RIGHTS`).
//! The stream then stays silent; its end tells either side that the other is gone.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

use nix::errno::Errno;

use crate::records::{Record, Ring, Rings, Written};
use nix::sys::socket::{
    recv, recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockFlag, SockType,
};

/// Environment variable carrying the link's name from the master to the workers.
pub const LINK_ENV: &str = "WSGID_LINK";
/// Environment variable carrying the listening socket's descriptor from the master to the
/// broker: the master binds the name once and holds it, so it is never free for another
/// local user to take while a broker restarts.
pub const LISTENER_FD_ENV: &str = "WSGID_LINK_FD";

/// The broker's greeting, which carries the channels.
const WELCOME: u8 = b'w';

/// Largest message carried in the queue itself. A datagram must fit the socket's send buffer
/// (`net.core.wmem_default`, 208 KiB here), so larger ones travel in a memfd.
const INLINE_MAX: usize = 64 * 1024;
/// A queued request: kind, sequence number (u64 LE), then the message when inline.
const INLINE: u8 = b'm';
const IN_FILE: u8 = b'f';
/// A request to refuse: only its address, to close its connection.
const REFUSE: u8 = b'x';
const QUEUE_HEADER: usize = 9;

/// A fresh name for a master's link: abstract, so nothing on disk to clean up or to reach
/// from inside a chroot; random, so nobody can take it ahead of us.
pub fn new_name(master_pid: u32) -> String {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(master_pid);
    format!("wsgid-{master_pid}-{random:016x}")
}

fn address(name: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(name.as_bytes())
}

pub fn listen(name: &str) -> io::Result<UnixListener> {
    UnixListener::bind_addr(&address(name)?)
}

/// The listener the master passed to its broker.
pub fn inherited_listener() -> io::Result<UnixListener> {
    let fd: RawFd = std::env::var(LISTENER_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no link listener: the broker is started by the master"))?;
    // SAFETY: the master left this descriptor open for us; nothing else here owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(listener)
}

/// The peer of a link runs as us: the broker accepts only our workers, a worker talks only
/// to our broker. Other local users cannot read requests or feed forged ones. Returns the
/// peer's pid. A worker sees the credentials of whoever bound the listener: the master,
/// which may be root (`--chroot` keeps it root while its children drop to the folder's
/// owner); root is trusted.
pub fn check_peer(stream: &UnixStream) -> io::Result<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let us = nix::unistd::geteuid().as_raw();
    if peer.uid() != us && peer.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("link peer runs as uid {}, not {us}", peer.uid()),
        ));
    }
    Ok(peer.pid())
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

/// Non-blocking send of one datagram; `Ok(false)` when the socket is full.
fn send_datagram(fd: &OwnedFd, parts: &[IoSlice<'_>], fds: &[RawFd]) -> io::Result<bool> {
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs = if fds.is_empty() { &[][..] } else { &cmsgs[..] };
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    match sendmsg::<()>(fd.as_raw_fd(), parts, cmsgs, flags, None) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The broker's side: the queue and the doorbell, both ends of each, and the rings. It keeps
/// the workers' ends open too, so requests in the queue outlive any worker and wait for the
/// next one.
pub struct BrokerChannels {
    queue: OwnedFd,
    queue_for_workers: OwnedFd,
    doorbell: OwnedFd,
    doorbell_for_workers: OwnedFd,
    pub rings: Rings,
}

impl BrokerChannels {
    pub fn new() -> io::Result<BrokerChannels> {
        let (queue, queue_for_workers) = seqpacket_pair()?;
        let (doorbell, doorbell_for_workers) = seqpacket_pair()?;
        Ok(BrokerChannels {
            queue,
            queue_for_workers,
            doorbell,
            doorbell_for_workers,
            rings: Rings::new()?,
        })
    }

    /// The queue's writing end, to poll for room.
    pub fn queue_fd(&self) -> &OwnedFd {
        &self.queue
    }

    /// The doorbell, to poll while waiting for a record.
    pub fn doorbell_fd(&self) -> &OwnedFd {
        &self.doorbell
    }

    /// Silences the doorbell (the broker is awake and reads every ring).
    pub fn quiet_doorbell(&self) {
        let mut sink = [0u8; 16];
        while recv(self.doorbell.as_raw_fd(), &mut sink, MsgFlags::MSG_DONTWAIT)
            .is_ok_and(|n| n > 0)
        {}
    }

    /// Queues a request to be refused: its connection gets closed. The address at the
    /// message's start is all a worker needs.
    pub fn refuse(&self, seq: u64, msg: &[u8]) -> io::Result<bool> {
        self.send_frame(REFUSE, seq, &msg[..msg.len().min(1024)], &[])
    }

    /// Greets a new worker with its ring's number and the shared descriptors.
    pub fn welcome(&self, stream: &UnixStream, slot: usize) -> io::Result<()> {
        let mut greeting = [WELCOME; 5];
        greeting[1..].copy_from_slice(&(slot as u32).to_le_bytes());
        let fds = [
            self.queue_for_workers.as_raw_fd(),
            self.doorbell_for_workers.as_raw_fd(),
            self.rings.file().as_raw_fd(),
        ];
        let cmsgs = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&greeting)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// Queues a request; `Ok(false)` when the queue is full (poll `queue_fd` for room).
    pub fn enqueue(&self, seq: u64, msg: &[u8]) -> io::Result<bool> {
        if msg.len() <= INLINE_MAX {
            return self.send_frame(INLINE, seq, msg, &[]);
        }
        let mut file: File = nix::sys::memfd::memfd_create(
            c"wsgid-request",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?
        .into();
        file.write_all(msg)?;
        self.send_frame(IN_FILE, seq, &[], &[file.as_raw_fd()])
    }

    /// One frame of the queue: kind, sequence number, payload (see the constants).
    fn send_frame(&self, kind: u8, seq: u64, payload: &[u8], fds: &[RawFd]) -> io::Result<bool> {
        let mut header = [kind; QUEUE_HEADER];
        header[1..].copy_from_slice(&seq.to_le_bytes());
        send_datagram(
            &self.queue,
            &[IoSlice::new(&header), IoSlice::new(payload)],
            fds,
        )
    }
}

/// A worker's side of the link.
pub struct WorkerChannels {
    /// The stream to the broker: silent, readable only once the broker is gone.
    stream: UnixStream,
    queue: OwnedFd,
    doorbell: OwnedFd,
    ring: Ring,
    buf: Box<[u8]>,
}

/// What taking from the queue gave.
pub enum Taken {
    Request {
        seq: u64,
        msg: Vec<u8>,
        /// Close the request's connection instead of serving it (the client pipelined
        /// more requests than the broker holds for one connection).
        refuse: bool,
    },
    /// Nothing queued now.
    Empty,
    /// Nothing queued, ever again: the broker is gone.
    Closed,
}

/// Connects a worker to the link. The master holds the listener, also while its broker
/// (re)starts: the greeting comes when a broker accepts (poll the stream for it).
pub fn connect(name: &str) -> io::Result<UnixStream> {
    let stream = UnixStream::connect_addr(&address(name)?)?;
    check_peer(&stream)?;
    Ok(stream)
}

impl WorkerChannels {
    /// Receives the channels: reads the broker's greeting (blocking).
    pub fn receive(stream: UnixStream) -> io::Result<WorkerChannels> {
        let mut greeting = [0u8; 5];
        let mut cmsg = nix::cmsg_space!([RawFd; 3]);
        let mut iov = [IoSliceMut::new(&mut greeting)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let (fds, received) = (owned_fds(&msg)?, msg.bytes);
        let [queue, doorbell, rings]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|_| io::Error::other("the broker's greeting lacks its channels"))?;
        if received != greeting.len() || greeting[0] != WELCOME {
            return Err(io::Error::other("unexpected greeting from the broker"));
        }
        let slot = u32::from_le_bytes(greeting[1..].try_into().expect("4 bytes"));
        Ok(WorkerChannels {
            stream,
            queue,
            doorbell,
            ring: Ring::open(&rings, slot as usize)?,
            buf: vec![0u8; QUEUE_HEADER + INLINE_MAX].into_boxed_slice(),
        })
    }

    /// The queue's reading end, to poll for requests.
    pub fn queue_fd(&self) -> &OwnedFd {
        &self.queue
    }

    /// Takes the next request if one is queued (non-blocking), and records it as taken.
    pub fn take(&mut self) -> io::Result<Taken> {
        loop {
            let mut cmsg = nix::cmsg_space!([RawFd; 1]);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let (len, truncated, fds) = {
                let mut iov = [IoSliceMut::new(&mut self.buf)];
                let msg =
                    match recvmsg::<()>(self.queue.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                        Ok(msg) => msg,
                        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Taken::Empty),
                        Err(e) => return Err(e.into()),
                    };
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                (msg.bytes, truncated, owned_fds(&msg))
            };
            if len == 0 {
                return Ok(Taken::Closed);
            }
            if len < QUEUE_HEADER {
                tracing::error!("a short frame in the request queue, skipped");
                continue;
            }
            // Taken: recorded before anything else can fail, so the broker never waits on
            // a request that nobody serves.
            let seq = u64::from_le_bytes(self.buf[1..QUEUE_HEADER].try_into().expect("8 bytes"));
            self.record(Record::Took(seq));
            match self.unpack(len, truncated, fds) {
                Ok(msg) => {
                    let refuse = self.buf[0] == REFUSE;
                    return Ok(Taken::Request { seq, msg, refuse });
                }
                Err(e) => {
                    tracing::error!("a queued request was lost: {e}");
                    self.done(seq);
                }
            }
        }
    }

    fn unpack(
        &self,
        len: usize,
        truncated: bool,
        fds: io::Result<Vec<OwnedFd>>,
    ) -> io::Result<Vec<u8>> {
        if truncated {
            return Err(io::Error::other("the frame overran its buffer"));
        }
        match (self.buf[0], fds?.into_iter().next()) {
            (INLINE | REFUSE, _) => Ok(self.buf[QUEUE_HEADER..len].to_vec()),
            (IN_FILE, Some(fd)) => {
                let mut file = File::from(fd);
                file.rewind()?;
                let mut msg = Vec::new();
                file.read_to_end(&mut msg)?;
                Ok(msg)
            }
            _ => Err(io::Error::other("a malformed frame")),
        }
    }

    /// Records a request as done.
    pub fn done(&self, seq: u64) {
        self.record(Record::Done(seq));
    }

    fn record(&self, record: Record) {
        loop {
            match self.ring.write(record) {
                Written::Quietly => return,
                Written::RingDoorbell => return self.ring_doorbell(),
                // Only when the broker has read nothing for a thousand requests, or is gone.
                Written::Full if self.broker_gone() => return,
                Written::Full => {
                    self.ring_doorbell();
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// One byte is enough: the broker reads every ring when it wakes. A full doorbell has
    /// been rung already; a closed one has nobody left to hear it.
    fn ring_doorbell(&self) {
        let _ = send_datagram(&self.doorbell, &[IoSlice::new(b"!")], &[]);
    }

    /// Whether the broker has gone (its end of the stream closed).
    pub fn broker_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(
            recv(
                self.stream.as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK
            ),
            Err(Errno::EAGAIN)
        )
    }
}

/// Takes ownership of the descriptors a message carried, so none leaks.
fn owned_fds(msg: &nix::sys::socket::RecvMsg<'_, '_, ()>) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now, and
            // nothing else refers to them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (BrokerChannels, WorkerChannels, usize) {
        let name = format!(
            "wsgid-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let listener = listen(&name).unwrap();
        let mut broker = BrokerChannels::new().unwrap();
        let slot = broker.rings.allocate().unwrap();
        let joined = std::thread::spawn(move || connect(&name).and_then(WorkerChannels::receive));
        let (stream, _) = listener.accept().unwrap();
        assert_eq!(check_peer(&stream).unwrap() as u32, std::process::id());
        broker.welcome(&stream, slot).unwrap();
        let worker = joined.join().unwrap().unwrap();
        drop(stream);
        (broker, worker, slot)
    }

    fn take(worker: &mut WorkerChannels) -> (u64, Vec<u8>) {
        match worker.take().unwrap() {
            Taken::Request { seq, msg, .. } => (seq, msg),
            _ => panic!("nothing taken"),
        }
    }

    #[test]
    fn requests_inline_and_in_a_file_arrive_in_order_with_records() {
        let (broker, mut worker, slot) = pair();
        let big: Vec<u8> = (0..INLINE_MAX * 3).map(|i| (i % 251) as u8).collect();
        assert!(broker.enqueue(1, b"small").unwrap());
        assert!(broker.enqueue(2, &big).unwrap());
        assert!(
            matches!(worker.take().unwrap(), Taken::Request { seq: 1, ref msg, refuse: false } if msg == b"small")
        );
        worker.done(1);
        let (seq, msg) = take(&mut worker);
        assert_eq!((seq, msg == big), (2, true));
        assert!(matches!(worker.take().unwrap(), Taken::Empty));
        let mut records = Vec::new();
        broker.rings.read(slot, &mut |r| records.push(r));
        assert_eq!(records, [Record::Took(1), Record::Done(1), Record::Took(2)]);
        // Waiting for a record, the broker hears the doorbell.
        broker.rings.want_wake(true);
        worker.done(2);
        let mut bell = [0u8; 4];
        assert_eq!(
            recv(
                broker.doorbell_fd().as_raw_fd(),
                &mut bell,
                MsgFlags::MSG_DONTWAIT
            )
            .unwrap(),
            1
        );
        broker.quiet_doorbell();
        // The broker is gone (the link's stream was closed); queued requests remain.
        assert!(worker.broker_gone());
        assert!(broker.enqueue(3, b"last").unwrap());
        drop(broker);
        assert_eq!(take(&mut worker), (3, b"last".to_vec()));
        assert!(matches!(worker.take().unwrap(), Taken::Closed));
    }

    #[test]
    fn a_full_queue_says_so_and_loses_nothing() {
        let (broker, mut worker, _) = pair();
        let msg = vec![7u8; 1000];
        let mut queued = 0u64;
        while broker.enqueue(queued, &msg).unwrap() {
            queued += 1;
            assert!(queued < 100_000, "the queue never filled");
        }
        for seq in 0..queued {
            assert_eq!(take(&mut worker).0, seq);
        }
        assert!(matches!(worker.take().unwrap(), Taken::Empty));
    }
}

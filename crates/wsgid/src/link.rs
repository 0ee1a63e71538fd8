//! The broker ↔ worker link.
//!
//! Requests travel through one *shared queue*: a `SOCK_SEQPACKET` socket pair whose reading
//! end every worker holds. A worker takes the next request only when it is idle, so a fast
//! request never waits behind a slow one (design note 3), and a worker that stops simply stops
//! taking: nothing was assigned to it ahead of time, so nothing is lost (note 2). Under load a
//! worker finds its next request already queued and takes it without sleeping or asking.
//!
//! Workers write what they *took* and what they have *done* on a second shared pair, the
//! record channel. The broker reads it whenever it wakes anyway; it needs the records only to
//! keep the pipelined requests of one connection in order and to free those of a worker that
//! died, so they cost no wake-up.
//!
//! A worker connects to the broker's abstract Unix stream socket, and the broker answers with
//! one byte carrying the worker's ends of both pairs (`SCM_RIGHTS`). The stream then stays
//! silent; its end tells either side that the other is gone.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

use nix::errno::Errno;
use nix::sys::socket::{
    recv, recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockFlag, SockType,
};

/// Environment variable carrying the link's name from the master to broker and workers.
pub const LINK_ENV: &str = "WSGID_LINK";

/// The broker's greeting, which carries the channels.
const WELCOME: u8 = b'w';

/// Largest message carried in the queue itself. A datagram must fit the socket's send buffer
/// (`net.core.wmem_default`, 208 KiB here), so larger ones travel in a memfd.
const INLINE_MAX: usize = 64 * 1024;
/// A queued request: kind, sequence number (u64 LE), then the message when inline.
const INLINE: u8 = b'm';
const IN_FILE: u8 = b'f';
const QUEUE_HEADER: usize = 9;

/// A record: kind, the worker's pid (u32 LE), the request's sequence number (u64 LE).
const TOOK: u8 = b't';
const DONE: u8 = b'd';
const RECORD_LEN: usize = 13;
/// Records sent in one datagram at most.
const RECORDS_PER_DATAGRAM: usize = 256;

/// The link's name for a master: abstract, so nothing on disk to clean up or to reach
/// from inside a chroot.
pub fn name(master_pid: u32) -> String {
    format!("wsgid-{master_pid}")
}

fn address(name: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(name.as_bytes())
}

pub fn listen(name: &str) -> io::Result<UnixListener> {
    UnixListener::bind_addr(&address(name)?)
}

/// The peer of a link runs as us: the broker accepts only our workers, a worker talks only
/// to our broker. Other local users cannot read requests or feed forged ones. Returns the
/// peer's pid.
pub fn check_peer(stream: &UnixStream) -> io::Result<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let us = nix::unistd::geteuid().as_raw();
    if peer.uid() != us {
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

/// The broker's side: both pairs, whole. It keeps the workers' ends open too, so requests in
/// the queue outlive any worker and wait for the next one.
pub struct BrokerChannels {
    queue: OwnedFd,
    queue_for_workers: OwnedFd,
    records: OwnedFd,
    records_for_workers: OwnedFd,
    buf: Vec<u8>,
}

/// What a worker recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Took { pid: i32, seq: u64 },
    Done { pid: i32, seq: u64 },
}

impl BrokerChannels {
    pub fn new() -> io::Result<BrokerChannels> {
        let (queue, queue_for_workers) = seqpacket_pair()?;
        let (records, records_for_workers) = seqpacket_pair()?;
        Ok(BrokerChannels {
            queue,
            queue_for_workers,
            records,
            records_for_workers,
            buf: vec![0; RECORD_LEN * RECORDS_PER_DATAGRAM],
        })
    }

    /// The queue's writing end, to poll for room.
    pub fn queue_fd(&self) -> &OwnedFd {
        &self.queue
    }

    /// The records' reading end, to poll while a held-back request waits for one.
    pub fn records_fd(&self) -> &OwnedFd {
        &self.records
    }

    /// Greets a new worker with its ends of both pairs.
    pub fn welcome(&self, stream: &UnixStream) -> io::Result<()> {
        let fds = [
            self.queue_for_workers.as_raw_fd(),
            self.records_for_workers.as_raw_fd(),
        ];
        let cmsgs = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&[WELCOME])],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// Queues a request; `Ok(false)` when the queue is full (poll `queue_fd` for room).
    pub fn enqueue(&self, seq: u64, msg: &[u8]) -> io::Result<bool> {
        let mut header = [0u8; QUEUE_HEADER];
        header[1..].copy_from_slice(&seq.to_le_bytes());
        if msg.len() <= INLINE_MAX {
            header[0] = INLINE;
            return send_datagram(
                &self.queue,
                &[IoSlice::new(&header), IoSlice::new(msg)],
                &[],
            );
        }
        header[0] = IN_FILE;
        let mut file: File = nix::sys::memfd::memfd_create(
            c"wsgid-request",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?
        .into();
        file.write_all(msg)?;
        send_datagram(&self.queue, &[IoSlice::new(&header)], &[file.as_raw_fd()])
    }

    /// The records written since the last call (non-blocking).
    pub fn records(&mut self) -> io::Result<Vec<Record>> {
        let mut found = Vec::new();
        loop {
            let n = match recv(
                self.records.as_raw_fd(),
                &mut self.buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(found),
                Err(e) => return Err(e.into()),
            };
            found.extend(self.buf[..n].chunks_exact(RECORD_LEN).filter_map(decode));
        }
    }
}

fn decode(raw: &[u8]) -> Option<Record> {
    let pid = i32::from_le_bytes(raw[1..5].try_into().ok()?);
    let seq = u64::from_le_bytes(raw[5..13].try_into().ok()?);
    match raw[0] {
        TOOK => Some(Record::Took { pid, seq }),
        DONE => Some(Record::Done { pid, seq }),
        _ => None,
    }
}

/// A worker's side of the link.
pub struct WorkerChannels {
    /// The stream to the broker: silent, readable only once the broker is gone.
    stream: UnixStream,
    queue: OwnedFd,
    records: OwnedFd,
    /// Records not sent yet: sent with the next take, or before sleeping.
    pending: Vec<u8>,
    pid: [u8; 4],
    buf: Box<[u8]>,
}

/// What taking from the queue gave.
pub enum Taken {
    Request {
        seq: u64,
        msg: Vec<u8>,
    },
    /// Nothing queued now.
    Empty,
    /// Nothing queued, ever again: the broker is gone.
    Closed,
}

impl WorkerChannels {
    /// Connects to the broker and receives the channels.
    pub fn join(name: &str) -> io::Result<WorkerChannels> {
        let stream = UnixStream::connect_addr(&address(name)?)?;
        check_peer(&stream)?;
        let mut byte = [0u8; 1];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let fds = owned_fds(&msg)?;
        let [queue, records]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|_| io::Error::other("the broker's greeting lacks its channels"))?;
        if byte[0] != WELCOME {
            return Err(io::Error::other("unexpected greeting from the broker"));
        }
        Ok(WorkerChannels {
            stream,
            queue,
            records,
            pending: Vec::new(),
            pid: (std::process::id() as i32).to_le_bytes(),
            buf: vec![0u8; QUEUE_HEADER + INLINE_MAX].into_boxed_slice(),
        })
    }

    /// The queue's reading end, to poll for requests.
    pub fn queue_fd(&self) -> &OwnedFd {
        &self.queue
    }

    /// The record channel, to poll for room while records are pending.
    pub fn records_fd(&self) -> &OwnedFd {
        &self.records
    }

    pub fn has_pending_records(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the next request if one is queued (non-blocking), and records it as taken.
    pub fn take(&mut self) -> io::Result<Taken> {
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let (len, file) = {
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            let msg = match recvmsg::<()>(self.queue.as_raw_fd(), &mut iov, Some(&mut cmsg), flags)
            {
                Ok(msg) => msg,
                Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Taken::Empty),
                Err(e) => return Err(e.into()),
            };
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                return Err(io::Error::other("a queued request overran its frame"));
            }
            (msg.bytes, owned_fds(&msg)?.into_iter().next())
        };
        if len == 0 {
            return Ok(Taken::Closed);
        }
        if len < QUEUE_HEADER {
            return Err(io::Error::other("a short frame in the request queue"));
        }
        let seq = u64::from_le_bytes(self.buf[1..QUEUE_HEADER].try_into().expect("8 bytes"));
        self.record(TOOK, seq);
        let msg = match (self.buf[0], file) {
            (INLINE, _) => self.buf[QUEUE_HEADER..len].to_vec(),
            (IN_FILE, Some(fd)) => {
                let mut file = File::from(fd);
                file.rewind()?;
                let mut msg = Vec::new();
                file.read_to_end(&mut msg)?;
                msg
            }
            _ => return Err(io::Error::other("a malformed frame in the request queue")),
        };
        self.flush_records()?;
        Ok(Taken::Request { seq, msg })
    }

    /// Records a request as done; sent with the next take, or by `flush_records`.
    pub fn done(&mut self, seq: u64) {
        self.record(DONE, seq);
    }

    fn record(&mut self, kind: u8, seq: u64) {
        self.pending.push(kind);
        self.pending.extend_from_slice(&self.pid);
        self.pending.extend_from_slice(&seq.to_le_bytes());
    }

    /// Sends the pending records (non-blocking: what does not fit waits for the next call).
    pub fn flush_records(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(RECORD_LEN * RECORDS_PER_DATAGRAM);
            match send_datagram(&self.records, &[IoSlice::new(&self.pending[..n])], &[]) {
                Ok(true) => drop(self.pending.drain(..n)),
                Ok(false) => return Ok(()),
                // The broker has gone, and with it whoever would read the records.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.pending.clear(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
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

    fn pair() -> (BrokerChannels, WorkerChannels) {
        let name = format!(
            "wsgid-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let listener = listen(&name).unwrap();
        let broker = BrokerChannels::new().unwrap();
        let joined = std::thread::spawn(move || WorkerChannels::join(&name).unwrap());
        let (stream, _) = listener.accept().unwrap();
        assert_eq!(check_peer(&stream).unwrap() as u32, std::process::id());
        broker.welcome(&stream).unwrap();
        let worker = joined.join().unwrap();
        drop(stream);
        (broker, worker)
    }

    fn take(worker: &mut WorkerChannels) -> (u64, Vec<u8>) {
        match worker.take().unwrap() {
            Taken::Request { seq, msg } => (seq, msg),
            _ => panic!("nothing taken"),
        }
    }

    #[test]
    fn requests_inline_and_in_a_file_arrive_in_order_with_records() {
        let (mut broker, mut worker) = pair();
        let big: Vec<u8> = (0..INLINE_MAX * 3).map(|i| (i % 251) as u8).collect();
        assert!(broker.enqueue(1, b"small").unwrap());
        assert!(broker.enqueue(2, &big).unwrap());
        assert!(
            matches!(worker.take().unwrap(), Taken::Request { seq: 1, ref msg } if msg == b"small")
        );
        worker.done(1);
        let (seq, msg) = take(&mut worker);
        assert_eq!((seq, msg == big), (2, true));
        assert!(matches!(worker.take().unwrap(), Taken::Empty));
        worker.flush_records().unwrap();
        let pid = std::process::id() as i32;
        assert_eq!(
            broker.records().unwrap(),
            [
                Record::Took { pid, seq: 1 },
                Record::Done { pid, seq: 1 },
                Record::Took { pid, seq: 2 },
            ]
        );
        // The broker is gone (the link's stream was closed); queued requests remain.
        assert!(worker.broker_gone());
        assert!(broker.enqueue(3, b"last").unwrap());
        drop(broker);
        assert_eq!(take(&mut worker), (3, b"last".to_vec()));
        assert!(matches!(worker.take().unwrap(), Taken::Closed));
    }

    #[test]
    fn a_full_queue_says_so_and_loses_nothing() {
        let (broker, mut worker) = pair();
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

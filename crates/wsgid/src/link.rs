//! The broker ↔ worker link: a Unix stream socket in the abstract namespace, with a framing
//! small enough to read at a glance. No ZeroMQ on this hop: a request costs one write and one
//! read, not two I/O-thread round trips.
//!
//! worker → broker: single bytes, `READY` (idle: send one request) and `BYE` (stopping).
//! broker → worker: `REQUEST` + u32 little-endian length + the mongrel2 message verbatim,
//! or `ACK` (answer to BYE; nothing follows it).

use std::io::{self, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

pub const READY: u8 = b'r';
pub const BYE: u8 = b'b';
pub const REQUEST: u8 = b'q';
pub const ACK: u8 = b'a';

/// Environment variable carrying the link's name from the master to broker and workers.
pub const LINK_ENV: &str = "WSGID_LINK";

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

/// Connects to the broker; refuses a listener run by another user (an abstract socket
/// name can be taken by anyone on the host).
pub fn connect(name: &str) -> io::Result<UnixStream> {
    let stream = UnixStream::connect_addr(&address(name)?)?;
    check_peer(&stream)?;
    Ok(stream)
}

/// The peer of a link runs as us: the broker accepts only our workers, a worker talks only
/// to our broker. Other local users cannot read requests or feed forged ones.
pub fn check_peer(stream: &UnixStream) -> io::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let us = nix::unistd::geteuid().as_raw();
    if peer.uid() != us {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("link peer runs as uid {}, not {us}", peer.uid()),
        ));
    }
    Ok(())
}

/// Writes a request frame with one `write` (a copy of the message costs less than a
/// second system call).
pub fn send_request(stream: &mut UnixStream, msg: &[u8]) -> io::Result<()> {
    let len = u32::try_from(msg.len()).map_err(|_| io::Error::other("request over 4 GiB"))?;
    let mut frame = Vec::with_capacity(5 + msg.len());
    frame.push(REQUEST);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(msg);
    stream.write_all(&frame)
}

/// What a worker reads from the broker.
pub enum FromBroker {
    Request(Vec<u8>),
    Ack,
}

/// Reads one frame (blocking). `Ok(None)` is the end of the stream: the broker is gone.
pub fn read_frame(stream: &mut impl Read) -> io::Result<Option<FromBroker>> {
    let mut kind = [0u8; 1];
    match stream.read_exact(&mut kind) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    match kind[0] {
        ACK => Ok(Some(FromBroker::Ack)),
        REQUEST => {
            let mut len = [0u8; 4];
            stream.read_exact(&mut len)?;
            let mut msg = vec![0u8; u32::from_le_bytes(len) as usize];
            stream.read_exact(&mut msg)?;
            Ok(Some(FromBroker::Request(msg)))
        }
        other => Err(io::Error::other(format!(
            "unknown frame {other:#x} from the broker"
        ))),
    }
}

//! The two ZeroMQ peers wsgid needs, written directly on a socket (ZMTP 3.0, NULL
//! mechanism): a PUB connected to mongrel2's SUB (replies) and a PULL connected to its PUSH
//! (requests).
//!
//! Why not libzmq here: measured with perf, a third of a worker's CPU per hello request went
//! to libzmq's I/O thread waking up to forward each reply, and the broker paid the same to
//! receive each request. Connecting to one peer and exchanging single-frame messages is a
//! small protocol: a 64-byte greeting each way, one READY command each way, then
//! length-prefixed frames. Each process now reads and writes its socket itself; a full
//! socket blocks the writer, which is the back-pressure libzmq's `XPUB_NODROP` gave.
//!
//! We announce ZMTP 3.0, so a libzmq SUB sends its subscriptions as messages (`\x01` +
//! prefix); the first one tells us mongrel2 listens (a reply before it would be dropped).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const SIGNATURE_END: u8 = 0x7F;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

/// Our greeting: signature, version 3.0, mechanism NULL, as-server 0, filler.
pub fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xFF;
    g[8] = 1;
    g[9] = SIGNATURE_END;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Checks a peer's greeting: a ZMTP 3.x peer using the NULL mechanism.
pub fn check_greeting(g: &[u8; 64]) -> io::Result<()> {
    let bad = |what: &str| Err(io::Error::other(format!("ZMTP greeting: {what}")));
    if g[0] != 0xFF || g[9] != SIGNATURE_END {
        return bad("not a ZeroMQ peer");
    }
    if g[10] < 3 {
        return bad("peer speaks ZMTP before 3.0");
    }
    if &g[12..16] != b"NULL" || g[16..32].iter().any(|&b| b != 0) {
        return bad("peer wants a security mechanism other than NULL");
    }
    Ok(())
}

/// Appends one frame (flags + size + body) to `out`.
pub fn push_frame(out: &mut Vec<u8>, flags: u8, body_len: usize) {
    if body_len <= 255 {
        out.extend_from_slice(&[flags, body_len as u8]);
    } else {
        out.push(flags | FLAG_LONG);
        out.extend_from_slice(&(body_len as u64).to_be_bytes());
    }
}

/// Our READY command: `Socket-Type: <socket_type>`.
pub fn ready_command(socket_type: &[u8]) -> Vec<u8> {
    let mut body = b"\x05READY".to_vec();
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type);
    let mut out = Vec::with_capacity(body.len() + 2);
    push_frame(&mut out, FLAG_COMMAND, body.len());
    out.extend_from_slice(&body);
    out
}

/// Reads one frame: `(flags, body)`, refusing bodies over `max` bytes.
fn read_frame(stream: &mut impl Read, max: u64) -> io::Result<(u8, Vec<u8>)> {
    let mut flags = [0u8; 1];
    stream.read_exact(&mut flags)?;
    let len = if flags[0] & FLAG_LONG != 0 {
        let mut len = [0u8; 8];
        stream.read_exact(&mut len)?;
        u64::from_be_bytes(len)
    } else {
        let mut len = [0u8; 1];
        stream.read_exact(&mut len)?;
        u64::from(len[0])
    };
    if len > max {
        return Err(io::Error::other(format!(
            "ZMTP frame of {len} bytes: over {max}"
        )));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    Ok((flags[0], body))
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(spec: &str) -> io::Result<Stream> {
        if let Some(address) = spec.strip_prefix("tcp://") {
            let stream = TcpStream::connect(address)?;
            stream.set_nodelay(true)?;
            Ok(Stream::Tcp(stream))
        } else if let Some(path) = spec.strip_prefix("ipc://") {
            Ok(Stream::Unix(UnixStream::connect(path)?))
        } else {
            Err(io::Error::other(format!(
                "{spec}: replies need a tcp:// or ipc:// endpoint"
            )))
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// Connects and completes the handshake as a `socket_type` peer.
fn open(spec: &str, socket_type: &[u8]) -> io::Result<Stream> {
    let mut stream = Stream::connect(spec)?;
    stream.write_all(&greeting())?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut peer = [0u8; 64];
    stream.read_exact(&mut peer)?;
    check_greeting(&peer)?;
    stream.write_all(&ready_command(socket_type))?;
    let (flags, body) = read_frame(&mut stream, 1 << 16)?;
    if flags & FLAG_COMMAND == 0 || !body.starts_with(b"\x05READY") {
        return Err(io::Error::other("ZMTP: expected READY from the peer"));
    }
    Ok(stream)
}

/// Tries `attempt` every 100 ms until it succeeds (mongrel2 may start after us), warning
/// once after 2 s, until `give_up()` says stop.
fn retry<T>(
    spec: &str,
    what: &str,
    give_up: impl Fn() -> bool,
    mut attempt: impl FnMut() -> io::Result<T>,
) -> anyhow::Result<T> {
    let since = Instant::now();
    let mut warned = false;
    loop {
        anyhow::ensure!(
            !give_up(),
            "stopped before mongrel2 was reachable at {spec}"
        );
        match attempt() {
            Ok(value) => return Ok(value),
            Err(e) => {
                if !warned && since.elapsed() > Duration::from_secs(2) {
                    tracing::warn!("waiting for mongrel2 to {what} on {spec}: {e}");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A connected, subscribed PUB.
pub struct Publisher {
    spec: String,
    stream: Option<Stream>,
    frame: Vec<u8>,
    /// When the connection was last checked; checked again only after `RECHECK`.
    checked: Instant,
    /// What mongrel2 subscribed to (its `recv_ident`): replies not starting with it are
    /// silently dropped by mongrel2, so we say so once.
    subscription: Vec<u8>,
    warned_prefix: bool,
}

/// How often `send` checks that mongrel2 is still there. A restarted mongrel2 comes back
/// (and our broker reconnects to it) far slower than this.
const RECHECK: Duration = Duration::from_millis(10);

impl Publisher {
    /// Connects to `spec` and completes the handshake; returns once the SUB peer has
    /// subscribed. Retries until `give_up()` says stop.
    pub fn connect(spec: &str, give_up: impl Fn() -> bool) -> anyhow::Result<Publisher> {
        let mut publisher = Publisher {
            spec: spec.to_string(),
            stream: None,
            frame: Vec::with_capacity(64 * 1024),
            checked: Instant::now(),
            subscription: Vec::new(),
            warned_prefix: false,
        };
        retry(spec, "accept replies", give_up, || publisher.handshake())?;
        Ok(publisher)
    }

    fn handshake(&mut self) -> io::Result<()> {
        self.stream = None;
        let mut stream = open(&self.spec, b"PUB")?;
        // A subscription (a message starting with 1) means mongrel2 now listens to us.
        loop {
            let (flags, body) = read_frame(&mut stream, 1 << 16)?;
            if flags & FLAG_COMMAND == 0 && body.first() == Some(&1) {
                self.subscription = body[1..].to_vec();
                break;
            }
        }
        stream.set_read_timeout(None)?;
        self.stream = Some(stream);
        self.warned_prefix = false;
        Ok(())
    }

    /// Publishes `prefix + payload` as one single-frame message. A connection that mongrel2
    /// closed (it restarted) is re-established first; a reply that cannot be sent is an error.
    pub fn send(&mut self, prefix: &[u8], payload: &[u8]) -> io::Result<()> {
        if self.stream.is_none() || self.checked.elapsed() >= RECHECK {
            self.checked = Instant::now();
            if !self.alive() {
                tracing::warn!(spec = %self.spec, "reply connection to mongrel2 lost; reconnecting");
                self.handshake()?;
            }
        }
        if !prefix.starts_with(&self.subscription) && !self.warned_prefix {
            self.warned_prefix = true;
            tracing::error!(
                subscribed = %String::from_utf8_lossy(&self.subscription),
                "mongrel2 drops replies that do not start with its recv_ident; set the \
                 handler's recv_ident to '' or to a prefix of its send_ident"
            );
        }
        self.frame.clear();
        push_frame(&mut self.frame, 0, prefix.len() + payload.len());
        self.frame.extend_from_slice(prefix);
        let stream = self.stream.as_mut().expect("connected above");
        // Large payloads are written from where they are, not copied.
        let result = if payload.len() > 64 * 1024 {
            stream
                .write_all(&self.frame)
                .and_then(|()| stream.write_all(payload))
        } else {
            self.frame.extend_from_slice(payload);
            stream.write_all(&self.frame)
        };
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    /// Whether the connection is still up: reads what the SUB peer sent (subscription
    /// changes) without blocking; end of stream means mongrel2 went away. One `recv` with
    /// MSG_DONTWAIT, so a healthy connection costs a single cheap system call.
    fn alive(&mut self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::{AsFd, AsRawFd};
        let Some(stream) = self.stream.as_ref() else {
            return false;
        };
        let fd = stream.as_fd().as_raw_fd();
        let mut sink = [0u8; 512];
        loop {
            match recv(fd, &mut sink, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(nix::errno::Errno::EAGAIN) => return true,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A connected PULL: reads mongrel2's requests, one message per frame.
pub struct Puller {
    reader: io::BufReader<Stream>,
}

/// Largest request message accepted (mongrel2 spools bodies over `limits.content_length`
/// to files, so messages stay small unless that limit is raised very far).
const MAX_REQUEST: u64 = 1 << 30;

impl Puller {
    /// Connects to `spec`, retrying until it answers or `give_up()` says stop.
    pub fn connect(spec: &str, give_up: impl Fn() -> bool) -> anyhow::Result<Puller> {
        let stream = retry(spec, "send requests", give_up, || {
            let stream = open(spec, b"PULL")?;
            stream.set_read_timeout(None)?;
            Ok(stream)
        })?;
        Ok(Puller {
            reader: io::BufReader::with_capacity(256 * 1024, stream),
        })
    }

    /// Half-closes the connection: mongrel2 sees the end of our stream, stops sending to us
    /// and closes its side; what it had already sent can still be read.
    pub fn shutdown_write(&self) {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = self.reader.get_ref().as_fd().as_raw_fd();
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
    }

    /// Whether a message (or part of one) is already read and waiting.
    pub fn buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    /// The next message (blocks until it is complete); `None` when mongrel2 closed.
    pub fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut message: Option<Vec<u8>> = None;
        loop {
            let (flags, body) = match read_frame(&mut self.reader, MAX_REQUEST) {
                Ok(frame) => frame,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            };
            if flags & FLAG_COMMAND != 0 {
                continue; // e.g. a PING from a peer with heartbeats: nothing to do
            }
            match message.as_mut() {
                Some(parts) => parts.extend_from_slice(&body),
                None => message = Some(body),
            }
            if flags & 0x01 == 0 {
                return Ok(message);
            }
        }
    }
}

impl std::os::fd::AsFd for Puller {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.reader.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_short_and_long() {
        let mut out = Vec::new();
        push_frame(&mut out, 0, 3);
        assert_eq!(out, [0, 3]);
        out.clear();
        push_frame(&mut out, 0, 300);
        assert_eq!(out, [FLAG_LONG, 0, 0, 0, 0, 0, 0, 1, 44]);
        let mut input: &[u8] = &[0, 2, 1, b'a'];
        assert_eq!(read_frame(&mut input, 10).unwrap(), (0, vec![1, b'a']));
        let mut input: &[u8] = &[0, 20];
        assert!(read_frame(&mut input, 10).is_err());
    }

    #[test]
    fn greets_as_zmtp_30_null() {
        let g = greeting();
        check_greeting(&g).unwrap();
        let mut other = g;
        other[12..16].copy_from_slice(b"PLAI");
        assert!(check_greeting(&other).is_err());
        let ready = ready_command(b"PUB");
        assert_eq!(&ready[..2], &[FLAG_COMMAND, 25]);
        assert!(ready.ends_with(b"Socket-Type\x00\x00\x00\x03PUB"));
    }

    /// Against the real libzmq: a SUB bound as mongrel2 binds it receives what we publish.
    /// (libzmq sends its subscription only while its owner uses the socket, as mongrel2
    /// does all the time: so the publisher runs in a thread while this one receives.)
    #[test]
    fn talks_to_a_libzmq_sub() {
        let context = zmq::Context::new();
        let sub = context.socket(zmq::SUB).unwrap();
        sub.set_subscribe(b"").unwrap();
        sub.set_rcvtimeo(10_000).unwrap();
        sub.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = sub.get_last_endpoint().unwrap().unwrap();
        let big = vec![b'x'; 200_000];
        let sent = big.clone();
        let publisher = std::thread::spawn(move || {
            let mut publisher = Publisher::connect(&endpoint, || false).unwrap();
            publisher
                .send(b"uuid 1:7, ", b"HTTP/1.1 200 OK\r\n\r\n")
                .unwrap();
            publisher.send(b"uuid 1:7, ", &sent).unwrap();
        });
        assert_eq!(
            sub.recv_bytes(0).unwrap(),
            b"uuid 1:7, HTTP/1.1 200 OK\r\n\r\n"
        );
        let got = sub.recv_bytes(0).unwrap();
        assert_eq!(got.len(), 10 + big.len());
        assert!(got.starts_with(b"uuid 1:7, xxx"));
        assert!(!sub.get_rcvmore().unwrap());
        publisher.join().unwrap();
    }

    /// Against the real libzmq: a PUSH bound as mongrel2 binds it delivers to our PULL.
    #[test]
    fn pulls_from_a_libzmq_push() {
        let context = zmq::Context::new();
        let push = context.socket(zmq::PUSH).unwrap();
        push.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = push.get_last_endpoint().unwrap().unwrap();
        let mut puller = Puller::connect(&endpoint, || false).unwrap();
        let big = vec![b'y'; 300_000];
        push.send(&b"u 1 /p 2:{},0:,"[..], 0).unwrap();
        push.send(&big, 0).unwrap();
        assert_eq!(puller.recv().unwrap().unwrap(), b"u 1 /p 2:{},0:,");
        assert_eq!(puller.recv().unwrap().unwrap(), big);
        drop(push);
        drop(context);
        assert_eq!(puller.recv().unwrap(), None);
    }
}

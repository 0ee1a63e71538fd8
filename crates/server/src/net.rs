//! Where clients connect: TCP (IPv4, IPv6) or a Unix stream socket (`unix:PATH`, for a
//! proxy on the same host). One type each for listeners and streams, so the loop and the
//! connections do not care which.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use mio::event::Source;
use mio::{Interest, Registry, Token};

pub enum Listener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

pub enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

/// A Unix socket's client has no address: it is on this host, and counts as local.
const UNIX_PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

impl Listener {
    /// Takes over a listening socket made elsewhere (the master binds, so that the address
    /// outlives a restarted front end), by its address family.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        let socket = socket2::Socket::from(fd);
        socket.set_nonblocking(true)?;
        let unix = socket.local_addr()?.domain() == socket2::Domain::UNIX;
        Ok(if unix {
            Listener::Unix(mio::net::UnixListener::from_std(socket.into()))
        } else {
            Listener::Tcp(mio::net::TcpListener::from_std(socket.into()))
        })
    }

    pub fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, remote) = l.accept()?;
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), remote))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| (Stream::Unix(s), UNIX_PEER)),
        }
    }
}

impl Stream {
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
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

/// Both kinds register as themselves.
macro_rules! delegate_source {
    ($ty:ident) => {
        impl Source for $ty {
            fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
                match self {
                    $ty::Tcp(s) => s.register(r, t, i),
                    $ty::Unix(s) => s.register(r, t, i),
                }
            }

            fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
                match self {
                    $ty::Tcp(s) => s.reregister(r, t, i),
                    $ty::Unix(s) => s.reregister(r, t, i),
                }
            }

            fn deregister(&mut self, r: &Registry) -> io::Result<()> {
                match self {
                    $ty::Tcp(s) => s.deregister(r),
                    $ty::Unix(s) => s.deregister(r),
                }
            }
        }
    };
}

delegate_source!(Listener);
delegate_source!(Stream);

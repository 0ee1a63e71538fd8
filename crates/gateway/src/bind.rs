//! `--bind`: the addresses one-command mode serves HTTP on, in gunicorn's forms
//! (`HOST:PORT`, `[IPV6]:PORT`, `HOST` for port 8000, `unix:PATH`). The master binds them
//! before it drops privileges (so port 80 works when started as root) and holds them, so a
//! restarted front end finds its clients' connections waiting in the backlog.

use std::net::ToSocketAddrs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use anyhow::Context;
use socket2::{Domain, SockAddr, Socket, Type};

/// gunicorn's default port.
const DEFAULT_PORT: u16 = 8000;
/// Connections waiting to be accepted (gunicorn's default is 2048).
const BACKLOG: i32 = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl Address {
    pub fn parse(text: &str) -> Result<Address, String> {
        let bad = |why: &str| format!("invalid --bind {text:?}: {why}");
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a path"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address is written [ADDRESS]:PORT"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(bad("expected :PORT after ]")),
                },
            }
        } else {
            match text.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(bad("write an IPv6 address as [ADDRESS]:PORT"))
                }
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
        };
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        Ok(Address::Tcp {
            host: host.to_string(),
            port,
        })
    }

    /// A listening socket, close-on-exec (the master lends it to its front end on purpose).
    pub fn listen(&self) -> anyhow::Result<OwnedFd> {
        let socket = match self {
            Address::Tcp { host, port } => {
                let address = (host.as_str(), *port)
                    .to_socket_addrs()
                    .with_context(|| format!("cannot resolve {host}"))?
                    .next()
                    .with_context(|| format!("{host}: no address"))?;
                let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                if address.is_ipv6() {
                    socket.set_only_v6(true)?;
                }
                socket
                    .bind(&address.into())
                    .with_context(|| format!("cannot listen on {address}"))?;
                socket
            }
            Address::Unix(path) => {
                remove_stale_socket(path)?;
                let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
                socket
                    .bind(&SockAddr::unix(path)?)
                    .with_context(|| format!("cannot listen on unix:{}", path.display()))?;
                socket
            }
        };
        socket.listen(BACKLOG)?;
        Ok(socket.into())
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A socket file left by a server that is gone is removed; one a live server listens on is
/// an error, as is any other file there.
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    anyhow::ensure!(
        meta.file_type().is_socket(),
        "cannot listen on unix:{}: a file that is not a socket is there",
        path.display()
    );
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "cannot listen on unix:{}: another server listens there",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
}

/// Binds every address, in order; the first failure is the error.
pub fn listen_all(addresses: &[String]) -> anyhow::Result<Vec<OwnedFd>> {
    addresses
        .iter()
        .map(|a| Address::parse(a).map_err(anyhow::Error::msg)?.listen())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn reads_gunicorns_forms() {
        assert_eq!(Address::parse("127.0.0.1:8080"), Ok(tcp("127.0.0.1", 8080)));
        assert_eq!(Address::parse("localhost"), Ok(tcp("localhost", 8000)));
        assert_eq!(Address::parse(":9000"), Ok(tcp("0.0.0.0", 9000)));
        assert_eq!(Address::parse("[::1]:8000"), Ok(tcp("::1", 8000)));
        assert_eq!(Address::parse("[::]"), Ok(tcp("::", 8000)));
        assert_eq!(
            Address::parse("unix:/run/app.sock"),
            Ok(Address::Unix("/run/app.sock".into()))
        );
        for bad in [
            "::1:8000",
            "host:port",
            "unix:",
            "[::1",
            "[::1]8000",
            "h:70000",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(tcp("::1", 80).to_string(), "[::1]:80");
    }

    #[test]
    fn a_stale_unix_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let address = Address::Unix(path.clone());
        let live = address.listen().unwrap();
        let err = address.listen().unwrap_err().to_string();
        assert!(err.contains("another server"), "{err}");
        drop(live);
        address.listen().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        assert!(Address::Unix(dir.path().join("f")).listen().is_err());
    }
}

//! The access log in mongrel2's format: one tnetstring list per line (host, remote address,
//! remote port, time, method, path, version, status, bytes), so `m2sh access` reads it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use m2wire::netstring::{write, write_framed, write_tagged};

/// Buffered, flushed at most every 200 ms or 64 KiB: one write per line would cost more
/// than a hello request.
pub struct AccessLog {
    path: std::path::PathBuf,
    file: File,
    buf: Vec<u8>,
    flushed: Instant,
}

pub struct Entry<'a> {
    pub host: &'a str,
    pub remote: std::net::SocketAddr,
    /// `remote`'s address as the connection spelled it once.
    pub remote_ip: &'a str,
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub version: &'a [u8],
    pub status: u16,
    pub bytes: u64,
}

impl AccessLog {
    pub fn open(path: &Path) -> io::Result<AccessLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AccessLog {
            path: path.to_path_buf(),
            file,
            buf: Vec::with_capacity(64 * 1024),
            flushed: Instant::now(),
        })
    }

    pub fn log(&mut self, e: &Entry) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // Numbers are tnetstring integers (`#`).
        let number = |list: &mut Vec<u8>, n: u64| {
            write_tagged(list, itoa::Buffer::new().format(n).as_bytes(), b'#')
        };
        write_framed(&mut self.buf, b']', |list| {
            write(list, e.host.as_bytes());
            write(list, e.remote_ip.as_bytes());
            number(list, e.remote.port().into());
            number(list, now);
            write(list, e.method);
            write(list, e.path);
            write(list, e.version);
            number(list, e.status.into());
            number(list, e.bytes);
        });
        self.buf.push(b'\n');
        if self.buf.len() > 64 * 1024 {
            self.flush();
        }
    }

    /// Writes what is buffered if it has waited long enough.
    pub fn tick(&mut self) {
        if !self.buf.is_empty() && self.flushed.elapsed() > Duration::from_millis(200) {
            self.flush();
        }
    }

    /// After logrotate moved the file away (SIGHUP, as mongrel2 does it).
    pub fn reopen(&mut self) {
        self.flush();
        match OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            Ok(file) => self.file = file,
            Err(e) => tracing::warn!("cannot reopen the access log {}: {e}", self.path.display()),
        }
    }

    pub fn flush(&mut self) {
        if let Err(e) = self.file.write_all(&self.buf) {
            tracing::warn!("access log: {e}");
        }
        self.buf.clear();
        self.flushed = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_mongrel2s_tnetstring_list() {
        let dir = std::env::temp_dir().join(format!("wsgid-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let mut log = AccessLog::open(&path).unwrap();
        log.log(&Entry {
            host: "localhost",
            remote: "127.0.0.1:51234".parse().unwrap(),
            remote_ip: "127.0.0.1",
            method: b"GET",
            path: b"/x",
            version: b"HTTP/1.1",
            status: 200,
            bytes: 13,
        });
        log.flush();
        let line = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let (len, rest) = line.split_once(':').unwrap();
        let list = rest.strip_suffix("]\n").unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), list.len());
        let (start, end) = list.split_at(list.find("#").unwrap() + 1);
        assert_eq!(start, "9:localhost,9:127.0.0.1,5:51234#");
        let (time, end) = end.split_once('#').unwrap();
        assert_eq!(time.split_once(':').unwrap().1.len(), 10);
        assert_eq!(end, "3:GET,2:/x,8:HTTP/1.1,3:200#2:13#");
    }
}

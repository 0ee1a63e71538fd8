//! The access log in mongrel2's format: one tnetstring list per line (host, remote address,
//! remote port, time, method, path, version, status, bytes), so `m2sh access` reads it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use m2wire::netstring::{write, write_tagged};

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
        let mut list = Vec::with_capacity(128);
        write(&mut list, e.host.as_bytes());
        write(&mut list, e.remote.ip().to_string().as_bytes());
        write_tagged(&mut list, e.remote.port().to_string().as_bytes(), b'#');
        write_tagged(&mut list, now.to_string().as_bytes(), b'#');
        write(&mut list, e.method);
        write(&mut list, e.path);
        write(&mut list, e.version);
        write_tagged(&mut list, e.status.to_string().as_bytes(), b'#');
        write_tagged(&mut list, e.bytes.to_string().as_bytes(), b'#');
        write_tagged(&mut self.buf, &list, b']');
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

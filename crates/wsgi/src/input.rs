//! `wsgi.input`: the request body as a read-only binary file.
//!
//! Small bodies come inline in the mongrel2 message and are read from memory; large ones
//! were spooled by mongrel2 to a temp file and are read from it through a fixed buffer, so
//! memory stays flat whatever the body size. Reads never go past the declared body and
//! return `b''` at its end, as PEP 3333 asks.

use std::cell::Cell;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use pyo3::exceptions::PyOSError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// Read-buffer size for spooled bodies: large enough for few syscalls, small enough that a
/// gigabyte upload costs no more memory than a hello-world request.
const FILE_BUFFER: usize = 64 * 1024;

pub enum Body {
    Memory {
        data: Vec<u8>,
        end: usize,
        pos: usize,
    },
    File {
        file: File,
        remaining: u64,
        buf: Box<[u8]>,
        lo: usize,
        hi: usize,
        /// A file lent for this request only: once the flag says the request is over, the
        /// file holds another request's body, and it is not read again.
        lent_until: Option<Rc<Cell<bool>>>,
    },
}

impl Body {
    /// The inline body: bytes `start..end` of the mongrel2 message (kept, not copied).
    pub fn inline(data: Vec<u8>, start: usize, end: usize) -> Body {
        Body::Memory {
            data,
            end,
            pos: start,
        }
    }

    pub fn file(file: File, len: u64) -> Body {
        Body::File {
            file,
            remaining: len,
            buf: vec![0; FILE_BUFFER].into_boxed_slice(),
            lo: 0,
            hi: 0,
            lent_until: None,
        }
    }

    /// A file lent for the request: read only until `over` is set.
    pub fn lent_file(file: File, len: u64, over: Rc<Cell<bool>>) -> Body {
        let mut body = Body::file(file, len);
        if let Body::File { lent_until, .. } = &mut body {
            *lent_until = Some(over);
        }
        body
    }

    /// Buffered bytes, refilled from the file when empty; empty at the end of the body.
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        match self {
            Body::Memory { data, end, pos } => Ok(&data[*pos..*end]),
            Body::File {
                file,
                remaining,
                buf,
                lo,
                hi,
                lent_until,
            } => {
                check_lent(lent_until)?;
                if lo == hi && *remaining > 0 {
                    let want = buf
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    let n = file.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(short_body());
                    }
                    *remaining -= n as u64;
                    *lo = 0;
                    *hi = n;
                }
                Ok(&buf[*lo..*hi])
            }
        }
    }

    /// With nothing buffered, a read of at least a buffer's worth from a file goes straight
    /// into the bytes object returned, not through the buffer: `None` when that does not
    /// apply.
    fn read_file_direct<'py>(
        &mut self,
        py: Python<'py>,
        limit: Option<usize>,
    ) -> Option<PyResult<Bound<'py, PyBytes>>> {
        let Body::File {
            file,
            remaining,
            lo,
            hi,
            lent_until,
            ..
        } = self
        else {
            return None;
        };
        let want = limit.map_or(*remaining, |l| (l as u64).min(*remaining));
        if lo != hi || want < FILE_BUFFER as u64 {
            return None;
        }
        if let Err(e) = check_lent(lent_until) {
            return Some(Err(io_err(e)));
        }
        let read = read_bytes(py, file, want as usize);
        if read.is_ok() {
            *remaining -= want;
        }
        Some(read)
    }

    fn consume(&mut self, n: usize) {
        match self {
            Body::Memory { pos, .. } => *pos += n,
            Body::File { lo, .. } => *lo += n,
        }
    }

    /// Reads up to `limit` bytes (all if `None`), stopping after `stop_at` when given.
    fn read_until(
        &mut self,
        limit: Option<usize>,
        stop_at: Option<u8>,
    ) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let want = limit.map_or(usize::MAX, |l| l - out.len());
            if want == 0 {
                break;
            }
            let available = self.fill_buf()?;
            if available.is_empty() {
                break;
            }
            let mut take = available.len().min(want);
            let mut done = false;
            if let Some(byte) = stop_at {
                if let Some(i) = available[..take].iter().position(|&b| b == byte) {
                    take = i + 1;
                    done = true;
                }
            }
            out.extend_from_slice(&available[..take]);
            self.consume(take);
            if done {
                break;
            }
        }
        Ok(out)
    }
}

fn check_lent(lent_until: &Option<Rc<Cell<bool>>>) -> std::io::Result<()> {
    if lent_until.as_ref().is_some_and(|over| over.get()) {
        return Err(std::io::Error::other(
            "the request is over: its body can no longer be read",
        ));
    }
    Ok(())
}

#[pyclass(module = "wsgid", unsendable)]
pub struct Input {
    body: Body,
}

impl Input {
    pub fn new(body: Body) -> Self {
        Input { body }
    }
}

fn size_arg(size: Option<isize>) -> Option<usize> {
    size.and_then(|s| usize::try_from(s).ok())
}

/// The body's file or pipe ended before the length the request declared.
fn short_body() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "upload file is shorter than the request body",
    )
}

fn io_err(e: std::io::Error) -> PyErr {
    PyOSError::new_err(format!("wsgi.input: {e}"))
}

/// `len` bytes of `file` in a new bytes object, written once: `PyBytes::new_with` zeroes the
/// object first, which on 1 MiB bodies cost a tenth of a worker's time (memset and the page
/// faults it takes).
fn read_bytes<'py>(py: Python<'py>, file: &File, len: usize) -> PyResult<Bound<'py, PyBytes>> {
    // SAFETY: with a null source, PyBytes_FromStringAndSize returns a new bytes object of
    // `len` uninitialised bytes (or NULL on failure, an error here), which only this function
    // holds until it returns: its bytes are written through a raw pointer, never read or seen
    // as a Rust reference, and the object reaches Python only once every byte is written (on
    // an error it is dropped unseen).
    unsafe {
        let object = ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as ffi::Py_ssize_t);
        let bytes = Bound::from_owned_ptr_or_err(py, object)?.cast_into_unchecked::<PyBytes>();
        let base = ffi::PyBytes_AsString(bytes.as_ptr()).cast::<u8>();
        let mut done = 0;
        while done < len {
            match libc::read(file.as_raw_fd(), base.add(done).cast(), len - done) {
                0 => return Err(io_err(short_body())),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(io_err(e));
                    }
                }
            }
        }
        Ok(bytes)
    }
}

#[pymethods]
impl Input {
    /// read(size=-1): at most `size` bytes; everything left when `size` is negative or None.
    #[pyo3(signature = (size = None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let limit = size_arg(size);
        if let Some(read) = self.body.read_file_direct(py, limit) {
            return read;
        }
        // Fast path: the answer is already contiguous in the buffer (always for inline bodies).
        let in_memory = matches!(self.body, Body::Memory { .. });
        let available = self.body.fill_buf().map_err(io_err)?;
        if in_memory || limit.is_some_and(|l| l <= available.len()) {
            let take = limit.map_or(available.len(), |l| l.min(available.len()));
            let bytes = PyBytes::new(py, &available[..take]);
            self.body.consume(take);
            return Ok(bytes);
        }
        let data = self.body.read_until(limit, None).map_err(io_err)?;
        Ok(PyBytes::new(py, &data))
    }

    /// readline(size=-1): up to and including the next b"\n".
    #[pyo3(signature = (size = None))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = self
            .body
            .read_until(size_arg(size), Some(b'\n'))
            .map_err(io_err)?;
        Ok(PyBytes::new(py, &data))
    }

    /// readlines(hint=-1): lines until their total size reaches `hint`.
    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(
        &mut self,
        py: Python<'py>,
        hint: Option<isize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let hint = size_arg(hint).filter(|&h| h > 0);
        let lines = PyList::empty(py);
        let mut total = 0;
        loop {
            let line = self.body.read_until(None, Some(b'\n')).map_err(io_err)?;
            if line.is_empty() {
                break;
            }
            total += line.len();
            lines.append(PyBytes::new(py, &line))?;
            if hint.is_some_and(|h| total >= h) {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.readline(py, None)?;
        Ok((!line.as_bytes().is_empty()).then_some(line))
    }

    fn readable(&self) -> bool {
        true
    }

    fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A body of `declared` bytes whose pipe carries `sent` (then closes), as a lent pipe does.
    fn piped(sent: &[u8], declared: u64) -> Input {
        let (read, write) = nix::unistd::pipe().unwrap();
        let sent = sent.to_vec();
        std::thread::spawn(move || File::from(write).write_all(&sent).unwrap());
        Input::new(Body::file(File::from(read), declared))
    }

    #[test]
    fn large_reads_return_the_bytes_sent() {
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        Python::attach(|py| {
            let mut input = piped(&sent, sent.len() as u64);
            let first = input.read(py, Some(200_000)).unwrap();
            assert_eq!(first.as_bytes(), &sent[..200_000]);
            let rest = input.read(py, None).unwrap();
            assert_eq!(rest.as_bytes(), &sent[200_000..]);
            assert!(input.read(py, None).unwrap().as_bytes().is_empty());
        });
    }

    #[test]
    fn a_body_shorter_than_declared_is_an_error() {
        Python::attach(|py| {
            let mut input = piped(&[b'x'; 100_000], 150_000);
            let err = input.read(py, Some(150_000)).unwrap_err();
            assert!(
                err.to_string().contains("shorter than the request body"),
                "{err}"
            );
        });
    }
}

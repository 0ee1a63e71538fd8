//! A read buffer zeroed once, not on every read: a `Vec` resized before each `read` and
//! truncated after memsets the whole read size each time (a 64 KiB memset per reply, 1 MiB
//! per read of a large request, measured as the broker's largest user-space cost).

/// Bytes `start..end` are read and not yet consumed; `end..` is room for the next read.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The size it returns to once empty, after a large message made it grow.
    base: usize,
}

impl ReadBuf {
    pub fn new(base: usize) -> ReadBuf {
        ReadBuf {
            buf: vec![0; base],
            start: 0,
            end: 0,
            base,
        }
    }

    /// What is read and not consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.clear();
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        if self.buf.len() > self.base {
            self.buf = vec![0; self.base];
        }
    }

    /// Room for at least `want` more bytes after the unconsumed ones (moved to the front
    /// first when that makes room), to read into; then call `filled`.
    pub fn space(&mut self, want: usize) -> &mut [u8] {
        if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into `space`.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_consumes_compacts_grows_and_shrinks() {
        let mut b = ReadBuf::new(8);
        b.space(4)[..6].copy_from_slice(b"abcdef");
        b.filled(6);
        b.consume(4);
        assert_eq!(b.data(), b"ef");
        // 6 more do not fit after "ef" at 4..6: moved to the front, then room.
        let room = b.space(6);
        assert!(room.len() >= 6);
        room[..6].copy_from_slice(b"ghijkl");
        b.filled(6);
        assert_eq!(b.data(), b"efghijkl");
        b.space(100)[..3].copy_from_slice(b"mno");
        b.filled(3);
        assert_eq!(b.data(), b"efghijklmno");
        b.consume(11);
        assert!(b.is_empty());
        assert_eq!(b.buf.len(), 8);
    }
}

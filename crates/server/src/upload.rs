//! Request bodies over `limits.content_length`, spooled to a file made from the
//! `upload.temp_store` mkstemp template, as mongrel2 does: the handler gets an upload-start
//! message naming the file, then an upload-done message once it is complete, and deletes it.
//! The path in the messages is relative to the chroot, as the handler expects.

use std::cell::Cell;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Most spool files a pool keeps (as many bodies as wrk's 64 connections send at once), and
/// the largest body it takes (nginx's default limit for a whole body, so: most bodies); a
/// larger one gets a file of its own, removed by the worker as mongrel2's are, and named to
/// the app. At most 64 MiB of page cache stays with the pool.
const POOL_FILES: usize = 64;
pub const POOL_BODY_MAX: u64 = 1 << 20;
/// Most orphaned files kept (see `SpoolPool::orphan`): a request whose client left while
/// it waited is dropped unserved, and no `done` ever claims its file, so orphans must not
/// take the pool from the bodies arriving.
const MAX_ORPHANS: usize = POOL_FILES / 4;
/// Writes are gathered up to this; a larger read from the socket goes to the file as it is,
/// without a copy through the buffer.
const WRITE_BUFFER: usize = 64 * 1024;

pub struct Spool {
    file: io::BufWriter<File>,
    /// From a `SpoolPool`: the file is rewritten for later bodies, not removed.
    pooled: Option<PooledFile>,
    /// Where the file is for us.
    host_path: PathBuf,
    /// What the messages say: the path inside the chroot.
    pub message_path: String,
    pub written: u64,
    /// The complete file went to the handler, whose it is to delete.
    handed_off: bool,
}

/// An upload that was refused, abandoned or could not be written is nobody else's: every
/// way a spool can end without `finish` removes its file.
impl Drop for Spool {
    fn drop(&mut self) {
        // A pooled file removes itself when dropped.
        if !self.handed_off && self.pooled.is_none() {
            if let Err(e) = std::fs::remove_file(&self.host_path) {
                tracing::warn!("cannot remove {}: {e}", self.host_path.display());
            }
        }
    }
}

impl Spool {
    /// A new file from `template` (`/tmp/upload.XXXXXX`), under `root` (the chroot as seen
    /// from here; `/` once chrooted), with `mode`.
    pub fn create(template: &str, root: &Path, mode: u32) -> io::Result<Spool> {
        let host_path = root.join(template.trim_start_matches('/'));
        let mut bytes = CString::new(host_path.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("NUL in upload.temp_store"))?
            .into_bytes_with_nul();
        // SAFETY: `bytes` is a NUL-terminated template that mkostemp rewrites in place.
        let fd = unsafe { libc::mkostemp(bytes.as_mut_ptr().cast(), libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: mkostemp returned a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        bytes.pop();
        let host_path = PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        let generated = &bytes[bytes.len() - 6..];
        let message_path = format!(
            "{}{}",
            &template[..template.len() - 6],
            String::from_utf8_lossy(generated)
        );
        Ok(Spool {
            file: io::BufWriter::with_capacity(WRITE_BUFFER, file),
            pooled: None,
            host_path,
            message_path,
            written: 0,
            handed_off: false,
        })
    }

    /// A pooled file, written again from its start.
    fn reuse(pooled: PooledFile) -> io::Result<Spool> {
        let mut file = pooled.file.try_clone()?;
        file.rewind()?;
        Ok(Spool {
            file: io::BufWriter::with_capacity(WRITE_BUFFER, file),
            host_path: pooled.host_path.clone(),
            message_path: pooled.message_path.clone(),
            pooled: Some(pooled),
            written: 0,
            handed_off: false,
        })
    }

    /// From a pool: lent with its request, and taken back.
    pub fn is_pooled(&self) -> bool {
        self.pooled.is_some()
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        self.file.write_all(data)
    }

    /// Moves `len` bytes waiting in `pipe` to the file, after what was written before.
    pub fn splice_from(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<()> {
        self.file.flush()?;
        let mut left = len;
        while left > 0 {
            let flags = nix::fcntl::SpliceFFlags::SPLICE_F_MOVE;
            match nix::fcntl::splice(pipe, None, self.file.get_ref(), None, left, flags) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.written += len as u64;
        Ok(())
    }

    /// The body is complete: the file is flushed and closed, the handler's to delete; or,
    /// from a pool, cut to this body and lent to the handler (give it back once the
    /// response is complete).
    pub fn finish(mut self) -> io::Result<Option<PooledFile>> {
        self.file.flush()?;
        if let Some(pooled) = &self.pooled {
            pooled.file.set_len(self.written)?;
        }
        self.handed_off = true;
        Ok(self.pooled.take())
    }

    /// The upload was refused or abandoned: the file goes (as when dropped).
    pub fn remove(self) {}
}

/// One-command mode's spool files, kept and written again: a fresh file costs the kernel a
/// page allocation (and here, ext4's block reservation) for every 4 KiB of every body, more
/// than copying the body in; a file written again reuses its pages. A pooled file is lent
/// with its request (the message says `UPLOAD_LENT`: the worker reads it, neither removes
/// nor shows it to the app, and stops reading it when the response is complete); it is
/// given back only once its response is complete, and removed instead whenever its
/// connection closes first, so no later body can be read for an earlier request.
pub struct SpoolPool {
    free: Vec<PooledFile>,
    /// Lent files of connections that closed while their request was out, by connection
    /// id, oldest first: their workers may not have opened them yet.
    orphans: std::collections::VecDeque<(u64, PooledFile)>,
    /// Pooled files in existence: free, in a spool, or lent.
    live: Rc<Cell<usize>>,
}

/// A spool file of a pool; removed when dropped.
pub struct PooledFile {
    file: File,
    host_path: PathBuf,
    message_path: String,
    dev: u64,
    ino: u64,
    live: Rc<Cell<usize>>,
}

impl Drop for PooledFile {
    fn drop(&mut self) {
        self.live.set(self.live.get() - 1);
        if self.still_there() {
            if let Err(e) = std::fs::remove_file(&self.host_path) {
                tracing::warn!("cannot remove {}: {e}", self.host_path.display());
            }
        }
    }
}

impl PooledFile {
    /// Its name still names it (nothing replaced it there).
    fn still_there(&self) -> bool {
        std::fs::symlink_metadata(&self.host_path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino)
    }
}

impl Default for SpoolPool {
    fn default() -> SpoolPool {
        SpoolPool {
            free: Vec::new(),
            orphans: std::collections::VecDeque::new(),
            live: Rc::new(Cell::new(0)),
        }
    }
}

impl SpoolPool {
    /// A spool for a body of `len` bytes: a pooled file when the body is small enough and
    /// the pool has one (or room for one), else a file of its own.
    pub fn take(&mut self, template: &str, root: &Path, mode: u32, len: u64) -> io::Result<Spool> {
        if len > POOL_BODY_MAX {
            return Spool::create(template, root, mode);
        }
        while let Some(pooled) = self.free.pop() {
            if pooled.still_there() {
                return Spool::reuse(pooled);
            }
        }
        let mut spool = Spool::create(template, root, mode)?;
        if self.live.get() < POOL_FILES {
            let meta = spool.file.get_ref().metadata()?;
            self.live.set(self.live.get() + 1);
            spool.pooled = Some(PooledFile {
                file: spool.file.get_ref().try_clone()?,
                host_path: spool.host_path.clone(),
                message_path: spool.message_path.clone(),
                dev: meta.dev(),
                ino: meta.ino(),
                live: Rc::clone(&self.live),
            });
        }
        Ok(spool)
    }

    /// A lent file whose response is complete: its next body may be written.
    pub fn give_back(&mut self, pooled: PooledFile) {
        self.free.push(pooled);
    }

    /// The connection `id` closed while its request, with `pooled`, was out: the file waits
    /// for that request's `done` (`claim_orphan`). The oldest orphan past the limit is
    /// removed (safe: a worker reading it keeps its own descriptor; only reuse is not).
    pub fn orphan(&mut self, id: u64, pooled: PooledFile) {
        if self.orphans.len() == MAX_ORPHANS {
            self.orphans.pop_front();
        }
        self.orphans.push_back((id, pooled));
    }

    /// The request of closed connection `id` is done: its file, if still kept, is free.
    pub fn claim_orphan(&mut self, id: u64) {
        if let Some(at) = self.orphans.iter().position(|(c, _)| *c == id) {
            let (_, pooled) = self.orphans.remove(at).expect("found");
            self.give_back(pooled);
        }
    }
}

/// One-command mode's bodies that fit a pipe (up to 1 MiB, the size an unprivileged
/// process may give one): each goes to the worker in a pipe of its own, sent with its
/// request. The socket's pages move into the pipe (`splice`) and the worker reads them out:
/// no copy here and no file, where a spool file costs a copy into the page cache (half the
/// front end's CPU per 1 MiB POST). A pipe carries one body and is never reused.
#[derive(Default)]
pub struct RequestPipes {
    /// Pipes whose request is not complete yet, and the pages they may hold.
    held: Rc<Cell<Held>>,
    /// Numbers the pipes: the broker gives a pipe only to the request that names it.
    next_serial: u64,
}

#[derive(Clone, Copy, Default)]
struct Held {
    pipes: usize,
    pages: usize,
}

/// Most pipes whose requests are not complete (the broker holds as many); past this,
/// bodies go to files.
pub const MAX_PIPES: usize = 64;
/// Most pages those pipes may hold: 56 MiB, under the 64 MiB past which the kernel gives an
/// unprivileged user's new pipes (the app's too) two pages only (`pipe-user-pages-soft`).
const MAX_PIPE_PAGES: usize = 56 * 256;
const PIPE_BODY_MAX: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A body's pipe being filled: the request goes out with the read end.
pub struct RequestPipe {
    read: OwnedFd,
    write: OwnedFd,
    pub written: u64,
    pub serial: u64,
    ticket: PipeTicket,
}

/// Counts a pipe as held until its request is complete (or its connection closed).
pub struct PipeTicket {
    held: Rc<Cell<Held>>,
    pages: usize,
}

impl Drop for PipeTicket {
    fn drop(&mut self) {
        let held = self.held.get();
        self.held.set(Held {
            pipes: held.pipes - 1,
            pages: held.pages - self.pages,
        });
    }
}

impl RequestPipes {
    /// A pipe for a body of `len` bytes, if one may be had; else the body goes to a file.
    pub fn take(&mut self, len: u64) -> Option<RequestPipe> {
        // A slot holds at most a page, and spliced network segments fill it only in part
        // (1448 bytes of an Ethernet frame's payload): slots for three times the body,
        // within the largest pipe.
        let size = (len * 3).clamp(PAGE, PIPE_BODY_MAX);
        let pages = (size / PAGE).next_power_of_two() as usize;
        let held = self.held.get();
        if len > PIPE_BODY_MAX || held.pipes >= MAX_PIPES || held.pages + pages > MAX_PIPE_PAGES {
            return None;
        }
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        // The worker's end blocks: the body is in whole before the worker reads.
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ok()?;
        fcntl(&write, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).ok()?;
        let got = fcntl(&write, FcntlArg::F_SETPIPE_SZ(i32::try_from(size).ok()?)).ok()?;
        if (got as u64) < len {
            return None;
        }
        let pages = got as usize / PAGE as usize;
        self.held.set(Held {
            pipes: held.pipes + 1,
            pages: held.pages + pages,
        });
        self.next_serial += 1;
        Some(RequestPipe {
            read,
            write,
            written: 0,
            serial: self.next_serial,
            ticket: PipeTicket {
                held: Rc::clone(&self.held),
                pages,
            },
        })
    }
}

impl RequestPipe {
    /// The end body bytes go in at (spliced from the socket).
    pub fn input(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// Bytes already read from the socket (with the head) go in by a copy.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match nix::unistd::write(&self.write, data) {
                Ok(n) => {
                    data = &data[n..];
                    self.written += n as u64;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The body is in: the ticket, to hold until the request is complete, and the end the
    /// worker reads, to go with the request. The write end closes here, before the request
    /// goes out, so the worker meets the body's end.
    pub fn finish(self) -> (PipeTicket, OwnedFd) {
        (self.ticket, self.read)
    }

    /// What was written so far goes to `spool` instead (the pipe filled before the body
    /// was in: spliced socket pages may fill its slots only in part).
    pub fn spill(self, spool: &mut Spool) -> io::Result<()> {
        spool.splice_from(self.read.as_fd(), self.written as usize)
    }
}

/// Checks the template at start, so that a bad one is an error then, not on the first
/// large upload.
pub fn check_template(template: &str, root: &Path) -> Result<(), String> {
    if !template.ends_with("XXXXXX") {
        return Err(format!(
            "upload.temp_store {template:?} must end with XXXXXX"
        ));
    }
    let dir = root.join(template.trim_start_matches('/'));
    let dir = dir.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(format!(
            "upload.temp_store {template:?}: directory {} does not exist",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spools_with_the_mode_and_a_chroot_relative_name() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("tmp")).unwrap();
        check_template("/tmp/upload.XXXXXX", root.path()).unwrap();
        assert!(check_template("/tmp/upload", root.path()).is_err());
        assert!(check_template("/nodir/upload.XXXXXX", root.path()).is_err());
        let mut spool = Spool::create("/tmp/upload.XXXXXX", root.path(), 0o640).unwrap();
        assert!(spool.message_path.starts_with("/tmp/upload."));
        assert_eq!(spool.message_path.len(), "/tmp/upload.XXXXXX".len());
        spool.write(b"hello ").unwrap();
        spool.write(b"world").unwrap();
        let on_disk = root.path().join(spool.message_path.trim_start_matches('/'));
        spool.finish().unwrap();
        assert_eq!(std::fs::read(&on_disk).unwrap(), b"hello world");
        assert_eq!(std::fs::metadata(&on_disk).unwrap().mode() & 0o777, 0o640);
        let other = Spool::create("/tmp/upload.XXXXXX", root.path(), 0o600).unwrap();
        let other_path = root.path().join(other.message_path.trim_start_matches('/'));
        other.remove();
        assert!(!other_path.exists());
    }

    fn spooled(pool: &mut SpoolPool, root: &Path, body: &[u8]) -> (PathBuf, Option<PooledFile>) {
        let mut spool = pool
            .take("/upload.XXXXXX", root, 0o600, body.len() as u64)
            .unwrap();
        let path = root.join(spool.message_path.trim_start_matches('/'));
        spool.write(body).unwrap();
        (path, spool.finish().unwrap())
    }

    #[test]
    fn a_pooled_file_takes_the_next_body_only_once_given_back_and_exactly_it() {
        let root = tempfile::tempdir().unwrap();
        let mut pool = SpoolPool::default();
        let (first, lent) = spooled(&mut pool, root.path(), &[1u8; 5000]);
        let lent = lent.expect("pooled");
        // Lent: the next body gets another file.
        let (second, other) = spooled(&mut pool, root.path(), b"other");
        assert_ne!(first, second);
        pool.give_back(lent);
        let (again, lent) = spooled(&mut pool, root.path(), b"short");
        assert_eq!(again, first);
        assert_eq!(
            std::fs::read(&first).unwrap(),
            b"short",
            "no tail of the last body"
        );
        // Dropped (its connection closed first): removed, never reused.
        drop(lent);
        assert!(!first.exists());
        drop(other);
        assert!(!second.exists());
        assert_eq!(pool.live.get(), 0);
    }

    #[test]
    fn a_pooled_file_moved_away_or_replaced_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let mut pool = SpoolPool::default();
        let (path, lent) = spooled(&mut pool, root.path(), b"kept by the app");
        let moved = root.path().join("kept");
        std::fs::rename(&path, &moved).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        pool.give_back(lent.unwrap());
        let (next, _lent) = spooled(&mut pool, root.path(), b"next body");
        assert_ne!(next, path);
        assert_eq!(std::fs::read(&moved).unwrap(), b"kept by the app");
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    #[test]
    fn large_bodies_and_bodies_past_the_pools_size_get_files_of_their_own() {
        let root = tempfile::tempdir().unwrap();
        let mut pool = SpoolPool::default();
        let big = vec![0u8; POOL_BODY_MAX as usize + 1];
        let (_, lent) = spooled(&mut pool, root.path(), &big);
        assert!(lent.is_none());
        let held: Vec<_> = (0..POOL_FILES)
            .map(|_| spooled(&mut pool, root.path(), b"x").1.expect("pooled"))
            .collect();
        assert!(spooled(&mut pool, root.path(), b"x").1.is_none());
        drop(held);
        assert_eq!(pool.live.get(), 0);
    }

    #[test]
    fn orphans_never_hold_the_pool_from_new_bodies() {
        let root = tempfile::tempdir().unwrap();
        let mut pool = SpoolPool::default();
        for id in 0..POOL_FILES as u64 {
            let (_, lent) = spooled(&mut pool, root.path(), b"left behind");
            pool.orphan(id, lent.expect("pooled"));
        }
        let mut held: Vec<_> = (0..POOL_FILES / 2)
            .map(|_| spooled(&mut pool, root.path(), b"x").1.expect("pooled"))
            .collect();
        while let (_, Some(lent)) = spooled(&mut pool, root.path(), b"x") {
            held.push(lent);
        }
        // The pool is full now. A claimed orphan (the newest is still kept) takes the next
        // body; one long removed is nothing to claim.
        pool.claim_orphan(0);
        assert!(spooled(&mut pool, root.path(), b"y").1.is_none());
        pool.claim_orphan(POOL_FILES as u64 - 1);
        let (path, lent) = spooled(&mut pool, root.path(), b"y");
        assert!(lent.is_some() && path.exists());
    }
}

//! Request bodies over `limits.content_length`, spooled to a file made from the
//! `upload.temp_store` mkstemp template, as mongrel2 does: the handler gets an upload-start
//! message naming the file, then an upload-done message once it is complete, and deletes it.
//! The path in the messages is relative to the chroot, as the handler expects.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub struct Spool {
    file: io::BufWriter<File>,
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
        if !self.handed_off {
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
            file: io::BufWriter::with_capacity(256 * 1024, file),
            host_path,
            message_path,
            written: 0,
            handed_off: false,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        self.file.write_all(data)
    }

    /// The body is complete: the file is flushed and closed, the handler's to delete.
    pub fn finish(mut self) -> io::Result<()> {
        self.file.flush()?;
        self.handed_off = true;
        Ok(())
    }

    /// The upload was refused or abandoned: the file goes (as when dropped).
    pub fn remove(self) {}
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
    use std::os::unix::fs::MetadataExt;

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
}

//! mongrel2 temp-file uploads, trusted only when they are genuine.
//!
//! A client can send `X-Mongrel2-Upload-Start/Done` itself (reference §2.5); the original
//! wsgid then opened, and afterwards deleted, whatever path the client named. Here an upload
//! is genuine only when start and done agree, the message body is empty, the request
//! declares a body, the path matches `upload.temp_store` (when configured) and names a
//! regular file under mongrel2's chroot, opened without following a symlink.

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use server::front::lend::UPLOAD_LENT;

use m2wire::Request;

/// What the gateway knows about where mongrel2 spools uploads.
#[derive(Debug, Clone)]
pub struct UploadPolicy {
    /// mongrel2's chroot as seen from here (`/` when both see the same tree).
    pub chroot: PathBuf,
    /// mongrel2's `upload.temp_store`, e.g. `/tmp/upload.XXXXXX`.
    pub template: Option<String>,
    pub max_body_size: Option<u64>,
}

/// Why an upload message is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a genuine mongrel2 upload: answered 400, no file touched.
    Forged(&'static str),
    /// Larger than `--max-body-size`: answered 413 at start, mongrel2 deletes the file.
    TooLarge { declared: u64, limit: u64 },
}

/// Why a genuine-looking upload cannot be served.
#[derive(Debug)]
pub enum OpenError {
    Refused(Refusal),
    /// The file is gone or unreadable: a 5xx, not the client's fault.
    Unavailable(io::Error),
}

/// An opened upload: the file, its size, and its identity for a safe unlink.
#[derive(Debug)]
pub struct UploadFile {
    pub file: File,
    /// The path as mongrel2 named it (chroot-relative).
    pub named: Vec<u8>,
    /// The path on this host.
    pub path: PathBuf,
    pub size: u64,
    /// Lent by the front end from its pool of spool files (`UPLOAD_LENT`): read for this
    /// request only, never removed here, and its name not shown to the app.
    pub lent: bool,
    dev: u64,
    ino: u64,
}

impl UploadPolicy {
    pub fn from_settings(settings: &crate::config::Settings) -> UploadPolicy {
        UploadPolicy {
            chroot: settings.mongrel2_chroot.clone(),
            template: settings.upload_temp_store.clone(),
            max_body_size: settings.max_body_size,
        }
    }

    /// Where a path mongrel2 named lives here, if it can be one of its temp files.
    pub fn locate(&self, path: &[u8]) -> Result<PathBuf, Refusal> {
        match &self.template {
            Some(template) if matches_template(path, template.as_bytes()) => self.resolve(path),
            _ => Err(Refusal::Forged(
                "not a path of mongrel2's upload.temp_store",
            )),
        }
    }

    /// Structural checks shared by both messages.
    fn check(&self, req: &Request<'_>, path: &[u8]) -> Result<(), Refusal> {
        if !req.body.is_empty() {
            return Err(Refusal::Forged(
                "upload headers on a request with an inline body",
            ));
        }
        if !req.declares_body() {
            return Err(Refusal::Forged(
                "upload headers on a request that declares no body",
            ));
        }
        // Without mongrel2's template there is no telling its files from others a client
        // names: uploads are then refused, never trusted.
        if self.template.is_none() {
            return Err(Refusal::Forged(
                "uploads need --upload-temp-store (mongrel2's upload.temp_store)",
            ));
        }
        self.locate(path).map(drop)
    }

    /// The upload-start message: accept (send nothing) or refuse.
    pub fn admit(&self, req: &Request<'_>, path: &[u8]) -> Result<(), Refusal> {
        self.check(req, path)?;
        self.check_size(req.content_length().unwrap_or(0))
    }

    /// `--max-body-size`, checked on the declared length at start and on the file at done
    /// (a client can finish sending before the refusal at start reaches mongrel2).
    pub fn check_size(&self, size: u64) -> Result<(), Refusal> {
        match self.max_body_size {
            Some(limit) if size > limit => Err(Refusal::TooLarge {
                declared: size,
                limit,
            }),
            _ => Ok(()),
        }
    }

    /// The upload-done message: opens the spooled body.
    pub fn open(&self, req: &Request<'_>, path: &[u8]) -> Result<UploadFile, OpenError> {
        self.check(req, path).map_err(OpenError::Refused)?;
        let host_path = self.resolve(path).map_err(OpenError::Refused)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&host_path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => {
                    OpenError::Refused(Refusal::Forged("upload path is a symlink"))
                }
                // mongrel2 names the file inside its chroot: a wrong --mongrel2-chroot finds
                // nothing, and mongrel2's temp files pile up where it wrote them.
                Some(libc::ENOENT) => OpenError::Unavailable(io::Error::new(
                    e.kind(),
                    format!(
                        "{} does not exist: is --mongrel2-chroot ({}) mongrel2's chroot? The \
                         file stays where mongrel2 wrote it until that option is right",
                        host_path.display(),
                        self.chroot.display()
                    ),
                )),
                _ => OpenError::Unavailable(e),
            })?;
        let meta = file.metadata().map_err(OpenError::Unavailable)?;
        if !meta.file_type().is_file() {
            return Err(OpenError::Refused(Refusal::Forged(
                "upload path is not a regular file",
            )));
        }
        Ok(UploadFile {
            file,
            named: path.to_vec(),
            path: host_path,
            size: meta.len(),
            lent: req.header(UPLOAD_LENT) == Some(b"1"),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// `chroot + path`, refusing anything that could leave the chroot.
    fn resolve(&self, path: &[u8]) -> Result<PathBuf, Refusal> {
        let relative = Path::new(std::ffi::OsStr::from_bytes(path));
        if !relative.is_absolute() {
            return Err(Refusal::Forged("upload path is not absolute"));
        }
        let mut resolved = self.chroot.clone();
        for component in relative.components() {
            match component {
                Component::RootDir => {}
                Component::Normal(part) => resolved.push(part),
                _ => return Err(Refusal::Forged("upload path has '.' or '..' components")),
            }
        }
        Ok(resolved)
    }
}

impl UploadFile {
    /// Removes the temp file, unless the app moved it away (`wsgid.upload_path` lets it):
    /// only the very file we opened is unlinked, never a new one under the same name.
    pub fn remove(&self) -> io::Result<()> {
        if self.lent {
            return Ok(());
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                std::fs::remove_file(&self.path)
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether `path` is what mkstemp makes of `template`: the same bytes, with the trailing
/// `X`s replaced by the same number of `[A-Za-z0-9]`.
pub fn matches_template(path: &[u8], template: &[u8]) -> bool {
    let stem_len = template.len() - template.iter().rev().take_while(|&&b| b == b'X').count();
    let suffix_len = template.len() - stem_len;
    path.len() == template.len()
        && suffix_len >= 6
        && path[..stem_len] == template[..stem_len]
        && path[stem_len..].iter().all(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &str, body: &str) -> Vec<u8> {
        let mut msg = b"u 1 /up ".to_vec();
        m2wire::netstring::write(&mut msg, headers.as_bytes());
        m2wire::netstring::write(&mut msg, body.as_bytes());
        msg
    }

    #[test]
    fn template_matching() {
        assert!(matches_template(
            b"/tmp/upload.kX28Qe",
            b"/tmp/upload.XXXXXX"
        ));
        assert!(!matches_template(
            b"/tmp/upload.kX28Q",
            b"/tmp/upload.XXXXXX"
        ));
        assert!(!matches_template(
            b"/etc/passwd.kX28Qe",
            b"/tmp/upload.XXXXXX"
        ));
        assert!(!matches_template(
            b"/tmp/upload/../x1",
            b"/tmp/upload.XXXXXX"
        ));
        assert!(!matches_template(
            b"/tmp/upload.k/28Qe",
            b"/tmp/upload.XXXXXX"
        ));
        assert!(!matches_template(b"/tmp/a", b"/tmp/a"));
    }

    #[test]
    fn refuses_forged_uploads() {
        let policy = UploadPolicy {
            chroot: "/srv/m2".into(),
            template: Some("/tmp/upload.XXXXXX".into()),
            max_body_size: None,
        };
        let inline = request(
            r#"{"content-length":"3","x-mongrel2-upload-start":"/etc/passwd"}"#,
            "abc",
        );
        let req = Request::parse(&inline).unwrap();
        assert!(matches!(
            policy.admit(&req, b"/etc/passwd"),
            Err(Refusal::Forged(_))
        ));
        let no_body = request(r#"{"x-mongrel2-upload-start":"/etc/passwd"}"#, "");
        let req = Request::parse(&no_body).unwrap();
        assert!(matches!(
            policy.admit(&req, b"/etc/passwd"),
            Err(Refusal::Forged(_))
        ));
        let dotdot = request(r#"{"content-length":"9000"}"#, "");
        let req = Request::parse(&dotdot).unwrap();
        assert!(matches!(
            policy.admit(&req, b"/tmp/../etc/passwd"),
            Err(Refusal::Forged(_))
        ));
        assert!(matches!(
            policy.admit(&req, b"tmp/x"),
            Err(Refusal::Forged(_))
        ));
        assert_eq!(
            policy.resolve(b"/tmp/upload.abc").unwrap(),
            PathBuf::from("/srv/m2/tmp/upload.abc")
        );
        assert!(policy.admit(&req, b"/tmp/upload.abc123").is_ok());
        let untemplated = UploadPolicy {
            template: None,
            ..policy.clone()
        };
        assert!(matches!(
            untemplated.admit(&req, b"/tmp/upload.abc123"),
            Err(Refusal::Forged(_))
        ));
        // mongrel2 reads Content-Length into a C int: an overflowing one is 0 to it, so the
        // (empty) body came inline and the markers are the client's.
        for headers in [
            r#"{"content-length":"4294967296"}"#,
            r#"{"content-length":"0","transfer-encoding":"chunked"}"#,
            r#"{"transfer-encoding":"gzip, notchunked"}"#,
        ] {
            let msg = request(headers, "");
            let req = Request::parse(&msg).unwrap();
            assert!(
                matches!(
                    policy.admit(&req, b"/tmp/upload.abc123"),
                    Err(Refusal::Forged(_))
                ),
                "{headers}"
            );
        }
    }

    #[test]
    fn refuses_oversized_uploads_at_start() {
        let policy = UploadPolicy {
            chroot: "/".into(),
            template: Some("/tmp/x.XXXXXX".into()),
            max_body_size: Some(1000),
        };
        let msg = request(r#"{"content-length":"5000"}"#, "");
        let req = Request::parse(&msg).unwrap();
        assert_eq!(
            policy.admit(&req, b"/tmp/x.abc123"),
            Err(Refusal::TooLarge {
                declared: 5000,
                limit: 1000
            })
        );
    }

    #[test]
    fn opens_regular_files_only_and_removes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("upload.abc123"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("upload.link12")).unwrap();
        let policy = UploadPolicy {
            chroot: dir.path().into(),
            template: Some("/upload.XXXXXX".into()),
            max_body_size: None,
        };
        let msg = request(r#"{"content-length":"5"}"#, "");
        let req = Request::parse(&msg).unwrap();
        let upload = policy.open(&req, b"/upload.abc123").unwrap();
        assert_eq!(upload.size, 5);
        assert!(matches!(
            policy.open(&req, b"/upload.link12"),
            Err(OpenError::Refused(_))
        ));
        assert!(matches!(
            policy.open(&req, b"/upload.gone12"),
            Err(OpenError::Unavailable(_))
        ));
        // The app moved the file and something else took its name: leave that alone.
        std::fs::rename(&upload.path, dir.path().join("moved")).unwrap();
        std::fs::write(&upload.path, b"other").unwrap();
        upload.remove().unwrap();
        assert!(upload.path.exists());
        let again = policy.open(&req, b"/upload.abc123").unwrap();
        again.remove().unwrap();
        assert!(!again.path.exists());
    }
}

//! Logging: `tracing` to `<app-path>/logs/wsgid.log` (append, shared by master and workers)
//! or to stderr with `--stdout`. `reopen()` serves logrotate (SIGUSR1).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

pub const LOG_FILE: &str = "logs/wsgid.log";

enum Target {
    Stderr,
    File {
        path: Mutex<PathBuf>,
        file: Mutex<File>,
    },
}

static TARGET: OnceLock<Target> = OnceLock::new();

fn open(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Where logs go for this app folder: the file, unless `to_stderr`.
pub fn log_path(app_path: &Path) -> PathBuf {
    app_path.join(LOG_FILE)
}

/// Installs the global subscriber. `role` ("master"/"worker") and the pid prefix each line.
pub fn init(app_path: &Path, to_stderr: bool, debug: bool) -> io::Result<()> {
    let target = if to_stderr {
        Target::Stderr
    } else {
        let path = log_path(app_path);
        let file = open(&path)?;
        Target::File {
            path: Mutex::new(path),
            file: Mutex::new(file),
        }
    };
    let _ = TARGET.set(target);
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_env("WSGID_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Writer)
        .with_ansi(false)
        .with_target(false)
        .init();
    Ok(())
}

/// Reopens the log file (after logrotate moved it away).
pub fn reopen() -> io::Result<()> {
    if let Some(Target::File { path, file }) = TARGET.get() {
        let fresh = open(&path.lock().unwrap_or_else(|e| e.into_inner()))?;
        *file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    }
    Ok(())
}

/// After a chroot into `new_root`: the log file's path as seen from inside.
pub fn rebase(new_root: &Path) {
    if let Some(Target::File { path, .. }) = TARGET.get() {
        let mut path = path.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(inside) = path.strip_prefix(new_root) {
            *path = Path::new("/").join(inside);
        }
    }
}

/// The file descriptor a daemon's stdout/stderr should point at.
pub fn file_for_stdio() -> Option<File> {
    match TARGET.get()? {
        Target::File { file, .. } => file.lock().ok()?.try_clone().ok(),
        Target::Stderr => None,
    }
}

struct Writer;

pub struct Line;

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match TARGET.get() {
            Some(Target::File { file, .. }) => {
                // One write per event: O_APPEND keeps lines of all processes whole.
                file.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(buf)?;
            }
            _ => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Writer {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line
    }
}

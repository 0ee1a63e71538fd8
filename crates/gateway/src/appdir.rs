//! The app folder: `app/`, `logs/`, `pid/master/<pid>.pid`, `pid/worker/<pid>.pid`,
//! `wsgid.json`, `django.json`. Several wsgid instances may share one folder.

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::signal::kill;

use crate::upload::UploadPolicy;
use nix::unistd::Pid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Worker,
}

impl Role {
    fn dir(self) -> &'static str {
        match self {
            Role::Master => "pid/master",
            Role::Worker => "pid/worker",
        }
    }
}

pub const LAYOUT: [&str; 5] = ["app", "logs", "pid", "pid/master", "pid/worker"];

/// Creates the folder layout; existing parts are kept (idempotent).
pub fn init(app_path: &Path) -> io::Result<()> {
    for dir in LAYOUT {
        std::fs::create_dir_all(app_path.join(dir))?;
    }
    Ok(())
}

pub fn pid_file(app_path: &Path, role: Role, pid: u32) -> PathBuf {
    app_path.join(role.dir()).join(format!("{pid}.pid"))
}

pub fn write_pid(app_path: &Path, role: Role, pid: u32) -> io::Result<()> {
    std::fs::create_dir_all(app_path.join(role.dir()))?;
    std::fs::write(pid_file(app_path, role, pid), pid.to_string())
}

pub fn remove_pid(app_path: &Path, role: Role, pid: u32) {
    let path = pid_file(app_path, role, pid);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Pids named by `<digits>.pid` files in the role's directory, sorted.
pub fn pids(app_path: &Path, role: Role) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(app_path.join(role.dir())) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".pid")?.parse().ok()
        })
        // 0 or a pid past i32 would signal a whole process group, or everything.
        .filter(|&pid: &u32| pid > 0 && i32::try_from(pid).is_ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// Removes a worker's own pid file when the worker ends, however it ends (the master
/// removes it too when it reaps the worker; this covers a master that died first).
pub struct OwnPidFile(PathBuf);

impl OwnPidFile {
    pub fn worker(app_path: &Path) -> OwnPidFile {
        OwnPidFile(pid_file(app_path, Role::Worker, std::process::id()))
    }
}

impl Drop for OwnPidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether `pid` runs: exists and is not a zombie (an exited process not yet reaped).
pub fn alive(pid: u32) -> bool {
    let exists = i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok());
    exists && !zombie(pid)
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}

/// Where a worker notes the upload it is serving (`pid/worker/<pid>.upload`), so that the
/// master can delete the temp file if the worker dies before it could.
pub fn upload_marker(app_path: &Path, pid: u32) -> PathBuf {
    app_path
        .join(Role::Worker.dir())
        .join(format!("{pid}.upload"))
}

/// Removes the temp file a dead worker was serving, if any. The marker holds the path as
/// mongrel2 named it; it is located again through `policy` (template, mongrel2's chroot, no
/// `..`), so a marker written by app code can name nothing but a mongrel2 temp file.
pub fn sweep_orphan_upload(app_path: &Path, pid: u32, policy: &UploadPolicy) {
    let marker = upload_marker(app_path, pid);
    let Ok(named) = std::fs::read(&marker) else {
        return;
    };
    let _ = std::fs::remove_file(&marker);
    let path = match policy.locate(&named) {
        Ok(path) => path,
        Err(refusal) => {
            tracing::warn!(
                pid,
                "ignored the upload marker of a dead worker: {refusal:?}"
            );
            return;
        }
    };
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::warn!(
            pid,
            "removed the upload {} its dead worker left",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!("cannot remove orphan upload {}: {e}", path.display()),
    }
}

/// Removes pid files of processes that no longer exist (a master killed with SIGKILL could
/// not remove its own), and the uploads such dead workers left. Live ones, perhaps of another
/// wsgid sharing the folder, are kept.
pub fn sweep_stale(app_path: &Path, policy: &UploadPolicy) {
    for role in [Role::Master, Role::Worker] {
        for pid in pids(app_path, role) {
            if !alive(pid) {
                tracing::info!(pid, "removing the stale pid file of a dead process");
                remove_pid(app_path, role, pid);
                if role == Role::Worker {
                    sweep_orphan_upload(app_path, pid, policy);
                }
            }
        }
    }
}

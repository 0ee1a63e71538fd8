//! Process-level setup of the master: detaching from the terminal, and dropping root
//! privileges to the owner of the app folder (as the original did, plus `setgroups`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Context;
use nix::unistd::{fork, setsid, ForkResult, Gid, Uid};

/// Double fork and `setsid`: the returned process is a session-less daemon. Must run before
/// any thread exists. stdin becomes /dev/null; stdout/stderr go to `log` when given.
pub fn daemonize(log: Option<std::fs::File>) -> anyhow::Result<()> {
    // SAFETY: single-threaded at this point (called first thing in main).
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {}
    }
    setsid().context("setsid")?;
    // SAFETY: still single-threaded.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {}
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let out = log.unwrap_or(null.try_clone()?);
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&out)?;
    nix::unistd::dup2_stderr(&out)?;
    Ok(())
}

/// `--chroot`: a worker enters the app folder before importing the app. Paths that the
/// worker uses are rewritten to their view from inside; the ones outside cannot be reached
/// and are reported.
pub fn enter_chroot(settings: &mut crate::config::Settings) -> anyhow::Result<()> {
    let root = settings.app_path.clone();
    nix::unistd::chroot(&root)
        .with_context(|| format!("cannot chroot into {} (root only)", root.display()))?;
    nix::unistd::chdir("/").context("chdir /")?;
    let inside = |path: &Path, what: &str| match path.strip_prefix(&root) {
        Ok(rest) => Some(Path::new("/").join(rest)),
        Err(_) => {
            tracing::warn!(
                "{what} {} is outside the chroot {}",
                path.display(),
                root.display()
            );
            None
        }
    };
    if settings.mongrel2_chroot != Path::new("/") {
        if let Some(path) = inside(&settings.mongrel2_chroot, "--mongrel2-chroot") {
            settings.mongrel2_chroot = path;
        }
    }
    if let Some(venv) = settings.virtualenv.take() {
        settings.virtualenv = inside(&venv, "--virtualenv");
    }
    crate::logging::rebase(&root);
    settings.app_path = "/".into();
    tracing::info!(root = %root.display(), "chrooted into the app folder");
    Ok(())
}

/// The owner of the app folder: who a wsgid started as root runs as.
pub fn folder_owner(app_path: &Path) -> anyhow::Result<(Uid, Gid)> {
    let meta = std::fs::metadata(app_path)
        .with_context(|| format!("cannot stat {}", app_path.display()))?;
    Ok((Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid())))
}

/// When running as root, become `owner` (the app folder's), supplementary groups reset.
/// A root-owned folder keeps root; a process that is not root stays who it is.
pub fn drop_privileges((uid, gid): (Uid, Gid)) -> anyhow::Result<()> {
    if !Uid::effective().is_root() || uid.is_root() {
        return Ok(());
    }
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setgid(gid).context("setgid")?;
    nix::unistd::setuid(uid).context("setuid")?;
    tracing::info!(
        uid = uid.as_raw(),
        gid = gid.as_raw(),
        "dropped root privileges to the app folder's owner"
    );
    Ok(())
}

/// Changing credentials clears the parent-death signal: a child that dropped privileges
/// asks for it again, and leaves at once if the master is already gone.
pub fn rearm_parent_death(master: nix::unistd::Pid) -> anyhow::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    anyhow::ensure!(nix::unistd::getppid() == master, "the master is gone");
    Ok(())
}

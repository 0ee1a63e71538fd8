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

/// When running as root, become the owner of the app folder (supplementary groups reset).
pub fn drop_privileges(app_path: &Path) -> anyhow::Result<()> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let meta = std::fs::metadata(app_path)?;
    if meta.uid() == 0 {
        return Ok(());
    }
    let (uid, gid) = (Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()));
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setgid(gid).context("setgid")?;
    nix::unistd::setuid(uid).context("setuid")?;
    tracing::info!(
        uid = meta.uid(),
        gid = meta.gid(),
        "dropped root privileges to the app folder's owner"
    );
    Ok(())
}

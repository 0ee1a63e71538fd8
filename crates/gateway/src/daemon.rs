//! Process-level setup of the master: detaching from the terminal, and dropping root
//! privileges to the owner of the app folder (as the original did, plus `setgroups`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Context;
use nix::unistd::{fork, setsid, ForkResult, Gid, Uid};

/// Double fork and `setsid`: the returned process is a session-less daemon. Must run before
/// any thread exists. stdin becomes /dev/null; stdout/stderr go to `log` when given.
///
/// The process that ran the command waits until the daemon reports on `boot` (see
/// `BootReport`): it exits 0 once a worker serves, or 3 with the reason when none could
/// start, so a broken app is seen on the terminal, not only in the log.
pub fn daemonize(log: Option<std::fs::File>, log_path: &Path) -> anyhow::Result<BootReport> {
    let (boot_read, boot_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: single-threaded at this point (called first thing in main).
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { .. } => {
            drop(boot_write);
            std::process::exit(wait_for_boot(boot_read, log_path))
        }
        ForkResult::Child => drop(boot_read),
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
    Ok(BootReport(Some(std::fs::File::from(boot_write))))
}

/// How a daemonized master tells the waiting command how its start went.
pub struct BootReport(Option<std::fs::File>);

const BOOTED: u8 = b'r';
const BOOT_FAILED: u8 = b'f';

impl BootReport {
    /// For a master that did not daemonize: nobody waits.
    pub fn none() -> BootReport {
        BootReport(None)
    }

    /// A worker is serving.
    pub fn booted(&mut self) {
        self.send(BOOTED);
    }

    /// No worker could load the app.
    pub fn failed(&mut self) {
        self.send(BOOT_FAILED);
    }

    fn send(&mut self, what: u8) {
        if let Some(mut pipe) = self.0.take() {
            let _ = std::io::Write::write_all(&mut pipe, &[what]);
        }
    }
}

/// The waiting command's side: the exit code for the shell.
fn wait_for_boot(boot: std::os::fd::OwnedFd, log_path: &Path) -> i32 {
    let mut byte = [0u8; 1];
    let got = std::io::Read::read(&mut std::fs::File::from(boot), &mut byte);
    match got {
        Ok(1) if byte[0] == BOOTED => 0,
        Ok(1) if byte[0] == BOOT_FAILED => {
            eprintln!("wsgid: error: worker failed to boot (the app cannot be loaded):");
            for line in last_errors(log_path) {
                eprintln!("  {line}");
            }
            eprintln!("wsgid: see {}", log_path.display());
            crate::worker::EXIT_APP_LOAD
        }
        _ => {
            eprintln!(
                "wsgid: error: the master exited during its start; see {}",
                log_path.display()
            );
            1
        }
    }
}

/// The last error of the log (its record and the lines that continue it: a traceback),
/// for the terminal.
fn last_errors(log_path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log_path).unwrap_or_default();
    let starts_record = |line: &str| {
        line.len() > 5
            && line.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && line.as_bytes()[4] == b'-'
    };
    let mut last = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        if starts_record(line) {
            if let Some(block) = current.take() {
                last = block;
            }
            if line.contains(" ERROR ") && !line.contains("failed to boot") {
                current = Some(vec![line.to_string()]);
            }
        } else if let Some(block) = current.as_mut() {
            block.push(line.to_string());
        }
    }
    let mut block = current.unwrap_or(last);
    block.truncate(40);
    block
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

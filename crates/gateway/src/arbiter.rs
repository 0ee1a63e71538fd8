//! The master: starts workers, watches them, reloads and stops them. It runs no Python and
//! no ZeroMQ; workers are fresh executions of this binary (`wsgid worker`), so nothing
//! crosses a fork, and they die with the master (parent-death signal).
//!
//! Signals: TERM/INT graceful stop, QUIT immediate stop, HUP graceful reload (new workers
//! first, old ones retire once the new ones are ready), TTIN/TTOU one worker more/fewer,
//! USR1 reopen logs.
//!
//! Stopping goes downstream: the front end first (one-command mode: it stops accepting and
//! finishes what it has; the broker runs inside it), or the broker behind mongrel2, then the
//! workers, each once the one before has gone, so nothing that was accepted is dropped.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::appdir::{self, Role};
use crate::config::Settings;
use crate::daemon::BootReport;
use crate::front::HTTP_FDS_ENV;
use crate::link::{LINK_ENV, LISTENER_FD_ENV};
use crate::upload::UploadPolicy;
use crate::worker::{Report, EXIT_APP_LOAD, REPORT_FD_ENV, REPORT_LEN};

/// Environment variable carrying the settings (JSON) from master to worker.
pub const SETTINGS_ENV: &str = "WSGID_SETTINGS";

/// A worker that dies sooner than this after its start counts as a failed start.
const FAILED_START: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Failed starts in a row, before any worker served, that end the master (exit 3).
const BOOT_ATTEMPTS: u32 = 3;

struct WorkerState {
    generation: u64,
    started: Instant,
    ready: bool,
    /// Asked to stop (reload, TTOU, shutdown): its exit is expected.
    retiring: bool,
    /// Reached `--max-requests`: to be replaced, then stopped.
    wants_retirement: bool,
}

#[derive(Default)]
struct Flags {
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    more: Arc<AtomicBool>,
    fewer: Arc<AtomicBool>,
    reopen: Arc<AtomicBool>,
}

pub struct Arbiter {
    settings: Settings,
    settings_json: String,
    workers: BTreeMap<i32, WorkerState>,
    target: u32,
    generation: u64,
    failures: u32,
    next_spawn: Instant,
    stopping: Option<Instant>,
    ready_read: OwnedFd,
    ready_write: OwnedFd,
    /// The broker process (see `broker`), behind mongrel2; in one-command mode the broker
    /// runs inside the front end.
    broker: Option<Kept>,
    broker_endpoint: String,
    /// The link's listening socket, bound once and lent to each broker (or front end).
    link_listener: std::os::unix::net::UnixListener,
    /// One-command mode: the front end.
    front: Option<LocalFront>,
    /// Stopping: the workers have been told to stop (after the broker exited).
    workers_stopped: bool,
    /// A worker has been ready since the start: later failures to load the app (a reload
    /// of broken code) are retried while the others serve; before, they end the master.
    ever_ready: bool,
    boot: BootReport,
    boot_failed: bool,
}

/// A process the master keeps exactly one of (the broker; the front end in one-command
/// mode): restarted when it dies, at most once a second.
struct Kept {
    /// Its name in log lines.
    name: &'static str,
    pid: Option<i32>,
    next_spawn: Instant,
    /// Stopping: told to stop already.
    stop_sent: bool,
}

impl Kept {
    fn new(name: &'static str) -> Kept {
        Kept {
            name,
            pid: None,
            next_spawn: Instant::now(),
            stop_sent: false,
        }
    }

    /// None runs and it may be started again.
    fn due(&self) -> bool {
        self.pid.is_none() && Instant::now() >= self.next_spawn
    }

    fn started(&mut self, spawned: anyhow::Result<u32>) {
        self.next_spawn = Instant::now() + Duration::from_secs(1);
        match spawned {
            Ok(pid) => {
                tracing::info!(pid, "{} started", self.name);
                self.pid = Some(pid as i32);
            }
            Err(e) => tracing::error!("cannot start the {}: {e:#}", self.name),
        }
    }

    /// Whether `pid` was this process (then it is gone, and restarted unless stopping).
    fn reaped(&mut self, pid: i32, status: &WaitStatus, stopping: bool) -> bool {
        if self.pid != Some(pid) {
            return false;
        }
        self.pid = None;
        if !stopping {
            tracing::error!(pid, ?status, "the {} died; restarting it", self.name);
        }
        true
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Stopping: TERM once; whether it still runs.
    fn stop(&mut self) -> bool {
        if self.pid.is_some() && !std::mem::replace(&mut self.stop_sent, true) {
            self.signal(Signal::SIGTERM);
        }
        self.pid.is_some()
    }
}

/// One-command mode's front end (`server::local`) and what it is lent.
struct LocalFront {
    /// The `--bind` listeners, bound by the master once.
    listeners: Vec<OwnedFd>,
    /// Private (0700): spooled bodies (and slow clients' responses) unless
    /// `--upload-temp-store` says otherwise. Removed when the master exits.
    _dir: tempfile::TempDir,
    process: Kept,
}

impl LocalFront {
    /// Spools to a fresh private directory unless told otherwise.
    fn new(settings: &mut Settings, listeners: Vec<OwnedFd>) -> anyhow::Result<LocalFront> {
        let dir = tempfile::Builder::new()
            .prefix("wsgid-")
            .tempdir()
            .context("cannot create the front end's directory")?;
        if settings.upload_temp_store.is_none() {
            settings.upload_temp_store = Some(format!("{}/upload.XXXXXX", dir.path().display()));
        }
        settings.mongrel2_chroot = "/".into();
        Ok(LocalFront {
            listeners,
            _dir: dir,
            process: Kept::new("front end"),
        })
    }
}

/// No worker could load the app at the start (gunicorn: "Worker failed to boot").
#[derive(Debug)]
pub struct BootFailed;

impl std::fmt::Display for BootFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "worker failed to boot: the app cannot be loaded (see the error above)"
        )
    }
}

impl std::error::Error for BootFailed {}

impl Arbiter {
    /// `listeners`: the `--bind` addresses, bound (one-command mode), or none.
    pub fn new(
        mut settings: Settings,
        boot: BootReport,
        listeners: Vec<OwnedFd>,
    ) -> anyhow::Result<Arbiter> {
        let front = if settings.bind.is_empty() {
            None
        } else {
            Some(LocalFront::new(&mut settings, listeners)?)
        };
        let (ready_read, ready_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).context("pipe")?;
        let broker_endpoint = crate::link::new_name(std::process::id());
        Ok(Arbiter {
            settings_json: serde_json::to_string(&settings)?,
            target: settings.workers,
            settings,
            workers: BTreeMap::new(),
            generation: 0,
            failures: 0,
            next_spawn: Instant::now(),
            stopping: None,
            ready_read,
            ready_write,
            broker: front.is_none().then(|| Kept::new("broker")),
            link_listener: crate::link::listen(&broker_endpoint)
                .with_context(|| format!("cannot listen on the worker link @{broker_endpoint}"))?,
            broker_endpoint,
            ever_ready: false,
            boot,
            boot_failed: false,
            front,
            workers_stopped: false,
        })
    }

    pub fn run(mut self) -> anyhow::Result<()> {
        let app_path = self.settings.app_path.clone();
        let pid = std::process::id();
        appdir::sweep_stale(&app_path, &UploadPolicy::from_settings(&self.settings));
        appdir::write_pid(&app_path, Role::Master, pid)
            .context("cannot write the master pid file")?;
        let mut result = self.supervise();
        appdir::remove_pid(&app_path, Role::Master, pid);
        if self.boot_failed {
            self.boot.failed();
            result = Err(BootFailed.into());
        }
        tracing::info!("master exiting");
        result
    }

    fn supervise(&mut self) -> anyhow::Result<()> {
        use signal_hook::consts::*;
        let flags = Flags::default();
        let (wake_read, wake_write) = std::os::unix::net::UnixStream::pair()?;
        wake_read.set_nonblocking(true)?;
        wake_write.set_nonblocking(true)?;
        for (sig, flag) in [
            (SIGTERM, Some(&flags.stop)),
            (SIGINT, Some(&flags.stop)),
            (SIGQUIT, Some(&flags.quit)),
            (SIGHUP, Some(&flags.reload)),
            (SIGTTIN, Some(&flags.more)),
            (SIGTTOU, Some(&flags.fewer)),
            (SIGUSR1, Some(&flags.reopen)),
            (SIGCHLD, None),
        ] {
            if let Some(flag) = flag {
                signal_hook::flag::register(sig, flag.clone())?;
            }
            signal_hook::low_level::pipe::register(sig, wake_write.try_clone()?)?;
        }
        tracing::info!(
            pid = std::process::id(),
            workers = self.target,
            "master started"
        );
        loop {
            self.reap();
            if flags.quit.swap(false, Ordering::Relaxed) {
                tracing::info!("QUIT: stopping now");
                for kept in self.kept_mut() {
                    kept.signal(Signal::SIGQUIT);
                    kept.stop_sent = true;
                }
                self.signal_all(Signal::SIGQUIT);
                self.workers_stopped = true;
                // A moment to exit cleanly (pid files, flushed replies), then KILL.
                self.stopping = Some(Instant::now() + Duration::from_secs(1));
            }
            if self.boot_failed && self.stopping.is_none() {
                tracing::error!("{BootFailed}; stopping");
                flags.stop.store(true, Ordering::Relaxed);
            }
            if flags.stop.swap(false, Ordering::Relaxed) && self.stopping.is_none() {
                tracing::info!("stopping gracefully");
                self.stopping =
                    Some(Instant::now() + Duration::from_secs(self.settings.graceful_timeout));
            }
            if let Some(deadline) = self.stopping {
                self.stop_downstream();
                if self.kept_mut().all(|k| k.pid.is_none()) && self.workers.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!("graceful timeout over: killing what is left");
                    self.signal_all(Signal::SIGKILL);
                    for kept in self.kept_mut() {
                        kept.signal(Signal::SIGKILL);
                    }
                }
            } else {
                self.handle_requests(&flags);
                self.keep_processes();
                self.maintain();
                self.retire_replaced();
                if self.workers.is_empty() && self.target == 0 {
                    tracing::info!("no workers left and keep-alive is off");
                    return Ok(());
                }
            }
            self.wait(&wake_read)?;
        }
    }

    /// The next stop in order, once the one before has exited: the front end stops
    /// accepting and finishes its requests; the broker stops taking requests and hands the
    /// ones already sent to the workers, which are still running; then the workers.
    fn stop_downstream(&mut self) {
        if let Some(front) = self.front.as_mut() {
            // New clients are refused from now on, not left in a backlog nobody reads.
            front.listeners.clear();
        }
        // In order: each is told once the one before it has gone.
        if self.kept_mut().any(Kept::stop) {
            return;
        }
        if !std::mem::replace(&mut self.workers_stopped, true) {
            self.signal_all(Signal::SIGTERM);
        }
    }

    fn handle_requests(&mut self, flags: &Flags) {
        if flags.reload.swap(false, Ordering::Relaxed) {
            self.generation += 1;
            tracing::info!(
                generation = self.generation,
                "reloading: starting new workers"
            );
            self.failures = 0;
            self.next_spawn = Instant::now();
        }
        if flags.more.swap(false, Ordering::Relaxed) {
            self.target += 1;
            tracing::info!(workers = self.target, "TTIN: one worker more");
        }
        if flags.fewer.swap(false, Ordering::Relaxed) && self.target > 1 {
            self.target -= 1;
            tracing::info!(workers = self.target, "TTOU: one worker fewer");
            if let Some((&pid, state)) = self.workers.iter_mut().find(|(_, w)| !w.retiring) {
                state.retiring = true;
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        if flags.reopen.swap(false, Ordering::Relaxed) {
            if let Err(e) = crate::logging::reopen() {
                tracing::error!("cannot reopen the log file: {e}");
            }
            self.signal_all(Signal::SIGUSR1);
        }
    }

    /// Starts workers until the current generation has `target` of them, respecting the
    /// backoff after failed starts.
    fn maintain(&mut self) {
        while self.current_count() < self.target as usize && Instant::now() >= self.next_spawn {
            if let Err(e) = self.spawn() {
                tracing::error!("cannot start a worker: {e:#}");
                self.backoff();
                break;
            }
        }
    }

    /// Workers that count towards the target: current generation, not on their way out.
    fn is_current(&self, w: &WorkerState) -> bool {
        w.generation == self.generation && !w.retiring && !w.wants_retirement
    }

    fn current_count(&self) -> usize {
        self.workers.values().filter(|w| self.is_current(w)).count()
    }

    /// Workers of an old generation (after HUP) or past `--max-requests` stop only once
    /// their replacements are ready, so some worker is connected to mongrel2 at every
    /// instant (design note 5) and a reload drops nothing.
    fn retire_replaced(&mut self) {
        let ready = self
            .workers
            .values()
            .filter(|w| self.is_current(w) && w.ready)
            .count();
        if ready < self.target as usize {
            return;
        }
        let generation = self.generation;
        for (&pid, state) in self.workers.iter_mut() {
            if (state.generation < generation || state.wants_retirement) && !state.retiring {
                state.retiring = true;
                tracing::info!(pid, "retiring a replaced worker");
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
    }

    /// Starts `wsgid ROLE` with the settings, the broker endpoint and the descriptors the
    /// role needs. Children die with the master (parent-death signal).
    fn spawn_child(&self, role: &str) -> anyhow::Result<u32> {
        let exe = std::env::current_exe().context("cannot find our own executable")?;
        // The broker gets the link's listener; the front end the HTTP listeners and the
        // link's (its broker's); workers the link's name and the report pipe.
        let link = (LISTENER_FD_ENV, vec![self.link_listener.as_raw_fd()]);
        let passed: Vec<(&str, Vec<RawFd>)> = match (role, &self.front) {
            ("broker", _) => vec![link],
            ("front", Some(front)) => vec![
                link,
                (
                    HTTP_FDS_ENV,
                    front.listeners.iter().map(AsRawFd::as_raw_fd).collect(),
                ),
            ],
            _ => vec![(REPORT_FD_ENV, vec![self.ready_write.as_raw_fd()])],
        };
        let mut command = Command::new(exe);
        command
            .arg(role)
            .env(SETTINGS_ENV, &self.settings_json)
            .env(LINK_ENV, &self.broker_endpoint)
            .envs(&self.settings.envs);
        for (env, fds) in &passed {
            let list = fds.iter().map(RawFd::to_string).collect::<Vec<_>>();
            command.env(env, list.join(","));
        }
        let inherited: Vec<RawFd> = passed.into_iter().flat_map(|(_, fds)| fds).collect();
        // SAFETY: only async-signal-safe calls (prctl, fcntl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
                for &fd in &inherited {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot execute the {role}"))?;
        // Reaped through waitpid in `reap`, not through `Child`.
        Ok(child.id())
    }

    /// The processes kept one of, in the order they stop: the front end or the broker.
    fn kept_mut(&mut self) -> impl Iterator<Item = &mut Kept> {
        self.front
            .as_mut()
            .map(|f| &mut f.process)
            .into_iter()
            .chain(self.broker.as_mut())
    }

    /// Starts the front end and the broker when they are not running.
    fn keep_processes(&mut self) {
        if self.front.as_ref().is_some_and(|f| f.process.due()) {
            let spawned = self.spawn_child("front");
            if let Some(front) = self.front.as_mut() {
                front.process.started(spawned);
            }
        }
        if self.broker.as_ref().is_some_and(Kept::due) {
            let spawned = self.spawn_child("broker");
            if let Some(broker) = self.broker.as_mut() {
                broker.started(spawned);
            }
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let pid = self.spawn_child("worker")?;
        if let Err(e) = appdir::write_pid(&self.settings.app_path, Role::Worker, pid) {
            tracing::warn!("cannot write the worker pid file: {e}");
        }
        tracing::info!(pid, generation = self.generation, "worker started");
        self.workers.insert(
            pid as i32,
            WorkerState {
                generation: self.generation,
                started: Instant::now(),
                ready: false,
                retiring: false,
                wants_retirement: false,
            },
        );
        Ok(())
    }

    fn backoff(&mut self) {
        self.failures += 1;
        let delay = Duration::from_millis(500)
            .saturating_mul(1 << self.failures.min(8))
            .min(MAX_BACKOFF);
        tracing::warn!(
            failures = self.failures,
            "next worker start in {:.1}s",
            delay.as_secs_f64()
        );
        self.next_spawn = Instant::now() + delay;
    }

    fn reap(&mut self) {
        // Reports first: a worker that said it was ready before another died counts.
        self.read_reports();
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else { return };
            let stopping = self.stopping.is_some();
            if self
                .kept_mut()
                .any(|k| k.reaped(pid.as_raw(), &status, stopping))
            {
                continue;
            }
            let Some(state) = self.workers.remove(&pid.as_raw()) else {
                continue;
            };
            appdir::remove_pid(&self.settings.app_path, Role::Worker, pid.as_raw() as u32);
            appdir::sweep_orphan_upload(
                &self.settings.app_path,
                pid.as_raw() as u32,
                &UploadPolicy::from_settings(&self.settings),
            );
            let (code, signal) = match status {
                WaitStatus::Exited(_, code) => (Some(code), None),
                WaitStatus::Signaled(_, sig, _) => (None, Some(sig)),
                _ => (None, None),
            };
            let expected = state.retiring || self.stopping.is_some();
            if expected {
                tracing::info!(pid = pid.as_raw(), ?code, ?signal, "worker exited");
                continue;
            }
            if !self.settings.keep_alive {
                tracing::warn!(
                    pid = pid.as_raw(),
                    ?code,
                    ?signal,
                    "worker died; keep-alive is off, not replacing it"
                );
                self.target = self.target.saturating_sub(1);
                continue;
            }
            let lived = state.started.elapsed();
            tracing::warn!(
                pid = pid.as_raw(),
                ?code,
                ?signal,
                "worker died after {:.1}s",
                lived.as_secs_f64()
            );
            if code == Some(EXIT_APP_LOAD) && !self.ever_ready {
                self.boot_failed = true;
                continue;
            }
            // A worker that never got ready (or dies at once, again and again) is a failed
            // start: back off. One that served and then died is replaced at once.
            if code == Some(EXIT_APP_LOAD) || !state.ready || lived < FAILED_START {
                self.backoff();
                // Before any worker served, dying again and again is a failed boot too (a
                // crash in an extension, a bad --virtualenv): the command that waits for
                // the start must not wait forever.
                if !self.ever_ready && self.failures >= BOOT_ATTEMPTS {
                    self.boot_failed = true;
                }
            } else {
                self.failures = 0;
            }
        }
    }

    fn signal_all(&self, signal: Signal) {
        for &pid in self.workers.keys() {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Sleeps until a signal, a ready report, or the next deadline.
    fn wait(&mut self, wake: &std::os::unix::net::UnixStream) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut deadline = None::<Instant>;
        if let Some(stop) = self.stopping {
            deadline = Some(stop.max(now + Duration::from_millis(100)));
        } else if self.current_count() < self.target as usize {
            deadline = Some(self.next_spawn);
        }
        let timeout = match deadline {
            Some(d) => PollTimeout::try_from(
                d.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1,
            )
            .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::try_from(1000).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.ready_read.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let mut sink = [0u8; 256];
        while matches!((&*wake).read(&mut sink), Ok(n) if n > 0) {}
        self.read_reports();
        Ok(())
    }

    /// Reads what workers reported on the pipe.
    fn read_reports(&mut self) {
        let mut reports = [0u8; REPORT_LEN * 64];
        while let Ok(n) = nix::unistd::read(&self.ready_read, &mut reports) {
            if n == 0 {
                break;
            }
            for report in reports[..n].chunks_exact(REPORT_LEN) {
                let pid = u32::from_le_bytes(report[1..].try_into().expect("4 bytes")) as i32;
                match Report::from_byte(report[0]) {
                    Some(Report::Ready) => {
                        // Counted even for a worker already reaped: it did serve.
                        if let Some(state) = self.workers.get_mut(&pid) {
                            state.ready = true;
                        }
                        self.failures = 0;
                        self.ever_ready = true;
                        if !self.boot_failed && self.stopping.is_none() {
                            self.boot.booted();
                        }
                    }
                    Some(Report::WantsRetirement) => {
                        if let Some(state) = self.workers.get_mut(&pid) {
                            tracing::info!(pid, "worker reached --max-requests; replacing it");
                            state.wants_retirement = true;
                        }
                    }
                    None => tracing::warn!(pid, "unknown report from a worker"),
                }
            }
        }
    }
}

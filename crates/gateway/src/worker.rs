//! A worker: one embedded Python, one app, one request at a time.
//!
//! Python and the app are loaded first (design note 7), then the worker joins the broker.
//! Requests are taken from the broker's shared queue one at a time, only when idle; a
//! worker that stops takes no more (see `link`). Replies go back to the broker, which alone
//! talks to mongrel2: a reply that cannot be delivered fails that response, never the worker.
//! In one-command mode a request may come with its client's connection (see `client`): the
//! response is then written there, and only its end goes to the broker; a body up to 1 MiB
//! may come in a pipe of its own.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use m2wire::{MessageKind, Request, UploadMarker};
use pyo3::intern;
use pyo3::prelude::*;

use crate::client::{Backlog, Client};
use crate::config::Settings;
use crate::hold::{HeldRequest, Holding, Read, Said};
use crate::link::{self, Orders, Replier, Taken, Ticket, WorkerChannels, LINK_ENV};
use crate::upload::{OpenError, Refusal, UploadFile, UploadPolicy};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use server::front::lend::BODY_PIPE;
use std::path::{Path, PathBuf};
use wsgi::environ::{self, BodyInfo, EnvironTemplate};
use wsgi::input::{Body, Input};
use wsgi::response::{Piece, ReplySink, RequestFacts, ResponseWriter};
use wsgi::types::{Errors, FileWrapper};
use wsgi::{call, loader};

/// Exit code of a worker whose app cannot be loaded: the master backs off before retrying.
pub const EXIT_APP_LOAD: i32 = 3;

/// Environment variable naming the pipe on which a worker reports to the master.
pub const REPORT_FD_ENV: &str = "WSGID_REPORT_FD";

/// One report on that pipe: a kind byte and the worker's pid (little endian); at 5 bytes,
/// a write is atomic, so reports of many workers never interleave.
pub const REPORT_LEN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Joined the broker and serving: a reload may now retire the worker it replaces.
    Ready = b'r' as isize,
    /// Served `--max-requests`: start a replacement, then stop this one.
    WantsRetirement = b'x' as isize,
}

impl Report {
    pub fn from_byte(byte: u8) -> Option<Report> {
        match byte {
            b'r' => Some(Report::Ready),
            b'x' => Some(Report::WantsRetirement),
            _ => None,
        }
    }
}

/// The signals a worker reacts to, set from handlers, read by the loop.
struct Signals {
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    reopen_logs: Arc<AtomicBool>,
    wake: UnixStream,
}

impl Signals {
    fn install() -> io::Result<Signals> {
        use signal_hook::consts::*;
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        let signals = Signals {
            stop: Arc::default(),
            quit: Arc::default(),
            reopen_logs: Arc::default(),
            wake,
        };
        for (sig, flag) in [
            (SIGTERM, &signals.stop),
            (SIGINT, &signals.stop),
            (SIGQUIT, &signals.quit),
            (SIGUSR1, &signals.reopen_logs),
        ] {
            signal_hook::flag::register(sig, flag.clone())?;
            signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
        }
        // The master reloads on HUP; a worker in the same process group must not die of it.
        signal_hook::flag::register(SIGHUP, Arc::new(AtomicBool::new(false)))?;
        Ok(signals)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.quit.load(Ordering::Relaxed)
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!(io::Read::read(&mut &self.wake, &mut buf), Ok(n) if n > 0) {}
        if self.reopen_logs.swap(false, Ordering::Relaxed) {
            if let Err(e) = crate::logging::reopen() {
                tracing::error!("cannot reopen the log file: {e}");
            }
        }
    }
}

pub fn run(mut settings: Settings) -> anyhow::Result<()> {
    let signals = Signals::install().context("cannot install signal handlers")?;
    let owner = crate::daemon::folder_owner(&settings.app_path)?;
    if settings.chroot {
        crate::daemon::enter_chroot(&mut settings)?;
    }
    let master = nix::unistd::getppid();
    crate::daemon::drop_privileges(owner)?;
    crate::daemon::rearm_parent_death(master)?;
    let _pid_file = crate::appdir::OwnPidFile::worker(&settings.app_path);
    loader::init_python(settings.virtualenv.as_deref())?;
    let (app, template) = Python::attach(|py| -> anyhow::Result<_> {
        let app = match loader::load_app(
            py,
            &settings.app_path,
            settings.wsgi_app.as_deref(),
            settings.django,
        ) {
            Ok(app) => app,
            Err(e) => {
                tracing::error!("{e:#}");
                std::process::exit(EXIT_APP_LOAD);
            }
        };
        let errors = Bound::new(py, Errors::default())?.into_any();
        let wrapper = py.get_type::<FileWrapper>().into_any();
        Ok((
            app,
            EnvironTemplate::new(py, errors, wrapper, &settings.forwarded_allow_ips)?,
        ))
    })?;

    let link_name =
        std::env::var(LINK_ENV).context("no broker link: workers are started by the master")?;
    let mut broker = BrokerLink::connect(&link_name, &signals)?;
    let mut master = report_pipe();
    report(&mut master, Report::Ready);
    tracing::info!("worker ready");

    let mut worker = Worker {
        app,
        template,
        policy: UploadPolicy::from_settings(&settings),
        served: 0,
        upload_marker: crate::appdir::upload_marker(&settings.app_path, std::process::id()),
        backlog: Rc::new(RefCell::new(Backlog::new(spill_dir(&settings)))),
    };
    let retire_after = settings.max_requests.unwrap_or(u64::MAX);
    let mut retirement_asked = false;
    loop {
        if signals.quit.load(Ordering::Relaxed) {
            tracing::info!("quit: stopping now");
            return Ok(());
        }
        if signals.stop.load(Ordering::Relaxed) {
            break;
        }
        if worker.served >= retire_after && !retirement_asked {
            // The master starts a replacement, then stops us; alone, we stop ourselves.
            if master.is_none() {
                break;
            }
            report(&mut master, Report::WantsRetirement);
            retirement_asked = true;
        }
        match broker.next(&signals, &worker.backlog)? {
            Some(Next::Taken(taken)) => worker.take(taken, &mut broker),
            Some(Next::Held(held)) => worker.serve_held(held, &mut broker),
            None => signals.drain(),
        }
    }
    tracing::info!(served = worker.served, "stopping gracefully");
    broker.stop(|taken, broker| worker.take(taken, broker))?;
    worker.backlog.borrow_mut().finish();
    tracing::info!(served = worker.served, "worker stopped");
    Ok(())
}

/// Whether what failed was the stream to the broker, which went away (killed, or in
/// one-command mode with its front end): its successor is joined at the next take. A
/// client's own failures are marked (`client::went_away`) and told apart first.
fn broker_gone(e: &anyhow::Error) -> bool {
    !crate::client::went_away(e)
        && e.chain()
            .filter_map(|c| c.downcast_ref::<io::Error>())
            .any(|e| {
                matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                )
            })
}

/// Where slow clients' responses spill past the memory bound (`client::Bounds`): beside
/// the spooled request bodies, in one-command mode the master's private directory. Only
/// that mode lends clients to workers.
fn spill_dir(settings: &Settings) -> Option<PathBuf> {
    if settings.bind.is_empty() {
        return None;
    }
    let dir = Path::new(settings.upload_temp_store.as_deref()?).parent()?;
    Some(
        settings
            .mongrel2_chroot
            .join(dir.strip_prefix("/").unwrap_or(dir)),
    )
}

/// The worker's end of the link to the broker (see `link`).
struct BrokerLink {
    name: String,
    channels: WorkerChannels,
    /// Waits for a request, a held connection's request, or a signal. The queue is watched
    /// with `EPOLLEXCLUSIVE`: a new request wakes one idle worker, not all of them.
    idle: Epoll,
    /// Connections we hold between requests (one-command mode).
    holding: Holding,
    /// The queue may hold a request: the last wait said so, or the last take found one.
    queue_hint: bool,
    /// Numbers the requests in service (`records::Ring::busy`).
    generation: u64,
}

/// What the worker does next.
enum Next {
    Taken(Taken),
    Held(HeldRequest),
}

/// Tokens of what `BrokerLink::idle` watches (held connections: their ids, from
/// `hold::FIRST_TOKEN`).
const QUEUE: u64 = 0;
const SIGNAL: u64 = 1;
const ORDERS: u64 = 2;

impl BrokerLink {
    /// Connects, retrying while the broker starts.
    fn connect(name: &str, signals: &Signals) -> anyhow::Result<BrokerLink> {
        let since = Instant::now();
        loop {
            let joined = link::connect(name).and_then(|stream| {
                if greeting_arrives(&stream, signals)? {
                    WorkerChannels::receive(stream).map(Some)
                } else {
                    Ok(None)
                }
            });
            match joined {
                Ok(None) => anyhow::bail!("stopped before the broker was up"),
                Ok(Some(channels)) => {
                    let idle = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
                    let exclusive = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                    idle.add(channels.queue_fd(), EpollEvent::new(exclusive, QUEUE))?;
                    idle.add(&signals.wake, EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL))?;
                    idle.add(
                        channels.stream_fd(),
                        EpollEvent::new(EpollFlags::EPOLLIN, ORDERS),
                    )?;
                    return Ok(BrokerLink {
                        name: name.to_string(),
                        channels,
                        idle,
                        holding: Holding::default(),
                        queue_hint: true,
                        generation: 0,
                    });
                }
                Err(e) if since.elapsed() > Duration::from_secs(30) => {
                    return Err(e).context("cannot reach the broker")
                }
                Err(_) => {
                    anyhow::ensure!(
                        !signals.stop.load(Ordering::Relaxed),
                        "stopped before the broker was up"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// The next request (or upload to discard), or `None` when a signal woke us. Under
    /// load it is already queued and is taken without sleeping. When the broker has gone
    /// (it is restarted by the master) and its queue is empty, the new broker is joined.
    /// Slow clients' responses in `backlog` go out meanwhile.
    fn next(
        &mut self,
        signals: &Signals,
        backlog: &RefCell<Backlog>,
    ) -> anyhow::Result<Option<Next>> {
        loop {
            backlog.borrow_mut().advance();
            match self.take_queued()? {
                taken @ (Taken::Request { .. } | Taken::Discard { .. }) => {
                    self.begin_service(0);
                    return Ok(Some(Next::Taken(taken)));
                }
                Taken::Closed => {
                    // On a stop the broker goes first, and our signal follows at once.
                    if signals.stopping() || signal_within(signals, Duration::from_millis(500))? {
                        return Ok(None);
                    }
                    tracing::warn!("lost the broker; reconnecting");
                    // Its front end went with it: our copies of its connections close.
                    self.holding.let_go(&self.idle, None);
                    match BrokerLink::connect(&self.name, signals) {
                        Ok(fresh) => *self = fresh,
                        Err(_) if signals.stopping() => {}
                        Err(e) => return Err(e),
                    }
                    return Ok(None);
                }
                Taken::Empty => {}
            }
            // Between requests, even under load: an idle held connection goes back in time.
            self.holding.sweep(&self.idle, &self.channels.replier());
            if let Some(conn) = self.holding.next_ready() {
                // Marked busy before reading: from then on the broker leaves it to us.
                self.begin_service(conn);
                let replier = self.channels.replier();
                match self.holding.read(&self.idle, conn, &replier) {
                    Read::Request(held) => return Ok(Some(Next::Held(held))),
                    Read::Nothing => {
                        self.end_service(Some(conn));
                        continue;
                    }
                }
            }
            let mut events = [EpollEvent::empty(); 64];
            let timeout = if backlog.borrow().is_empty() {
                self.holding.deadline().map_or(EpollTimeout::NONE, |at| {
                    let wait = at.saturating_duration_since(Instant::now());
                    // Rounded up: a deadline is not reached by waking just before it.
                    EpollTimeout::try_from(wait + Duration::from_millis(1))
                        .unwrap_or(EpollTimeout::MAX)
                })
            } else {
                self.wait_with(&backlog.borrow())?;
                EpollTimeout::ZERO
            };
            let n = match self.idle.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                match event.data() {
                    QUEUE => self.queue_hint = true,
                    SIGNAL => {}
                    ORDERS => self.obey(),
                    conn => self.holding.woke(conn),
                }
            }
            // A request that woke us is taken even if a signal came with it: the wake-up
            // was ours alone (EPOLLEXCLUSIVE), and no other idle worker would get it.
            let woke = |token| events[..n].iter().any(|e| e.data() == token);
            if woke(SIGNAL) && !woke(QUEUE) {
                return Ok(None);
            }
        }
    }

    fn obey(&mut self) {
        match self.channels.orders() {
            Orders::None => {}
            Orders::GiveBack => {
                self.holding
                    .give_back_all(&self.idle, &self.channels.replier());
                self.holding.close();
            }
            Orders::Ended => {
                // Watched no more (it would signal for ever); what ended the stream is
                // found when the queue ends with it, or when a reply cannot go.
                let _ = self.idle.delete(self.channels.stream_fd());
                self.queue_hint = true;
            }
        }
    }

    /// The next queued request, when the queue may hold one.
    fn take_queued(&mut self) -> io::Result<Taken> {
        if !self.queue_hint {
            return Ok(Taken::Empty);
        }
        let taken = self.channels.take()?;
        self.queue_hint = !matches!(taken, Taken::Empty);
        Ok(taken)
    }

    /// A request is in service (`serving`: the held connection it came on, or 0).
    fn begin_service(&mut self, serving: u64) {
        self.generation += 1;
        self.channels.busy(self.generation, serving);
    }

    /// The request in service is over: if the broker took our held connections back
    /// meanwhile, they are dropped (but `serving`'s, which it left us).
    fn end_service(&mut self, serving: Option<u64>) {
        if !self.channels.idle(self.generation) {
            self.holding.let_go(&self.idle, serving);
        }
    }

    /// Sleeps until a request or a signal comes (the epoll instance is readable), a slow
    /// client can take more, or one of them has stalled too long.
    fn wait_with(&self, backlog: &Backlog) -> io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let (clients, deadline) = backlog.watch();
        let mut fds = vec![PollFd::new(self.idle.0.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            clients
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLOUT)),
        );
        let wait = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        // Rounded up: a deadline is not reached by waking just before it.
        let ms = wait.as_millis().saturating_add(1);
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops gracefully. Nothing was assigned to us ahead of time, so while the broker runs
    /// there is nothing to finish: other workers take what is queued, and the connections
    /// we hold go back to the front end now (not when the broker sees our stream end, which
    /// a child the app forked may keep open). When the broker has gone (the whole instance
    /// stops, the broker first), the workers serve what it queued.
    fn stop(&mut self, mut answer: impl FnMut(Taken, &mut BrokerLink)) -> anyhow::Result<()> {
        self.holding
            .give_back_all(&self.idle, &self.channels.replier());
        if self.channels.broker_gone() {
            while let taken @ (Taken::Request { .. } | Taken::Discard { .. }) =
                self.channels.take()?
            {
                self.begin_service(0);
                answer(taken, self);
            }
        }
        Ok(())
    }
}

/// Waits for the broker's greeting on a fresh link stream; `false` when told to stop first.
fn greeting_arrives(stream: &UnixStream, signals: &Signals) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(true);
        }
        signals.drain();
        if signals.stopping() {
            return Ok(false);
        }
    }
}

/// Whether a signal arrives within `wait` (it is left for the caller to handle).
fn signal_within(signals: &Signals, wait: Duration) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(signals.wake.as_fd(), PollFlags::POLLIN)];
    let millis = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    match poll(&mut fds, millis) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// The pipe to the master, when started by one.
fn report_pipe() -> Option<std::fs::File> {
    let fd = std::env::var(REPORT_FD_ENV).ok()?.parse::<i32>().ok()?;
    // SAFETY: the master passed this fd open for us, and nothing else in the worker uses it.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn report(pipe: &mut Option<std::fs::File>, kind: Report) {
    if let Some(pipe) = pipe {
        let mut msg = [kind as u8; REPORT_LEN];
        msg[1..].copy_from_slice(&std::process::id().to_le_bytes());
        if let Err(e) = pipe.write_all(&msg) {
            tracing::warn!("cannot report to the master: {e}");
        }
    }
}

struct Worker {
    app: Py<PyAny>,
    template: EnvironTemplate,
    policy: UploadPolicy,
    served: u64,
    /// Names the upload in hand while the app runs (see `appdir::sweep_orphan_upload`).
    upload_marker: std::path::PathBuf,
    /// Responses the app has finished that slow clients are still taking.
    backlog: Rc<RefCell<Backlog>>,
}

/// What one request needs after its message is parsed and dropped.
struct Prepared<'py> {
    environ: Bound<'py, pyo3::types::PyDict>,
    writer: Rc<RefCell<ResponseWriter>>,
    upload: Option<UploadFile>,
    body_range: (usize, usize),
    /// The body's length, when it comes in a pipe (`BODY_PIPE`).
    pipe_body: Option<u64>,
    /// The access-log line's request part, when the access log is on.
    access: Option<String>,
}

/// Where a request's body is.
enum BodyFile {
    /// In the message (or none).
    Inline,
    /// In a spooled file, opened and checked.
    File(UploadFile),
    /// Nowhere the app will see: the message was answered or needs no answer.
    Handled,
}

/// The reply to one request, on its way to the broker, or written to the client when its
/// connection was lent to us; it notes when the response ended.
struct Reply {
    replier: Arc<Replier>,
    ticket: Ticket,
    /// Whether the connection may be kept after a whole response (`hold`): then `kept` has
    /// it, and `said` what the front end said of it when it offered it.
    may_hold: Cell<MayHold>,
    said: RefCell<Option<Said>>,
    kept: RefCell<Option<Rc<OwnedFd>>>,
    ended: Cell<bool>,
    client: RefCell<Option<Client>>,
    /// Set once the response is complete: a lent upload file is not read after that (the
    /// front end writes the next body into it).
    over: Rc<Cell<bool>>,
    /// Where the rest of a response goes when the client is slower than the app.
    backlog: Rc<RefCell<Backlog>>,
}

/// Whether a response's connection may be kept after it (`hold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MayHold {
    No,
    /// If the front end offered it, which the request's message says (`Reply::note_offer`).
    IfOffered,
    Yes,
}

impl Reply {
    /// Reads the front end's offer in the request, once its message is parsed.
    fn note_offer(&self, req: &Request<'_>) {
        if self.may_hold.get() != MayHold::IfOffered {
            return;
        }
        let said = Said::offered(req);
        self.may_hold.set(if said.is_some() {
            MayHold::Yes
        } else {
            MayHold::No
        });
        *self.said.borrow_mut() = said;
    }
}

impl ReplySink for Reply {
    fn send(&self, payload: &[u8], piece: Piece) -> io::Result<()> {
        if piece != Piece::Middle {
            self.ended.set(true);
            self.over.set(true);
        }
        let mut lent = self.client.borrow_mut();
        let Some(client) = lent.as_mut() else {
            let Ticket::Queued(seq) = self.ticket else {
                return Err(io::Error::other(
                    "a held connection's response has no client",
                ));
            };
            return self.replier.reply(seq, payload, piece);
        };
        let written = client.write_all(payload);
        if piece == Piece::Middle {
            return written.map_err(crate::client::gone);
        }
        if let Err(e) = written {
            tracing::debug!("the client of {} is gone: {e}", self.ticket);
        }
        let piece = if client.broken() {
            Piece::LastThenClose
        } else {
            piece
        };
        let client = lent.take().expect("the client of this response");
        if client.has_pending() && !client.broken() {
            let replier = self.replier.clone();
            self.backlog
                .borrow_mut()
                .add(client, self.ticket, piece, replier);
            return Ok(());
        }
        if self.may_hold.get() == MayHold::Yes && piece == Piece::Last {
            // What becomes of it is the worker's to say, once this request is over.
            *self.kept.borrow_mut() = Some(client.share());
            return Ok(());
        }
        // Our copy of the connection is closed before the front end takes it back.
        drop(client);
        self.replier.finish(self.ticket, piece);
        Ok(())
    }
}

impl Worker {
    /// Does what was taken from the queue.
    fn take(&mut self, taken: Taken, link: &mut BrokerLink) {
        let replier = link.channels.replier();
        match taken {
            Taken::Request {
                seq,
                msg,
                client,
                body,
            } => {
                let may_hold = if client.is_some() {
                    MayHold::IfOffered
                } else {
                    MayHold::No
                };
                let client = client.map(|fd| self.backlog.borrow().client(Rc::new(fd)));
                let ticket = Ticket::Queued(seq);
                let kept = self.answer(
                    ticket,
                    msg,
                    body.map(File::from),
                    &replier,
                    client,
                    may_hold,
                );
                link.end_service(None);
                if let Some((fd, said)) = kept {
                    if said.is_some_and(|said| link.holding.keep(&link.idle, said, fd)) {
                        replier.finish_held(seq);
                    } else {
                        replier.finish(ticket, Piece::Last);
                    }
                }
            }
            Taken::Discard { msg } => {
                self.discard_upload(&msg);
                link.end_service(None);
            }
            Taken::Empty | Taken::Closed => {}
        }
    }

    /// Serves a request read from a connection we hold; it stays held unless its response
    /// ended otherwise (closed, or waiting for a slow client) or we hold no more.
    fn serve_held(&mut self, held: HeldRequest, link: &mut BrokerLink) {
        let HeldRequest { conn, msg, fd } = held;
        let client = self.backlog.borrow().client(fd);
        let replier = link.channels.replier();
        let may_hold = if link.holding.is_closed() {
            MayHold::No
        } else {
            MayHold::Yes
        };
        let kept = self.answer(
            Ticket::Held(conn),
            msg,
            None,
            &replier,
            Some(client),
            may_hold,
        );
        link.end_service(Some(conn));
        if kept.is_none() {
            link.holding.forget(&link.idle, conn);
        }
    }

    /// An upload's end whose client is gone: the temp file is removed (when it is genuine),
    /// the app is not called.
    fn discard_upload(&self, msg: &[u8]) {
        let Ok(req) = Request::parse(msg) else {
            return;
        };
        if let UploadMarker::Done(path) = req.upload() {
            match self.policy.open(&req, path) {
                Ok(file) => {
                    if let Err(e) = file.remove() {
                        tracing::error!("cannot remove upload {}: {e}", file.path.display());
                    }
                    tracing::debug!(
                        conn_id = req.conn_id,
                        "removed the upload of a closed connection"
                    );
                }
                Err(_) => tracing::debug!(
                    conn_id = req.conn_id,
                    "an upload of a closed connection was not ours"
                ),
            }
        }
    }

    /// Serves request `seq`. Whatever happens, its response ends, so the broker can free its
    /// connection; a response that cannot reach the broker is logged, and the worker lives on.
    /// `piped`: the body, when it came in a pipe of its own.
    /// `may_hold`: whether the connection may be kept after a whole response; it is then
    /// returned, with what the front end said of it when it offered it, and its response's
    /// end is for the caller to tell.
    fn answer(
        &mut self,
        ticket: Ticket,
        msg: Vec<u8>,
        piped: Option<File>,
        replier: &Arc<Replier>,
        client: Option<Client>,
        may_hold: MayHold,
    ) -> Option<(Rc<OwnedFd>, Option<Said>)> {
        let reply = Rc::new(Reply {
            replier: replier.clone(),
            ticket,
            may_hold: Cell::new(may_hold),
            said: RefCell::new(None),
            kept: RefCell::new(None),
            ended: Cell::new(false),
            client: RefCell::new(client),
            over: Rc::new(Cell::new(false)),
            backlog: self.backlog.clone(),
        });
        let served = Python::attach(|py| self.handle(py, msg, piped, &reply));
        match &served {
            Err(e) if crate::client::went_away(e) => {
                tracing::info!("the client went away before its response was complete ({ticket})")
            }
            Err(e) if broker_gone(e) => {
                tracing::warn!(
                    "the broker is gone: the response to {ticket} is lost with it ({e:#})"
                )
            }
            Err(e) => tracing::error!("cannot answer {ticket}: {e:#}"),
            Ok(()) => {}
        }
        if !reply.ended.get() {
            // Unanswered (a notice) or failed half-way (then the client cannot be answered
            // honestly: its connection is closed).
            let piece = if served.is_ok() {
                Piece::Last
            } else {
                Piece::LastThenClose
            };
            if let Err(e) = reply.send(b"", piece) {
                let e = anyhow::Error::from(e);
                if broker_gone(&e) {
                    tracing::warn!("the broker is gone: the end of {ticket} is lost with it");
                } else {
                    tracing::error!("cannot send the response to {ticket} to the broker: {e}");
                }
            }
        }
        let kept = reply.kept.take()?;
        Some((kept, reply.said.take()))
    }

    fn writer(&self, reply: &Rc<Reply>, facts: RequestFacts) -> Rc<RefCell<ResponseWriter>> {
        Rc::new(RefCell::new(ResponseWriter::new(reply.clone(), facts)))
    }

    /// Answers a request we refuse, and closes its connection.
    fn refuse(&self, reply: &Rc<Reply>, status: &str, reason: &str) -> io::Result<()> {
        self.writer(reply, RequestFacts::default())
            .borrow_mut()
            .reply_error(status, &format!("{reason}\n"))
    }

    fn handle(
        &mut self,
        py: Python<'_>,
        msg: Vec<u8>,
        piped: Option<File>,
        reply: &Rc<Reply>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let prepared = match Request::parse(&msg) {
            Err(e) => {
                tracing::warn!("malformed message from mongrel2 ({e}): {:?}", preview(&msg));
                self.refuse(reply, "400 Bad Request", "malformed request")?;
                return Ok(());
            }
            Ok(req) => {
                reply.note_offer(&req);
                match self.prepare(py, &req, reply)? {
                    Some(prepared) => prepared,
                    None => return Ok(()),
                }
            }
        };
        let Prepared {
            environ,
            writer,
            upload,
            body_range,
            pipe_body,
            access,
        } = prepared;
        let Some(body) = self.input(msg, upload.as_ref(), body_range, pipe_body, piped, reply)?
        else {
            return Ok(());
        };
        environ.set_item(intern!(py, "wsgi.input"), Bound::new(py, Input::new(body))?)?;
        let result = call::run_app(py, self.app.bind(py), environ, &writer);
        if let Some(upload) = upload.filter(|u| !u.lent) {
            if let Err(e) = upload.remove() {
                tracing::error!("cannot remove upload {}: {e}", upload.path.display());
            }
            let _ = std::fs::remove_file(&self.upload_marker);
        }
        self.served += 1;
        if let Some(access) = access {
            let w = writer.borrow();
            tracing::info!(
                target: "wsgid::access",
                "{access} {} {} {:.1}ms",
                w.status_code,
                w.body_bytes,
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        result.context("cannot send the response")
    }

    /// What `wsgi.input` reads: the upload file, the body's own pipe, or the message's
    /// bytes. `None` when a piped body did not come (answered 500 here).
    fn input(
        &self,
        msg: Vec<u8>,
        upload: Option<&UploadFile>,
        body_range: (usize, usize),
        pipe_body: Option<u64>,
        piped: Option<File>,
        reply: &Rc<Reply>,
    ) -> anyhow::Result<Option<Body>> {
        if let Some(upload) = upload {
            // A lent file is the front end's to remove, whatever becomes of us.
            if !upload.lent {
                if let Err(e) = std::fs::write(&self.upload_marker, &upload.named) {
                    tracing::warn!("cannot write {}: {e}", self.upload_marker.display());
                }
            }
            let file = upload
                .file
                .try_clone()
                .context("cannot reuse the upload file")?;
            return Ok(Some(if upload.lent {
                Body::lent_file(file, upload.size, Rc::clone(&reply.over))
            } else {
                Body::file(file, upload.size)
            }));
        }
        Ok(Some(match (pipe_body, piped) {
            (Some(len), Some(pipe)) => Body::lent_file(pipe, len, Rc::clone(&reply.over)),
            (Some(_), None) => {
                tracing::error!("a request's body pipe did not come with it");
                self.refuse(
                    reply,
                    "500 Internal Server Error",
                    "the request body was lost",
                )?;
                return Ok(None);
            }
            (None, _) => Body::inline(msg, body_range.0, body_range.1),
        }))
    }

    /// Decides what a parsed message needs; returns what to run the app with, or `None`
    /// when the message is fully handled (notification, refusal, upload start).
    fn prepare<'py>(
        &mut self,
        py: Python<'py>,
        req: &Request<'_>,
        reply: &Rc<Reply>,
    ) -> anyhow::Result<Option<Prepared<'py>>> {
        if !self.serves_kind(req, reply)? {
            return Ok(None);
        }
        // A piped body is as long as declared (the front end sends it whole).
        let piped_len = req
            .header(BODY_PIPE)
            .map(|_| req.content_length().unwrap_or(0));
        // Inline bodies are at most mongrel2's limits.content_length; the limit still holds.
        if let Err(refusal) = self
            .policy
            .check_size(piped_len.unwrap_or(req.body.len() as u64))
        {
            self.refuse_upload(req, reply, refusal)?;
            return Ok(None);
        }
        let upload = match self.body_file(req, reply)? {
            BodyFile::Handled => return Ok(None),
            BodyFile::Inline => None,
            BodyFile::File(file) => Some(file),
        };
        let connection = req.headers.get(b"connection").map(|v| v.joined(b","));
        let facts = RequestFacts::new(
            req.header(b"VERSION").unwrap_or(b"HTTP/1.1"),
            connection.as_deref(),
            req.header(b"METHOD").unwrap_or(b"GET"),
        );
        let writer = self.writer(reply, facts);
        let content_length = match &upload {
            Some(file) => Some(req.content_length().unwrap_or(file.size)),
            None => req
                .content_length()
                .or((!req.body.is_empty()).then_some(req.body.len() as u64)),
        };
        let info = BodyInfo {
            content_length,
            upload_path: upload
                .as_ref()
                .filter(|u| !u.lent)
                .map(|u| u.path.as_path()),
        };
        let environ = environ::build(py, &self.template, req, py.None().into_bound(py), &info)?;
        let msg_start = req.sender.as_ptr() as usize;
        let body_start = req.body.as_ptr() as usize - msg_start;
        Ok(Some(Prepared {
            environ,
            writer,
            upload,
            body_range: (body_start, body_start + req.body.len()),
            pipe_body: piped_len,
            access: access_request(req),
        }))
    }

    /// Whether the message is an HTTP request for the app; the others are handled here
    /// (notices are ignored, what WSGI cannot serve is refused or closed).
    fn serves_kind(&self, req: &Request<'_>, reply: &Rc<Reply>) -> anyhow::Result<bool> {
        let conn_id = req.conn_id;
        match req.kind() {
            MessageKind::Http => return Ok(true),
            MessageKind::Disconnect | MessageKind::Credits | MessageKind::OtherNotification => {
                tracing::debug!(conn_id, kind = ?req.kind(), "notification");
            }
            MessageKind::UploadStream => {
                tracing::warn!(
                    conn_id,
                    "upload.stream=1 is not supported; use upload.temp_store"
                );
                self.refuse(
                    reply,
                    "501 Not Implemented",
                    "streamed uploads are not supported",
                )?;
            }
            other => {
                tracing::warn!(conn_id, kind = ?other, "not an HTTP request (WSGI serves HTTP only); closing the connection");
                reply.send(b"", Piece::LastThenClose)?;
            }
        }
        Ok(false)
    }

    /// Where the body is, by the message's upload headers: checked before it is opened
    /// (only files of the upload store, of the size announced, within --max-body-size).
    fn body_file(&mut self, req: &Request<'_>, reply: &Rc<Reply>) -> anyhow::Result<BodyFile> {
        let conn_id = req.conn_id;
        match req.upload() {
            UploadMarker::None => Ok(BodyFile::Inline),
            UploadMarker::Start(path) => {
                match self.policy.admit(req, path) {
                    Ok(()) => {
                        tracing::debug!(conn_id, path = %String::from_utf8_lossy(path), "upload started")
                    }
                    Err(refusal) => self.refuse_upload(req, reply, refusal)?,
                }
                Ok(BodyFile::Handled)
            }
            UploadMarker::Done(path) => match self.policy.open(req, path) {
                Ok(file) => match self.policy.check_size(file.size) {
                    Ok(()) => Ok(BodyFile::File(file)),
                    Err(refusal) => {
                        // A complete upload is ours to delete, refused or not.
                        if let Err(e) = file.remove() {
                            tracing::error!("cannot remove upload {}: {e}", file.path.display());
                        }
                        self.refuse_upload(req, reply, refusal)?;
                        Ok(BodyFile::Handled)
                    }
                },
                Err(OpenError::Refused(refusal)) => {
                    self.refuse_upload(req, reply, refusal)?;
                    Ok(BodyFile::Handled)
                }
                Err(OpenError::Unavailable(e)) => {
                    tracing::error!(conn_id, path = %String::from_utf8_lossy(path), "upload file unavailable: {e}");
                    self.refuse(
                        reply,
                        "500 Internal Server Error",
                        "the uploaded body was lost",
                    )?;
                    Ok(BodyFile::Handled)
                }
            },
            UploadMarker::Mismatched => {
                self.refuse_upload(
                    req,
                    reply,
                    Refusal::Forged("upload start and done headers disagree"),
                )?;
                Ok(BodyFile::Handled)
            }
        }
    }

    fn refuse_upload(
        &self,
        req: &Request<'_>,
        reply: &Rc<Reply>,
        refusal: Refusal,
    ) -> io::Result<()> {
        let conn_id = req.conn_id;
        let stage = match req.upload() {
            UploadMarker::Start(_) => "start",
            UploadMarker::Done(_) => "done",
            UploadMarker::None => "inline body",
            UploadMarker::Mismatched => "headers",
        };
        match refusal {
            Refusal::Forged(reason) => {
                tracing::warn!(conn_id, stage, "refused upload headers: {reason}");
                self.refuse(reply, "400 Bad Request", reason)
            }
            Refusal::TooLarge { declared, limit } => {
                tracing::warn!(
                    conn_id,
                    stage,
                    declared,
                    limit,
                    "refused upload larger than --max-body-size"
                );
                self.refuse(reply, "413 Payload Too Large", "request body too large")
            }
        }
    }
}

/// The access log line's request part; only built when the access log is on (WSGID_LOG=warn
/// turns it off).
fn access_request(req: &Request<'_>) -> Option<String> {
    tracing::enabled!(target: "wsgid::access", tracing::Level::INFO).then(|| {
        format!(
            "{} \"{} {} {}\"",
            String::from_utf8_lossy(req.header(b"REMOTE_ADDR").unwrap_or(b"-")),
            String::from_utf8_lossy(req.header(b"METHOD").unwrap_or(b"-")),
            String::from_utf8_lossy(req.header(b"URI").unwrap_or(req.path)),
            String::from_utf8_lossy(req.header(b"VERSION").unwrap_or(b"-")),
        )
    })
}

/// The start of a message, for a log line about it.
fn preview(msg: &[u8]) -> String {
    String::from_utf8_lossy(&msg[..msg.len().min(200)]).into_owned()
}

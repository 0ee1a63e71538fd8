//! `wsgid server`: start-up in mongrel2's order (§1.3 of the reference), then the loop.
//!
//! Load the config; bind the HTTP listener (before the chroot, so ports under 1024 work);
//! check the pid file; chroot when root (otherwise mongrel2's "test mode": paths are taken
//! under the chroot directory without entering it); daemonize when `server.daemonize`;
//! write the pid file; drop to the chroot directory's owner; bind the handlers' sockets
//! (`ipc://` paths are then inside the chroot); open the logs; serve.

use std::io::Write;
use std::net::ToSocketAddrs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use mio::{Poll, Registry};

use crate::access_log::AccessLog;
use crate::config::{self, Config, Target};
use crate::dir::DirRoute;
use crate::front::{Front, Hub, RouteTarget};
use crate::handlers::Handlers;
use crate::mime::MimeTypes;
use crate::net::Listener;
use crate::routing::{HostSpec, Router};
use crate::settings::Settings;

/// How long a stop waits for the requests in service.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Reads `path`: a `config.sqlite` (by its magic bytes) or a `.conf` file.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let mut magic = [0u8; 16];
    let is_sqlite = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"SQLite format 3\0";
    if is_sqlite {
        config::sqlite::load(path)
    } else {
        config::conf::load(path)
    }
}

pub fn run(config_path: &Path, uuid: Option<&str>) -> anyhow::Result<()> {
    let config = load(config_path)?;
    let server = config.server(uuid)?.clone();
    let (settings, warnings) = Settings::from_map(&config.settings);
    if server.use_ssl {
        bail!("server {}: use_ssl=1, and TLS is not implemented yet; refusing to serve plain HTTP where HTTPS is configured", server.uuid);
    }
    let root = PathBuf::from(if server.chroot.is_empty() {
        "."
    } else {
        &server.chroot
    });
    let chrooting = nix::unistd::geteuid().is_root() && !server.chroot.is_empty();
    // Paths as seen from here, before any chroot.
    let outside = |p: &str| root.join(p.trim_start_matches('/'));
    init_logging(&outside(&server.error_log), !settings.daemonize)?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    warn_unimplemented(&server);

    raise_fd_limit();
    let listener = bind_http(&server)?;
    let pid_path = outside(&server.pid_file);
    clear_stale_pid_file(&pid_path)?;
    // Opened before the chroot, which usually has no /dev.
    let dev_null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    if chrooting {
        nix::unistd::chroot(&root).with_context(|| format!("chroot {}", root.display()))?;
        std::env::set_current_dir("/")?;
    }
    // Paths as seen from here, from now on.
    let inside = {
        let root = root.clone();
        move |p: &str| {
            if chrooting {
                Path::new("/").join(p.trim_start_matches('/'))
            } else {
                root.join(p.trim_start_matches('/'))
            }
        }
    };
    error_log_moved_to(inside(&server.error_log));
    if settings.daemonize {
        #[allow(deprecated)]
        nix::unistd::daemon(true, true).context("daemonize")?;
        // stdio to /dev/null, so that whoever started us sees its pipes close: from now
        // on the error log says what happens.
        let null = std::os::fd::AsRawFd::as_raw_fd(&dev_null);
        for fd in 0..=2 {
            // SAFETY: both descriptors are open; dup2 replaces `fd` atomically.
            if unsafe { libc::dup2(null, fd) } < 0 {
                return Err(std::io::Error::last_os_error()).context("stdio to /dev/null");
            }
        }
    }
    let pid_path = inside(&server.pid_file);
    write_pid_file(&pid_path)?;
    let result = (|| {
        if chrooting {
            drop_to_owner_of(Path::new("/"))?;
        }
        let poll = Poll::new()?;
        let handlers = Handlers::new(settings.handler_heartbeat);
        let hub = build_hub(
            &config, &server, settings, handlers, &inside, &poll, chrooting,
        )?;
        let mut front = Front::new(poll, vec![listener], hub)?;
        let reload = Reload {
            config_path: config_path.to_path_buf(),
            uuid: server.uuid.clone(),
            inside: Box::new(inside.clone()),
        };
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&stop))?;
        }
        let reopen = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reopen))?;
        tracing::info!(
            "serving {} on {}:{} (server {})",
            config_path.display(),
            server.bind_addr,
            server.port,
            server.uuid
        );
        front.run(stop, reopen, Some(&reload), STOP_GRACE)
    })();
    let _ = std::fs::remove_file(&pid_path);
    result
}

/// `handlers`: any made in this process already (see `Handlers::add_inproc`).
pub(crate) fn build_hub(
    config: &Config,
    server: &config::Server,
    settings: Settings,
    mut handlers: Handlers,
    inside: &dyn Fn(&str) -> PathBuf,
    poll: &Poll,
    chrooting: bool,
) -> anyhow::Result<Hub> {
    let (router, dirs) = build_routes(server, &mut handlers, inside, poll.registry())?;
    let upload_root = if chrooting {
        PathBuf::from("/")
    } else {
        inside("/")
    };
    if let Some(template) = &settings.temp_store {
        crate::upload::check_template(template, &upload_root).map_err(anyhow::Error::msg)?;
    }
    let access = if settings.access_logging {
        let path = inside(&server.access_log);
        Some(AccessLog::open(&path).with_context(|| format!("access log {}", path.display()))?)
    } else {
        None
    };
    Ok(Hub {
        handlers,
        router,
        dirs,
        mime: MimeTypes::new(&config.mimetypes),
        settings,
        access,
        upload_root,
        scheme: b"http",
        lending: false,
        pool: None,
        pipes: None,
    })
}

/// The router and the Dir routes of `server`; handlers are bound on first use (a reload
/// keeps those already bound).
fn build_routes(
    server: &config::Server,
    handlers: &mut Handlers,
    inside: &dyn Fn(&str) -> PathBuf,
    registry: &Registry,
) -> anyhow::Result<(Router<RouteTarget>, Vec<DirRoute>)> {
    let mut dirs = Vec::new();
    let mut hosts = Vec::new();
    for host in &server.hosts {
        let mut routes = Vec::new();
        for route in &host.routes {
            let target = match &route.target {
                Target::Handler(h) => RouteTarget::Handler(handlers.add(h, registry)?),
                Target::Dir(d) => {
                    let base = inside(&d.base);
                    let dir = DirRoute::new(&base, &d.index_file, &d.default_ctype).with_context(
                        || format!("Dir route {:?}: base {}", route.path, base.display()),
                    )?;
                    dirs.push(dir);
                    RouteTarget::Dir(dirs.len() - 1)
                }
                Target::Proxy(_) => RouteTarget::Proxy,
            };
            routes.push((route.path.clone(), target));
        }
        hosts.push(HostSpec {
            name: host.name.clone(),
            matching: host.matching.clone(),
            routes,
        });
    }
    let router = Router::new(hosts, &server.default_host).map_err(anyhow::Error::msg)?;
    Ok((router, dirs))
}

/// What SIGHUP needs to read the config again (mongrel2 needs a restart for a new route).
pub struct Reload {
    config_path: PathBuf,
    uuid: String,
    inside: Box<dyn Fn(&str) -> PathBuf>,
}

impl Reload {
    /// Reads the config again: routes, Dir routes, mimetypes and settings are replaced and
    /// new handlers bound; the listener, chroot, privileges and logs stay as they are. On
    /// any error the running config stays.
    pub fn apply(&self, hub: &mut Hub, registry: &Registry) -> anyhow::Result<()> {
        let config = load(&self.config_path)?;
        let server = config.server(Some(&self.uuid))?;
        let (settings, warnings) = Settings::from_map(&config.settings);
        if let Some(template) = &settings.temp_store {
            crate::upload::check_template(template, &hub.upload_root)
                .map_err(anyhow::Error::msg)?;
        }
        let (router, dirs) = build_routes(server, &mut hub.handlers, &*self.inside, registry)?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        warn_unimplemented(server);
        hub.router = router;
        hub.dirs = dirs;
        hub.mime = MimeTypes::new(&config.mimetypes);
        hub.settings = Settings {
            // Bound into the handlers at start.
            handler_heartbeat: hub.settings.handler_heartbeat,
            ..settings
        };
        Ok(())
    }
}

/// What the config asks for that we do not do (yet), named at start.
fn warn_unimplemented(server: &config::Server) {
    for plugin in &server.plugins {
        tracing::warn!("filter/xrequest plugin {plugin} is not supported: ignored");
    }
    for host in &server.hosts {
        for route in &host.routes {
            if let Target::Proxy(p) = &route.target {
                tracing::warn!(
                    "host {} route {:?}: Proxy routes ({}:{}) are not implemented yet; they answer 501",
                    host.name,
                    route.path,
                    p.addr,
                    p.port
                );
            }
        }
    }
    if !server.control_port.is_empty() {
        tracing::warn!(
            "control_port {} is not implemented: there is no control port",
            server.control_port
        );
    }
}

fn bind_http(server: &config::Server) -> anyhow::Result<Listener> {
    let address = (server.bind_addr.as_str(), server.port)
        .to_socket_addrs()
        .with_context(|| format!("bind_addr {}", server.bind_addr))?
        .next()
        .with_context(|| format!("bind_addr {}: no address", server.bind_addr))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&address.into())
        .with_context(|| format!("cannot listen on {address}"))?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(Listener::Tcp(mio::net::TcpListener::from_std(
        socket.into(),
    )))
}

/// Each client holds a descriptor: take all the kernel allows us (the soft limit is often
/// 1024, far below what an idle keep-alive crowd needs). Returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard {
        if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::warn!("cannot raise the open files limit from {soft}");
            return soft;
        }
        return hard;
    }
    soft
}

/// A pid file naming a live process means another server runs: refuse. A dead one is
/// removed (mongrel2 leaves it behind when it stops).
fn clear_stale_pid_file(path: &Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    if let Ok(pid) = text.trim().parse::<i32>() {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
            bail!(
                "{} names process {pid}, which is running: is the server already started?",
                path.display()
            );
        }
    }
    std::fs::remove_file(path)
        .with_context(|| format!("removing the stale pid file {}", path.display()))
}

fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("pid file {}", path.display()))?;
    writeln!(file, "{}", std::process::id())?;
    Ok(())
}

/// mongrel2's rule: after a chroot, run as the chroot directory's owner.
fn drop_to_owner_of(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir)?;
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(meta.uid()),
        nix::unistd::Gid::from_raw(meta.gid()),
    );
    if uid.is_root() {
        return Ok(());
    }
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setgid(gid).context("setgid")?;
    nix::unistd::setuid(uid).context("setuid")?;
    tracing::info!("running as uid {uid}, gid {gid}");
    Ok(())
}

/// The error log (opened before the chroot, so it needs no reopening inside), and stderr
/// too when in the foreground.
fn init_logging(error_log: &Path, to_stderr: bool) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(error_log)
        .with_context(|| format!("error log {}", error_log.display()))?;
    let file = Arc::new(Mutex::new(file));
    let _ = ERROR_LOG.set((Mutex::new(error_log.to_path_buf()), Arc::clone(&file)));
    let writer = Tee {
        file,
        stderr: to_stderr,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WSGID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    Ok(())
}

/// The error log's path (as seen before any chroot) and file, for SIGHUP.
static ERROR_LOG: std::sync::OnceLock<(Mutex<PathBuf>, Arc<Mutex<std::fs::File>>)> =
    std::sync::OnceLock::new();

/// After the chroot: the error log's path as seen from inside, for reopening.
fn error_log_moved_to(inside: PathBuf) {
    if let Some((path, _)) = ERROR_LOG.get() {
        *path.lock().unwrap_or_else(|e| e.into_inner()) = inside;
    }
}

/// Reopens the error log after logrotate moved it.
pub fn reopen_error_log() {
    let Some((path, file)) = ERROR_LOG.get() else {
        return;
    };
    let path = path.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path);
    match opened {
        Ok(fresh) => *file.lock().unwrap_or_else(|e| e.into_inner()) = fresh,
        Err(e) => tracing::warn!("cannot reopen the error log {}: {e}", path.display()),
    }
}

#[derive(Clone)]
struct Tee {
    file: Arc<Mutex<std::fs::File>>,
    stderr: bool,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stderr {
            let _ = std::io::stderr().write_all(buf);
        }
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Tee;

    fn make_writer(&'a self) -> Tee {
        self.clone()
    }
}

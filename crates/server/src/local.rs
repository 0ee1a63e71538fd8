//! The front end of one-command mode (`wsgid --bind`): no config file, one route (`/`) to
//! one handler, the gateway's broker, running in this process (`inproc`). The master binds
//! the listeners and hands them over, so the addresses outlive a restarted front end.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use mio::Poll;

use crate::config::{self, Config, Host, Protocol, Route, Server, Target};
use crate::front::Front;
use crate::handlers::Handlers;
use crate::inproc::Inproc;
use crate::net::Listener;
use crate::settings::Settings;
use crate::upload::{RequestPipes, SpoolPool};

/// What the master decides for its front end.
pub struct Local {
    /// Listening sockets, bound by the master.
    pub listeners: Vec<OwnedFd>,
    /// The broker, which takes the requests to the workers.
    pub broker: Box<dyn Inproc>,
    /// mkstemp template for bodies over `inline_body`.
    pub temp_store: String,
    /// Bodies up to this travel in the request message; larger ones are spooled to disk.
    pub inline_body: u64,
    /// How long a stop waits for the requests in service.
    pub grace: Duration,
}

/// The handler's identity towards the broker (it answers any).
const IDENT: &str = "wsgid-local";
/// The broker's name where a handler's endpoints would be.
const INPROC: &str = "inproc://broker";
/// Request heads up to this size (mongrel2's 4 KiB default is short for today's cookies;
/// nginx allows 4 x 8 KiB, gunicorn about 8 KiB per line).
const HEAD_LIMIT: usize = 16 << 10;
/// A proxy's X-Forwarded-For is kept; the workers believe it only from a peer in
/// `--forwarded-allow-ips`, and take the peer's address otherwise.
const NO_CLOBBER_XFF: bool = true;

/// What a worker needs to read the next requests of a connection it holds (see
/// `front::lend::Lent::MayHold`) as this front end would: the same limits and headers.
pub fn held_requests() -> (crate::http::request::HeadLimits, bool) {
    let limits = crate::http::request::HeadLimits {
        max_head: HEAD_LIMIT,
        max_headers: Settings::from_map(&BTreeMap::new()).0.header_count,
    };
    (limits, NO_CLOBBER_XFF)
}

pub fn run(local: Local) -> anyhow::Result<()> {
    let limit = usize::try_from(crate::run::raise_fd_limit()).unwrap_or(usize::MAX);
    let listeners = local
        .listeners
        .into_iter()
        .map(Listener::from_fd)
        .collect::<std::io::Result<Vec<_>>>()?;
    let handler = config::Handler {
        send_spec: INPROC.to_string(),
        send_ident: IDENT.to_string(),
        recv_spec: INPROC.to_string(),
        recv_ident: String::new(),
        raw_payload: false,
        protocol: Protocol::Tnetstring,
    };
    let server = Server {
        uuid: IDENT.to_string(),
        name: IDENT.to_string(),
        access_log: String::new(),
        error_log: String::new(),
        pid_file: String::new(),
        chroot: String::new(),
        default_host: "any".to_string(),
        bind_addr: String::new(),
        port: 0,
        use_ssl: false,
        control_port: String::new(),
        hosts: vec![Host {
            name: "any".to_string(),
            matching: "any".to_string(),
            routes: vec![Route {
                path: "/".to_string(),
                target: Target::Handler(handler.clone()),
            }],
        }],
        plugins: Vec::new(),
    };
    let raw: BTreeMap<String, String> = [
        ("limits.content_length", local.inline_body.to_string()),
        ("limits.buffer_size", HEAD_LIMIT.to_string()),
        ("upload.temp_store", local.temp_store),
        // The workers' access log says what was served.
        ("disable.access_logging", "1".to_string()),
        ("no_clobber_xff", u8::from(NO_CLOBBER_XFF).to_string()),
        // Credits: a slow client holds up its worker's response rather than buffering it.
        ("download.flow_control", "1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (settings, warnings) = Settings::from_map(&raw);
    debug_assert!(warnings.is_empty(), "{warnings:?}");
    let config = Config {
        servers: vec![server.clone()],
        settings: raw,
        mimetypes: BTreeMap::new(),
    };
    let poll = Poll::new()?;
    let absolute = |p: &str| PathBuf::from(p);
    let mut handlers = Handlers::new(settings.handler_heartbeat);
    handlers.add_inproc(&handler, local.broker);
    let mut hub = crate::run::build_hub(
        &config, &server, settings, handlers, &absolute, &poll, false,
    )?;
    hub.lending = true;
    hub.pool = Some(SpoolPool::default());
    hub.pipes = Some(RequestPipes::default());
    let mut front = Front::new(poll, listeners, hub)?;
    // An eighth of the descriptors (at least 32) for the broker's work: workers' links,
    // spool files, body pipes.
    front.limit_connections(limit.saturating_sub((limit / 8).max(32)));
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    // The master's business (it reloads the workers); the front end has nothing to redo.
    let ignored = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&ignored))?;
    tracing::info!("front end ready");
    front.run(stop, Arc::new(AtomicBool::new(false)), None, local.grace)
}

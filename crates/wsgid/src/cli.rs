//! The command line, option for option the original wsgid's (see the README for what we
//! changed): `wsgid [SUBCOMMAND] [OPTIONS]`. Without a subcommand wsgid serves.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::config::validate_spec;

#[derive(Debug, Parser)]
#[command(
    name = "wsgid",
    version,
    disable_version_flag = true,
    propagate_version = true,
    about = "A complete WSGI environment for mongrel2 handlers",
    after_help = "Options given on the command line override <app-path>/wsgid.json."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub options: Options,

    /// Print the version and exit.
    #[arg(short = 'v', long = "version", action = ArgAction::Version, global = true)]
    version: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the app folder (app/, logs/, pid/master, pid/worker); idempotent.
    Init,
    /// Write the given options into <app-path>/wsgid.json, keeping keys not given.
    Config {
        /// Write "debug": false.
        #[arg(long)]
        no_debug: bool,
    },
    /// Print whether this app folder's wsgid is running, with master and worker pids.
    Status,
    /// Stop the master (graceful unless --send-signal says otherwise) and wait until it is
    /// gone.
    Stop {
        #[command(flatten)]
        signal: SignalArg,
        /// Seconds to wait for the master to exit.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
    },
    /// Graceful reload: the master starts new workers, then retires the old ones.
    Restart {
        #[command(flatten)]
        signal: SignalArg,
    },
    /// Internal: run one worker (started by the master, never by hand).
    #[command(hide = true)]
    Worker,
    /// Internal: run the broker (started by the master, never by hand).
    #[command(hide = true)]
    Broker,
}

#[derive(Debug, Args)]
pub struct SignalArg {
    /// Signal to send, by name (TERM, SIGHUP) or number.
    #[arg(long, value_name = "SIGNAL")]
    pub send_signal: Option<String>,
}

/// Options shared by every invocation. `Option`/`bool` fields that are unset/false leave
/// the wsgid.json value (or the default) in force.
#[derive(Debug, Args, Default, Clone)]
pub struct Options {
    /// ZeroMQ endpoint to PULL requests from: mongrel2's handler send_spec.
    #[arg(long, value_name = "SPEC", value_parser = parse_spec, global = true)]
    pub recv: Option<String>,
    /// ZeroMQ endpoint to PUB replies to: mongrel2's handler recv_spec.
    #[arg(long, value_name = "SPEC", value_parser = parse_spec, global = true)]
    pub send: Option<String>,
    /// The WSGI callable: `pkg.module:callable` or the dotted `pkg.module.callable`.
    #[arg(long, value_name = "NAME", global = true)]
    pub wsgi_app: Option<String>,
    /// The app folder; its app/ goes on sys.path. Default: the current directory.
    #[arg(long, value_name = "DIR", global = true)]
    pub app_path: Option<PathBuf>,
    /// Number of worker processes.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub workers: Option<u32>,
    /// Stay in the foreground.
    #[arg(long, global = true)]
    pub no_daemon: bool,
    /// Log to stderr instead of <app-path>/logs/wsgid.log.
    #[arg(long, global = true)]
    pub stdout: bool,
    /// Log at debug level.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Replace workers that die (the default).
    #[arg(long, overrides_with = "no_keep_alive", global = true)]
    pub keep_alive: bool,
    /// Do not replace workers that die.
    #[arg(long, global = true)]
    pub no_keep_alive: bool,
    /// chroot into the app folder before serving (root only).
    #[arg(long, global = true)]
    pub chroot: bool,
    /// mongrel2's chroot as seen from here: upload paths are resolved under it.
    #[arg(long, value_name = "DIR", global = true)]
    pub mongrel2_chroot: Option<PathBuf>,
    /// mongrel2's upload.temp_store template (e.g. /tmp/upload.XXXXXX): uploads whose path
    /// does not match it are refused.
    #[arg(long, value_name = "TEMPLATE", global = true)]
    pub upload_temp_store: Option<String>,
    /// Refuse request bodies larger than this with 413 (default: no limit).
    #[arg(long, value_name = "BYTES", global = true)]
    pub max_body_size: Option<u64>,
    /// Force the Django loader.
    #[arg(long, global = true)]
    pub django: bool,
    /// Make this virtualenv's packages importable (default: $VIRTUAL_ENV).
    #[arg(long, value_name = "DIR", global = true)]
    pub virtualenv: Option<PathBuf>,
    /// Seconds a stopping worker may take to finish its request.
    #[arg(long, value_name = "SECONDS", global = true)]
    pub graceful_timeout: Option<u64>,
    /// Retire a worker gracefully after this many requests.
    #[arg(long, value_name = "N", global = true)]
    pub max_requests: Option<u64>,
    /// Start even if a master already serves this app folder.
    #[arg(long, global = true)]
    pub allow_second_master: bool,
    /// Front-end addresses (comma-separated, `*` for any) whose X-Forwarded-Proto and
    /// X-Forwarded-For are trusted for wsgi.url_scheme and REMOTE_ADDR (default: 127.0.0.1).
    #[arg(long, value_name = "ADDRS", global = true)]
    pub forwarded_allow_ips: Option<String>,
}

/// The original's spec check: `(inproc|ipc|tcp|pgm|epgm)://...`, and `tcp://host:port`.
fn parse_spec(spec: &str) -> Result<String, String> {
    validate_spec(spec).map(|()| spec.to_string())
}

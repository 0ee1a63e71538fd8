//! The command line, option for option the original wsgid's (see the README for what we
//! changed): `wsgid [SUBCOMMAND] [OPTIONS]`. Without a subcommand wsgid serves.

use clap::{ArgAction, Args, Parser, Subcommand};

pub use gateway::config::Options;

#[derive(Debug, Parser)]
#[command(
    name = "wsgid",
    version,
    disable_version_flag = true,
    propagate_version = true,
    about = "Serves a Python WSGI app: over HTTP itself (--bind), or as a mongrel2 handler (--recv/--send)",
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
    /// Serve HTTP as mongrel2 would, from its config: `wsgid server config.sqlite UUID` (the
    /// arguments mongrel2 takes) or `wsgid server mongrel2.conf [UUID]`.
    Server {
        /// A config.sqlite written by `m2sh load`, or a mongrel2 .conf file.
        config: std::path::PathBuf,
        /// The server's uuid; may be left out when the config declares one server.
        uuid: Option<String>,
    },
    /// Internal: run one worker (started by the master, never by hand).
    #[command(hide = true)]
    Worker,
    /// Internal: run the broker (started by the master, never by hand).
    #[command(hide = true)]
    Broker,
    /// Internal: run the HTTP front end of `--bind` (started by the master, never by hand).
    #[command(hide = true)]
    Front,
}

#[derive(Debug, Args)]
pub struct SignalArg {
    /// Signal to send, by name (TERM, SIGHUP) or number.
    #[arg(long, value_name = "SIGNAL")]
    pub send_signal: Option<String>,
}

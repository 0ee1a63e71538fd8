//! `wsgid`: serves a Python WSGI application as a mongrel2 handler.
//!
//! `main` only dispatches: subcommands (`commands`), the master (`arbiter`), or a worker
//! (`worker`, started by the master as `wsgid worker`).

mod cli;
mod commands;

use gateway::{appdir, arbiter, bind, broker, daemon, front, link, logging, worker};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::Signal;

use crate::cli::{Cli, Command};
use gateway::config::Settings;

/// Usage errors (bad options, a malformed wsgid.json) exit 2, as argparse did.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let app_path = || -> PathBuf {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        cwd.join(cli.options.app_path.clone().unwrap_or_else(|| cwd.clone()))
    };
    let result = match &cli.command {
        None => return serve(&cli),
        Some(Command::Worker) => return run_child("worker", worker::run),
        Some(Command::Broker) => {
            return run_child("broker", |settings| {
                as_folder_owner(&settings)?;
                broker::run(&settings, link::inherited_listener()?)
            })
        }
        Some(Command::Front) => {
            return run_child("front", |settings| {
                as_folder_owner(&settings)?;
                front::run(&settings)
            })
        }
        Some(Command::Server { config, uuid }) => {
            return match server::run::run(config, uuid.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wsgid server: error: {e:#}");
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Init) => commands::init(&app_path()),
        Some(Command::Config { no_debug }) => {
            commands::config(&app_path(), &cli.options, *no_debug)
        }
        Some(Command::Status) => {
            print!("{}", commands::status(&app_path()));
            Ok(())
        }
        Some(Command::Stop { signal, wait }) => {
            let app_path = app_path();
            let masters = appdir::pids(&app_path, appdir::Role::Master);
            send(&app_path, signal.send_signal.as_deref(), Signal::SIGTERM)
                .and_then(|()| commands::wait_for_masters(&masters, Duration::from_secs(*wait)))
        }
        Some(Command::Restart { signal }) => {
            send(&app_path(), signal.send_signal.as_deref(), Signal::SIGHUP)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgid: error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The broker and the front end run as the app folder's owner (the master may stay root
/// for `--chroot`), and die with the master.
fn as_folder_owner(settings: &Settings) -> anyhow::Result<()> {
    let master = nix::unistd::getppid();
    daemon::drop_privileges(daemon::folder_owner(&settings.app_path)?)?;
    daemon::rearm_parent_death(master)
}

fn send(app_path: &std::path::Path, given: Option<&str>, default: Signal) -> anyhow::Result<()> {
    let signal = given
        .map(commands::parse_signal)
        .transpose()?
        .unwrap_or(default);
    let count = commands::signal_masters(app_path, signal);
    if count == 0 {
        anyhow::bail!("no running wsgid master in {}", app_path.display());
    }
    Ok(())
}

fn serve(cli: &Cli) -> ExitCode {
    let settings = match Settings::resolve(&cli.options) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("wsgid: error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !cli.options.allow_second_master {
        if let Some(pid) = commands::live_master(&settings.app_path) {
            eprintln!(
                "wsgid: error: a master (pid {pid}) already serves {}; stop it first \
                 (wsgid stop), or pass --allow-second-master",
                settings.app_path.display()
            );
            return ExitCode::from(EXIT_USAGE);
        }
    }
    // Bound first: an address in use is a usage error, seen before daemonizing, and ports
    // under 1024 work for a master started as root.
    let listeners = match bind::listen_all(&settings.bind) {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("wsgid: error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let to_stderr = settings.stdout;
    if let Err(e) = logging::init(&settings.app_path, to_stderr, settings.debug) {
        eprintln!(
            "wsgid: error: cannot open {}: {e}",
            logging::log_path(&settings.app_path).display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let boot = if settings.no_daemon {
        daemon::BootReport::none()
    } else {
        let log_path = logging::log_path(&settings.app_path);
        match daemon::daemonize(logging::file_for_stdio(), &log_path) {
            Ok(boot) => boot,
            Err(e) => {
                eprintln!("wsgid: error: cannot daemonize: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    };
    // With --chroot, workers need root to chroot; they drop privileges themselves after.
    let dropped = if settings.chroot {
        Ok(())
    } else {
        daemon::folder_owner(&settings.app_path).and_then(daemon::drop_privileges)
    };
    let outcome = dropped
        .and_then(|()| arbiter::Arbiter::new(settings, boot, listeners))
        .and_then(arbiter::Arbiter::run);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<arbiter::BootFailed>() => {
            tracing::error!("{e}");
            ExitCode::from(worker::EXIT_APP_LOAD as u8)
        }
        Err(e) => {
            tracing::error!("master failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A process the master started (`wsgid worker`, `wsgid broker`): settings come as JSON
/// in the environment.
fn run_child(role: &str, run: impl FnOnce(Settings) -> anyhow::Result<()>) -> ExitCode {
    let settings: Settings = match std::env::var(arbiter::SETTINGS_ENV)
        .map_err(anyhow::Error::from)
        .and_then(|json| Ok(serde_json::from_str(&json)?))
    {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("wsgid {role}: started without settings ({e}); it is started by the master");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = logging::init(&settings.app_path, settings.stdout, settings.debug) {
        eprintln!("wsgid {role}: cannot open the log: {e}");
        return ExitCode::FAILURE;
    }
    let span = tracing::info_span!("child", role, pid = std::process::id());
    let _entered = span.enter();
    match run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{role} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

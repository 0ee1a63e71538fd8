//! The subcommands that manage an app folder: `init`, `config`, `status`, `stop`, `restart`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::cli::Options;
use gateway::appdir::{self, Role};
use gateway::config::{front_of, read_config_file, CONFIG_FILE};

pub fn init(app_path: &Path) -> anyhow::Result<()> {
    eprintln!("Initializing wsgid app folder in {}...", app_path.display());
    appdir::init(app_path).with_context(|| format!("cannot create {}", app_path.display()))
}

/// Writes the given options into wsgid.json with real JSON types; keys not given are kept.
pub fn config(app_path: &Path, options: &Options, no_debug: bool) -> anyhow::Result<()> {
    let mut cfg = read_config_file(app_path)?;
    let mut set = |key: &str, value: Value| {
        cfg.insert(key.to_string(), value);
    };
    let o = options;
    let given = [
        ("recv", o.recv.as_ref().map(|v| json!(v))),
        ("send", o.send.as_ref().map(|v| json!(v))),
        ("wsgi_app", o.wsgi_app.as_ref().map(|v| json!(v))),
        ("workers", o.workers.map(|v| json!(v))),
        (
            "mongrel2_chroot",
            o.mongrel2_chroot.as_ref().map(|v| json!(v)),
        ),
        (
            "upload_temp_store",
            o.upload_temp_store.as_ref().map(|v| json!(v)),
        ),
        ("max_body_size", o.max_body_size.map(|v| json!(v))),
        ("virtualenv", o.virtualenv.as_ref().map(|v| json!(v))),
        ("graceful_timeout", o.graceful_timeout.map(|v| json!(v))),
        ("max_requests", o.max_requests.map(|v| json!(v))),
        (
            "forwarded_allow_ips",
            o.forwarded_allow_ips.as_ref().map(|v| json!(v)),
        ),
    ];
    for (key, value) in given {
        if let Some(value) = value {
            set(key, value);
        }
    }
    for (given, key) in [
        (o.debug, "debug"),
        (o.no_daemon, "no_daemon"),
        (o.stdout, "stdout"),
        (o.chroot, "chroot"),
        (o.django, "django"),
    ] {
        if given {
            set(key, json!(true))
        }
    }
    if no_debug {
        set("debug", json!(false))
    }
    if o.keep_alive {
        set("keep_alive", json!(true))
    }
    if o.no_keep_alive {
        set("keep_alive", json!(false))
    }
    if !o.bind.is_empty() {
        // The command line wins: an address given replaces mongrel2's endpoints in the file.
        set("bind", json!(o.bind));
        cfg.remove("recv");
        cfg.remove("send");
    } else if o.recv.is_some() || o.send.is_some() {
        cfg.remove("bind");
    }
    // What is written must serve: --bind addresses, or mongrel2's two endpoints.
    front_of(&Options::default(), &cfg)?;
    let text = serde_json::to_string_pretty(&Value::Object(cfg))? + "\n";
    let path = app_path.join(CONFIG_FILE);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn pid_list(pids: &[u32]) -> String {
    pids.iter()
        .map(|&pid| {
            if appdir::alive(pid) {
                pid.to_string()
            } else {
                format!("{pid}(dead)")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The original's three lines. "Stopped" only when no master lives: a master without a
/// live worker is running, and says so.
pub fn status(app_path: &Path) -> String {
    let masters = appdir::pids(app_path, Role::Master);
    let workers = appdir::pids(app_path, Role::Worker);
    let master = masters.iter().any(|&p| appdir::alive(p));
    let worker = workers.iter().any(|&p| appdir::alive(p));
    let state = match (master, worker) {
        (true, true) => "Running",
        (true, false) => "Running (no live worker)",
        (false, _) => "Stopped",
    };
    format!(
        "Status: {}\nMaster pid(s): {}\nWorker pid(s): {}\n",
        state,
        pid_list(&masters),
        pid_list(&workers)
    )
}

/// A live master of this app folder, if any.
pub fn live_master(app_path: &Path) -> Option<u32> {
    appdir::pids(app_path, Role::Master)
        .into_iter()
        .find(|&p| appdir::alive(p))
}

/// Waits until the masters that were signalled have exited, at most `limit`. (Their pid
/// files go a moment before the processes do: the processes are watched.)
pub fn wait_for_masters(masters: &[u32], limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while let Some(&pid) = masters.iter().find(|&&p| appdir::alive(p)) {
        if Instant::now() >= deadline {
            bail!(
                "the master (pid {pid}) is still running after {}s",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A signal by name (`TERM`, `SIGTERM`, `term`) or number.
pub fn parse_signal(text: &str) -> anyhow::Result<Signal> {
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).with_context(|| format!("no signal number {number}"));
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .with_context(|| format!("unknown signal {text:?}"))
}

/// Sends `signal` to every live master of the app folder; returns how many got it.
pub fn signal_masters(app_path: &Path, signal: Signal) -> usize {
    appdir::pids(app_path, Role::Master)
        .into_iter()
        .filter(|&pid| kill(Pid::from_raw(pid as i32), signal).is_ok())
        .count()
}

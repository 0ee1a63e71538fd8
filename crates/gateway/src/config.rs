//! Settings: defaults, then `<app-path>/wsgid.json`, then the command line (the command line
//! wins; the original let the file win, which made a one-off override impossible).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Everything a master and its workers need; passed to workers as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    /// One-command mode: HTTP addresses the master serves itself (see `bind`). Empty
    /// behind mongrel2 (or `wsgid server`): then `recv` and `send` are its handler's.
    pub bind: Vec<String>,
    /// ZeroMQ endpoints: given, or in one-command mode the master's own front end's.
    pub recv: String,
    pub send: String,
    pub wsgi_app: Option<String>,
    pub app_path: PathBuf,
    pub workers: u32,
    pub no_daemon: bool,
    pub stdout: bool,
    pub debug: bool,
    pub keep_alive: bool,
    pub chroot: bool,
    pub mongrel2_chroot: PathBuf,
    pub upload_temp_store: Option<String>,
    pub max_body_size: Option<u64>,
    pub django: bool,
    pub virtualenv: Option<PathBuf>,
    pub graceful_timeout: u64,
    pub max_requests: Option<u64>,
    /// Peers whose X-Forwarded-* headers are trusted (`*`: any).
    pub forwarded_allow_ips: Vec<String>,
    pub envs: BTreeMap<String, String>,
}

pub const CONFIG_FILE: &str = "wsgid.json";

/// The original's spec validation, kept so configs that worked there work here.
pub fn validate_spec(spec: &str) -> Result<(), String> {
    let Some((scheme, address)) = spec.split_once("://") else {
        return Err(format!(
            "invalid ZeroMQ endpoint {spec:?}: expected SCHEME://ADDRESS"
        ));
    };
    match scheme {
        "tcp" => {
            let port = address.rsplit_once(':').map(|(_, port)| port);
            match port {
                Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                    Ok(())
                }
                _ => Err(format!("invalid ZeroMQ endpoint {spec:?}: tcp needs HOST:PORT")),
            }
        }
        "ipc" | "inproc" | "pgm" | "epgm" if !address.is_empty() => Ok(()),
        _ => Err(format!(
            "invalid ZeroMQ endpoint {spec:?}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"
        )),
    }
}

/// Reads `<app_path>/wsgid.json` as a JSON object; an absent file is an empty one. A
/// malformed file is an error naming the file, line and column.
pub fn read_config_file(app_path: &Path) -> anyhow::Result<Map<String, Value>> {
    let path = app_path.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => bail!("{}: expected a JSON object", path.display()),
        Err(e) => bail!(
            "{}:{}:{}: malformed JSON: {e}",
            path.display(),
            e.line(),
            e.column()
        ),
    }
}

/// The original accepted `"true"`, `"True"` and `true`; so do we, and numbers as strings.
fn as_bool(file: &Map<String, Value>, key: &str) -> anyhow::Result<Option<bool>> {
    Ok(match file.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Some(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") || s.is_empty() => Some(false),
        Some(other) => bail!("{CONFIG_FILE}: \"{key}\" must be true or false, not {other}"),
    })
}

fn as_u64(file: &Map<String, Value>, key: &str) -> anyhow::Result<Option<u64>> {
    Ok(match file.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(Value::String(s)) if s.trim().parse::<u64>().is_ok() => s.trim().parse().ok(),
        Some(other) => bail!("{CONFIG_FILE}: \"{key}\" must be a whole number, not {other}"),
    })
}

fn as_string(file: &Map<String, Value>, key: &str) -> anyhow::Result<Option<String>> {
    Ok(match file.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => bail!("{CONFIG_FILE}: \"{key}\" must be a string, not {other}"),
    })
}

impl Settings {
    /// Merges defaults, the app folder's wsgid.json and the command line.
    pub fn resolve(cli: &Options) -> anyhow::Result<Settings> {
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        let app_path = cwd.join(cli.app_path.clone().unwrap_or_else(|| cwd.clone()));
        if !app_path.is_dir() {
            bail!("app path {} does not exist", app_path.display());
        }
        let file = read_config_file(&app_path)?;
        let flag = |given: bool, key: &str| -> anyhow::Result<bool> {
            Ok(given || as_bool(&file, key)?.unwrap_or(false))
        };
        let (bind, recv, send) = front_of(cli, &file)?;
        if !bind.is_empty() && flag(cli.chroot, "chroot")? {
            bail!("--chroot is not supported with --bind yet: the workers could not read the bodies the front end spools");
        }
        let keep_alive = if cli.no_keep_alive {
            false
        } else if cli.keep_alive {
            true
        } else {
            as_bool(&file, "keep_alive")?.unwrap_or(true)
        };
        let envs = match file.get("envs") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Ok((k.clone(), other.to_string())),
                })
                .collect::<anyhow::Result<_>>()?,
            Some(other) => bail!("{CONFIG_FILE}: \"envs\" must be an object, not {other}"),
        };
        let workers = match cli.workers {
            Some(n) => n,
            None => as_u64(&file, "workers")?.unwrap_or(1).clamp(1, 1024) as u32,
        };
        let path_opt = |given: &Option<PathBuf>, key: &str| -> anyhow::Result<Option<PathBuf>> {
            Ok(given.clone().or(as_string(&file, key)?.map(PathBuf::from)))
        };
        let virtualenv = path_opt(&cli.virtualenv, "virtualenv")?
            .or_else(|| std::env::var_os("VIRTUAL_ENV").map(PathBuf::from))
            .map(|venv| cwd.join(venv));
        Ok(Settings {
            bind,
            recv,
            send,
            wsgi_app: cli.wsgi_app.clone().or(as_string(&file, "wsgi_app")?),
            workers,
            no_daemon: flag(cli.no_daemon, "no_daemon")?,
            stdout: flag(cli.stdout, "stdout")?,
            debug: flag(cli.debug, "debug")?,
            keep_alive,
            chroot: flag(cli.chroot, "chroot")?,
            mongrel2_chroot: path_opt(&cli.mongrel2_chroot, "mongrel2_chroot")?
                .unwrap_or_else(|| PathBuf::from("/")),
            upload_temp_store: cli
                .upload_temp_store
                .clone()
                .or(as_string(&file, "upload_temp_store")?),
            max_body_size: cli.max_body_size.or(as_u64(&file, "max_body_size")?),
            django: flag(cli.django, "django")?,
            virtualenv,
            graceful_timeout: cli
                .graceful_timeout
                .or(as_u64(&file, "graceful_timeout")?)
                .unwrap_or(30),
            max_requests: cli.max_requests.or(as_u64(&file, "max_requests")?),
            forwarded_allow_ips: cli
                .forwarded_allow_ips
                .clone()
                .or(as_string(&file, "forwarded_allow_ips")?)
                .unwrap_or_else(|| "127.0.0.1".into())
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
            envs,
            app_path,
        })
    }
}

/// How requests arrive: `--bind` addresses (one-command mode), or mongrel2's handler
/// endpoints. The command line wins over the file; one level naming both is an error.
pub fn front_of(
    cli: &Options,
    file: &Map<String, Value>,
) -> anyhow::Result<(Vec<String>, String, String)> {
    let zmq = |recv: Option<String>, send: Option<String>| match (recv, send) {
        (Some(recv), Some(send)) => {
            for spec in [&recv, &send] {
                validate_spec(spec).map_err(|e| anyhow::anyhow!("{CONFIG_FILE}: {e}"))?;
            }
            Ok((Vec::new(), recv, send))
        }
        _ => bail!(
            "--recv and --send go together (mongrel2's handler send_spec and recv_spec), \
             on the command line or in {CONFIG_FILE}"
        ),
    };
    const BOTH: &str = "--bind serves HTTP itself; --recv/--send are for a front end over \
                        ZeroMQ: give one or the other";
    let cli_zmq = cli.recv.is_some() || cli.send.is_some();
    if !cli.bind.is_empty() {
        anyhow::ensure!(!cli_zmq, BOTH);
        return Ok((cli.bind.clone(), String::new(), String::new()));
    }
    let (recv, send) = (as_string(file, "recv")?, as_string(file, "send")?);
    if cli_zmq {
        return zmq(cli.recv.clone().or(recv), cli.send.clone().or(send));
    }
    let bind = match file.get("bind") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => bail!("{CONFIG_FILE}: \"bind\" lists addresses as strings, not {other}"),
            })
            .collect::<anyhow::Result<_>>()?,
        Some(other) => bail!("{CONFIG_FILE}: \"bind\" must be an address or a list, not {other}"),
    };
    for address in &bind {
        crate::bind::Address::parse(address).map_err(|e| anyhow::anyhow!("{CONFIG_FILE}: {e}"))?;
    }
    match (bind.is_empty(), recv.is_some() || send.is_some()) {
        (false, true) => bail!("{CONFIG_FILE}: {BOTH}"),
        (false, false) => Ok((bind, String::new(), String::new())),
        (true, true) => zmq(recv, send),
        (true, false) => bail!(
            "nothing to serve on: give --bind HOST:PORT to serve HTTP, or --recv and --send \
             to serve behind mongrel2 (on the command line or in {CONFIG_FILE})"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_specs_like_the_original() {
        for ok in [
            "tcp://127.0.0.1:8080",
            "tcp://*:8080",
            "tcp://machine.intranet.org:8080",
            "ipc:///tmp/sock",
            "inproc://#2",
            "pgm:///tmp/sock",
            "tcp://[::1]:9000",
        ] {
            assert!(validate_spec(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:abc",
            "invalid://127.0.0.1:abc",
            "ipc://",
            "127.0.0.1:80",
        ] {
            assert!(validate_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_line_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"{"recv": "tcp://127.0.0.1:5000", "send": "tcp://127.0.0.1:5001", "debug": "true",
                "workers": "4", "chroot": "false", "stdout": "True", "keep_alive": false,
                "envs": {"ENV1": "VALUE1"}}"#,
        )
        .unwrap();
        let cli = Options {
            app_path: Some(dir.path().to_path_buf()),
            workers: Some(8),
            ..Options::default()
        };
        let s = Settings::resolve(&cli).unwrap();
        assert_eq!(s.workers, 8);
        assert_eq!(s.recv, "tcp://127.0.0.1:5000");
        assert!(s.debug && s.stdout && !s.chroot && !s.keep_alive);
        assert_eq!(s.envs.get("ENV1").map(String::as_str), Some("VALUE1"));
        let s = Settings::resolve(&Options {
            keep_alive: true,
            ..cli
        })
        .unwrap();
        assert!(s.keep_alive);
    }

    #[test]
    fn bind_or_endpoints_the_command_line_winning() {
        let file = |json: &str| serde_json::from_str::<Map<String, Value>>(json).unwrap();
        let zmq = r#"{"recv": "tcp://127.0.0.1:1", "send": "tcp://127.0.0.1:2"}"#;
        let cli_bind = Options {
            bind: vec!["127.0.0.1:8000".into()],
            ..Options::default()
        };
        let (bind, recv, _) = front_of(&cli_bind, &file(zmq)).unwrap();
        assert_eq!((bind.len(), recv.as_str()), (1, ""));
        let (bind, recv, _) = front_of(&Options::default(), &file(zmq)).unwrap();
        assert!(bind.is_empty() && recv == "tcp://127.0.0.1:1");
        let (bind, _, _) = front_of(
            &Options::default(),
            &file(r#"{"bind": ["[::1]:80", "unix:/s"]}"#),
        )
        .unwrap();
        assert_eq!(bind, ["[::1]:80", "unix:/s"]);
        let (bind, _, _) = front_of(&Options::default(), &file(r#"{"bind": ":80"}"#)).unwrap();
        assert_eq!(bind, [":80"]);
        for (cli, json) in [
            (
                Options::default(),
                r#"{"bind": ":80", "recv": "tcp://a:1", "send": "tcp://a:2"}"#,
            ),
            (Options::default(), r#"{"bind": "::1:80"}"#),
            (Options::default(), r#"{"bind": [80]}"#),
            (Options::default(), r#"{"recv": "tcp://a:1"}"#),
            (Options::default(), "{}"),
            (
                Options {
                    recv: Some("tcp://a:1".into()),
                    ..cli_bind.clone()
                },
                "{}",
            ),
        ] {
            assert!(front_of(&cli, &file(json)).is_err(), "{json}");
        }
    }

    #[test]
    fn malformed_file_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "{\n  \"recv\": \"x\",\n  oops\n}",
        )
        .unwrap();
        let err = read_config_file(dir.path()).unwrap_err().to_string();
        assert!(err.contains("wsgid.json:3:"), "{err}");
    }
}

/// Options shared by every invocation. `Option`/`bool` fields that are unset/false leave
/// the wsgid.json value (or the default) in force.
#[derive(Debug, Args, Default, Clone)]
pub struct Options {
    /// Serve HTTP here, with no mongrel2: HOST:PORT, [IPV6]:PORT, HOST (port 8000) or
    /// unix:PATH; repeat for several.
    #[arg(short = 'b', long, value_name = "ADDRESS", value_parser = parse_bind, global = true)]
    pub bind: Vec<String>,
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

fn parse_bind(address: &str) -> Result<String, String> {
    crate::bind::Address::parse(address).map(|_| address.to_string())
}

/// The original's spec check: `(inproc|ipc|tcp|pgm|epgm)://...`, and `tcp://host:port`.
fn parse_spec(spec: &str) -> Result<String, String> {
    validate_spec(spec).map(|()| spec.to_string())
}

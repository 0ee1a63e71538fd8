//! mongrel2's configuration, read from a `.conf` file (m2sh's language, `conf`) or from the
//! `config.sqlite` that `m2sh load` writes (`sqlite`), into one model.

pub mod conf;
pub mod sqlite;

use std::collections::BTreeMap;

/// Everything one configuration source declares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub servers: Vec<Server>,
    /// `settings = {...}`: global, values kept as text (mongrel2 reads numbers with atoi).
    pub settings: BTreeMap<String, String>,
    /// `mimetypes = {".ext": "type"}`: additions and overrides of the built-in table.
    pub mimetypes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub uuid: String,
    pub name: String,
    pub access_log: String,
    pub error_log: String,
    pub pid_file: String,
    /// `""`: no chroot.
    pub chroot: String,
    pub default_host: String,
    pub bind_addr: String,
    pub port: u16,
    pub use_ssl: bool,
    pub control_port: String,
    pub hosts: Vec<Host>,
    /// Names of `Filter`/`Xrequest` plugins declared: not supported, warned about.
    pub plugins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    /// What the Host header is matched against; defaults to `name`.
    pub matching: String,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The route key exactly as configured: a literal prefix, then an optional pattern
    /// starting at the first `(`.
    pub path: String,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Handler(Handler),
    Dir(Dir),
    Proxy(Proxy),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handler {
    pub send_spec: String,
    pub send_ident: String,
    pub recv_spec: String,
    pub recv_ident: String,
    pub raw_payload: bool,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Json,
    Tnetstring,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dir {
    /// Relative to the chroot (mongrel2 requires a trailing `/`).
    pub base: String,
    pub index_file: String,
    pub default_ctype: String,
    pub cache_ttl: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Proxy {
    pub addr: String,
    pub port: u16,
}

impl Config {
    /// The server to run: the one with `uuid`, or the only one when `uuid` is `None`.
    pub fn server(&self, uuid: Option<&str>) -> anyhow::Result<&Server> {
        match uuid {
            Some(uuid) => self
                .servers
                .iter()
                .find(|s| s.uuid == uuid)
                .ok_or_else(|| anyhow::anyhow!("no server with uuid {uuid} in the config")),
            None => match self.servers.as_slice() {
                [one] => Ok(one),
                [] => anyhow::bail!("the config declares no server"),
                many => anyhow::bail!(
                    "the config declares {} servers ({}): name one by its uuid",
                    many.len(),
                    many.iter()
                        .map(|s| s.uuid.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
}

/// The server of the reference's minimal config (mongrel2-protocol.md §7.2), without hosts:
/// what both readers' tests expect around their own hosts and routes.
#[cfg(test)]
pub(crate) fn example_server() -> Server {
    Server {
        uuid: "f400bf85-4538-4f7a-8908-67e313d515c2".to_string(),
        name: "main".to_string(),
        access_log: "/logs/access.log".to_string(),
        error_log: "/logs/error.log".to_string(),
        pid_file: "/run/mongrel2.pid".to_string(),
        chroot: "./".to_string(),
        default_host: "localhost".to_string(),
        bind_addr: "127.0.0.1".to_string(),
        port: 6767,
        use_ssl: false,
        control_port: String::new(),
        hosts: Vec::new(),
        plugins: Vec::new(),
    }
}

//! The gateway: a master (`arbiter`) that starts a broker and N workers by re-executing
//! the binary; the broker (`broker`) is the only process that talks to the front end, and
//! hands requests to idle workers over a shared queue (`link`, `records`); each worker
//! (`worker`) embeds CPython and runs the app through the `wsgi` crate. `upload`, `appdir`,
//! `config`, `daemon` and `logging` serve all three roles. In one-command mode (`--bind`,
//! `bind`) the master also runs the front end (`front`): the `server` crate's HTTP side,
//! with the broker as its one handler.

pub mod appdir;
pub mod arbiter;
pub mod bind;
pub mod broker;
pub mod client;
pub mod config;
pub mod daemon;
pub mod front;
pub mod hold;
pub mod link;
pub mod logging;
pub mod records;
pub mod upload;
pub mod worker;

//! A mongrel2-compatible front end: it reads mongrel2's configs, serves HTTP/1.1, and hands
//! requests to handlers over ZeroMQ in mongrel2's message format, or serves Dir routes.
//!
//! * `config`: mongrel2's `.conf` files and `config.sqlite`, into one model;
//! * `settings`: the `settings` table, typed;
//! * `routing`: hosts and routes, as mongrel2 documents them;
//! * `http`: HTTP/1.1 without I/O (heads, bodies, response framing, canned responses);
//! * `handlers`: the handlers' bound PUSH and SUB sockets and their peers;
//! * `inproc`: a handler inside this process (one-command mode's broker);
//! * `net`: listeners and client streams, TCP or Unix;
//! * `conn`, `front`: client connections and the event loop;
//! * `dir`, `mime`: static files; `upload`: spooled bodies; `access_log`;
//! * `local`: the front end of one-command mode (`wsgid --bind`), configured in code;
//! * `run`: start-up (chroot, pid file, privileges, logs) and signals.

pub mod access_log;
pub mod config;
pub mod conn;
pub mod dir;
pub mod front;
pub mod handlers;
pub mod http;
pub mod inproc;
pub mod local;
pub mod mime;
pub mod net;
pub mod routing;
pub mod run;
pub mod settings;
pub mod upload;

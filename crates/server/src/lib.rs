//! A mongrel2-compatible front end: it reads mongrel2's configs, serves HTTP/1.1, and hands
//! requests to handlers over ZeroMQ in mongrel2's message format (or serves Dir routes).

pub mod http;

//! ZeroMQ's wire protocol, for the peers wsgid needs: on the handler's side a PULL connected
//! to mongrel2's PUSH (requests) and a PUB connected to its SUB (replies); on the front end's
//! side the bound PUSH and SUB that handlers connect to.
//!
//! Why not libzmq: measured with perf, a third of a worker's CPU per hello request went to
//! libzmq's I/O thread. Speaking ZMTP ourselves makes us answerable for what libzmq does for
//! its users, and this crate does it: non-blocking I/O driven by the caller's poll loop,
//! reconnection with backoff, PING answered with PONG (RFC 37), ERROR handled, TCP
//! keepalive and `TCP_USER_TIMEOUT`, and a cap on a whole message's size.
//!
//! * [`codec`]: pure, no I/O: greetings, commands, and an incremental frame decoder.
//! * [`peer`]: one connection to one bound socket, as a state machine over a socket.

pub mod codec;
pub mod peer;
pub mod readbuf;

pub use codec::{Decoder, Event};
pub use peer::{bind, Peer, PeerEvent, SocketType};
pub use readbuf::ReadBuf;

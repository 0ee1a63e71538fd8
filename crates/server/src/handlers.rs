//! The handlers' side: for each distinct handler (`send_spec`, `recv_spec`), a bound PUSH
//! socket that requests go out on and a bound SUB socket that replies come in on, each with
//! the peers that connected to it.
//!
//! Unlike mongrel2, handlers are checked for liveness: every peer is pinged, and a PUSH peer
//! silent for three heartbeats gets no more requests (a handler host cut off without a FIN
//! would otherwise collect its round-robin share in a TCP buffer). A request is never queued
//! for a handler that nobody serves: the caller answers 503.

use std::time::{Duration, Instant};

use m2wire::HeaderEncoding;
use mio::{Interest, Registry, Token};
use slab::Slab;
use socket2::Socket;
use zmtp::{Peer, PeerEvent, SocketType};

use crate::config;
use crate::inproc::Inproc;

/// Largest reply message taken from a handler.
const MAX_REPLY: u64 = 64 << 20;
/// A PUSH peer with this much unwritten is passed over while another has room.
const PUSH_BACKLOG: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Push,
    Sub,
}

/// What a token other than a client's stands for.
pub enum Aux {
    Listener,
    Bound {
        handler: usize,
        role: Role,
        socket: Socket,
    },
    Peer {
        handler: usize,
        role: Role,
        peer: Box<Peer>,
        pinged: Instant,
    },
}

pub struct Handler {
    pub config: config::Handler,
    pub encoding: HeaderEncoding,
    /// Aux indices of the connected PUSH peers, in round-robin order.
    push_peers: Vec<usize>,
    next: usize,
}

impl Handler {
    fn new(config: &config::Handler) -> Handler {
        Handler {
            config: config.clone(),
            encoding: match config.protocol {
                config::Protocol::Json => HeaderEncoding::Json,
                config::Protocol::Tnetstring => HeaderEncoding::Tnetstring,
            },
            push_peers: Vec::new(),
            next: 0,
        }
    }
}

/// Every handler, and the aux entries (listeners, bound sockets, peers) the loop polls.
pub struct Handlers {
    pub list: Vec<Handler>,
    pub aux: Slab<Aux>,
    heartbeat: Duration,
    /// Peers with messages queued since the last flush: one write for many requests.
    dirty: Vec<usize>,
    /// The handler inside this process, if any, and its index in `list`.
    pub inproc: Option<(usize, Box<dyn Inproc>)>,
    /// Messages were pushed to it since its last turn.
    pub pushed: bool,
}

/// Aux tokens live above client tokens.
pub const AUX_BASE: usize = 1 << 40;

pub fn aux_token(index: usize) -> Token {
    Token(AUX_BASE + index)
}

impl Handlers {
    pub fn new(heartbeat: Duration) -> Handlers {
        Handlers {
            list: Vec::new(),
            aux: Slab::new(),
            heartbeat,
            dirty: Vec::new(),
            inproc: None,
            pushed: false,
        }
    }

    /// A handler inside this process, for the routes to `config` (added before them).
    pub fn add_inproc(&mut self, config: &config::Handler, handler: Box<dyn Inproc>) {
        self.inproc = Some((self.list.len(), handler));
        self.list.push(Handler::new(config));
    }

    /// The handler for `config`, bound on first use: routes sharing specs share it, as
    /// in mongrel2 (by `send_spec` and `recv_spec`).
    pub fn add(&mut self, config: &config::Handler, registry: &Registry) -> anyhow::Result<usize> {
        if let Some(i) = self.list.iter().position(|h| {
            h.config.send_spec == config.send_spec && h.config.recv_spec == config.recv_spec
        }) {
            if self.list[i].config != *config {
                tracing::warn!(
                    "handlers on {} / {} differ in ident or protocol: the first one declared is used",
                    config.send_spec,
                    config.recv_spec
                );
            }
            return Ok(i);
        }
        let index = self.list.len();
        for (role, spec) in [
            (Role::Push, &config.send_spec),
            (Role::Sub, &config.recv_spec),
        ] {
            let socket = zmtp::bind(spec)
                .map_err(|e| anyhow::anyhow!("cannot bind handler socket {spec}: {e}"))?;
            let entry = self.aux.vacant_entry();
            registry.register(
                &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&socket)),
                aux_token(entry.key()),
                Interest::READABLE,
            )?;
            entry.insert(Aux::Bound {
                handler: index,
                role,
                socket,
            });
            tracing::info!("handler {role:?} socket bound on {spec}");
        }
        self.list.push(Handler::new(config));
        Ok(index)
    }

    /// Accepts what is waiting on a bound socket.
    pub fn accept(&mut self, index: usize, registry: &Registry) {
        loop {
            let Some(Aux::Bound {
                handler,
                role,
                socket,
            }) = self.aux.get(index)
            else {
                return;
            };
            let (handler, role) = (*handler, *role);
            let accepted = match socket.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accepting a handler connection: {e}");
                    return;
                }
            };
            let spec = match role {
                Role::Push => &self.list[handler].config.send_spec,
                Role::Sub => &self.list[handler].config.recv_spec,
            };
            let kind = match role {
                Role::Push => SocketType::Push,
                Role::Sub => SocketType::Sub,
            };
            let peer = match Peer::accepted(accepted, spec, kind, MAX_REPLY) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("a handler connection on {spec}: {e}");
                    continue;
                }
            };
            let entry = self.aux.vacant_entry();
            let key = entry.key();
            let Some((fd, _, _)) = peer.poll_interest() else {
                continue;
            };
            if let Err(e) = registry.register(
                &mut mio::unix::SourceFd(&fd),
                aux_token(key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("cannot poll a handler connection: {e}");
                continue;
            }
            entry.insert(Aux::Peer {
                handler,
                role,
                peer: Box::new(peer),
                pinged: Instant::now(),
            });
            tracing::debug!("handler {role:?} connection accepted on {spec}");
        }
    }

    /// Drives one peer; returns its events. A peer that ended is removed.
    pub fn drive(&mut self, index: usize, readable: bool, events: &mut Vec<PeerEvent>) {
        let Some(Aux::Peer {
            handler,
            role,
            peer,
            ..
        }) = self.aux.get_mut(index)
        else {
            return;
        };
        let (handler, role) = (*handler, *role);
        peer.drive(events, readable);
        for event in events.iter() {
            match event {
                PeerEvent::Up if role == Role::Push => self.list[handler].push_peers.push(index),
                PeerEvent::Up => {
                    // A SUB subscribes with a message: 1, then the prefix (ZMTP 3.0).
                    let prefix = self.list[handler].config.recv_ident.as_bytes();
                    peer.send(&[&[1], prefix]);
                    peer.drive(&mut Vec::new(), false);
                }
                PeerEvent::Down(reason) => {
                    tracing::info!(
                        "handler {role:?} connection on {} ended: {reason}",
                        match role {
                            Role::Push => &self.list[handler].config.send_spec,
                            Role::Sub => &self.list[handler].config.recv_spec,
                        }
                    );
                }
                _ => {}
            }
        }
        if peer.is_dead() {
            // Its descriptor is closed with it, which takes it out of the poll set.
            self.list[handler].push_peers.retain(|&p| p != index);
            self.aux.remove(index);
        }
    }

    /// The handler index and role of a peer.
    pub fn peer_of(&self, index: usize) -> Option<(usize, Role)> {
        match self.aux.get(index)? {
            Aux::Peer { handler, role, .. } => Some((*handler, *role)),
            _ => None,
        }
    }

    /// Whether any live peer takes requests for `handler`.
    pub fn available(&self, handler: usize) -> bool {
        self.is_inproc(handler)
            || self.list[handler]
                .push_peers
                .iter()
                .any(|&p| self.live(p).is_some())
    }

    /// A live PUSH peer's backlog, or None when it is silent past three heartbeats.
    fn live(&self, index: usize) -> Option<usize> {
        match self.aux.get(index)? {
            Aux::Peer { peer, .. } if peer.is_up() => {
                (peer.last_input().elapsed() < self.heartbeat * 3).then(|| peer.backlog())
            }
            _ => None,
        }
    }

    /// Sends a request message round-robin to a live PUSH peer of `handler`, preferring
    /// peers with room; false when none is live.
    pub fn send(&mut self, handler: usize, message: &[u8]) -> bool {
        self.send_to_next(handler, message, true)
    }

    /// Sends a notice to the peer whose turn it is, without taking its turn: notices
    /// interleaved with requests would otherwise deal every request to the same peer.
    pub fn send_notice(&mut self, handler: usize, message: &[u8]) -> bool {
        self.send_to_next(handler, message, false)
    }

    fn is_inproc(&self, handler: usize) -> bool {
        self.inproc.as_ref().is_some_and(|(i, _)| *i == handler)
    }

    fn send_to_next(&mut self, handler: usize, message: &[u8], take_turn: bool) -> bool {
        if let Some((_, inproc)) = self.inproc.as_mut().filter(|(i, _)| *i == handler) {
            inproc.push(message);
            self.pushed = true;
            return true;
        }
        let h = &self.list[handler];
        let n = h.push_peers.len();
        let mut fallback = None;
        let mut chosen = None;
        for k in 0..n {
            let slot = (h.next + k) % n;
            let index = h.push_peers[slot];
            match self.live(index) {
                Some(backlog) if backlog < PUSH_BACKLOG => {
                    chosen = Some((slot, index));
                    break;
                }
                Some(backlog) if fallback.is_none_or(|(_, _, b)| backlog < b) => {
                    fallback = Some((slot, index, backlog))
                }
                _ => {}
            }
        }
        let Some((slot, index)) = chosen.or(fallback.map(|(s, i, _)| (s, i))) else {
            return false;
        };
        if take_turn {
            self.list[handler].next = slot + 1;
        }
        match self.aux.get_mut(index) {
            Some(Aux::Peer { peer, .. }) => {
                let sent = peer.send(&[message]);
                if sent && !self.dirty.contains(&index) {
                    self.dirty.push(index);
                }
                sent
            }
            _ => false,
        }
    }

    /// Writes what was queued for peers since the last flush.
    pub fn flush(&mut self) {
        for index in std::mem::take(&mut self.dirty) {
            if let Some(Aux::Peer { peer, .. }) = self.aux.get_mut(index) {
                peer.flush(&mut Vec::new());
            }
        }
    }

    /// Pings every peer due, on the heartbeat, and drops the peers that ended.
    pub fn heartbeat(&mut self) {
        let now = Instant::now();
        let mut dead = Vec::new();
        for (index, aux) in self.aux.iter_mut() {
            if let Aux::Peer { peer, pinged, .. } = aux {
                if now.duration_since(*pinged) >= self.heartbeat {
                    peer.ping();
                    peer.drive(&mut Vec::new(), false);
                    *pinged = now;
                }
                if peer.is_dead() {
                    dead.push(index);
                }
            }
        }
        for index in dead {
            if let Some((handler, _)) = self.peer_of(index) {
                self.list[handler].push_peers.retain(|&p| p != index);
            }
            self.aux.remove(index);
        }
    }
}

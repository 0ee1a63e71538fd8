//! The reply path to mongrel2: one XPUB socket, paced so mongrel2 keeps the connection.
//!
//! mongrel2 handles every reply already queued on its socket before it lets a connection
//! write, and it disconnects a client with more than 16 replies waiting (reference §8.5).
//! A fast generator would trip that in a burst, so replies to one connection are paced:
//! a message goes out at once when the connection's previous one has had time to be
//! written, otherwise the data waits and merges with what follows (fewer, larger messages).
//! A flusher thread sends waiting data when its time comes, so a chunk the app yields and
//! then sleeps on still reaches the client at once, not at the next yield.
//!
//! Replies go out through `zmtp::Publisher`: a full socket blocks instead of silently
//! dropping replies, and it returns only once mongrel2 has subscribed (a PUB's first replies
//! are otherwise lost, design note 1).

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wsgi::response::ReplySink;
use crate::zmtp::Publisher;

/// Time we assume mongrel2 needs to write a KiB to a client (about 500 MB/s).
const PACE_PER_KIB: Duration = Duration::from_micros(2);
/// Waiting data is sent when it reaches this size, even before its time.
const MAX_MERGED: usize = 1 << 20;
/// How long the flusher sleeps when nothing waits.
const IDLE_TICK: Duration = Duration::from_secs(1);

struct Pending {
    prefix: Vec<u8>,
    data: Vec<u8>,
}

struct State {
    publisher: Publisher,
    /// The connection last written to, and when it may be written to again.
    paced: Vec<u8>,
    next_send: Instant,
    pending: Option<Pending>,
    stopping: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    wake: Condvar,
}

/// Owns the flusher thread; dropping it flushes what waits and stops the thread.
pub struct OutboxHandle {
    pub outbox: Arc<Outbox>,
    flusher: Option<JoinHandle<()>>,
}

fn pace(bytes: usize) -> Duration {
    PACE_PER_KIB * (bytes / 1024) as u32
}

impl State {
    fn send_now(&mut self, prefix: &[u8], payload: &[u8]) -> io::Result<()> {
        self.publisher.send(prefix, payload)?;
        if self.paced != prefix {
            self.paced.clear();
            self.paced.extend_from_slice(prefix);
        }
        self.next_send = Instant::now() + pace(payload.len());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.pending.take() {
            Some(p) => self.send_now(&p.prefix, &p.data),
            None => Ok(()),
        }
    }

    /// Flushes from the flusher thread, where no caller can see an error: a response that
    /// lost a piece is closed, so its client does not wait for the rest.
    fn flush_or_close(&mut self) {
        let prefix = self.pending.as_ref().map(|p| p.prefix.clone());
        if let Err(e) = self.flush() {
            tracing::error!("cannot send a reply to mongrel2: {e}; closing that connection");
            if let Some(prefix) = prefix {
                let _ = self.send_now(&prefix, b"");
            }
        }
    }
}

impl Outbox {
    /// Connects to mongrel2's recv_spec and waits for its subscription, checking `give_up`
    /// between tries (a worker told to stop while mongrel2 is down must not hang).
    pub fn connect(spec: &str, give_up: impl Fn() -> bool) -> anyhow::Result<OutboxHandle> {
        let publisher = Publisher::connect(spec, give_up)?;
        let outbox = Arc::new(Outbox {
            state: Mutex::new(State {
                publisher,
                paced: Vec::new(),
                next_send: Instant::now(),
                pending: None,
                stopping: false,
            }),
            wake: Condvar::new(),
        });
        let flusher = {
            let outbox = outbox.clone();
            std::thread::Builder::new()
                .name("wsgid-flusher".into())
                .spawn(move || outbox.flush_loop())?
        };
        Ok(OutboxHandle {
            outbox,
            flusher: Some(flusher),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flush_loop(&self) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let wait = match &state.pending {
                _ if state.stopping => break,
                Some(_) if now >= state.next_send => {
                    state.flush_or_close();
                    continue;
                }
                Some(_) => state.next_send - now,
                None => IDLE_TICK,
            };
            state = self
                .wake
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.flush_or_close();
    }
}

impl Outbox {
    /// Sends what waits for its pace now. A response is complete only once this is done:
    /// the broker then lets another worker answer the connection's next request, whose
    /// reply must not overtake this one's last piece.
    pub fn flush_now(&self) -> io::Result<()> {
        self.lock().flush()
    }
}

impl ReplySink for Outbox {
    fn send(&self, prefix: &[u8], payload: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        // Another connection's waiting data goes first: nothing reorders within a connection.
        if state.pending.as_ref().is_some_and(|p| p.prefix != prefix) {
            state.flush()?;
        }
        if payload.is_empty() {
            // A close: never merged (an empty body means "close"), after all waiting data.
            state.flush()?;
            return state.send_now(prefix, payload);
        }
        let due = state.paced != prefix || Instant::now() >= state.next_send;
        if state.pending.is_none() && due {
            return state.send_now(prefix, payload);
        }
        let pending = state.pending.get_or_insert_with(|| Pending {
            prefix: prefix.to_vec(),
            data: Vec::with_capacity(payload.len().max(64 * 1024)),
        });
        pending.data.extend_from_slice(payload);
        if pending.data.len() >= MAX_MERGED {
            // Bounded memory: wait out the pace, then send what has merged.
            let wait = state.next_send.saturating_duration_since(Instant::now());
            drop(state);
            std::thread::sleep(wait);
            return self.lock().flush();
        }
        drop(state);
        self.wake.notify_one();
        Ok(())
    }
}

impl Drop for OutboxHandle {
    fn drop(&mut self) {
        self.outbox.lock().stopping = true;
        self.outbox.wake.notify_one();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

//! Our peers against the real libzmq, bound as mongrel2 binds its sockets.

use std::time::{Duration, Instant};

use zmtp::{Peer, PeerEvent, SocketType};

/// Drives `peer` (polling its socket) until `until` says stop; returns every event.
fn drive_until(
    peer: &mut Peer,
    limit: Duration,
    until: impl FnMut(&[PeerEvent]) -> bool,
) -> Vec<PeerEvent> {
    let (events, done) = drive(peer, limit, until);
    assert!(done, "timed out; events so far: {events:?}");
    events
}

/// Drives `peer` for `limit` or until `until` says stop: the events, and whether it did.
fn drive(
    peer: &mut Peer,
    limit: Duration,
    mut until: impl FnMut(&[PeerEvent]) -> bool,
) -> (Vec<PeerEvent>, bool) {
    let deadline = Instant::now() + limit;
    let mut events = Vec::new();
    while Instant::now() < deadline {
        peer.drive(&mut events, true);
        if until(&events) {
            return (events, true);
        }
        if let Some((fd, read, write)) = peer.poll_interest() {
            let mut flags = 0;
            if read {
                flags |= libc::POLLIN;
            }
            if write {
                flags |= libc::POLLOUT;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: flags,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10) };
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    (events, false)
}

fn messages(events: &[PeerEvent]) -> Vec<&[u8]> {
    events
        .iter()
        .filter_map(|e| match e {
            PeerEvent::Message(m) => Some(&m[..]),
            _ => None,
        })
        .collect()
}

#[test]
fn pulls_from_a_push_and_skips_oversized_messages() {
    let context = zmq::Context::new();
    let push = context.socket(zmq::PUSH).unwrap();
    push.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = push.get_last_endpoint().unwrap().unwrap();
    let mut peer = Peer::new(&endpoint, SocketType::Pull, 100_000).unwrap();
    drive_until(&mut peer, Duration::from_secs(5), |e| {
        e.contains(&PeerEvent::Up)
    });
    let big = vec![b'y'; 300_000];
    push.send(&b"u 1 /p 2:{},0:,"[..], 0).unwrap();
    push.send_multipart([&b"u 2 /big "[..], &big[..]], 0)
        .unwrap();
    push.send(&b"u 3 /p 2:{},0:,"[..], 0).unwrap();
    let events = drive_until(&mut peer, Duration::from_secs(5), |e| {
        messages(e).len() == 2
    });
    assert_eq!(
        messages(&events),
        [&b"u 1 /p 2:{},0:,"[..], &b"u 3 /p 2:{},0:,"[..]]
    );
    assert!(events.iter().any(|e| matches!(e,
        PeerEvent::Oversized { head, size } if head.starts_with(b"u 2 /big yy") && *size == 300_009)));
    drop(push);
    drive_until(&mut peer, Duration::from_secs(5), |e| {
        e.iter().any(|e| matches!(e, PeerEvent::Down(_)))
    });
}

#[test]
fn publishes_to_a_sub_after_its_subscription() {
    let context = zmq::Context::new();
    let sub = context.socket(zmq::SUB).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.set_rcvtimeo(100).unwrap();
    sub.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = sub.get_last_endpoint().unwrap().unwrap();
    // libzmq sends its subscription only while its owner uses the socket.
    let receiver = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < 2 && Instant::now() < deadline {
            if let Ok(m) = sub.recv_bytes(0) {
                got.push(m);
            }
        }
        got
    });
    let mut peer = Peer::new(&endpoint, SocketType::Pub, 1 << 20).unwrap();
    drive_until(&mut peer, Duration::from_secs(5), |e| {
        e.iter().any(|e| matches!(e, PeerEvent::Subscribed(_)))
    });
    let big = vec![b'x'; 200_000];
    assert!(peer.send(&[b"uuid 1:7, ", b"HTTP/1.1 200 OK\r\n\r\n"]));
    assert!(peer.send(&[b"uuid 1:7, ", &big]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while peer.backlog() > 0 && Instant::now() < deadline {
        let mut events = Vec::new();
        peer.drive(&mut events, true);
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = receiver.join().unwrap();
    assert_eq!(got[0], b"uuid 1:7, HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!(got[1].len(), 10 + big.len());
}

/// libzmq peers with ZMTP heartbeats PING us; we answer PONG, so they keep us connected.
#[test]
fn heartbeating_peers_keep_us() {
    let context = zmq::Context::new();
    let push = context.socket(zmq::PUSH).unwrap();
    push.set_heartbeat_ivl(100).unwrap();
    push.set_heartbeat_timeout(300).unwrap();
    push.set_heartbeat_ttl(300).unwrap();
    push.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = push.get_last_endpoint().unwrap().unwrap();
    let monitor_spec = "inproc://heartbeat-monitor";
    push.monitor(monitor_spec, zmq::SocketEvent::DISCONNECTED as i32)
        .unwrap();
    let monitor = context.socket(zmq::PAIR).unwrap();
    monitor.connect(monitor_spec).unwrap();
    monitor.set_rcvtimeo(0).unwrap();
    let mut peer = Peer::new(&endpoint, SocketType::Pull, 1 << 20).unwrap();
    let start = Instant::now();
    let mut sent = 0;
    let events = drive_until(&mut peer, Duration::from_secs(10), |_| {
        if sent < 10 && start.elapsed() > Duration::from_millis(150 * (sent + 1)) {
            push.send(format!("u {sent} /p 2:{{}},0:,").as_bytes(), zmq::DONTWAIT)
                .ok();
            sent += 1;
        }
        start.elapsed() > Duration::from_secs(2)
    });
    let ups = events.iter().filter(|e| **e == PeerEvent::Up).count();
    let downs: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, PeerEvent::Down(_)))
        .collect();
    assert_eq!((ups, downs.len()), (1, 0), "{downs:?}");
    assert_eq!(messages(&events).len(), 10);
    assert!(
        monitor.recv_multipart(0).is_err(),
        "libzmq saw a disconnect"
    );
}

/// A peer that accepts and never speaks is given up after the handshake timeout, and a
/// stalled connection never blocks the caller.
#[test]
fn a_silent_listener_does_not_block() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
    let mut peer = Peer::new(&endpoint, SocketType::Pull, 1 << 20).unwrap();
    let start = Instant::now();
    for _ in 0..20 {
        let mut events = Vec::new();
        peer.drive(&mut events, true);
        assert!(events.is_empty());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(!peer.is_up());
}

/// A peer that sends ZMTP ERROR (RFC 37) ends the connection: we report it down and
/// connect again later, as libzmq does.
#[test]
fn an_error_command_ends_the_connection() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(&zmtp::codec::greeting()).unwrap();
        conn.write_all(&zmtp::codec::ready_command(b"PUSH"))
            .unwrap();
        let mut theirs = [0u8; 64];
        conn.read_exact(&mut theirs).unwrap();
        let mut error = Vec::new();
        zmtp::codec::push_command(&mut error, b"ERROR", b"\x0bgo away now");
        std::thread::sleep(Duration::from_millis(200));
        conn.write_all(&error).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let mut peer = Peer::new(&endpoint, SocketType::Pull, 1 << 20).unwrap();
    let events = drive_until(&mut peer, Duration::from_secs(5), |e| {
        e.iter().any(|e| matches!(e, PeerEvent::Down(_)))
    });
    assert!(events.contains(&PeerEvent::Up));
    assert!(events
        .iter()
        .any(|e| matches!(e, PeerEvent::Down(r) if r.contains("go away now"))));
    server.join().unwrap();
}

#[test]
fn a_peer_of_a_type_we_cannot_talk_to_never_comes_up() {
    // What a TCP connection that met itself looks like too: our own type answering.
    let context = zmq::Context::new();
    let pull = context.socket(zmq::PULL).unwrap();
    pull.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = pull.get_last_endpoint().unwrap().unwrap();
    let mut peer = Peer::new(&endpoint, SocketType::Pull, 1000).unwrap();
    let (events, up) = drive(&mut peer, Duration::from_secs(1), |e| {
        e.contains(&PeerEvent::Up)
    });
    assert!(!up, "{events:?}");
}

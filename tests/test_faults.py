"""Faults a production stack meets: many tiny chunks, CPU load, pipelining, mongrel2
restarts and outages, libzmq peers with heartbeats, stalled peers, oversized messages, slow
clients. Each test failed on 2aae097 (see the README's "What wsgid guarantees")."""
import os
import signal
import socket
import threading
import time

import pytest
import requests
import zmq

from faults import FakeMongrel2, Reader, children, cpu_load, exchange, read_response, role_of, rss_kib
from stack import APPS, Handler, Mongrel2, Wsgid, wait_for

TINY = [(600, 4), (200, 5), (100, 170)]


def tiny_expected(n, size):
    return b"".join(str(i % 10).encode() * size for i in range(n))


@pytest.mark.parametrize("version", ["1.1", "1.0"])
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "cpu-load"])
def test_many_tiny_chunks_arrive_whole(make, version, busy):
    """100 requests of generators yielding many small chunks: every body arrives whole."""
    server = make(workers=2)
    port = server.mongrel2.port
    failures = []
    with cpu_load(busy):
        for i in range(100):
            n, size = TINY[i % len(TINY)]
            close = "Connection: close\r\n" if version == "1.1" else ""
            req = f"GET /tiny?n={n}&size={size} HTTP/{version}\r\nHost: x\r\n{close}\r\n".encode()
            status, headers, body, complete = exchange(port, req)
            if status != 200 or not complete or body != tiny_expected(n, size):
                failures.append((i, n, size, status, len(body), complete))
    assert not failures, f"{len(failures)} of 100 cut: {failures[:5]}"


def test_django_streaming_response_of_small_chunks(make):
    """Django's StreamingHttpResponse of 200 ten-byte chunks, 50 times."""
    server = make(app="django", args=[], workers=2)
    expected = b"".join(f"{i % 10}".encode() * 10 for i in range(200))
    for _ in range(50):
        status, _, body, complete = exchange(server.mongrel2.port, b"GET /stream?n=200 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, complete, body == expected) == (200, True, True)


def test_events_arrive_as_they_are_yielded(make):
    """Progressive streaming: an event yielded every 100 ms reaches the client within 20 ms."""
    server = make(workers=1)
    with socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=5) as sock:
        sock.sendall(b"GET /events?n=6&every=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
        delays, buf = [], b""
        deadline = time.time() + 5
        while len(delays) < 6 and time.time() < deadline:
            chunk = sock.recv(65536)
            arrived = time.time()
            if not chunk:
                break
            buf += chunk
            while b"data: " in buf and b"\n\n" in buf.split(b"data: ", 1)[1]:
                event, buf = buf.split(b"data: ", 1)[1].split(b"\n\n", 1)
                delays.append(arrived - float(event.split()[1]))
    assert len(delays) == 6
    # The first event also carries the head; each later one goes out on its own.
    assert max(delays) < 0.020, delays


@pytest.mark.parametrize("workers", [2, 4])
def test_pipelined_streamed_pairs_stay_in_order_under_load(make, workers):
    """A 14-chunk streamed response then a small one, pipelined on one connection, 60 times,
    with every core busy: the second never overtakes the first."""
    server = make(workers=workers)
    expected = tiny_expected(14, 1000)
    bad = []
    with cpu_load():
        for i in range(60):
            with socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=10) as sock:
                sock.sendall(b"GET /tiny?n=14&size=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /id?second HTTP/1.1\r\nHost: x\r\n\r\n")
                deadline = time.time() + 10
                reader = Reader(sock)
                first = reader.response(deadline)
                second = reader.response(deadline)
                if first[2] != expected or second[2] != b"id=second":
                    bad.append((i, first[2][:40], second[2][:40]))
    assert not bad, f"{len(bad)} of 60 out of order: {bad[:3]}"


@pytest.mark.zmq_front
def test_mongrel2_restart_never_delivers_an_old_reply_to_a_new_client(make):
    """A request in service, one held behind it (pipelined) and one queued, when mongrel2
    restarts: the new clients (whose connection ids restart at 1) get their own replies only."""
    server = make(workers=1)
    port = server.mongrel2.port
    old = []

    def old_client(payload):
        try:
            old.append(exchange(port, payload, timeout=6))
        except OSError as e:
            old.append(e)

    threads = [threading.Thread(target=old_client, args=(p,)) for p in (
        b"GET /slow-id?old-served HTTP/1.1\r\nHost: x\r\n\r\nGET /id?old-held HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /slow-id?old-queued HTTP/1.1\r\nHost: x\r\n\r\n",
    )]
    for t in threads:
        t.start()
        time.sleep(0.1)
    time.sleep(0.2)
    server.mongrel2.stop()
    server.mongrel2.start()
    got = []
    deadline = time.time() + 8
    i = 0
    while time.time() < deadline:
        i += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
                sock.sendall(f"GET /id?new-{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, _, body, _ = read_response(sock, time.time() + 3)
                extra = b""
                sock.settimeout(0.2)
                try:
                    extra = sock.recv(65536)
                except socket.timeout:
                    pass
                got.append((i, status, body, extra))
        except OSError:
            time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(got) >= 10
    wrong = [g for g in got if g[2] != f"id=new-{g[0]}".encode() or g[3]]
    assert not wrong, wrong[:3]
    wait_for(lambda: "earlier epoch" in server.log() or "a new epoch" in server.log(), timeout=5)


@pytest.mark.zmq_front
def test_a_reply_for_a_mongrel2_that_is_down_kills_no_worker(make):
    """mongrel2 stops while two workers serve: both live on, and serve after it returns."""
    server = make(workers=2, args=["--wsgi-app", "testapp:application", "--no-keep-alive"])
    before = server.worker_pids()
    threads = [threading.Thread(target=lambda: _quiet_get(server.url + "/sleep?1")) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    server.mongrel2.stop()
    time.sleep(1.5)  # the workers finish while mongrel2 is away
    server.mongrel2.start()
    for t in threads:
        t.join()
    wait_for(lambda: requests.get(server.url + "/hello", timeout=2).status_code == 200, timeout=15)
    assert server.worker_pids() == before
    for _ in range(10):
        assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"


def _quiet_get(url):
    try:
        requests.get(url, timeout=5)
    except requests.RequestException:
        pass


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(heartbeat_ms=0, args=(), workers=1):
        m2 = FakeMongrel2(heartbeat_ms)
        handler = Handler("/", "tnetstring")
        handler.send_spec, handler.recv_spec = m2.send_spec, m2.recv_spec
        placeholder = Mongrel2(tmp_path / "m2", [handler])
        server = Wsgid(tmp_path / "app", handler, placeholder, APPS["testapp"],
                       ["--wsgi-app", "testapp:application", *args], workers=workers)
        server.start(wait_path=None)
        made.append((m2, server))
        return m2, server
    yield make
    for m2, server in made:
        server.stop(signal.SIGQUIT)
        m2.close()


@pytest.mark.zmq_front
@pytest.mark.parametrize("heartbeat_ms", [0, 200])
def test_libzmq_peers_with_and_without_heartbeats_keep_us(fake, heartbeat_ms):
    """PUSH and SUB bound as mongrel2 binds them, with ZMTP heartbeats every 200 ms: our
    peers answer PING, so they are never dropped, and every request is answered."""
    m2, server = fake(heartbeat_ms)
    wait_for(lambda: (m2.poll_monitors(), m2.events.count(zmq.EVENT_ACCEPTED) >= 2)[1],
             timeout=10, what="both connections")
    time.sleep(0.5)  # the reply connection's subscription
    sent = 0
    start = time.time()
    while time.time() - start < 4:
        sent += 1
        m2.send(m2.request(sent, b"/id?%d" % sent))
        time.sleep(0.1)
    replies = m2.replies(sent, timeout=10)
    assert sorted(conn for conn, _ in replies) == list(range(1, sent + 1))
    assert all(body.endswith(b"id=%d" % conn) for conn, body in replies)
    assert m2.disconnects() == 0


@pytest.mark.zmq_front
def test_oversized_messages_are_refused_and_never_held(fake):
    """A 64 MiB request of 1 MiB frames, over the cap: 413 for its connection, the broker's
    memory stays flat, and the next request is served."""
    m2, server = fake(args=["--max-body-size", "1000"])
    time.sleep(1.0)
    frame = b"x" * (1 << 20)
    head = m2.request(5, b"/id?big")
    m2.send(None, parts=[head] + [frame] * 64)
    replies = m2.replies(2, timeout=20)
    assert replies[0][0] == 5 and replies[0][1].startswith(b"HTTP/1.1 413 ")
    assert replies[1] == (5, b"")
    m2.send(m2.request(6, b"/id?after"))
    after = m2.replies(1)
    assert after[0][0] == 6 and after[0][1].endswith(b"id=after")
    broker = [p for p in children(server.proc.pid) if role_of(p) == "broker"][0]
    assert rss_kib(broker) < 40 * 1024


@pytest.mark.zmq_front
def test_a_peer_stalled_mid_frame_does_not_hold_up_a_stop(tmp_path):
    """A PUSH peer that completes the handshake, sends half a frame and stalls: TERM stops
    wsgid promptly (before: the broker blocked in a read until the graceful timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    fake_push = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    m2 = FakeMongrel2()
    handler = Handler("/", "tnetstring")
    handler.send_spec, handler.recv_spec = fake_push, m2.recv_spec
    server = Wsgid(tmp_path / "app", handler, Mongrel2(tmp_path / "m2", [handler]), APPS["testapp"],
                   ["--wsgi-app", "testapp:application"], workers=1)
    server.start(wait_path=None)
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        greeting = bytearray(64)
        greeting[0], greeting[8], greeting[9], greeting[10] = 0xFF, 1, 0x7F, 3
        greeting[12:16] = b"NULL"
        conn.sendall(bytes(greeting))
        ready = b"\x05READY\x0bSocket-Type\x00\x00\x00\x04PUSH"
        conn.sendall(bytes([0x04, len(ready)]) + ready)
        time.sleep(1.0)
        conn.sendall(b"\x02" + (1000).to_bytes(8, "big") + b"half a fr")  # then nothing
        time.sleep(0.5)
        start = time.time()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(10)
        assert time.time() - start < 1.5
    finally:
        server.stop(signal.SIGKILL)
        m2.close()
        listener.close()


def test_flow_control_lets_a_slow_client_receive_everything(make):
    """download.flow_control=1: a client reading at about 512 KiB/s receives a 4 MiB
    streamed response whole, and the worker's memory stays flat."""
    server = make(workers=1, m2_settings={"download.flow_control": 1})
    worker = server.worker_pids()[0]
    rss_before = rss_kib(worker)
    size = 4 << 20
    with socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        sock.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received, tail, growth = 0, b"", 0
        deadline = time.time() + 40
        reads = 0
        while time.time() < deadline and not tail.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(8192)
            if not chunk:
                break
            received += len(chunk)
            tail = (tail + chunk)[-16:]
            reads += 1
            if reads % 64 == 0:
                growth = max(growth, rss_kib(worker) - rss_before)
            time.sleep(0.015)
    assert tail.endswith(b"\r\n0\r\n\r\n"), (received, tail)
    assert received > size
    assert growth < 16 * 1024, f"worker grew by {growth} KiB"


@pytest.mark.zmq_front
def test_forwarded_for_is_believed_only_from_a_trusted_peer(fake):
    """mongrel2 with no_clobber_xff passes the client's X-Forwarded-For on: it names the
    client only when the peer mongrel2 saw is a trusted front end."""
    import json
    m2, _ = fake()
    time.sleep(1.0)
    forwarded = ((b"x-forwarded-for", b"198.51.100.1, 203.0.113.9"), (b"x-forwarded-proto", b"https"))
    m2.send(m2.request(1, b"/env", extra=forwarded))
    m2.send(m2.request(2, b"/env", extra=forwarded, remote=b"192.0.2.50"))
    replies = dict(m2.replies(2))
    env = {conn: json.loads(body.split(b"\r\n\r\n", 1)[1]) for conn, body in replies.items()}
    assert (env[1]["REMOTE_ADDR"], env[1]["wsgi.url_scheme"]) == ("203.0.113.9", "https")
    assert (env[2]["REMOTE_ADDR"], env[2]["wsgi.url_scheme"]) == ("192.0.2.50", "http")


@pytest.mark.zmq_front
def test_overload_is_answered_503_and_reading_goes_on(fake):
    """More requests than the broker keeps waiting (1024, past what the queue holds) while
    the only worker sleeps: the excess is answered 503 with Retry-After and closed at once,
    instead of the reading pausing (which would hold up mongrel2's notices too)."""
    m2, _ = fake()
    time.sleep(1.0)
    m2.send(m2.request(1, b"/sleep?3"))
    time.sleep(0.2)
    for conn in range(2, 1602):
        m2.send(m2.request(conn, b"/hello"))
    replies = m2.replies(2000, timeout=2.5)
    refused = {conn for conn, body in replies if body.startswith(b"HTTP/1.1 503 ")}
    closed = {conn for conn, body in replies if body == b""}
    assert len(refused) >= 100, len(refused)
    assert refused <= closed
    assert all(b"Retry-After: 1\r\n" in body for _, body in replies if body.startswith(b"HTTP/1.1 503"))

"""One-command mode: workers hold keep-alive connections between requests and read the next
requests themselves (`gateway::hold`). A held connection must be served as the front end
would serve it, whatever comes on it next, and no request may wait behind a slow one while
a worker is idle, nor be lost when its worker goes."""
import hashlib
import json
import os
import signal
import socket
import time

import pytest

from faults import Reader, children, role_of
from stack import wait_for
from test_bind import serve

pytestmark = pytest.mark.one_front


def connect(server):
    sock = socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=5)
    return sock, Reader(sock)


def ask(sock, reader, wire, timeout=5.0):
    sock.sendall(wire)
    return reader.response(time.time() + timeout)


def get(target):
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def held(server, count):
    """`count` keep-alive connections, each past a first request (and so held by a worker)."""
    conns = [connect(server) for _ in range(count)]
    for i, (sock, reader) in enumerate(conns):
        status, _, body, _ = ask(sock, reader, get(f"/id?first-{i}"))
        assert (status, body) == (200, f"id=first-{i}".encode())
    return conns


def test_a_held_connection_is_served_as_the_front_end_would_serve_it(tmp_path):
    server = serve(tmp_path, workers=1)
    try:
        (sock, reader), = held(server, 1)
        # What the app is told is the same as for a request the front end read.
        fresh, fresh_reader = connect(server)
        first = ask(fresh, fresh_reader, get("/env?a=1"))
        again = ask(sock, reader, get("/env?a=1"))
        fresh.close()
        assert first[0] == again[0] == 200
        told, told_again = json.loads(first[2]), json.loads(again[2])
        for key in ("REMOTE_PORT",):
            told.pop(key, None), told_again.pop(key, None)
        assert told == told_again
        # Pipelined requests, answered in order.
        sock.sendall(get("/id?p1") + get("/id?p2") + get("/id?p3"))
        for tag in ("p1", "p2", "p3"):
            status, _, body, _ = reader.response(time.time() + 5)
            assert (status, body) == (200, f"id={tag}".encode())
        # A body, inline and in a pipe.
        for size in (1000, 300_000):
            body = os.urandom(size)
            wire = f"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + body
            status, _, answer, _ = ask(sock, reader, wire)
            assert (status, json.loads(answer)["sha256"]) == (200, hashlib.sha256(body).hexdigest())
        # A head that comes in pieces.
        sock.sendall(b"GET /id?split HTTP/1.1\r\nHo")
        time.sleep(0.3)
        status, _, body, _ = ask(sock, reader, b"st: x\r\n\r\n")
        assert (status, body) == (200, b"id=split")
        # 100-continue.
        sock.sendall(b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert reader.response(time.time() + 5)[0] == 100
        status, _, answer, _ = ask(sock, reader, b"abc")
        assert json.loads(answer)["sha256"] == hashlib.sha256(b"abc").hexdigest()
        # Idle past the hold: still served.
        time.sleep(2.5)
        assert ask(sock, reader, get("/id?later"))[2] == b"id=later"
        # The app closes it.
        status, headers, body, _ = ask(sock, reader, get("/close-me"))
        assert (status, body, headers.get("connection")) == (200, b"bye", "close")
        assert sock.recv(1) == b""
        # The client says it closes, in HTTP/1.1 and in 1.0.
        for wire in (b"GET /id?bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                     b"GET /id?bye HTTP/1.0\r\nHost: x\r\n\r\n"):
            (sock, reader), = held(server, 1)
            status, _, body, _ = ask(sock, reader, wire)
            assert (status, body) == (200, b"id=bye")
            assert sock.recv(1) == b""
        # A malformed request: refused, and closed.
        (sock, reader), = held(server, 1)
        status, _, _, _ = ask(sock, reader, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert status == 400
        assert sock.recv(1) == b""
        # A client that leaves: nothing else is disturbed.
        (sock, reader), = held(server, 1)
        sock.close()
        (sock, reader), = held(server, 1)
        assert ask(sock, reader, get("/id?last"))[2] == b"id=last"
    finally:
        assert server.stop() == 0


def test_a_slow_request_on_a_held_connection_holds_up_no_other(tmp_path):
    """The worker busy with a slow request loses its other held connections to the front
    end within a few milliseconds: their next requests go to the idle worker."""
    server = serve(tmp_path, workers=2)
    try:
        conns = held(server, 16)
        slow_sock, slow_reader = conns[0]
        slow_sock.sendall(get("/sleep?1.5"))
        time.sleep(0.1)
        for i, (sock, reader) in enumerate(conns[1:]):
            started = time.time()
            status, _, body, _ = ask(sock, reader, get(f"/id?{i}"))
            assert (status, body) == (200, f"id={i}".encode())
            assert time.time() - started < 0.5, f"connection {i} waited behind the slow request"
        assert slow_reader.response(time.time() + 5)[2] == b"slept"
        # And the connections go on, held again.
        for i, (sock, reader) in enumerate(conns):
            assert ask(sock, reader, get(f"/id?again-{i}"))[2] == f"id=again-{i}".encode()
    finally:
        assert server.stop() == 0


def worker_pids(server):
    return [pid for pid in children(server.proc.pid) if role_of(pid) == "worker"]


def test_held_connections_outlive_their_worker(tmp_path):
    """A worker killed with connections held: they go back to the front end, and their next
    requests are served by the others."""
    server = serve(tmp_path, workers=2)
    try:
        conns = held(server, 16)
        os.kill(worker_pids(server)[0], signal.SIGKILL)
        time.sleep(0.3)
        for i, (sock, reader) in enumerate(conns):
            status, _, body, _ = ask(sock, reader, get(f"/id?after-{i}"))
            assert (status, body) == (200, f"id=after-{i}".encode())
        wait_for(lambda: len(worker_pids(server)) == 2, what="the replacement worker")
    finally:
        assert server.stop() == 0


def test_a_reload_gives_held_connections_back(tmp_path):
    """HUP: the old workers give their connections back as they stop; the clients notice
    nothing."""
    server = serve(tmp_path, workers=2)
    try:
        conns = held(server, 8)
        before = set(worker_pids(server))
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        rounds = 0
        while time.time() < deadline and (rounds < 3 or before & set(worker_pids(server))):
            for i, (sock, reader) in enumerate(conns):
                tag = f"{rounds}-{i}"
                status, _, body, _ = ask(sock, reader, get(f"/id?{tag}"))
                assert (status, body) == (200, f"id={tag}".encode())
            rounds += 1
            time.sleep(0.2)
        assert not before & set(worker_pids(server)), "the old workers were replaced"
    finally:
        assert server.stop() == 0


def test_a_stop_closes_idle_held_connections_at_once_and_finishes_those_in_service(tmp_path):
    server = serve(tmp_path, workers=2)
    conns = held(server, 10)
    busy_sock, busy_reader = conns[0]
    busy_sock.sendall(get("/slow-id?busy"))
    time.sleep(0.2)
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    status, _, body, _ = busy_reader.response(time.time() + 5)
    assert (status, body) == (200, b"id=busy")
    for sock, _ in conns[1:]:
        sock.settimeout(5)
        assert sock.recv(1) == b"", "an idle held connection is closed by the stop"
    assert server.proc.wait(timeout=10) == 0
    # Not held until they idle out (2 s): given back when the front end stops.
    assert time.time() - started < 1.8


def test_keep_alive_clients_get_only_their_own_replies_through_kills_and_reloads(tmp_path):
    """Clients that keep their connections (so that workers hold them) and mix GETs, bodies,
    pipelines and slow requests, while workers are killed, added, removed and reloaded and
    the front end is killed: every response read answers its own request."""
    import random
    import threading

    server = serve(tmp_path, workers=3)
    stop, wrong, served = threading.Event(), [], [0]

    def client(name):
        rng, n = random.Random(name), 0
        while not stop.is_set():
            try:
                sock, reader = connect(server)
                with sock:
                    for _ in range(rng.randint(1, 40)):
                        n += 1
                        tag = f"{name}-{n}"
                        roll = rng.random()
                        if roll < 0.6:
                            wires, expected = [get(f"/id?{tag}")], [f"id={tag}".encode()]
                        elif roll < 0.7:
                            wires = [get(f"/id?{tag}a"), get(f"/id?{tag}b")]
                            expected = [f"id={tag}a".encode(), f"id={tag}b".encode()]
                        elif roll < 0.8:
                            wires, expected = [get(f"/slow-id?{tag}")], [f"id={tag}".encode()]
                        else:
                            body = tag.encode() * rng.randint(1, 20_000)
                            wires = [f"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                                     f"\r\n\r\n".encode() + body]
                            expected = [b"sha256=" + hashlib.sha256(body).hexdigest().encode()]
                        sock.sendall(b"".join(wires))
                        for want in expected:
                            status, _, got, complete = reader.response(time.time() + 10)
                            if status is None or not complete:
                                raise OSError("cut")
                            if status == 200 and want.startswith(b"sha256="):
                                got = b"sha256=" + json.loads(got)["sha256"].encode()
                            if status == 200 and got != want:
                                wrong.append((tag, got[:100], want[:100]))
                            served[0] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    try:
        for t in threads:
            t.start()
        master = server.proc
        for action in ("kill-worker", "TTIN", "HUP", "TTOU", "kill-worker", "kill-front", "HUP"):
            time.sleep(0.8)
            before = served[0]
            if action == "kill-worker":
                os.kill(worker_pids(server)[0], signal.SIGKILL)
            elif action == "kill-front":
                os.kill([p for p in children(master.pid) if role_of(p) == "front"][0], signal.SIGKILL)
            else:
                master.send_signal(getattr(signal, "SIG" + action))
            wait_for(lambda: served[0] > before + 30, timeout=15, what=f"service after {action}")
        time.sleep(0.8)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    try:
        assert not wrong, wrong[:5]
        assert served[0] > 500, served[0]
    finally:
        assert server.stop() == 0


def test_connections_held_by_a_busy_worker_spread_to_an_idle_one(tmp_path):
    """Sixteen connections held by the only worker; a second one joins (TTIN) and each
    connection then asks for half-millisecond requests, one after another: too short for a
    worker to be seen busy with one request twice, yet the new worker must get its share,
    not idle while the first serves everything."""
    import threading

    server = serve(tmp_path, workers=1)
    try:
        conns = held(server, 16)
        server.proc.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(worker_pids(server)) == 2, what="the second worker")
        time.sleep(0.5)  # joined the broker
        pids, stop = [], time.time() + 2.0

        def client(sock, reader):
            while time.time() < stop:
                status, _, body, _ = ask(sock, reader, get("/sleep-pid?0.0005"))
                assert status == 200
                pids.append(body)

        threads = [threading.Thread(target=client, args=conn) for conn in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        share = {pid: pids.count(pid) / len(pids) for pid in set(pids)}
        assert len(share) == 2 and min(share.values()) > 0.25, share
    finally:
        assert server.stop() == 0


def test_responses_that_close_leave_no_warning(tmp_path):
    """HTTP/1.0 clients (ab, health checks) and `Connection: close`: each response ends the
    connection, and the log says nothing of it (a stray close message after each used to
    log a warning per request)."""
    server = serve(tmp_path, workers=2)
    try:
        for wire in (b"GET /id?a HTTP/1.0\r\n\r\n",
                     b"GET /id?b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") * 10:
            sock, reader = connect(server)
            with sock:
                status, _, body, _ = ask(sock, reader, wire)
                assert status == 200 and body.startswith(b"id=")
                assert sock.recv(1) == b""
        assert ask(*held(server, 1)[0], get("/id?last"))[2] == b"id=last"
        assert "WARN" not in server.log(), server.log()[-2000:]
    finally:
        assert server.stop() == 0

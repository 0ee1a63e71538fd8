"""One-command mode (`wsgid --bind`): what only it has. The rest of the suite also runs in this
mode (front "bind")."""
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from faults import Reader, children, role_of
from stack import APPS, VENV, WSGID, Handler, Mongrel2, Wsgid, free_port, wait_for

pytestmark = pytest.mark.one_front


def serve(tmp_path, args=(), workers=2, app_args=("--wsgi-app", "testapp:application")):
    front = Mongrel2(tmp_path / "m2", [Handler("/")], front="bind")
    front.start()
    server = Wsgid(tmp_path / "app", front.handlers[0], front, APPS["testapp"], [*app_args, *args],
                   workers=workers)
    return server.start(wait_path="/hello")


def get_unix(path, target="/hello", body=None):
    """The whole response to a GET, or with `body` a POST, over the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        if body is None:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        else:
            s.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode())
            for at in range(0, len(body), 8192):  # as a proxy writes it, in pieces
                s.sendall(body[at:at + 8192])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def front_pid(server):
    fronts = [pid for pid in children(server.proc.pid) if role_of(pid) == "front"]
    assert len(fronts) == 1, fronts
    return fronts[0]


def test_every_bound_address_serves(tmp_path):
    v6_port, sock = free_port(), tmp_path / "app.sock"
    server = serve(tmp_path, ["-b", f"[::1]:{v6_port}", "--bind", f"unix:{sock}"])
    try:
        assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"
        env = requests.get(f"http://[::1]:{v6_port}/env", timeout=5).json()
        assert env["REMOTE_ADDR"] == "::1" and env["SERVER_PORT"] == str(v6_port)
        assert get_unix(sock).endswith(b"Hello, World!")
        # A Unix socket's client counts as local: a proxy there is believed.
        reply = get_unix(sock, "/env").split(b"\r\n\r\n", 1)[1]
        assert json.loads(reply)["REMOTE_ADDR"] == "127.0.0.1"
        # Bodies in memory, in a pipe, and in a file of their own, spliced from the socket.
        for size in (1000, 300_000, 900_000, 3_000_000):
            body = os.urandom(size)
            reply = get_unix(sock, "/sha256", body).split(b"\r\n\r\n", 1)[1]
            assert json.loads(reply)["sha256"] == hashlib.sha256(body).hexdigest(), size
    finally:
        assert server.stop() == 0
    assert not sock.exists() or not _listening(sock)


def _listening(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return True
    except OSError:
        return False


def test_bind_from_wsgid_json_and_clear_errors(tmp_path):
    folder = tmp_path / "app"
    subprocess.run([str(WSGID), "init", "--app-path", str(folder)], check=True, capture_output=True)
    port = free_port()
    subprocess.run([str(WSGID), "config", "--app-path", str(folder), "--bind", f"127.0.0.1:{port}",
                    "--wsgi-app", "testapp:application", "--virtualenv", str(VENV)], check=True)
    assert json.loads((folder / "wsgid.json").read_text())["bind"] == [f"127.0.0.1:{port}"]
    (folder / "app").rmdir()
    (folder / "app").symlink_to(APPS["testapp"])
    proc = subprocess.Popen([str(WSGID), "--app-path", str(folder), "--no-daemon"],
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/hello", timeout=2).ok, what="wsgid from wsgid.json")
        # The address is taken: a second master says so and exits 2.
        second = subprocess.run([str(WSGID), "--app-path", str(tmp_path), "--bind", f"127.0.0.1:{port}",
                                 "--wsgi-app", "x:y"], capture_output=True, text=True, timeout=10)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    for args, message in [
        (["--bind", "::1:80"], "write an IPv6 address as [ADDRESS]:PORT"),
        (["--bind", "host:http"], "the port is not a number"),
        (["--bind", "127.0.0.1:8000", "--recv", "tcp://127.0.0.1:1", "--send", "tcp://127.0.0.1:2"],
         "--bind serves HTTP itself"),
        ([], "give --bind HOST:PORT to serve HTTP, or --recv and --send"),
    ]:
        result = subprocess.run([str(WSGID), "--app-path", str(tmp_path), *args], capture_output=True, text=True,
                                timeout=10)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_a_killed_front_end_is_replaced_and_waiting_clients_are_served(tmp_path):
    """The master holds the listening socket: clients who connect while the front end is
    down wait in the backlog and are served by the new one, not refused."""
    server = serve(tmp_path)
    try:
        old = front_pid(server)
        os.kill(old, signal.SIGKILL)
        started = time.time()
        # Sent at once, while no front end runs.
        assert requests.get(server.url + "/hello", timeout=10).text == "Hello, World!"
        assert time.time() - started < 5
        assert front_pid(server) != old
        assert "the front end died; restarting it" in server.log()
    finally:
        assert server.stop() == 0


def test_term_refuses_new_clients_and_finishes_those_in_service(tmp_path):
    server = serve(tmp_path, workers=1)
    result = {}
    slow = threading.Thread(target=lambda: result.update(r=requests.get(server.url + "/sleep?2", timeout=10)))
    slow.start()
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/hello", timeout=2)
    assert server.proc.wait(10) == 0
    slow.join()
    assert result["r"].text == "slept"
    assert server.master_pids() == [] and server.worker_pids() == []


def test_hup_reloads_the_workers_and_the_front_end_stays(tmp_path):
    server = serve(tmp_path)
    try:
        front = front_pid(server)
        old = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(server.worker_pids()).isdisjoint(old) and len(server.worker_pids()) == 2,
                 what="new workers")
        assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"
        assert front_pid(server) == front
    finally:
        assert server.stop() == 0


def test_a_slow_request_holds_up_no_other_connection(tmp_path):
    """Request-level balancing: while one connection waits on a 1 s endpoint, every other
    connection's requests go to the idle worker."""
    server = serve(tmp_path, workers=2)
    try:
        slow = threading.Thread(target=lambda: requests.get(server.url + "/sleep?1.5", timeout=10))
        slow.start()
        time.sleep(0.2)
        with requests.Session() as session:
            for _ in range(50):
                reply = session.get(server.url + "/hello", timeout=5)
                assert reply.text == "Hello, World!"
                assert reply.elapsed.total_seconds() < 0.5
        assert slow.is_alive(), "the slow request was still in service all along"
        slow.join()
    finally:
        assert server.stop() == 0


CLIENT_RCVBUF = 256 * 1024


def bytes_the_kernel_holds_for_a_client_that_reads_nothing():
    """What a sender's socket and a receiver's (with `CLIENT_RCVBUF`) hold on loopback here
    before the sender would block: the kernel's buffers, which differ between machines."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        client.connect(listener.getsockname())
        conn, _ = listener.accept()
        conn.setblocking(False)
        held, stuck = 0, 0
        while stuck < 3:  # the send buffer grows while it fills: wait until it stops
            try:
                held += conn.send(bytes(65536))
                stuck = 0
            except BlockingIOError:
                stuck += 1
                time.sleep(0.1)
        conn.close()
        client.close()
    return held


def a_client_that_reads_nothing_of_a_large_response(server, past=2 << 20):
    """A client that asks for `past` bytes more than the kernel's buffers hold (before, the
    worker waited on such a client) and reads nothing yet: its socket, and the body's size."""
    size = (bytes_the_kernel_holds_for_a_client_that_reads_nothing() + past) // 65536 * 65536
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    slow.connect(("127.0.0.1", server.mongrel2.port))
    slow.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    time.sleep(0.5)
    return slow, size


def twenty_hellos_answer_within_a_second_each(server):
    for _ in range(20):
        reply = requests.get(server.url + "/hello", timeout=5)
        assert reply.text == "Hello, World!" and reply.elapsed.total_seconds() < 1


def the_slow_client_gets_every_byte_then_its_next_request(slow, size):
    """The client of `a_client_that_reads_nothing_of_a_large_response` reads at last."""
    reader = Reader(slow)
    status, _, body, complete = reader.response(time.time() + 30)
    assert (status, complete, len(body)) == (200, True, size) and body.count(b"x") == size
    slow.sendall(b"GET /id?again HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reader.response(time.time() + 5)[2] == b"id=again"
    slow.close()


def test_a_client_slower_than_the_app_does_not_hold_its_worker(tmp_path):
    """A response the client's socket cannot take yet is kept by the worker (up to 4 MiB for
    all its clients), which serves the next request meanwhile; the slow client still gets
    every byte, and its connection serves its next request once the response is out."""
    server = serve(tmp_path, workers=1)
    try:
        slow, size = a_client_that_reads_nothing_of_a_large_response(server)
        twenty_hellos_answer_within_a_second_each(server)
        the_slow_client_gets_every_byte_then_its_next_request(slow, size)
    finally:
        assert server.stop() == 0


def test_a_response_far_past_the_memory_bound_waits_on_disk_not_in_the_worker(tmp_path):
    """Past the 4 MiB a worker keeps in memory, the rest of a slow client's response goes to
    an unnamed file beside the spooled bodies (as nginx buffers to a temp file): 64 MiB for
    a client that reads nothing hold neither the worker nor its memory, and all arrive."""
    server = serve(tmp_path, workers=1)
    try:
        slow, size = a_client_that_reads_nothing_of_a_large_response(server, past=64 << 20)
        twenty_hellos_answer_within_a_second_each(server)
        worker = server.worker_pids()[0]
        rss = int(next(l for l in open(f"/proc/{worker}/status") if l.startswith("VmRSS:")).split()[1])
        assert rss < 48 * 1024, f"the worker holds {rss} KiB"
        the_slow_client_gets_every_byte_then_its_next_request(slow, size)
    finally:
        assert server.stop() == 0


def test_a_reload_lets_a_slow_client_take_the_rest_of_its_response(tmp_path):
    """A worker told to stop (HUP: new workers take over) first writes out what it kept for
    slow clients: a client that reads only after the reload still gets every byte."""
    server = serve(tmp_path, workers=1)
    try:
        slow, size = a_client_that_reads_nothing_of_a_large_response(server)
        old = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(server.worker_pids()) - old, what="a new worker")
        assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"
        status, _, body, complete = Reader(slow).response(time.time() + 20)
        assert (status, complete, len(body)) == (200, True, size) and body.count(b"x") == size
        slow.close()
        wait_for(lambda: not set(server.worker_pids()) & old, what="the old worker gone")
    finally:
        assert server.stop() == 0


def pid_of(server, role):
    pids = [pid for pid in children(server.proc.pid) if role_of(pid) == role]
    return pids[0] if pids else None


def test_lent_connections_never_carry_a_reply_to_another_client_through_churn_and_kills(tmp_path):
    """Workers write responses to the client's connection themselves (the front end lends
    it), and bodies over 64 KiB go to them in pipes (or files) lent with the request. Clients
    that pipeline GETs and POSTs, drop their connections unread, and reconnect (so the front
    end reuses descriptor numbers at once) while a worker and the front end (with the broker
    inside it) are killed in turn: every response read answers its own request, and hashes
    its own body."""
    server = serve(tmp_path, workers=3)
    stop, wrong, served, failures = threading.Event(), [], [0], [0]

    def request(tag, rng):
        """The request's bytes and the response that answers it."""
        if rng.random() < 0.6:
            return f"GET /id?{tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), f"id={tag}".encode()
        body = (tag.encode() + b"|") * (rng.randint(70_000, 400_000) // (len(tag) + 1))
        head = f"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body, hashlib.sha256(body).hexdigest().encode()

    def client(name):
        rng, n = random.Random(name), 0
        while not stop.is_set():
            tags = [f"{name}-{n}-{k}" for k in range(rng.randint(1, 3))]
            n += 1
            sent = [request(tag, rng) for tag in tags]
            try:
                with socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=5) as sock:
                    sock.sendall(b"".join(wire for wire, _ in sent))
                    if rng.random() < 0.3:
                        continue  # gone before reading: its connection's number is free again
                    reader = Reader(sock)
                    for tag, (_, expected) in zip(tags, sent):
                        status, _, body, complete = reader.response(time.time() + 5)
                        if status is None or not complete:
                            failures[0] += 1
                            break
                        if expected.startswith(b"id="):
                            answered = body
                        else:
                            answered = body if status != 200 else json.loads(body)["sha256"].encode()
                        if answered != expected:
                            wrong.append((tag, status, body[:200]))
                        served[0] += 1
            except OSError:
                failures[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        for role in ("worker", "front"):
            time.sleep(1.0)
            before = served[0]
            os.kill(pid_of(server, role), signal.SIGKILL)
            wait_for(lambda: served[0] > before + 50, timeout=15, what=f"service after killing the {role}")
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(10)
        assert not wrong, wrong[:5]
        assert served[0] > 500, (served[0], failures[0])
        assert requests.get(server.url + "/id?after", timeout=5).text == "id=after"
    finally:
        stop.set()
        assert server.stop() == 0


def test_a_client_leaving_mid_response_is_logged_as_its_doing_not_as_our_error(tmp_path):
    """A client that closes its connection while its response streams (a browser tab
    closed on an event stream) stops that response, as gunicorn does, with an INFO line
    that says so; no ERROR, and the worker serves on."""
    server = serve(tmp_path, workers=1)
    try:
        sock = socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=5)
        sock.sendall(b"GET /events?n=100&every=0.02 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"data: 0" in sock.recv(4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()  # a reset: the next event's write fails
        wait_for(lambda: "the client went away before its response was complete" in server.log(),
                 what="the line saying the client went away")
        assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"
        assert " ERROR " not in server.log(), server.log()[-2000:]
    finally:
        assert server.stop() == 0


def test_a_worker_killed_while_writing_to_a_lent_connection_closes_it(tmp_path):
    """The worker writes the response itself; killed half-way, its client sees the connection
    end (not a hang, not another response), and the next client is served."""
    server = serve(tmp_path, workers=2)
    try:
        with socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=10) as sock:
            sock.sendall(b"GET /events?n=100&every=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200") and b"data: 0" in first
            pid = int(requests.get(server.url + "/pid", timeout=5).text)
            others = [p for p in server.worker_pids() if p != pid]
            os.kill(others[0], signal.SIGKILL)
            started, rest = time.time(), b""
            while chunk := sock.recv(65536):
                rest += chunk
            assert time.time() - started < 5
            assert b"HTTP/1.1" not in rest
            assert b"data: 99" not in rest
        assert requests.get(server.url + "/id?next", timeout=5).text == "id=next"
    finally:
        assert server.stop() == 0


def test_piped_and_pooled_bodies_carry_each_body_to_its_own_request_only(tmp_path):
    """Bodies up to 1 MiB go to the worker in a pipe of their own, or, when the pipe fills
    before the body is in (a client sending it in many small pieces), in a file the front end
    keeps and writes again (lent to the worker, and given back only once the response is
    complete). Sixteen clients upload bodies of their own, a third of them in 1 KiB pieces,
    some dropping the connection as soon as the body is sent (the worker may not have opened
    the pipe or file yet): every answer hashes its own body, and the pool's files are all that
    remain."""
    server = serve(tmp_path, workers=2)
    upload_dir = server.mongrel2.upload_dir
    wrong, answered, dribbled = [], [0], [0]

    def client(name):
        rng = random.Random(name)
        for n in range(12):
            body = bytes([name]) * rng.randint(65 * 1024, 1024 * 1024) + f"{name}-{n}".encode()
            head = f"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            try:
                with socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=10) as sock:
                    if rng.random() < 0.33:
                        # Each piece is a segment of its own: the pipe's slots fill first.
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        sock.sendall(head.encode())
                        for at in range(0, len(body), 1024):
                            sock.sendall(body[at:at + 1024])
                        dribbled[0] += 1
                    else:
                        sock.sendall(head.encode() + body)
                    if rng.random() < 0.25:
                        continue
                    status, _, reply, complete = Reader(sock).response(time.time() + 10)
                    if status != 200 or not complete:
                        wrong.append((name, n, status, reply[:100]))
                        continue
                    got = json.loads(reply)
                    if got["sha256"] != hashlib.sha256(body).hexdigest() or got["upload_path"] is not None:
                        wrong.append((name, n, got))
                    answered[0] += 1
            except OSError as e:
                wrong.append((name, n, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not wrong, wrong[:5]
        assert answered[0] > 100
        assert dribbled[0] > 30
        # Files are made only for bodies whose pipe filled: the dribbled ones.
        assert list(upload_dir.iterdir()), "no dribbled body moved from its pipe to a file"
        wait_for(lambda: len(list(upload_dir.iterdir())) <= 64, what="no spool file beyond the pool's")
    finally:
        assert server.stop() == 0
    assert list(upload_dir.iterdir()) == []


def test_pipelined_requests_each_get_their_own_piped_body(tmp_path):
    """Requests sent back to back on one connection, GETs between POSTs whose bodies go in
    pipes: each is answered in order, with its own body. (That a pipe goes only with the
    request that names it is unit-tested in `broker::lent`.)"""
    server = serve(tmp_path, workers=2)
    try:
        bodies = [bytes([65 + i]) * (100_000 + 50_000 * i) if i % 2 else None for i in range(8)]
        wire = b""
        for body in bodies:
            if body is None:
                wire += b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
            else:
                wire += f"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                wire += body
        with socket.create_connection(("127.0.0.1", server.mongrel2.port), timeout=10) as sock:
            sock.sendall(wire)
            reader = Reader(sock)
            for body in bodies:
                status, _, reply, complete = reader.response(time.time() + 10)
                assert status == 200 and complete, (status, reply[:200])
                if body is not None:
                    assert json.loads(reply)["sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        assert server.stop() == 0


def test_max_body_size_holds_for_bodies_in_pipes(tmp_path):
    server = serve(tmp_path, args=("--max-body-size", "150000"), workers=1)
    try:
        r = requests.post(server.url + "/sha256", data=b"x" * 200_000, timeout=5)
        assert r.status_code == 413, r.text
        body = b"y" * 140_000
        r = requests.post(server.url + "/sha256", data=body, timeout=5)
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
        assert "refused upload larger than --max-body-size" in server.log()
    finally:
        assert server.stop() == 0


def test_an_app_that_keeps_wsgi_input_cannot_read_a_later_body(tmp_path):
    """A pooled file takes the next body once its response is complete: a wsgi.input kept by
    the app past its request refuses to read, rather than read another client's body."""
    server = serve(tmp_path, workers=1)
    try:
        assert requests.post(server.url + "/keep-input", data=b"A" * 200_000, timeout=5).text == "kept"
        r = requests.post(server.url + "/sha256", data=b"B" * 200_000, timeout=5)
        assert r.json()["sha256"] == hashlib.sha256(b"B" * 200_000).hexdigest()
        kept = requests.get(server.url + "/read-kept", timeout=5).text
        assert kept.startswith("refused:") and "the request is over" in kept, kept
    finally:
        assert server.stop() == 0


def test_keep_alive_clients_past_the_open_files_limit_leave_room_for_new_workers(tmp_path):
    """Under an open files limit of 256, 250 keep-alive clients. A lent connection costs no
    descriptor beyond the client's own (the broker takes it from the front end only to queue
    a request), and the front end keeps an eighth of the limit for the broker's work: past
    224 connections, new clients wait in the listen backlog. So a HUP reload's new workers
    still connect to the broker, and every client is answered; those that waited once others
    leave."""
    front = Mongrel2(tmp_path / "m2", [Handler("/")], front="bind")
    front.start()
    server = Wsgid(tmp_path / "app", front.handlers[0], front, APPS["testapp"],
                   ["--wsgi-app", "testapp:application"], workers=2)
    command = server.command
    server.command = lambda: ["prlimit", "--nofile=256:256", "--", *command()]
    server.start(wait_path="/hello")
    clients = []
    try:
        for i in range(250):
            clients.append(socket.create_connection(("127.0.0.1", front.port), timeout=10))

        def round_trip(tag, which):
            for i in which:
                clients[i].sendall(f"GET /id?{tag}-{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            for i in which:
                status, _, body, complete = Reader(clients[i]).response(time.time() + 10)
                assert (status, body, complete) == (200, f"id={tag}-{i}".encode(), True), (tag, i)

        round_trip("first", range(200))
        old = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(server.worker_pids()).isdisjoint(old) and len(server.worker_pids()) == 2,
                 what="new workers")
        round_trip("reloaded", range(200))
        assert "at the most connections the open files limit allows" in server.log()
        for sock in clients[:40]:
            sock.close()
        round_trip("waited", range(200, 250))
    finally:
        for sock in clients:
            sock.close()
        assert server.stop() == 0


@pytest.mark.parametrize("way", ["bind", "mongrel2", "wsgid"])
def test_the_readmes_example_serves_behind_each_front(tmp_path, way):
    """`scripts/serve-example` as the README gives it: one command by default, or behind
    mongrel2 or `wsgid server`."""
    from stack import ROOT
    port = free_port()
    env = {**os.environ, "PORT": str(port), "FRONT": way, "BUILD": "debug"}
    proc = subprocess.Popen([str(ROOT / "scripts" / "serve-example")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"))
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200, timeout=60,
                 what="the example")
        assert "Flask" in requests.get(f"http://127.0.0.1:{port}/", timeout=5).text
        body = os.urandom(100_000)
        reply = requests.post(f"http://127.0.0.1:{port}/upload", files={"doc": ("d.bin", body)}, timeout=10)
        assert reply.status_code == 200, reply.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)

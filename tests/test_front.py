"""Our front end (`wsgid server`) itself: mongrel2's configs, HTTP/1.1 done strictly, the
handler protocol as libzmq handlers see it, Dir routes, and what it does better than
mongrel2 (503/504, no 16-message limit, handler liveness). The rest of the suite runs behind
it as well (conftest's `front` parameter)."""
import hashlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from front import Front, PyHandler, ok
from http_util import is_closed, raw_exchange
from stack import ROOT, WSGID as WSGID_BIN, wait_for

pytestmark = pytest.mark.one_front


@pytest.fixture
def started(tmp_path):
    """start(routes, settings, handlers=...) -> Front; stops everything after."""
    things = []

    def start(routes, settings=None, handlers=(), **kw):
        for h in handlers:
            things.append(h)
        front = Front(tmp_path / f"front-{len(things)}", routes, settings, **kw)
        things.append(front)
        front.start()
        for h in handlers:
            h.start()
        return front
    yield start
    for thing in reversed(things):
        thing.stop()


def wait_handler(front, path="/"):
    wait_for(lambda: requests.get(front.url + path, timeout=2).status_code != 503, what="the handler to connect")


def test_conf_and_sqlite_both_start_and_serve(started):
    for use_sqlite in (False, True):
        h = PyHandler()
        front = started({"/": h.conf()}, handlers=[h], use_sqlite=use_sqlite)
        wait_handler(front)
        r = requests.get(front.url + "/x?y=1")
        assert r.status_code == 200 and r.text == "/x"
        # The log is flushed every 200 ms.
        wait_for(lambda: "3:GET,2:/x,8:HTTP/1.1,3:200#" in (front.root / "logs" / "access.log").read_text(),
                 timeout=5, what="the request in the access log")


@pytest.mark.parametrize("protocol", ["json", "tnetstring"])
def test_request_messages_are_mongrel2s_and_json_is_always_valid(started, protocol):
    h = PyHandler(protocol)
    front = started({"/app": h.conf()}, handlers=[h])
    wait_handler(front, "/app")
    while not h.requests.empty():
        h.requests.get()
    data, _ = raw_exchange(front.port, b"GET /app/p%20q?a=1&b#frag HTTP/1.1\r\nHost: localhost:9\r\n"
                                       b"X-Ctl: a\tb\r\nX-Bytes: \xc3\xa9\xff\r\nX-Forwarded-For: 6.6.6.6\r\n"
                                       b"X-Mongrel2-Upload-Done: /etc/passwd\r\nX-Dup: 1\r\nx-dup: 2\r\n"
                                       b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK")
    req = h.next_request()
    hd = req["headers"]
    assert req["sender"] == h.ident and req["path"] == "/app/p%20q"
    assert hd["PATH"] == "/app/p%20q" and hd["METHOD"] == "GET" and hd["VERSION"] == "HTTP/1.1"
    assert hd["URI"] == "/app/p%20q?a=1&b" and hd["QUERY"] == "a=1&b" and hd["FRAGMENT"] == "frag"
    assert hd["PATTERN"] == "/app" and hd["URL_SCHEME"] == "http" and hd["REMOTE_ADDR"] == "127.0.0.1"
    assert hd["x-forwarded-for"] == "127.0.0.1"  # a client's is overwritten, as mongrel2 does
    assert hd["host"] == "localhost:9" and hd["x-dup"] == ["1", "2"] and hd["x-ctl"] == "a\tb"
    assert not any(k.startswith("x-mongrel2") for k in hd)
    # JSON: valid JSON; the byte that is not UTF-8 arrives as its Latin-1 character.
    assert hd["x-bytes"] == ("é\xff" if protocol == "json" else "\xc3\xa9\xff")


MALFORMED = [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12abc\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continues\r\n\r\n", 417),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Long: " + b"y" * 5000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 40 + b"\r\n", 431),
]


def test_malformed_requests_are_refused_and_closed(started):
    h = PyHandler()
    front = started({"/": h.conf()}, {"limits.header_count": 32}, handlers=[h])
    wait_handler(front)
    for raw, status in MALFORMED:
        data, sock = raw_exchange(front.port, raw, timeout=3)
        assert data.startswith(f"HTTP/1.1 {status} ".encode()), (raw[:80], data[:80])
        assert sock is None, raw[:80]  # closed: nothing after it can be read two ways
    assert requests.get(front.url + "/alive").text == "/alive"
    assert front.proc.poll() is None


def test_slow_heads_and_idle_connections_time_out(started):
    h = PyHandler()
    front = started({"/": h.conf()}, {"limits.header_timeout": 1, "limits.keepalive_timeout": 1}, handlers=[h])
    wait_handler(front)
    slow = socket.create_connection(("127.0.0.1", front.port))
    idle = socket.create_connection(("127.0.0.1", front.port))
    started_at = time.time()
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
        try:
            slow.sendall(bytes([byte]))
        except BrokenPipeError:
            break  # the server gave up on it: the 408 is waiting
        # Others are served meanwhile.
        if byte == ord("/"):
            assert requests.get(front.url + "/other", timeout=2).text == "/other"
        time.sleep(0.05)
        if time.time() - started_at > 3:
            break
    slow.settimeout(3)
    data = slow.recv(1000)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert is_closed(slow, 2) and is_closed(idle, 2)
    assert time.time() - started_at < 4


def test_keep_alive_pipelining_and_order_across_handler_and_dir(started):
    """mongrel2 answers a Dir request pipelined behind a slow handler request first; we keep
    the order."""
    def slow(req):
        time.sleep(0.3)
        return ok("slow")
    h = PyHandler(respond=slow)
    front = started({"/h": h.conf(), "/static/": "Dir(base='static/', index_file='index.html', default_ctype='text/plain')"},
                    handlers=[h])
    (front.root / "static" / "a.txt").write_text("static a")
    wait_handler(front, "/h")
    data, sock = raw_exchange(front.port, b"GET /h HTTP/1.1\r\nHost: x\r\n\r\nGET /static/a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
                                          b"HEAD /static/a.txt HTTP/1.1\r\nHost: x\r\n\r\nGET /h HTTP/1.0\r\n\r\n", timeout=5)
    assert sock is None  # HTTP/1.0 without keep-alive: closed after its response
    heads = data.split(b"HTTP/1.1 ")[1:]
    assert len(heads) == 4, data
    assert heads[0].startswith(b"200") and b"slow" in heads[0]
    assert b"static a" in heads[1] and heads[1].count(b"static a") == 1
    assert b"static a" not in heads[2]  # HEAD: no body
    assert b"slow" in heads[3]


def test_expect_100_continue_and_head_to_a_handler(started):
    h = PyHandler(respond=lambda req: ok(hashlib.sha256(req["body"]).hexdigest()))
    front = started({"/": h.conf()}, handlers=[h])
    wait_handler(front)
    sock = socket.create_connection(("127.0.0.1", front.port), timeout=3)
    sock.sendall(b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(b"hello")
    data = b""
    while hashlib.sha256(b"hello").hexdigest().encode() not in data:
        data += sock.recv(1000)
    # HEAD: the handler's Content-Length describes a body that never comes; the connection
    # goes on to the next request.
    h.respond = lambda req: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" if req["headers"]["METHOD"] == "HEAD" else ok("next")
    sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"next" not in data:
        data += sock.recv(1000)
    assert data.count(b"HTTP/1.1 200 OK") == 2


def test_dir_routes_never_escape_and_do_conditionals_and_ranges(started):
    h = PyHandler()
    front = started({"/": h.conf(), "/static/": "Dir(base='static/', index_file='index.html', default_ctype='text/plain')",
                     "/st2": "Dir(base='static/', index_file='index.html', default_ctype='text/plain')"}, handlers=[h])
    root = front.root
    (root / "static" / "a.txt").write_text("0123456789" * 100)
    (root / "static" / "index.html").write_text("<p>index</p>")
    (root / "static" / "sub").mkdir()
    (root / "static2").mkdir()
    (root / "static2" / "secret.txt").write_text("SECRET sibling")
    (root / "secret.txt").write_text("SECRET root")
    os.symlink(root / "secret.txt", root / "static" / "link.txt")
    for path in ["/static/../secret.txt", "/static/..%2fsecret.txt", "/static/%2e%2e/secret.txt",
                 "/static/..%2fstatic2/secret.txt", "/static/../static2/secret.txt", "/static/%2e%2e%2fstatic2/secret.txt",
                 "/static/a.txt%00.html", "/static/link.txt", "/static/%2fetc/passwd", "/st2a.txt",
                 "/static/..%5csecret.txt", "/static/sub/../../secret.txt"]:
        data, _ = raw_exchange(front.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert b"SECRET" not in data and data.startswith(b"HTTP/1.1 404"), (path, data[:100])
    r = requests.get(front.url + "/static/")
    assert r.text == "<p>index</p>" and r.headers["Content-Type"] == "text/html"
    r = requests.get(front.url + "/static/sub", allow_redirects=False)
    assert r.status_code == 301 and r.headers["Location"] == "/static/sub/"
    r = requests.get(front.url + "/static/a.txt")
    etag, date = r.headers["ETag"], r.headers["Date"]
    assert etag.startswith('"') and etag.endswith('"') and r.headers["Accept-Ranges"] == "bytes"
    r = requests.get(front.url + "/static/a.txt", headers={"If-None-Match": f'"nope", {etag}'})
    assert r.status_code == 304 and r.content == b""
    r = requests.get(front.url + "/static/a.txt", headers={"Range": "bytes=10-14"})
    assert r.status_code == 206 and r.content == b"01234" and r.headers["Content-Range"] == "bytes 10-14/1000"
    r = requests.get(front.url + "/static/a.txt", headers={"Range": "bytes=2000-"})
    assert r.status_code == 416
    time.sleep(1.1)
    assert requests.get(front.url + "/static/a.txt").headers["Date"] != date  # fresh, never cached
    assert requests.post(front.url + "/static/a.txt", data="x").status_code == 405


def test_no_handler_is_503_with_retry_after_and_a_silent_one_504(started):
    h = PyHandler(respond=lambda req: None)  # never replies
    nobody = PyHandler()  # never started
    front = started({"/": h.conf(), "/none": nobody.conf()},
                    {"limits.handler_wait_ms": 300, "limits.handler_timeout": 1}, handlers=[h])
    t = time.time()
    r = requests.get(front.url + "/none/x", timeout=5)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and time.time() - t < 2
    wait_for(lambda: not h.requests.empty() or requests.get(front.url + "/", timeout=3) is None, timeout=5,
             what="the handler to take a request")
    while not h.requests.empty():
        h.requests.get()
    sock = socket.create_connection(("127.0.0.1", front.port), timeout=5)
    t = time.time()
    sock.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
    data = sock.recv(1000)
    assert data.startswith(b"HTTP/1.1 504 ") and 0.9 < time.time() - t < 3
    assert is_closed(sock)
    # The late reply goes nowhere, and the handler hears the connection is gone.
    req = h.next_request()
    h.send(req["id"], ok("late"))
    notice = h.next_request(notices=True)
    while notice["path"] != "@*":
        notice = h.next_request(notices=True)
    assert notice["id"] == req["id"] and notice["body"] == b'{"type":"disconnect"}'


def test_a_handler_restart_never_gets_another_clients_id(started):
    """Connection ids are never reused: a reply for a closed connection reaches nobody."""
    h = PyHandler(respond=lambda req: None)
    front = started({"/": h.conf()}, handlers=[h])
    ids = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", front.port), timeout=3)
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        ids.append(h.next_request()["id"])
        sock.close()
    assert ids == sorted(set(ids))
    h.respond = lambda req: ok("fresh")
    fresh = requests.get(front.url + "/y", timeout=3)
    h.send(ids[-1], ok("stale reply for a gone client"))
    assert fresh.text == "fresh"


def test_disconnect_notice_when_a_client_goes_away(started):
    h = PyHandler(respond=lambda req: None)
    front = started({"/": h.conf()}, handlers=[h])
    sock = socket.create_connection(("127.0.0.1", front.port), timeout=3)
    sock.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    req = h.next_request()
    sock.close()
    notice = h.next_request(notices=True)
    assert notice["path"] == "@*" and notice["id"] == req["id"]
    assert notice["headers"] == {"METHOD": "JSON"} and notice["body"] == b'{"type":"disconnect"}'


def test_many_small_messages_reach_a_slow_client_and_a_stuck_one_is_dropped(started):
    """mongrel2 drops a client with 16 handler messages queued; we bound bytes instead."""
    def stream(req):
        if req["path"].startswith("/many"):
            h.send(req["id"], b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(300):
                h.send(req["id"], b"5\r\n%05d\r\n" % i)
            return b"0\r\n\r\n"
        big = os.urandom(1 << 20)
        h.send(req["id"], b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * len(big)))
        for _ in range(8):
            h.send(req["id"], big)
        return None
    h = PyHandler(respond=stream)
    front = started({"/": h.conf()}, {"limits.client_buffer": 2 << 20}, handlers=[h])
    wait_for(lambda: requests.get(front.url + "/many", timeout=3).status_code == 200, what="the handler")
    sock = socket.create_connection(("127.0.0.1", front.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /many HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(1)  # nothing read meanwhile: 300 messages wait for the client
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        data += sock.recv(65536)
    assert b"%05d" % 299 in data
    stuck = socket.create_connection(("127.0.0.1", front.port), timeout=5)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: "limits.client_buffer" in (front.root / "logs" / "error.log").read_text(), timeout=10,
             what="the stuck client to be dropped")
    assert requests.get(front.url + "/many", timeout=5).status_code == 200


def test_download_credits(started):
    h = PyHandler(respond=lambda req: ok("x" * 1000))
    front = started({"/": h.conf()}, {"download.flow_control": 1}, handlers=[h])
    wait_handler(front)
    while not h.requests.empty():
        h.requests.get()
    with requests.Session() as s:
        s.get(front.url + "/a")
        s.get(front.url + "/b")
    first, notices = None, []
    deadline = time.time() + 3
    while time.time() < deadline and len(notices) < 2:
        req = h.next_request(notices=True)
        if req["path"] == "@*":
            if req["body"] == b'{"type":"credits"}':
                notices.append(req)
        elif first is None:
            first = req
        else:
            assert "DOWNLOAD_CREDITS" not in req["headers"]
    assert first["headers"]["DOWNLOAD_CREDITS"] == "102400"
    assert len(notices) == 2 and all(int(n["headers"]["DOWNLOAD_CREDITS"]) > 1000 for n in notices)


def test_unimplemented_parts_are_named_at_start_and_answer_501(started):
    h = PyHandler()
    front = started({"/": h.conf(), "/proxy": "Proxy(addr='127.0.0.1', port=9)"},
                    {"limits.tick_timer": 10, "ssl.verify_optional": 1, "upload.stream": 1}, handlers=[h])
    wait_handler(front)
    log = (front.root / "logs" / "error.log").read_text()
    assert "Proxy routes" in log and "ssl.verify_optional is not implemented" in log and "upload.stream" in log
    assert "limits.tick_timer" not in log  # the reaper's settings: our timeouts replace it
    assert requests.get(front.url + "/proxy/x").status_code == 501


@pytest.mark.parametrize("content_length", [1024, 4096, 8192])
def test_uploads_are_whole_whatever_the_limits(started, content_length):
    """mongrel2 corrupts or hangs uploads when limits.content_length < limits.buffer_size."""
    h = PyHandler(respond=lambda req: upload_digest(front, req))
    front = started({"/": h.conf()}, {"limits.content_length": content_length, "limits.buffer_size": 4096,
                                      "upload.temp_store": "/tmp/upload.XXXXXX", "upload.temp_store_mode": "0640"},
                    handlers=[h])
    wait_handler(front)
    for size in (content_length - 1, content_length + 1, 3000, 5000, 300_000):
        body = os.urandom(size)
        data, _ = raw_exchange(front.port, b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                               % size + body, timeout=5)
        assert data.endswith(hashlib.sha256(body).hexdigest().encode()), (size, data[:200])
    assert list((front.root / "tmp").iterdir()) == []


def upload_digest(front, req):
    path = req["headers"].get("x-mongrel2-upload-done")
    if req["headers"].get("x-mongrel2-upload-start") and not path:
        return None  # the start: wait for the done message
    if path:
        on_disk = front.root / path.lstrip("/")
        assert oct(on_disk.stat().st_mode & 0o777) == "0o640"
        data = on_disk.read_bytes()
        on_disk.unlink()
        return ok(hashlib.sha256(data).hexdigest())
    return ok(hashlib.sha256(req["body"]).hexdigest())


def pyzmq_handler(h, front):
    """The command of bench/'s minimal pyzmq handler for `h`'s endpoints."""
    return [sys.executable, str(ROOT / "bench" / "pyzmq_handler.py"), h.send_spec, h.recv_spec, str(front.root)]


def late_requests(front, seconds=4):
    """Requests sent one after another for `seconds`: when (seconds from now) each of those
    that waited more than 0.5 s was sent."""
    cut = time.time()
    late = []
    while time.time() - cut < seconds:
        t = time.time()
        try:
            requests.get(front.url + "/", timeout=0.5)
        except requests.RequestException:
            late.append(t - cut)
    return late


@pytest.mark.parametrize("heartbeat_ms", [500, 60_000])
def test_a_silent_handler_stops_getting_requests_within_two_seconds(started, heartbeat_ms):
    """Two handler processes; one stops answering without closing anything (SIGSTOP: the
    kernel still accepts its TCP data, as with a host cut off the network). mongrel2 keeps
    dealing it its share; we stop within 2 s. With heartbeats too slow to notice (the
    second case), requests do wait on it: what the test would see without them."""
    h = PyHandler()  # only for its specs
    front = started({"/": h.conf()}, {"limits.handler_heartbeat_ms": heartbeat_ms})
    procs = [subprocess.Popen(pyzmq_handler(h, front), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    try:
        wait_for(lambda: requests.get(front.url + "/", timeout=2).status_code == 200, what="the handlers")
        time.sleep(0.5)
        procs[0].send_signal(signal.SIGSTOP)
        late = late_requests(front)
        if heartbeat_ms < 1000:
            assert all(t < 2 for t in late), late
        else:
            assert any(t > 2 for t in late), late
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()


def test_start_up_as_mongrel2_does_it(tmp_path):
    """Daemonized by default, chrooted, running as the chroot directory's owner, a pid file
    inside the chroot (a stale one replaced), removed on a graceful stop; the access log in
    mongrel2's format."""
    h = PyHandler()
    front = Front(tmp_path / "daemon", {"/": h.conf()}, {"server.daemonize": 1})
    front.settings.pop("server.daemonize")  # mongrel2's default: daemonize
    front.write_conf()
    (front.root / "run" / "front.pid").write_text("999999\n")  # stale: no such process
    subprocess.run(["chown", "-R", "65534:65534", str(front.root)], check=True)
    h.start()
    try:
        started = subprocess.run([str(WSGID_BIN), "server", "main.conf"], cwd=front.root, capture_output=True, timeout=10)
        assert started.returncode == 0, started.stderr  # the parent returns, the daemon serves
        wait_for(lambda: requests.get(front.url + "/d", timeout=2).text == "/d", what="the daemon")
        pid = int((front.root / "run" / "front.pid").read_text())
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        assert "\nUid:\t65534\t65534\t65534\t65534" in status
        assert os.readlink(f"/proc/{pid}/root") == str(front.root)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pathlib.Path(f"/proc/{pid}").exists(), what="the daemon to stop")
        assert not (front.root / "run" / "front.pid").exists()
        assert "2:/d,8:HTTP/1.1,3:200#" in (front.root / "logs" / "access.log").read_text()
    finally:
        h.stop()
        if (front.root / "run" / "front.pid").exists():
            os.kill(int((front.root / "run" / "front.pid").read_text()), signal.SIGKILL)


def netns_available():
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = subprocess.run(["ip", "netns", "add", "wsgid-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "wsgid-probe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not netns_available(), reason="needs root and network namespaces")
@pytest.mark.parametrize("heartbeat_ms", [500, 60_000])
def test_a_handler_host_cut_off_stops_getting_requests_within_two_seconds(started, heartbeat_ms):
    """A handler on another host (a network namespace over a veth pair) whose link goes
    down: no FIN, no RST, its TCP data just stops. With mongrel2, one host of three cut off
    for 4 s cost 6.5 s of near-total outage; here requests sent 2 s after the cut are all
    served by the host that is still up, and the cut host serves again once it is back.
    With heartbeats too slow to notice (the second case), requests keep waiting on it."""
    ns, host_if, ns_if = f"wsgid{os.getpid() % 100000}", f"wh{os.getpid() % 100000}", f"wn{os.getpid() % 100000}"
    here, there = "10.231.7.1", "10.231.7.2"

    def ip(*args, netns=None):
        prefix = ["ip", "netns", "exec", ns] if netns else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)
    ip("netns", "add", ns)
    procs = []
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{here}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{there}/24", "dev", ns_if, netns=True)
        ip("link", "set", ns_if, "up", netns=True)
        ip("link", "set", "lo", "up", netns=True)
        h = PyHandler()  # for its specs, moved to the veth address
        h.send_spec = f"tcp://{here}:{h.send_spec.rsplit(':', 1)[1]}"
        h.recv_spec = f"tcp://{here}:{h.recv_spec.rsplit(':', 1)[1]}"
        front = started({"/": h.conf()}, {"limits.handler_heartbeat_ms": heartbeat_ms})
        handler = pyzmq_handler(h, front)
        procs.append(subprocess.Popen(handler, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *handler], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_for(lambda: requests.get(front.url + "/", timeout=2).status_code == 200, what="the handlers")
        time.sleep(1)  # both connected: requests alternate between the hosts
        ip("link", "set", host_if, "down")
        late = late_requests(front)
        if heartbeat_ms < 1000:
            assert late and all(t < 2 for t in late), late  # some waited on the cut host at first
        else:
            assert any(t > 2 for t in late), late
        ip("link", "set", host_if, "up")
        wait_for(lambda: all(requests.get(front.url + "/", timeout=2).status_code == 200 for _ in range(10)),
                 what="service with both hosts")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_pipelining_client_that_does_not_read_is_held_back(started):
    """Thousands of pipelined requests for a static file from a client that reads nothing:
    the server answers a bounded amount ahead (no file descriptor or memory growth), then
    the rest as the client reads; all arrive, in order."""
    h = PyHandler()
    front = started({"/": h.conf(), "/static/": "Dir(base='static/', index_file='index.html', default_ctype='text/plain')"},
                    handlers=[h])
    size, count = 20_000, 2000  # 40 MB of responses: more than the kernel's buffers hold
    (front.root / "static" / "a.txt").write_text("a" * size)
    sock = socket.create_connection(("127.0.0.1", front.port), timeout=10)
    sender = threading.Thread(target=lambda: sock.sendall(b"GET /static/a.txt HTTP/1.1\r\nHost: x\r\n\r\n" * count))
    sender.start()
    time.sleep(1.5)
    fds = len(os.listdir(f"/proc/{front.proc.pid}/fd"))
    rss_kib = int(pathlib.Path(f"/proc/{front.proc.pid}/status").read_text().split("VmRSS:")[1].split()[0])
    assert fds < 100 and rss_kib < 64 * 1024, (fds, rss_kib)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 OK")
    one = data.index(b"\r\n\r\n") + 4 + size  # every response is the same length
    received = len(data)
    while received < count * one:
        chunk = sock.recv(1 << 20)
        assert chunk, received / one
        received += len(chunk)
        last = chunk
    sender.join()
    assert received == count * one and last.endswith(b"a" * min(size, len(last)))


def test_sighup_reopens_the_logs_and_reloads_the_config(started):
    """`m2sh reload` sends SIGHUP: mongrel2 reopens its logs (logrotate) and keeps its old
    routes until restarted; we reopen the logs and read the config again, going on serving."""
    h = PyHandler()
    front = started({"/": h.conf()}, handlers=[h])
    wait_handler(front)
    (front.root / "static" / "new.txt").write_text("a new route")
    assert requests.get(front.url + "/static/new.txt").text == "/static/new.txt"  # the handler's
    front.routes["/static/"] = "Dir(base='static/', index_file='index.html', default_ctype='text/plain')"
    front.write_conf()
    logs = front.root / "logs"
    (logs / "access.log").rename(logs / "access.log.1")
    (logs / "error.log").rename(logs / "error.log.1")
    front.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (logs / "error.log").exists(), what="a new error log")
    assert requests.get(front.url + "/after", timeout=3).text == "/after"
    wait_for(lambda: "6:/after," in (logs / "access.log").read_text(), what="the new access log's line")
    assert "logs reopened" in (logs / "error.log").read_text() and front.proc.poll() is None
    wait_for(lambda: "config reloaded" in (logs / "error.log").read_text(), what="the reload")
    assert requests.get(front.url + "/static/new.txt").text == "a new route"
    # A broken config leaves the running one in place.
    (front.root / "main.conf").write_text("servers = [")
    front.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config not reloaded" in (logs / "error.log").read_text(), what="the refused reload")
    assert requests.get(front.url + "/static/new.txt").text == "a new route"


def test_a_refusal_reaches_a_client_still_sending_its_body(started):
    """A 413 or 404 sent while the body is still coming: the server half-closes and reads
    the rest away instead of closing with unread input (which resets the connection and
    can destroy the response before the client reads it)."""
    h = PyHandler()
    front = started({"/h": h.conf()}, handlers=[h])
    body = b"x" * (4 << 20)
    for path in (b"/nothing", b"/h"):  # no route; over limits.content_length without temp_store
        sock = socket.create_connection(("127.0.0.1", front.port), timeout=10)
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        sender = threading.Thread(target=lambda: sock.sendall(body))
        sender.start()
        sender.join(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.split(b" ")[1] in (b"404", b"413"), data[:80]
        sock.close()
    assert front.proc.poll() is None

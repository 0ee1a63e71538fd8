"""Tools for the fault tests: raw HTTP responses read exactly, CPU load, and mongrel2's side
of the handler protocol played by real libzmq sockets (pyzmq)."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid

import zmq


class Reader:
    """Reads HTTP responses one after another from a socket (pipelining: what is read past
    one response is kept for the next)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def more(self):
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            return False
        self.buf += chunk
        return bool(chunk)

    def response(self, deadline, head=False):
        """One response: (status, headers, body, complete). `complete` says whether its
        framing (Content-Length, the chunked terminator) was met; a close-delimited body is
        complete when the server closed after it, which cannot tell a cut. `head`: the
        answer to a HEAD request (no body, whatever the headers say)."""
        self.sock.settimeout(max(0.05, deadline - time.time()))
        while b"\r\n\r\n" not in self.buf:
            if not self.more():
                return None, {}, self.buf, False
        status_and_headers, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = status_and_headers.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
        if head or status in (204, 304) or 100 <= status < 200:
            return status, headers, b"", True
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buf) < length:
                if not self.more():
                    return status, headers, self.buf, False
            body, self.buf = self.buf[:length], self.buf[length:]
            return status, headers, body, True
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    if not self.more():
                        return status, headers, body, False
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    if not self.more():
                        return status, headers, body + self.buf, False
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    return status, headers, body, True
        while self.more():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body, True


def read_response(sock, deadline):
    """One response from a fresh socket (see `Reader.response`)."""
    return Reader(sock).response(deadline)


def exchange(port, request, timeout=10.0):
    """Sends one raw request and reads one response (see `read_response`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock, time.time() + timeout)


@contextlib.contextmanager
def cpu_load(busy=True, processes=2):
    """Keeps every core busy with spinning processes (as many as this machine's cores)."""
    procs = []
    if busy:
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def tnetstring_dict(pairs):
    body = b"".join(b"%d:%s," % (len(k), k) + b"%d:%s," % (len(v), v) for k, v in pairs)
    return b"%d:%s}" % (len(body), body)


class FakeMongrel2:
    """mongrel2's two sockets as libzmq binds them: PUSH for requests, SUB for replies;
    optionally with ZMTP heartbeats. Requests are built as mongrel2 builds them."""

    def __init__(self, heartbeat_ms=0):
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.sub = self.context.socket(zmq.SUB)
        for s in (self.push, self.sub):
            if heartbeat_ms:
                s.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
                s.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * 3)
                s.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_ms * 3)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, 5000)  # a PUSH without peers blocks: fail instead
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.push.bind("tcp://127.0.0.1:*")
        self.sub.bind("tcp://127.0.0.1:*")
        self.send_spec = self.push.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.recv_spec = self.sub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.ident = str(uuid.uuid4()).encode()
        self.monitors = []
        for s in (self.push, self.sub):
            address = f"inproc://monitor-{uuid.uuid4()}"
            s.monitor(address, zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
            m = self.context.socket(zmq.PAIR)
            m.connect(address)
            self.monitors.append(m)
        self.events = []

    def request(self, conn_id, path, body=b"", extra=(), remote=b"127.0.0.1"):
        headers = tnetstring_dict([
            (b"REMOTE_ADDR", remote), (b"METHOD", b"POST" if body else b"GET"),
            (b"URL_SCHEME", b"http"), (b"PATTERN", b"/"), (b"URI", path), (b"VERSION", b"HTTP/1.1"),
            (b"PATH", path.split(b"?")[0]), (b"QUERY", path.partition(b"?")[2]), (b"host", b"localhost"),
            *extra,
        ])
        return b"%s %d %s %s%d:%s," % (self.ident, conn_id, path.split(b"?")[0], headers, len(body), body)

    def send(self, msg, parts=None):
        if parts:
            self.push.send_multipart(parts)
        else:
            self.push.send(msg)

    def replies(self, count, timeout=10.0):
        """Replies received within `timeout`: [(conn_id, body)] (body b'' is a close)."""
        out = []
        deadline = time.time() + timeout
        while len(out) < count and time.time() < deadline:
            if self.sub.poll(50):
                msg = self.sub.recv()
                prefix, _, body = msg.partition(b", ")
                ids = prefix.split(b":", 1)[1]
                out.append((int(ids), body))
            self.poll_monitors()
        return out

    def poll_monitors(self):
        for m in self.monitors:
            while m.poll(0):
                event = m.recv_multipart()
                self.events.append(int.from_bytes(event[0][:2], "little"))

    def disconnects(self):
        self.poll_monitors()
        return self.events.count(zmq.EVENT_DISCONNECTED)

    def close(self):
        for s in (self.push, self.sub, *self.monitors):
            s.close(0)
        self.context.term()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def role_of(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[1].decode() if os.path.exists(f"/proc/{pid}") else ""

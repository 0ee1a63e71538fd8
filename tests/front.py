"""Our front end (`wsgid server`) started on a mongrel2 .conf of the test's, and a handler
in the test process (pyzmq, i.e. libzmq) that sees every message and answers as told."""
import json
import os
import queue
import socket
import subprocess
import textwrap
import threading
import time
import uuid
from pathlib import Path

import zmq

from stack import WSGID, free_port, wait_for


class PyHandler:
    """A mongrel2 handler over libzmq: PULL from send_spec, PUB to recv_spec. Requests land
    in `self.requests` (parsed); `respond` decides the reply bytes (None: no reply)."""

    def __init__(self, protocol="json", respond=None):
        self.protocol = protocol
        self.ident = f"h-{uuid.uuid4().hex[:12]}"
        self.send_spec = f"tcp://127.0.0.1:{free_port()}"
        self.recv_spec = f"tcp://127.0.0.1:{free_port()}"
        self.respond = respond or (lambda req: ok(req["headers"].get("PATH", "")))
        self.requests = queue.Queue()
        self.errors = []
        self.ctx = zmq.Context()
        self.stopped = threading.Event()
        self.thread = None

    def conf(self):
        return (f"Handler(send_spec='{self.send_spec}', send_ident='{self.ident}', "
                f"recv_spec='{self.recv_spec}', recv_ident='', protocol='{self.protocol}')")

    def start(self):
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.connect(self.send_spec)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.connect(self.recv_spec)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        return self

    def loop(self):
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while not self.stopped.is_set():
            if not poller.poll(50):
                continue
            raw = self.pull.recv()
            req = parse(raw)
            self.requests.put(req)
            if req["path"] == "@*":
                continue
            try:
                reply = self.respond(req)
            except Exception as e:  # noqa: BLE001 - shown by the test that reads `errors`
                self.errors.append(e)
                reply = b"HTTP/1.1 500 Handler Error\r\nContent-Length: %d\r\n\r\n%s" % (len(repr(e)), repr(e).encode())
            if reply is not None:
                self.send(req["id"], reply)

    def send(self, conn_id, body, ids=None):
        ids = ids or [conn_id]
        idlist = " ".join(str(i) for i in ids).encode()
        with self.lock:
            self.pub.send(self.ident.encode() + b" " + str(len(idlist)).encode() + b":" + idlist + b", " + body)

    def next_request(self, timeout=5, notices=False):
        deadline = time.time() + timeout
        while True:
            req = self.requests.get(timeout=max(0.01, deadline - time.time()))
            if notices or req["path"] != "@*":
                return req

    def stop(self):
        self.stopped.set()
        if self.thread:
            self.thread.join(2)
        self.ctx.destroy(linger=0)


def netstring(data):
    length, _, rest = data.partition(b":")
    n = int(length)
    return rest[:n], rest[n:n + 1], rest[n + 1:]


def tnetstring_dict(payload):
    out = {}
    while payload:
        key, _, payload = netstring(payload)
        value, tag, payload = netstring(payload)
        if tag == b"]":
            items = []
            while value:
                item, _, value = netstring(value)
                items.append(item.decode("latin-1"))
            out[key.decode()] = items
        else:
            out[key.decode()] = value.decode("latin-1")
    return out


def parse(raw):
    """A request message; JSON headers are parsed strictly (they must be valid JSON)."""
    sender, conn_id, path, rest = raw.split(b" ", 3)
    headers, tag, rest = netstring(rest)
    body, _, tail = netstring(rest)
    assert tail == b"", raw
    parsed = json.loads(headers) if tag == b"," else tnetstring_dict(headers)
    return {"sender": sender.decode(), "id": int(conn_id), "path": path.decode("latin-1"), "headers": parsed,
            "body": body, "raw": raw}


def ok(text, extra=""):
    body = text.encode() if isinstance(text, str) else text
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class Front:
    """`wsgid server` in `root` (run/, logs/, tmp/, static/ made), from a .conf we write."""

    def __init__(self, root, routes, settings=None, hosts_extra="", use_sqlite=False):
        self.root = Path(root)
        self.port = free_port()
        self.uuid = str(uuid.uuid4())
        self.routes = routes
        self.settings = {"server.daemonize": 0, **(settings or {})}
        self.hosts_extra = hosts_extra
        self.use_sqlite = use_sqlite
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def write_conf(self):
        for d in ("run", "logs", "tmp", "static"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"'{k}': {v}" for k, v in self.routes.items())
        (self.root / "main.conf").write_text(textwrap.dedent(f"""\
            main = Server(uuid="{self.uuid}", access_log="/logs/access.log",
                          error_log="/logs/error.log", chroot="./", pid_file="/run/front.pid",
                          default_host="localhost", name="main", bind_addr="127.0.0.1", port={self.port},
                          hosts=[Host(name="localhost", routes={{{routes}}}){self.hosts_extra}])
            settings = {self.settings!r}
            servers = [main]
            """))

    def start(self, wait=True):
        self.write_conf()
        if self.use_sqlite:
            env = {**os.environ, "LOGNAME": os.environ.get("LOGNAME") or "root"}
            subprocess.run(["m2sh", "load", "-config", "main.conf", "-db", "config.sqlite"], cwd=self.root,
                           env=env, check=True, capture_output=True)
            args = ["config.sqlite", self.uuid]
        else:
            args = ["main.conf"]
        self.out = open(self.root / "front.out", "ab")
        self.proc = subprocess.Popen([str(WSGID), "server", *args], cwd=self.root, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        if wait:
            wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close() or True,
                     what="wsgid server to listen")
        return self

    def log(self):
        return (self.root / "front.out").read_text(errors="replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

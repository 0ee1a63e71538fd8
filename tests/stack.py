"""Real processes for tests and benchmarks: a front end in a scratch chroot, either the real
mongrel2 (Debian mongrel2-core) or our own (`wsgid server`) on the same config.sqlite, and
wsgid (target/debug/wsgid unless WSGID_BIN says otherwise) serving an app; or, in
one-command mode ("bind"), wsgid alone serving HTTP with `--bind`."""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
WSGID = Path(os.environ.get("WSGID_BIN", ROOT / "target" / "debug" / "wsgid"))
VENV = Path(sys.prefix)
UPLOAD_TEMPLATE = "/tmp/upload.XXXXXX"
# Which front end a Mongrel2() runs unless told: "mongrel2", "wsgid" (`wsgid server`), or
# "bind": none, wsgid serves HTTP itself on the Mongrel2's port (conftest sets it for each
# parametrized run of the suite; WSGID_FRONTS=a,b runs only those).
FRONTS = tuple(os.environ.get("WSGID_FRONTS", "mongrel2,wsgid,bind").split(","))
DEFAULT_FRONT = os.environ.get("WSGID_FRONT", "mongrel2")


# Ports handed out in this process, never handed out twice.
_GIVEN = set()


def free_port():
    """A free port below the kernel's ephemeral range. A port the kernel picked (bind to 0)
    is free only until it picks it again for someone's outgoing connection: then a server
    given it cannot bind it, and a client dialing it while nobody listens can connect to
    itself (both seen in CI, as a front end that never listened and a stop that hung)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, max(low, 10001))
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


class Handler:
    """One mongrel2 Handler entry: the route and the two ZeroMQ endpoints."""

    def __init__(self, route, protocol="json", recv_ident="", ipc_chroot=None):
        self.route = route
        self.protocol = protocol
        self.recv_ident = recv_ident
        self.ident = str(uuid.uuid4())
        if ipc_chroot is None:
            self.send_spec = f"tcp://127.0.0.1:{free_port()}"  # mongrel2 PUSHes here: wsgid --recv
            self.recv_spec = f"tcp://127.0.0.1:{free_port()}"  # mongrel2 SUBs here: wsgid --send
            self.m2_specs = (self.send_spec, self.recv_spec)
        else:
            # Unix sockets: mongrel2 names them inside its chroot, the handler from outside.
            names = (f"/run/{self.ident[:8]}-requests", f"/run/{self.ident[:8]}-replies")
            self.m2_specs = tuple(f"ipc://{n}" for n in names)
            self.send_spec, self.recv_spec = (f"ipc://{ipc_chroot}{n}" for n in names)

    def config(self):
        send, recv = self.m2_specs
        return (f"Handler(send_spec='{send}', send_ident='{self.ident}', "
                f"recv_spec='{recv}', recv_ident='{self.recv_ident}', protocol='{self.protocol}')")


class Mongrel2:
    """A front end chrooted in `root` (which holds run/, logs/, tmp/): the real mongrel2, or
    `wsgid server` started with mongrel2's own arguments on the same config.sqlite. With
    front "bind" it starts nothing: it is the port and the upload directory of a wsgid that
    serves HTTP itself."""

    def __init__(self, root, handlers, content_length=20480, extra_settings=None, upload_template=UPLOAD_TEMPLATE,
                 front=None, dirs=None):
        self.front = front or DEFAULT_FRONT
        self.dirs = dirs or {}  # route -> Dir base (inside root)
        self.root = Path(root)
        self.upload_template = upload_template
        self.handlers = handlers
        self.port = free_port()
        self.content_length = content_length
        self.extra_settings = extra_settings or {}
        self.proc = None
        self.server_uuid = str(uuid.uuid4())

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def upload_dir(self):
        return self.root / "tmp"

    @property
    def bind(self):
        return self.front == "bind"

    def start(self):
        for d in ("run", "logs", "tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if self.bind:
            return
        routes = ", ".join([f"'{h.route}': {h.config()}" for h in self.handlers] + [
            f"'{route}': Dir(base='{base}', index_file='index.html', default_ctype='application/octet-stream')"
            for route, base in self.dirs.items()])
        settings = {"limits.content_length": self.content_length, "upload.temp_store": self.upload_template,
                    "server.daemonize": 0, **self.extra_settings}
        (self.root / "main.conf").write_text(textwrap.dedent(f"""\
            main = Server(uuid="{self.server_uuid}", access_log="/logs/access.log",
                          error_log="/logs/error.log", chroot="./", pid_file="/run/mongrel2.pid",
                          default_host="localhost", name="main", bind_addr="127.0.0.1", port={self.port},
                          hosts=[Host(name="localhost", routes={{{routes}}})])
            settings = {settings!r}
            servers = [main]
            """))
        env = {**os.environ, "LOGNAME": os.environ.get("LOGNAME") or "root"}
        subprocess.run(["m2sh", "load", "-config", "main.conf", "-db", "config.sqlite"],
                       cwd=self.root, env=env, check=True, capture_output=True)
        self.log = open(self.root / "mongrel2.out", "wb")
        program = ["mongrel2"] if self.front == "mongrel2" else [str(WSGID), "server"]
        self.proc = subprocess.Popen([*program, "config.sqlite", self.server_uuid], cwd=self.root,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close() or True,
                 what="mongrel2 to listen")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Wsgid:
    """A wsgid master (foreground, logging to a file) serving `handler`."""

    def __init__(self, folder, handler, mongrel2, app_source, args=(), workers=2, chroot_option=True,
                 foreground=True, env=None, copy_app=False):
        self.folder = Path(folder)
        self.handler = handler
        self.mongrel2 = mongrel2
        self.app_source = Path(app_source)
        self.args = list(args)
        self.workers = workers
        self.chroot_option = chroot_option
        self.foreground = foreground
        self.env = env
        self.copy_app = copy_app
        self.proc = None

    @property
    def url(self):
        route = self.handler.route.rstrip("/")
        return self.mongrel2.url + route

    @property
    def log_path(self):
        return self.folder / "wsgid.stderr"

    def command(self):
        m2 = self.mongrel2
        if m2.bind:
            # Spooled bodies go where the front end's would: the tests look there.
            front = ["--bind", f"127.0.0.1:{m2.port}",
                     "--upload-temp-store", f"{m2.root}{m2.upload_template}"]
        else:
            front = ["--recv", self.handler.send_spec, "--send", self.handler.recv_spec,
                     "--upload-temp-store", m2.upload_template,
                     *(["--mongrel2-chroot", str(m2.root)] if self.chroot_option else [])]
        return [str(WSGID), *front, "--app-path", str(self.folder), "--workers", str(self.workers),
                *(["--no-daemon", "--stdout"] if self.foreground else []),
                *([] if self.env and "VIRTUAL_ENV" in self.env else ["--virtualenv", str(VENV)]),
                *self.args]

    def start(self, wait_path="/"):
        self.folder.mkdir(parents=True, exist_ok=True)
        app_link = self.folder / "app"
        if self.copy_app and not app_link.exists():
            shutil.copytree(self.app_source, app_link)
        elif not app_link.exists():
            app_link.symlink_to(self.app_source)
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, env=env,
                                     stderr=open(self.log_path, "ab"), start_new_session=True)
        if wait_path is not None:
            wait_for(lambda: requests.get(self.url + wait_path, timeout=2).status_code < 500,
                     what=f"wsgid at {self.url}{wait_path}")
        return self

    def log(self):
        """What this wsgid logged: its stderr, and logs/wsgid.log when not logging to stderr."""
        parts = [p.read_text(errors="replace") for p in (self.log_path, self.folder / "logs" / "wsgid.log")
                 if p.exists()]
        return "".join(parts)

    def worker_pids(self):
        return sorted(int(p.stem) for p in (self.folder / "pid" / "worker").glob("*.pid"))

    def master_pids(self):
        return sorted(int(p.stem) for p in (self.folder / "pid" / "master").glob("*.pid"))

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode if self.proc else None


APPS = {
    "testapp": ROOT / "tests" / "apps",
    "flask": ROOT / "examples" / "flask_app",
    "django": ROOT / "examples" / "django_app",
}



"""Issue 4: supervision, reload, app folder, subcommands, config, loaders, against the real
mongrel2 and real wsgid processes."""
import hashlib
import json
from pathlib import Path
import os
import signal
import subprocess
import threading
import time

import pytest
import requests

from stack import APPS, ROOT, VENV, WSGID, Handler, Mongrel2, Wsgid, wait_for


def running(pid):
    """Exists and is not a zombie (a daemon's parent may not reap it at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wsgid(*args, **kw):
    return subprocess.run([str(WSGID), *args], capture_output=True, text=True, **kw)


class Load:
    """A client looping over requests in a thread, counting failures."""

    def __init__(self, url, timeout=5):
        self.url, self.timeout = url, timeout
        self.ok, self.failed, self.bodies = 0, [], []
        self.running = True
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while self.running:
            try:
                r = requests.get(self.url, timeout=self.timeout)
                if r.status_code == 200:
                    self.ok += 1
                    self.bodies.append(r.text)
                else:
                    self.failed.append(r.status_code)
            except requests.RequestException as e:
                self.failed.append(repr(e))

    def stop(self):
        self.running = False
        self.thread.join()


def test_init_is_idempotent(tmp_path):
    folder = tmp_path / "site"
    for _ in range(2):
        out = wsgid("init", "--app-path", str(folder))
        assert out.returncode == 0
        assert f"Initializing wsgid app folder in {folder}..." in out.stderr
    for d in ["app", "logs", "pid/master", "pid/worker"]:
        assert (folder / d).is_dir()


def test_config_round_trip(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "wsgid.json").write_text(json.dumps({"envs": {"A": "1"}, "custom": "kept"}))
    out = wsgid("config", "--app-path", str(folder), "--recv", "tcp://127.0.0.1:9999", "--send", "tcp://127.0.0.1:9998",
                "--workers", "1", "--debug", "--no-daemon", "--mongrel2-chroot", "/var/m2", "--wsgi-app", "a.b:c",
                "--no-keep-alive", "--max-body-size", "1000")
    assert out.returncode == 0, out.stderr
    cfg = json.loads((folder / "wsgid.json").read_text())
    assert cfg == {"envs": {"A": "1"}, "custom": "kept", "recv": "tcp://127.0.0.1:9999", "send": "tcp://127.0.0.1:9998",
                   "workers": 1, "debug": True, "no_daemon": True, "mongrel2_chroot": "/var/m2", "wsgi_app": "a.b:c",
                   "keep_alive": False, "max_body_size": 1000}
    assert wsgid("config", "--app-path", str(folder), "--no-debug").returncode == 0
    assert json.loads((folder / "wsgid.json").read_text())["debug"] is False
    before = (folder / "wsgid.json").read_text()
    bad = wsgid("config", "--app-path", str(folder), "--recv", "tcp://nope")
    assert bad.returncode == 2 and (folder / "wsgid.json").read_text() == before


def test_malformed_wsgid_json_is_a_clear_error(tmp_path):
    (tmp_path / "wsgid.json").write_text('{\n  "recv": "tcp://127.0.0.1:1",\n  "workers": 2,,\n}\n')
    out = wsgid("--app-path", str(tmp_path), "--no-daemon")
    assert out.returncode == 2
    assert f"{tmp_path}/wsgid.json:3:" in out.stderr


def test_config_file_is_used_and_cli_wins(make):
    server = make(start=False, workers=1)
    server.folder.mkdir(parents=True)
    (server.folder / "wsgid.json").write_text(json.dumps({
        "workers": 3, "envs": {"WSGID_TEST_ENV": "from-json"}, "wsgi_app": "nope:nope"}))
    server.start(wait_path="/hello")
    assert requests.get(server.url + "/envvar?WSGID_TEST_ENV").text == "from-json"
    assert len(server.worker_pids()) == 1  # --workers 1 on the command line beats "workers": 3


def test_status_stop_in_daemon_mode(make):
    server = make(foreground=False, start=False)
    # The command returns once a worker serves, before any request has come.
    server.start(wait_path=None)
    assert server.proc.wait(20) == 0
    wait_for(lambda: server.master_pids() and len(server.worker_pids()) == 2, what="pid files")
    [master] = server.master_pids()
    workers = server.worker_pids()
    status = wsgid("status", "--app-path", str(server.folder))
    assert status.stdout == (f"Status: Running\nMaster pid(s): {master}\n"
                             f"Worker pid(s): {', '.join(map(str, workers))}\n")
    assert os.getsid(master) != os.getsid(0)  # detached into a session of its own
    assert requests.get(server.url + "/hello").status_code == 200
    # The worker logs a request once its response is out: the line may follow the answer.
    wait_for(lambda: "GET /hello" in (server.folder / "logs" / "wsgid.log").read_text(),
             what="the access log line")
    # A second start on the same folder is refused, unless asked for.
    second = wsgid("--app-path", str(server.folder), "--recv", server.handler.send_spec,
                   "--send", server.handler.recv_spec)
    assert second.returncode == 2 and f"a master (pid {master}) already serves" in second.stderr
    # stop returns once the master is gone.
    assert wsgid("stop", "--app-path", str(server.folder)).returncode == 0
    assert not running(master)
    assert wsgid("status", "--app-path", str(server.folder)).stdout.startswith("Status: Stopped")
    assert server.master_pids() == [] and server.worker_pids() == []


def test_status_marks_stale_pids(tmp_path):
    wsgid("init", "--app-path", str(tmp_path))
    (tmp_path / "pid" / "worker" / "999999.pid").write_text("999999")
    (tmp_path / "pid" / "worker" / "crash.pid").write_text("x")
    out = wsgid("status", "--app-path", str(tmp_path)).stdout
    assert out == "Status: Stopped\nMaster pid(s): \nWorker pid(s): 999999(dead)\n"


def test_send_signal_by_name_and_number(make):
    server = make(workers=1)
    wsgid("restart", "--app-path", str(server.folder), "--send-signal", "TTIN")
    wait_for(lambda: len(server.worker_pids()) == 2, what="a second worker (TTIN)")
    wsgid("restart", "--app-path", str(server.folder), "--send-signal", str(int(signal.SIGTTOU)))
    wait_for(lambda: len(server.worker_pids()) == 1, what="one worker again (TTOU)")
    bad = wsgid("stop", "--app-path", str(server.folder), "--send-signal", "NOPE")
    assert bad.returncode == 2 and "unknown signal" in bad.stderr


def test_killed_worker_is_replaced_under_load(make):
    server = make(workers=2)
    load = Load(server.url + "/hello", timeout=3)
    try:
        time.sleep(0.5)
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2,
                 what="a replacement worker")
        ok_before = load.ok
        # Requests queued in the killed worker are lost (ZeroMQ PUSH has no acks): the
        # looping client waits out its timeout on one of them, then goes on.
        wait_for(lambda: load.ok > ok_before + 50, timeout=15, what="requests to succeed again")
    finally:
        load.stop()
    assert len(load.failed) <= 20  # at most what sat in the killed worker's queue
    assert "worker died" in server.log()


def test_a_worker_that_fails_to_boot_ends_the_master_with_exit_3(make):
    """gunicorn's "Worker failed to boot": no worker ever loaded the app, so the master
    stops (exit 3) instead of retrying forever."""
    server = make(app="apps_broken", args=("--wsgi-app", "broken:app"), start=False, workers=2)
    server.start(wait_path=None)
    assert server.proc.wait(15) == 3
    log = server.log()
    assert "this app is broken on purpose" in log and "worker failed to boot" in log


def test_a_daemonized_start_of_a_broken_app_says_why_on_the_terminal(make):
    server = make(app="apps_broken", args=("--wsgi-app", "broken:app"), start=False, foreground=False)
    server.folder.mkdir(parents=True, exist_ok=True)
    (server.folder / "app").symlink_to(server.app_source)
    started = subprocess.run([str(WSGID), *server.command()[1:]], capture_output=True, text=True, timeout=30)
    assert started.returncode == 3
    assert "worker failed to boot" in started.stderr
    assert "this app is broken on purpose" in started.stderr
    assert str(server.folder / "logs" / "wsgid.log") in started.stderr
    assert server.master_pids() == []


def test_a_broken_reload_backs_off_while_the_old_workers_serve(make):
    server = make(workers=1, copy_app=True)
    app_file = server.folder / "app" / "testapp.py"
    app_file.write_text('raise ImportError("this app is broken on purpose")\n')
    os.kill(server.proc.pid, signal.SIGHUP)
    time.sleep(5)
    log = server.log()
    starts = log.count("worker started")
    assert "this app is broken on purpose" in log
    assert "next worker start in" in log
    assert 3 <= starts <= 7, starts  # 0.5 s, 1 s, 2 s, 4 s... not a tight loop
    assert server.proc.poll() is None  # the master stays up
    assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"
    with open(f"/proc/{server.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu_seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert cpu_seconds < 0.5


def test_hup_reload_drops_nothing_and_serves_new_code(make):
    server = make(workers=2, copy_app=True)
    old_workers = set(server.worker_pids())
    load = Load(server.url + "/version")
    try:
        time.sleep(0.5)
        app_file = server.folder / "app" / "testapp.py"
        app_file.write_text(app_file.read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: load.bodies and load.bodies[-1] == "v2", what="new code to be served")
        wait_for(lambda: not (set(server.worker_pids()) & old_workers), what="old workers to retire")
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.failed == []
    assert load.bodies.count("v1") > 0 and load.bodies.count("v2") > 0
    assert len(server.worker_pids()) == 2


def test_term_finishes_slow_request_then_exits_clean(make):
    server = make(workers=1)
    result = {}

    def slow():
        result["r"] = requests.get(server.url + "/sleep?2", timeout=10)
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    t.join()
    assert result["r"].status_code == 200 and result["r"].text == "slept"
    assert time.time() - started > 1.0  # it waited for the request
    assert server.master_pids() == [] and server.worker_pids() == []


def test_quit_stops_at_once(make):
    server = make(workers=1)
    def slow():
        try:
            requests.get(server.url + "/sleep?5", timeout=10)
        except requests.RequestException:
            pass  # expected: QUIT does not wait for it
    t = threading.Thread(target=slow, daemon=True)
    t.start()
    time.sleep(0.5)
    started = time.time()
    server.proc.send_signal(signal.SIGQUIT)
    server.proc.wait(10)
    assert time.time() - started < 2
    assert server.master_pids() == [] and server.worker_pids() == []


def test_max_requests_retires_workers(make):
    server = make(workers=1, args=("--wsgi-app", "testapp:application", "--max-requests", "5"))
    pids = set()
    for _ in range(200):
        r = requests.get(server.url + "/pid", timeout=5)
        assert r.status_code == 200
        pids.add(r.text)
    # Each worker serves on until its replacement is ready, so about every 5+ requests.
    assert len(pids) >= 2


def test_usr1_reopens_the_log(make):
    server = make(foreground=False, workers=1)
    wait_for(lambda: server.master_pids(), what="the master pid file")
    log = server.folder / "logs" / "wsgid.log"
    wait_for(lambda: "worker ready" in log.read_text(), what="the worker")
    log.rename(log.with_suffix(".log.1"))
    os.kill(server.master_pids()[0], signal.SIGUSR1)
    wait_for(lambda: log.exists(), what="a new log file")
    time.sleep(0.2)
    requests.get(server.url + "/hello")
    wait_for(lambda: "GET /hello" in log.read_text(), what="the access line in the new log")


def test_django_autodetected_with_virtual_env_and_django_json(make):
    server = make(app="django", args=(), start=False, workers=1, env={"VIRTUAL_ENV": str(VENV)})
    server.folder.mkdir(parents=True)
    (server.folder / "django.json").write_text(json.dumps({"WSGID_EXTRA": "merged", "ALLOWED_HOSTS": ["extra.example"]}))
    server.start(wait_path="/")
    info = requests.get(server.url + "/info").json()
    assert info["extra_setting"] == "merged"
    assert "using the Django loader" in server.log()


def test_no_loader_is_a_clear_error(make, tmp_path):
    server = make(app="apps_broken", args=("--no-keep-alive",), start=False, workers=1)
    server.start(wait_path=None)
    assert server.proc.wait(10) == 0  # no keep-alive: the master ends with its last worker
    assert "no WSGI app found: give --wsgi-app" in server.log()


@pytest.mark.zmq_front
@pytest.mark.skipif(os.geteuid() != 0, reason="chroot and dropping privileges need root")
def test_chroot_and_privilege_drop(tmp_path):
    """Started as root with --chroot: workers import the app inside the app folder and run
    as its owner (uid/gid 4242 here, supplementary groups reset)."""
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="wsgid-chroot-"))
    usr = folder / "usr"
    mounted = False
    handler = Handler("/", "tnetstring")
    m2 = Mongrel2(tmp_path / "m2", [handler])
    proc = None
    try:
        assert wsgid("init", "--app-path", str(folder)).returncode == 0
        shutil.rmtree(folder / "app")
        shutil.copytree(ROOT / "tests" / "apps", folder / "app")
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, 4242, 4242)
        os.chmod(folder, 0o755)
        # What the embedded Python needs inside the chroot: the system's /usr, read-only.
        usr.mkdir()
        subprocess.run(["mount", "--bind", "-o", "ro", "/usr", str(usr)], check=True)
        mounted = True
        for name in ["lib", "lib64", "bin"]:
            (folder / name).symlink_to(f"usr/{name}")
        m2.start()
        proc = subprocess.Popen([str(WSGID), "--app-path", str(folder), "--chroot", "--no-daemon", "--stdout",
                                 "--wsgi-app", "testapp:application", "--recv", handler.send_spec,
                                 "--send", handler.recv_spec], stderr=open(tmp_path / "wsgid.log", "wb"))
        try:
            wait_for(lambda: requests.get(f"{m2.url}/whereami", timeout=2).status_code == 200,
                     what="the chrooted worker")
        except TimeoutError:
            print((tmp_path / "wsgid.log").read_text())
            raise
        info = requests.get(f"{m2.url}/whereami").json()
        assert info["file"] == "/app/testapp.py" and info["cwd"] == "/"
        assert (info["uid"], info["gid"], info["groups"]) == (4242, 4242, [4242])
        log = (tmp_path / "wsgid.log").read_text()
        assert "chrooted into the app folder" in log
    finally:
        if proc:
            proc.terminate()
            proc.wait(10)
        m2.stop()
        if mounted:
            subprocess.run(["umount", str(usr)], check=False)
        if not os.path.ismount(usr):
            shutil.rmtree(folder, ignore_errors=True)


def test_master_killed_leaves_no_live_looking_pid_files(make):
    """SIGKILL of the master: workers die with it (parent-death signal) and remove their pid
    files; the master's own stale file is shown as dead and swept by the next start."""
    server = make(workers=2)
    workers = server.worker_pids()
    [master] = server.master_pids()
    os.kill(master, signal.SIGKILL)
    server.proc.wait()  # reap it (a daemon's parent, init, does this)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), what="the workers to exit")
    wait_for(lambda: server.worker_pids() == [], what="worker pid files to go")
    status = wsgid("status", "--app-path", str(server.folder)).stdout
    assert status.startswith("Status: Stopped") and f"{master}(dead)" in status
    server.start(wait_path="/hello")
    assert master not in server.master_pids()


@pytest.mark.zmq_front  # in one-command mode the broker is inside the front end (test_bind)
def test_killed_broker_is_replaced_and_workers_reconnect(make):
    server = make(workers=2)
    load = Load(server.url + "/hello", timeout=3)
    try:
        time.sleep(0.5)
        [broker] = [p for p in children(server.proc.pid) if "broker" in cmdline(p)]
        os.kill(broker, signal.SIGKILL)
        wait_for(lambda: [p for p in children(server.proc.pid) if "broker" in cmdline(p) and p != broker],
                 what="a new broker")
        ok_before = load.ok
        wait_for(lambda: load.ok > ok_before + 50, timeout=15, what="requests to succeed again")
    finally:
        load.stop()
    assert len(load.failed) <= 8  # at most what the dead broker held
    assert "the broker died; restarting it" in server.log()
    assert "lost the broker; reconnecting" in server.log()


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.zmq_front
def test_mongrel2_restart_is_survived(make):
    """mongrel2 restarts (same config): the broker's PULL and PUB reconnect, in a new epoch."""
    server = make(workers=2)
    assert requests.get(server.url + "/hello").status_code == 200
    server.mongrel2.stop()
    server.mongrel2.start()
    wait_for(lambda: requests.get(server.url + "/hello", timeout=2).text == "Hello, World!",
             timeout=20, what="service after the mongrel2 restart")
    for _ in range(20):
        assert requests.get(server.url + "/hello", timeout=5).status_code == 200
    log = server.log()
    assert "connection to mongrel2 lost" in log
    assert "a new epoch" in log


@pytest.mark.mongrel2_only
def test_unanswerable_recv_ident_is_reported(tmp_path):
    """mongrel2 drops replies that do not start with its recv_ident: say so in the log.
    (Our front end subscribes with the recv_ident, which wsgid then uses for its replies.)"""
    handler = Handler("/", "tnetstring", recv_ident="only-this-prefix")
    m2 = Mongrel2(tmp_path / "m2", [handler])
    server = Wsgid(tmp_path / "app", handler, m2, APPS["testapp"], ["--wsgi-app", "testapp:application"], workers=1)
    try:
        m2.start()
        server.start(wait_path=None)
        with pytest.raises(requests.RequestException):
            requests.get(server.url + "/hello", timeout=3)
        wait_for(lambda: "mongrel2 drops replies that do not start with its recv_ident" in server.log(),
                 what="the recv_ident error in the log")
    finally:
        server.stop()
        m2.stop()


def test_max_body_size_applies_to_inline_bodies(make):
    server = make(workers=1, args=("--wsgi-app", "testapp:application", "--max-body-size", "1000"))
    r = requests.post(server.url + "/echo", data=b"x" * 5000)
    assert r.status_code == 413
    assert requests.post(server.url + "/echo", data=b"y" * 900).content == b"y" * 900
    assert 'stage="inline body"' in server.log()


def test_term_serves_every_queued_request(make):
    """A burst waits in the broker's queue when TERM comes: the broker stops first, and the
    workers serve everything it had queued before they exit."""
    server = make(workers=2)
    results = []

    def slow():
        try:
            results.append(requests.get(server.url + "/sleep?0.2", timeout=20).text)
        except requests.RequestException as e:
            results.append(repr(e))
    threads = [threading.Thread(target=slow) for _ in range(24)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all sent; two in service, the rest queued
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert server.proc.wait(20) == 0
    assert results == ["slept"] * 24


def test_large_inline_bodies_pass_the_queue(make, front):
    """mongrel2 sends bodies under limits.content_length inline; those over the queue's
    datagram size travel through a memfd. One-command mode sends up to 64 KiB inline, and
    lends a pooled file, whose name the app is not given, for bodies up to 1 MiB."""
    server = make(workers=2, content_length=4 * 1024 * 1024)
    unnamed_max = 1024 * 1024 if front == "bind" else 4 * 1024 * 1024
    for size in (1000, 64 * 1024, 64 * 1024 + 1, 1024 * 1024, 3 * 1024 * 1024):
        body = os.urandom(size)
        r = requests.post(server.url + "/sha256", data=body, timeout=10)
        assert r.status_code == 200
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
        assert (r.json()["upload_path"] is None) == (size <= unnamed_max), size


@pytest.mark.zmq_front
def test_ipc_endpoints(make):
    """Unix-socket endpoints (mongrel2 names them inside its chroot), both directions."""
    server = make(workers=2, ipc=True)
    assert server.handler.send_spec.startswith("ipc://")
    for _ in range(20):
        assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"
    body = os.urandom(100_000)
    assert requests.post(server.url + "/echo", data=body, timeout=5).content == body


def test_a_client_pipelining_too_much_is_closed_and_others_are_served(make, front):
    """The broker holds at most 16 requests behind one connection's request in service; a
    client that pipelines more has its connection closed, and nobody else waits on it. Our
    front end hands a connection's requests over one at a time: all 60 are answered."""
    from http_util import raw_exchange
    server = make(workers=2)
    reqs = b"".join(b"GET /sleep?0.05 HTTP/1.1\r\nHost: x\r\n\r\n" for _ in range(60))
    result = {}
    t = threading.Thread(target=lambda: result.update(r=raw_exchange(server.mongrel2.port, reqs, timeout=10)))
    t.start()
    time.sleep(0.3)
    assert requests.get(server.url + "/hello", timeout=2).text == "Hello, World!"
    t.join()
    data, sock = result["r"]
    if front != "mongrel2":
        assert data.count(b"HTTP/1.1 200 OK") == 60
        return
    assert sock is None, "the connection should have been closed"
    assert data.count(b"HTTP/1.1 200 OK") < 60  # closed at once, answered or not
    assert "closing a connection that pipelined too many requests" in server.log()


def test_many_pipelining_clients_cannot_stop_the_reading(make, front):
    """40 connections pipelining 16 slow requests each would hold 640 requests behind their
    first ones: past 512 held in all (half of what the broker keeps waiting), connections are
    closed instead, and a plain request is still served at once."""
    import socket
    server = make(workers=2)
    # Each connection's first request is queued ahead of the plain one: 40 x 0.05 s over
    # 2 workers is 1 s of waiting for it, whatever the broker does.
    burst = b"".join(b"GET /sleep?0.05 HTTP/1.1\r\nHost: x\r\n\r\n" for _ in range(16))
    socks = [socket.create_connection(("127.0.0.1", server.mongrel2.port)) for _ in range(40)]
    try:
        for s in socks:
            s.sendall(burst)
        time.sleep(0.5)
        started = time.time()
        assert requests.get(server.url + "/hello", timeout=5).text == "Hello, World!"
        assert time.time() - started < 2
        if front == "mongrel2":  # ours hands over one request per connection at a time
            assert "closing a connection that pipelined too many requests" in server.log()
    finally:
        for s in socks:
            s.close()


def test_a_killed_worker_is_noticed_even_if_its_app_forked(make):
    """A child forked by the app keeps the worker's end of the link open, so the broker never
    sees it end: it checks that its workers live. The dead worker's connection, with a
    pipelined request held behind the lost one, is then closed."""
    from http_util import raw_exchange
    server = make(workers=1)
    requests.get(server.url + "/fork-child?15", timeout=5)
    worker = int(requests.get(server.url + "/pid", timeout=5).text)
    result = {}

    def pipelined():
        reqs = b"GET /sleep?30 HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
        result["r"] = raw_exchange(server.mongrel2.port, reqs, timeout=8, expect=(b"Hello, World!", 1))
    t = threading.Thread(target=pipelined)
    t.start()
    time.sleep(0.5)
    os.kill(worker, signal.SIGKILL)
    t.join()
    data, sock = result["r"]
    # The first request's response is lost with its worker: a later one would answer the
    # wrong request, so the connection is closed.
    assert sock is None and data == b"", "the connection should have been closed, unanswered"
    assert "a worker died while serving (its process is gone)" in server.log()


def test_a_fresh_django_startproject_is_served_as_it_is(make, tmp_path):
    """Today's `django-admin startproject mysite` layout (mysite/manage.py next to the
    mysite/mysite/ settings package), copied into app/ unchanged, is auto-detected."""
    source = tmp_path / "src"
    source.mkdir()
    subprocess.run([str(VENV / "bin" / "django-admin"), "startproject", "mysite"], cwd=source, check=True)
    assert (source / "mysite" / "manage.py").exists()
    server = make(app=str(source), args=(), start=False)
    server.start(wait_path="/admin/login/")
    reply = requests.get(server.url + "/admin/login/", timeout=5)
    assert reply.status_code == 200 and "Django" in reply.text
    assert "using the Django loader: project 'mysite'" in server.log()


def test_workers_that_crash_before_serving_end_the_master_too(make):
    """Not the app-load exit code but a crash (SIGABRT at import): after 3 failed starts in
    a row with no worker ever ready, the master stops with exit 3."""
    server = make(app="apps_crashing", args=("--wsgi-app", "crashing:app"), start=False, workers=1)
    server.start(wait_path=None)
    assert server.proc.wait(20) == 3
    assert "worker failed to boot" in server.log()

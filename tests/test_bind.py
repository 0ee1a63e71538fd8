"""One-command mode (`wsgid --bind`): what only it has. The rest of the suite also runs in this
mode (front "bind")."""
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from faults import children, role_of
from stack import APPS, VENV, WSGID, Handler, Mongrel2, Wsgid, free_port, wait_for

pytestmark = pytest.mark.one_front


def serve(tmp_path, args=(), workers=2, app_args=("--wsgi-app", "testapp:application")):
    front = Mongrel2(tmp_path / "m2", [Handler("/")], front="bind")
    front.start()
    server = Wsgid(tmp_path / "app", front.handlers[0], front, APPS["testapp"], [*app_args, *args],
                   workers=workers)
    return server.start(wait_path="/hello")


def get_unix(path, target="/hello"):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
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

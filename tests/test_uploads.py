"""Issue 3: mongrel2 temp-file uploads of any size, done safely, against the real mongrel2."""
import concurrent.futures
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid

import pytest
import requests

from stack import APPS, Handler, Mongrel2, Wsgid, wait_for
from http_util import is_closed, raw_exchange

MiB = 1024 * 1024
# A body every front end spools: mongrel2's limits.content_length here is 20 KiB, one-command
# mode sends up to 64 KiB inline.
SPOOLED = 2 * MiB


def make_file(path, size):
    """A file whose every MiB differs (a rotated random block), with its sha256."""
    base = os.urandom(MiB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < size:
            shift = (i * 7919) % MiB
            block = (base[shift:] + base[:shift])[: size - written]
            f.write(block)
            digest.update(block)
            written += len(block)
            i += 1
    return digest.hexdigest()


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files")
    cache = {}

    def get(size):
        if size not in cache:
            path = tmp / f"{size}.bin"
            cache[size] = (path, make_file(path, size))
        return cache[size]
    return get


# One-command mode keeps up to 64 spool files for bodies up to 1 MiB and writes them again
# (`SpoolPool`): those an earlier test left with the shared server are not this test's.
POOLED_BEFORE = {}


@pytest.fixture(autouse=True)
def _pooled_files_of_earlier_tests(request, front):
    POOLED_BEFORE.clear()
    if front == "bind" and "server" in request.fixturenames:
        upload_dir = request.getfixturevalue("server").mongrel2.upload_dir
        POOLED_BEFORE[upload_dir] = {p.name for p in upload_dir.glob("upload.*")}


def temp_files(mongrel2):
    ignored = POOLED_BEFORE.get(mongrel2.upload_dir, set())
    return sorted(p.name for p in mongrel2.upload_dir.glob("upload.*") if p.name not in ignored)


def assert_no_temp_files(mongrel2):
    """The gateway removes the temp file right after the response went out."""
    wait_for(lambda: temp_files(mongrel2) == [], timeout=5, what="temp files to be removed")


def curl(*args):
    out = subprocess.run(["curl", "-sS", "--max-time", "120", *args], capture_output=True, check=True)
    return out.stdout


@pytest.mark.parametrize("mode", ["-T", "--data-binary"])
def test_one_gib_upload(stack, files, mode):
    server = stack["tnet"]
    m2 = server.mongrel2
    # curl 7.88 holds --data-binary bodies in memory and caps them just below 1 GiB.
    size = 1024 * MiB if mode == "-T" else 1023 * MiB
    path, sha = files(size)
    arg = str(path) if mode == "-T" else f"@{path}"
    result = json.loads(curl(mode, arg, "-H", "Content-Type: application/octet-stream", server.url + "/sha256"))
    assert result["sha256"] == sha and result["size"] == size
    assert result["content_length"] == str(size)
    assert result["upload_path"].startswith(str(m2.upload_dir))
    assert_no_temp_files(m2)


def test_chunked_upload(server, files):
    path, sha = files(3 * MiB)
    result = json.loads(curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}", server.url + "/sha256"))
    assert result["sha256"] == sha
    assert result["content_length"] == str(3 * MiB)  # no declared length: the file's size
    assert_no_temp_files(server.mongrel2)


def test_small_chunked_body_is_an_upload_too(server, front):
    """mongrel2 spools every chunked body; our front end only those over the limit."""
    result = json.loads(curl("-H", "Transfer-Encoding: chunked", "--data-binary", "hello world", server.url + "/sha256"))
    assert result["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert (result["upload_path"] is not None) == (front == "mongrel2")


def test_django_multipart_100_mib(stack, files):
    path, sha = files(100 * MiB)
    result = json.loads(curl("-F", f"file=@{path}", "-F", "note=hi", stack["django"].url + "/upload"))
    assert result["files"]["file"]["sha256"] == sha and result["files"]["file"]["size"] == 100 * MiB
    assert result["fields"] == {"note": "hi"}
    assert_no_temp_files(stack["mongrel2"])


def test_flask_multipart(stack, files):
    path, sha = files(30 * MiB)
    result = json.loads(curl("-F", f"doc=@{path}", stack["flask"].url + "/upload"))
    assert result["files"]["doc"]["sha256"] == sha


def test_forged_upload_headers_touch_nothing(server, tmp_path, front):
    """A client naming a file of ours in upload headers: behind mongrel2, which passes the
    headers on, wsgid answers 400; our front end strips them, so the body is read as sent.
    Either way the file stays."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    inside = server.mongrel2.upload_dir / "upload.victim"  # matches no template length
    inside.write_text("precious too")
    for target in [str(victim), "/tmp/upload.victim", "/tmp/upload.abcdef"]:
        for headers in (f"X-Mongrel2-Upload-Start: {target}\r\nX-Mongrel2-Upload-Done: {target}\r\n",
                        f"X-Mongrel2-Upload-Start: {target}\r\n",
                        f"X-Mongrel2-Upload-Done: {target}\r\n",
                        f"X-Mongrel2-Upload-Start: {target}\r\nX-Mongrel2-Upload-Start: {target}\r\n"
                        f"X-Mongrel2-Upload-Done: {target}\r\n"):
            data, _ = raw_exchange(server.mongrel2.port, (
                f"POST {server.handler.route.rstrip('/')}/sha256 HTTP/1.1\r\nHost: x\r\n{headers}"
                "Content-Length: 3\r\nConnection: close\r\n\r\nabc").encode())
            if front == "mongrel2":
                assert data.startswith(b"HTTP/1.1 400"), (target, headers, data[:100])
            else:
                assert data.startswith(b"HTTP/1.1 200"), (target, headers, data[:100])
                result = json.loads(data.split(b"\r\n\r\n", 1)[1])
                assert result["sha256"] == hashlib.sha256(b"abc").hexdigest() and result["upload_path"] is None
    assert victim.read_text() == "precious" and inside.read_text() == "precious too"
    inside.unlink()
    assert requests.get(server.url + "/hello").status_code == 200


def test_over_max_body_size_is_413_and_closed(stack, files):
    server = stack["limited"]
    m2 = server.mongrel2
    path, _ = files(5 * MiB)
    sock = socket.create_connection(("127.0.0.1", m2.port), timeout=5)
    sock.sendall(f"POST {server.handler.route}/sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {5 * MiB}\r\n\r\n".encode())
    reply = b""
    try:
        with open(path, "rb") as f:
            while block := f.read(65536):
                sock.sendall(block)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass  # refused: the front end stops reading (mongrel2 may neither read nor close)
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    wait_for(lambda: temp_files(m2) == [], timeout=5, what="mongrel2 to delete the refused upload")
    assert "refused upload larger than --max-body-size" in server.log()
    # Within the limit: served.
    small, sha = files(MiB // 2)
    assert json.loads(curl("-T", str(small), server.url + "/sha256"))["sha256"] == sha


def test_client_disconnect_mid_upload(server):
    m2 = server.mongrel2
    sock = socket.create_connection(("127.0.0.1", m2.port), timeout=5)
    sock.sendall(f"POST {server.handler.route.rstrip('/')}/sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MiB}\r\n\r\n".encode())
    sock.sendall(b"x" * (2 * MiB))
    wait_for(lambda: temp_files(m2) != [], timeout=5, what="the upload to start")
    sock.close()
    wait_for(lambda: temp_files(m2) == [], timeout=5, what="mongrel2 to delete the aborted upload")
    assert requests.get(server.url + "/hello").text == "Hello, World!"


def test_twenty_concurrent_uploads(server, files):
    path, sha = files(10 * MiB)
    data = path.read_bytes()

    def upload(_):
        r = requests.post(server.url + "/sha256", data=data, timeout=60)
        return r.json()["sha256"]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(upload, range(20)))
    assert results == [sha] * 20
    assert_no_temp_files(server.mongrel2)


def test_app_may_move_the_upload_into_place(server, files, tmp_path):
    path, sha = files(SPOOLED)
    target = tmp_path / "kept.bin"
    r = requests.post(f"{server.url}/move-upload?{target}", data=path.read_bytes())
    assert r.text == "moved"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha
    assert_no_temp_files(server.mongrel2)
    assert "cannot remove upload" not in server.log()


def test_vanished_upload_file_is_a_clear_5xx(server):
    m2 = server.mongrel2
    sock = socket.create_connection(("127.0.0.1", m2.port), timeout=5)
    sock.sendall(f"POST {server.handler.route.rstrip('/')}/sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {SPOOLED}\r\n\r\n".encode())
    sock.sendall(b"y" * (SPOOLED // 2))
    wait_for(lambda: temp_files(m2) != [], timeout=5, what="the upload to start")
    for name in temp_files(m2):
        (m2.upload_dir / name).unlink()
    sock.sendall(b"y" * (SPOOLED // 2))
    data = b""
    sock.settimeout(5)
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 500"), data[:100]
    assert "upload file unavailable" in server.log()
    assert requests.get(server.url + "/hello").status_code == 200


def test_orphan_upload_removed_when_worker_killed(stack, files):
    server = stack["tnet"]
    m2 = server.mongrel2
    path, _ = files(SPOOLED)
    proc = subprocess.Popen(["curl", "-sS", "--max-time", "20", "-T", str(path), f"{server.url}/sleep?30"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        folder = server.folder / "pid" / "worker"
        wait_for(lambda: list(folder.glob("*.upload")), timeout=10, what="the worker to take the upload")
        marker = next(folder.glob("*.upload"))
        pid = int(marker.stem)
        # The marker holds the path as the front end named it: inside mongrel2's chroot, or
        # absolute in one-command mode.
        named = marker.read_text()
        upload = named if m2.bind else str(m2.root / named.lstrip("/"))
        assert os.path.exists(upload)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(upload), timeout=10, what="the master to sweep the orphan")
        assert not marker.exists()
        wait_for(lambda: requests.get(server.url + "/hello", timeout=2).status_code == 200, what="a replacement worker")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.zmq_front
def test_same_paths_layout_without_mongrel2_chroot(tmp_path, files):
    """The "same device mounted twice" layout: mongrel2's upload directory is visible to
    wsgid at the very path mongrel2 names, so no --mongrel2-chroot is needed."""
    shared = f"/wsgid-uploads-{uuid.uuid4().hex[:8]}"
    m2root = tmp_path / "m2"
    inside = m2root / shared.lstrip("/")
    inside.mkdir(parents=True)
    mounted = os.geteuid() == 0
    if mounted:
        os.mkdir(shared)
        subprocess.run(["mount", "--bind", str(inside), shared], check=True)
        template = f"{shared}/upload.XXXXXX"
    else:
        # mongrel2 does not chroot without root: its paths already are the host's.
        template = f"{inside}/upload.XXXXXX"
    handler = Handler("/", "tnetstring")
    m2 = Mongrel2(m2root, [handler], upload_template=template)
    server = Wsgid(tmp_path / "app", handler, m2, APPS["testapp"], ["--wsgi-app", "testapp:application"],
                   workers=1, chroot_option=False)
    try:
        m2.start()
        server.start(wait_path="/hello")
        path, sha = files(2 * MiB)
        result = json.loads(curl("-T", str(path), server.url + "/sha256"))
        assert result["sha256"] == sha
        assert result["upload_path"].startswith(shared if mounted else str(inside))
        assert list(inside.iterdir()) == []
    finally:
        server.stop()
        m2.stop()
        if mounted:
            subprocess.run(["umount", shared], check=False)
            os.rmdir(shared)

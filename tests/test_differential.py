"""Third-party WSGI apps from PyPI (httpbin, pypiserver, and WsgiDAV for a session of
uploads and WebDAV methods), served by gunicorn and by wsgid behind each front end: the
same raw requests to both, and the same answers back.

Compared: status, headers (but those that describe the connection or the moment: Date,
Server, Connection, Keep-Alive, and the framing, Content-Length or chunked, since the body
is compared whole), and the body. The deliberate differences, listed in the README
("Differences from gunicorn"), are checked for what they are in `DELIBERATE`, and
normalised where they are not the point of a request:
* mongrel2 adds `X-Forwarded-For` to every request, which httpbin echoes back.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import textwrap
import time

import socket

import pytest
import requests

from faults import Reader
from stack import VENV, Handler, Mongrel2, Wsgid, free_port, wait_for

HTTPBIN_REQUESTS = [
    b"GET /get?a=1&b=two HTTP/1.1",
    b"GET /get?a=1&a=2&c=%20x HTTP/1.1",
    b"GET /headers HTTP/1.1\r\nX-Custom: one\r\nAccept: text/plain",
    b"GET /ip HTTP/1.1",
    b"GET /user-agent HTTP/1.1\r\nUser-Agent: differential/1.0",
    b"GET /status/200 HTTP/1.1",
    b"GET /status/204 HTTP/1.1",
    b"GET /status/304 HTTP/1.1",
    b"GET /status/404 HTTP/1.1",
    b"GET /status/418 HTTP/1.1",
    b"GET /status/500 HTTP/1.1",
    b"GET /redirect/3 HTTP/1.1",
    b"GET /relative-redirect/2 HTTP/1.1",
    b"GET /absolute-redirect/1 HTTP/1.1",
    b"GET /redirect-to?url=/get&status_code=307 HTTP/1.1",
    b"GET /cookies HTTP/1.1\r\nCookie: a=1; b=2",
    b"GET /cookies/set?k=v&x=y HTTP/1.1",
    b"GET /cookies/delete?k HTTP/1.1\r\nCookie: k=v",
    b"GET /response-headers?X-Test=1&Content-Type=text/plain HTTP/1.1",
    b"GET /bytes/1024?seed=1 HTTP/1.1",
    b"GET /stream-bytes/5000?seed=2&chunk_size=100 HTTP/1.1",
    b"GET /stream-bytes/300?seed=4&chunk_size=3 HTTP/1.1",
    b"GET /range/1000 HTTP/1.1\r\nRange: bytes=10-99",
    b"GET /range/1000?chunk_size=100 HTTP/1.1",
    b"GET /etag/abc HTTP/1.1\r\nIf-None-Match: \"abc\"",
    b"GET /etag/abc HTTP/1.1\r\nIf-Match: \"xyz\"",
    b"GET /cache HTTP/1.1\r\nIf-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT",
    b"GET /cache/60 HTTP/1.1",
    b"HEAD /get HTTP/1.1",
    b"HEAD /bytes/100?seed=1 HTTP/1.1",
    b"POST /post HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 17\r\n\r\nname=J%C3%B6rg&x=1",
    b"POST /post HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 183\r\n\r\n"
    b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\n"
    b"hello file\r\n--XyZ\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\nvalue\r\n--XyZ--\r\n",
    b"POST /anything HTTP/1.1\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"PUT /put HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\": [1, 2]}",
    b"PATCH /patch HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"DELETE /delete HTTP/1.1",
    b"GET /gzip HTTP/1.1",
    b"GET /deflate HTTP/1.1",
    b"GET /encoding/utf8 HTTP/1.1",
    b"GET /html HTTP/1.1",
    b"GET /xml HTTP/1.1",
    b"GET /json HTTP/1.1",
    b"GET /robots.txt HTTP/1.1",
    b"GET /deny HTTP/1.1",
    b"GET /base64/SGVsbG8gd29ybGQ= HTTP/1.1",
    b"GET /drip?duration=0.3&numbytes=6&code=200&delay=0 HTTP/1.1",
    b"GET /links/3/1 HTTP/1.1",
    b"GET /image/png HTTP/1.1",
    b"GET /anything/x/y?z=1 HTTP/1.1",
    b"GET /basic-auth/u/p HTTP/1.1\r\nAuthorization: Basic dTpw",
    b"GET /basic-auth/u/p HTTP/1.1",
    b"GET /get HTTP/1.0",
    b"GET /stream-bytes/1000?seed=3&chunk_size=10 HTTP/1.0",
    b"GET /status/201 HTTP/1.0",
    b"OPTIONS /get HTTP/1.1",
    b"GET /nonexistent HTTP/1.1",
]

PYPI_REQUESTS = [
    b"GET / HTTP/1.1",
    b"GET /simple/ HTTP/1.1",
    b"GET /simple/demo/ HTTP/1.1",
    b"GET /simple/demo HTTP/1.1",
    b"GET /simple/nothing-here/ HTTP/1.1",
    b"GET /packages/ HTTP/1.1",
    b"GET /packages/demo-1.0.tar.gz HTTP/1.1",
    b"HEAD /packages/demo-1.0.tar.gz HTTP/1.1",
    b"GET /packages/demo-1.0.tar.gz HTTP/1.1\r\nRange: bytes=100-199",
    b"GET /packages/demo-1.0.tar.gz HTTP/1.1\r\nIf-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT",
    b"GET /packages/missing-1.0.tar.gz HTTP/1.1",
    b"GET /favicon.ico HTTP/1.1",
    b"GET /simple/ HTTP/1.0",
    b"POST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\n\r\n:action=x",
]

# What differs by design, removed before comparing.
IGNORED_HEADERS = {"date", "server", "connection", "keep-alive", "transfer-encoding", "content-length"}


# Requests whose answers differ on purpose: what ours must be instead.
DELIBERATE = {
    # httpbin yields a bytearray; gunicorn 23 accepts only bytes and cuts the response.
    # PEP 3333 asks for bytes; bytearray and memoryview are taken as their bytes here.
    b"GET /bytes/1024?seed=1 HTTP/1.1": lambda theirs, ours: (
        theirs[3] is False and ours[0] == 200 and ours[3] and len(ours[2]) == 1024),
    # A chunked body reaches the app de-chunked with a Content-Length and without
    # Transfer-Encoding (mongrel2 spools it to a file); gunicorn passes it through chunked.
    b"POST /anything HTTP/1.1\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n": lambda theirs, ours: (
        theirs[2]["headers"].pop("Transfer-Encoding") == "chunked"
        and ours[2]["headers"].pop("Content-Length") == "11" and theirs == ours),
}


def normalise_body(body, headers):
    if headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, dict) and isinstance(data.get("headers"), dict):
            data["headers"].pop("X-Forwarded-For", None)  # added by mongrel2
        return data
    return body


def fetch(port, raw):
    line, _, rest = raw.partition(b"\r\n")
    head_rest, sep, body = rest.partition(b"\r\n\r\n")
    head = line + b"\r\nHost: localhost\r\nConnection: close\r\n" + (head_rest + b"\r\n" if head_rest else b"")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + body)
        status, headers, data, complete = Reader(sock).response(time.time() + 10, head=raw.startswith(b"HEAD"))
    # Allow's order comes from a Python set: it differs between any two processes.
    if "allow" in headers:
        headers["allow"] = ", ".join(sorted(headers["allow"].split(", ")))
    kept = sorted((k, v) for k, v in headers.items() if k not in IGNORED_HEADERS)
    return status, kept, normalise_body(data, headers), complete


@pytest.fixture(scope="module")
def pair_of_servers(tmp_path_factory, front):
    """Each app under gunicorn (2 sync workers) and under wsgid (2 workers), behind the
    suite's front end of the moment (so rebuilt for each)."""
    tmp = tmp_path_factory.mktemp("differential")
    apps = tmp / "apps"
    packages = tmp / "packages"
    apps.mkdir()
    packages.mkdir()
    (packages / "demo-1.0.tar.gz").write_bytes(bytes(range(256)) * 8)
    (apps / "httpbin_app.py").write_text("from httpbin import app as application\n")
    (apps / "pypi_app.py").write_text(textwrap.dedent(f"""\
        import pypiserver
        application = pypiserver.app(roots=[{str(packages)!r}], authenticate=[], password_file=".")
        """))
    started = []
    servers = {}
    try:
        for name, module in [("httpbin", "httpbin_app:application"), ("pypi", "pypi_app:application")]:
            port = free_port()
            gunicorn = subprocess.Popen(
                [str(VENV / "bin" / "gunicorn"), "--workers", "2", "--bind", f"127.0.0.1:{port}",
                 "--chdir", str(apps), module],
                stdout=subprocess.DEVNULL, stderr=open(tmp / f"gunicorn-{name}.log", "wb"))
            started.append(gunicorn)
            handler = Handler("/", "tnetstring")
            m2 = Mongrel2(tmp / f"m2-{name}", [handler])
            m2.start()
            started.append(m2)
            wsgid = Wsgid(tmp / f"wsgid-{name}", handler, m2, apps, ["--wsgi-app", module], workers=2)
            wsgid.start(wait_path=None)
            started.append(wsgid)
            wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code < 500,
                     what=f"gunicorn serving {name}")
            wait_for(lambda: requests.get(m2.url + "/", timeout=2).status_code < 500,
                     what=f"wsgid serving {name}")
            servers[name] = (port, m2.port)
        yield servers
    finally:
        for s in started:
            if isinstance(s, subprocess.Popen):
                s.send_signal(signal.SIGTERM)
                s.wait(10)
            else:
                s.stop()


@pytest.mark.parametrize("app,raw", [("httpbin", r) for r in HTTPBIN_REQUESTS] + [("pypi", r) for r in PYPI_REQUESTS],
                         ids=lambda v: v if isinstance(v, str) else v.split(b"\r\n")[0].decode())
def test_same_answer_as_gunicorn(pair_of_servers, app, raw):
    gunicorn_port, wsgid_port = pair_of_servers[app]
    theirs = fetch(gunicorn_port, raw)
    ours = fetch(wsgid_port, raw)
    if raw in DELIBERATE:
        assert DELIBERATE[raw](theirs, ours), (theirs, ours)
    else:
        assert ours == theirs



# A WebDAV session, in order: bodies in and out of every size and framing (a 3 MB PUT goes
# to a spool file or a pipe, a chunked one is de-chunked), ranges, and methods with XML
# bodies, against a WsgiDAV share of each server's own.
DAV_BODY = bytes(range(256)) * 12289  # 3 MiB and a bit, not a multiple of any chunk size
DAV_CHUNKED = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in
                       (DAV_BODY[i:i + 65536] for i in range(0, len(DAV_BODY), 65536))) + b"0\r\n\r\n"
PROPFIND_SIZES = (b'<?xml version="1.0"?><propfind xmlns="DAV:"><prop><getcontentlength/>'
                  b'<resourcetype/></prop></propfind>')
PROPPATCH = (b'<?xml version="1.0"?><propertyupdate xmlns="DAV:" xmlns:Z="urn:x"><set><prop>'
             b'<Z:color>red</Z:color></prop></set></propertyupdate>')
DAV_SESSION = [
    b"PUT /a.txt HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nhello dav\n",
    b"GET /a.txt HTTP/1.1",
    b"HEAD /a.txt HTTP/1.1",
    b"GET /a.txt HTTP/1.1\r\nRange: bytes=2-5",
    b"MKCOL /dir HTTP/1.1",
    b"MKCOL /dir HTTP/1.1",
    b"PUT /dir/big.bin HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(DAV_BODY) + DAV_BODY,
    b"GET /dir/big.bin HTTP/1.1",
    b"GET /dir/big.bin HTTP/1.1\r\nRange: bytes=1000000-1000099",
    b"PUT /dir/chunked.bin HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + DAV_CHUNKED,
    b"GET /dir/chunked.bin HTTP/1.1",
    b"PUT /dir/empty HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /dir/empty HTTP/1.1",
    b"PROPFIND /dir HTTP/1.1\r\nDepth: 1\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n"
    % len(PROPFIND_SIZES) + PROPFIND_SIZES,
    b"OPTIONS / HTTP/1.1",
    b"COPY /a.txt HTTP/1.1\r\nDestination: /dir/b.txt",
    b"MOVE /dir/b.txt HTTP/1.1\r\nDestination: /dir/c.txt",
    b"GET /dir/c.txt HTTP/1.1",
    b"PROPPATCH /a.txt HTTP/1.1\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n"
    % len(PROPPATCH) + PROPPATCH,
    b"PROPFIND /a.txt HTTP/1.1\r\nDepth: 0",
    b"DELETE /dir/c.txt HTTP/1.1",
    b"GET /dir/c.txt HTTP/1.1",
    b"GET /dir/ HTTP/1.1",
    b"DELETE /dir HTTP/1.1",
    b"GET /dir/big.bin HTTP/1.1",
]


def dav_answer(port, raw):
    """An answer with what depends on the moment or the disk taken out: times, ETags (from
    mtimes and inodes), and the share's quota."""
    status, headers, body, complete = fetch(port, raw)
    headers = [(k, v) for k, v in headers if k not in ("etag", "last-modified")]
    body = re.sub(rb"<(ns0:)?(creationdate|getlastmodified|getetag|quota-used-bytes|quota-available-bytes)>"
                  rb"[^<]*<", rb"<\2>-<", body)
    body = re.sub(rb"\d{4}-\d\d-\d\d[ T][\d:.]+Z?", b"(time)", body)
    body = re.sub(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} [\d:]+ GMT", b"(time)", body)
    return status, headers, hashlib.sha256(body).hexdigest(), len(body), complete


@pytest.fixture(scope="module")
def dav_pair(tmp_path_factory, front):
    """WsgiDAV under gunicorn and under wsgid (2 workers each), each with its own share."""
    tmp = tmp_path_factory.mktemp("dav")
    apps = tmp / "apps"
    apps.mkdir()
    (apps / "dav_app.py").write_text(textwrap.dedent("""\
        import os
        from wsgidav.wsgidav_app import WsgiDAVApp
        application = WsgiDAVApp({
            "provider_mapping": {"/": os.environ["DAV_ROOT"]},
            "simple_dc": {"user_mapping": {"*": True}},
            "logging": {"enable": False},
        })
        """))
    shares = {name: tmp / name / "share" for name in ("gunicorn", "wsgid")}
    for share in shares.values():
        share.mkdir(parents=True)
    port = free_port()
    gunicorn = subprocess.Popen(
        [str(VENV / "bin" / "gunicorn"), "--workers", "2", "--bind", f"127.0.0.1:{port}",
         "--chdir", str(apps), "dav_app:application"],
        env={**os.environ, "DAV_ROOT": str(shares["gunicorn"])},
        stdout=subprocess.DEVNULL, stderr=open(tmp / "gunicorn.log", "wb"))
    handler = Handler("/", "tnetstring")
    m2 = Mongrel2(tmp / "m2", [handler])
    wsgid = Wsgid(tmp / "wsgid", handler, m2, apps, ["--wsgi-app", "dav_app:application"], workers=2,
                  env={"DAV_ROOT": str(shares["wsgid"])})
    try:
        m2.start()
        wsgid.start(wait_path=None)
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200,
                 what="gunicorn serving WsgiDAV")
        wait_for(lambda: requests.get(m2.url + "/", timeout=2).status_code == 200, what="wsgid serving WsgiDAV")
        yield port, m2.port, shares
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(10)
        wsgid.stop()
        m2.stop()


def test_a_webdav_session_goes_as_under_gunicorn(dav_pair):
    gunicorn_port, wsgid_port, shares = dav_pair
    steps = []
    for raw in DAV_SESSION:
        theirs, ours = dav_answer(gunicorn_port, raw), dav_answer(wsgid_port, raw)
        steps.append((raw.split(b"\r\n")[0].decode(), theirs, ours))
    different = [step for step in steps if step[1] != step[2]]
    assert not different, different
    # The session did what it says: the big bodies were stored whole, and then removed.
    assert [s[1][0] for s in steps][:8] == [201, 200, 200, 206, 201, 405, 201, 200]
    assert steps[7][2][3] == len(DAV_BODY) and steps[10][2][3] == len(DAV_BODY)
    assert steps[-1][2][0] == 404
    assert sorted(p.name for p in shares["wsgid"].iterdir()) == ["a.txt"]

"""Issue 2: PEP 3333 behind the real mongrel2, through JSON and tnetstring handlers."""
import json
import socket
import subprocess
import time

import pytest
import requests

from stack import WSGID
from http_util import is_closed, raw_exchange, split_responses


def env(server, path="/env", **kw):
    r = requests.get(server.url + path, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def test_environ_basics(server):
    e = env(server, "/env/sub/path", params={"a": "1", "b": "two x"}, headers={"X-Requested-With": "XMLHttpRequest"})
    script = server.handler.route.rstrip("/")
    assert e["REQUEST_METHOD"] == "GET"
    assert e["SCRIPT_NAME"] == script
    assert e["PATH_INFO"] == "/env/sub/path"
    assert e["QUERY_STRING"] == "a=1&b=two+x"
    assert e["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert e["SERVER_NAME"] == "127.0.0.1"
    assert e["SERVER_PORT"] == str(server.mongrel2.port)
    assert e["REMOTE_ADDR"] == "127.0.0.1"
    assert e["HTTP_X_REQUESTED_WITH"] == "XMLHttpRequest"
    assert e["HTTP_USER_AGENT"].startswith("python-requests")
    assert e["wsgi.version"] == [1, 0]
    assert e["wsgi.url_scheme"] == "http"
    assert e["wsgi.multithread"] is False and e["wsgi.multiprocess"] is True and e["wsgi.run_once"] is False
    assert e["wsgi.input"] == "Input" and e["wsgi.errors"] == "Errors"
    assert e["SERVER_SOFTWARE"].startswith("wsgid/")
    assert "CONTENT_TYPE" not in e and "CONTENT_LENGTH" not in e
    assert not any(k.startswith("HTTP_X_MONGREL2") for k in e)


def test_percent_encoded_and_non_ascii_paths(server):
    r = requests.get(server.url + "/env/caf%C3%A9/a%20b/%2Fslash")
    e = r.json()
    # PEP 3333: PATH_INFO holds the decoded bytes as a latin-1 native string.
    assert e["PATH_INFO"].encode("latin-1").decode("utf-8") == "/env/café/a b//slash"
    assert e["REQUEST_URI"] == server.handler.route.rstrip("/") + "/env/caf%C3%A9/a%20b/%2Fslash"


def test_repeated_headers_joined_per_cgi(server):
    data, _ = raw_exchange(server.mongrel2.port,
                           f"GET {server.handler.route.rstrip('/')}/env HTTP/1.1\r\nHost: localhost\r\n"
                           "X-Dup: one\r\nx-dup: two\r\nCookie: a=1\r\nCookie: b=2\r\nConnection: close\r\n\r\n".encode())
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["HTTP_X_DUP"] == "one, two"
    assert body["HTTP_COOKIE"] == "a=1; b=2"
    assert body["SERVER_NAME"] == "localhost" and body["SERVER_PORT"] == "80"


def test_non_utf8_and_control_bytes_in_headers(server):
    """mongrel2's JSON headers are invalid JSON here (raw TAB, byte 0xff): still served."""
    data, _ = raw_exchange(server.mongrel2.port,
                           f"GET {server.handler.route.rstrip('/')}/env HTTP/1.1\r\nHost: localhost\r\n"
                           "X-Ctl: a\tb\r\nX-Utf8: \xc3\xa9\xff\r\nConnection: close\r\n\r\n".encode("latin-1"))
    assert data.startswith(b"HTTP/1.1 200 OK"), data[:200]
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["HTTP_X_CTL"] == "a\tb"
    assert body["HTTP_X_UTF8"].encode("latin-1") == b"\xc3\xa9\xff"


def test_ipv6_host_header(server):
    e = env(server, headers={"Host": "[::1]:8080"})
    assert (e["SERVER_NAME"], e["SERVER_PORT"], e["HTTP_HOST"]) == ("[::1]", "8080", "[::1]:8080")


def test_no_host_header_uses_defaults(server):
    data, _ = raw_exchange(server.mongrel2.port, f"GET {server.handler.route.rstrip('/')}/env HTTP/1.0\r\n\r\n".encode())
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["SERVER_PORT"] == "80" and body["SERVER_NAME"]
    assert "HTTP_HOST" not in body


def test_post_body_and_content_headers(server):
    r = requests.post(server.url + "/echo", data=b"name=J%C3%B6rg&x=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.content == b"name=J%C3%B6rg&x=1"
    assert r.headers["X-Content-Length"] == "18"


def test_input_readline_iteration(server):
    r = requests.post(server.url + "/lines", data=b"first\nsecond line\nthird\nlast")
    assert r.json() == ["first\n", "sec", ["ond line\n", "third\n", "last"], ""]


def test_streaming_reaches_client_progressively(server):
    started = time.time()
    arrivals = []
    with requests.get(server.url + "/stream", stream=True) as r:
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in r.headers
        for line in r.iter_lines():
            arrivals.append(time.time() - started)
    assert len(arrivals) == 3
    # Each chunk arrives when yielded (0.4 s apart), not all at the end.
    assert arrivals[2] - arrivals[0] > 0.6


def test_small_response_is_one_message_with_length(server):
    r = requests.get(server.url + "/hello")
    assert r.headers["Content-Length"] == "13"
    assert r.headers["Server"].startswith("wsgid/")
    assert "Date" in r.headers


def test_unknown_length_is_chunked_and_empty_chunks_skipped(server):
    r = requests.get(server.url + "/nolength")
    assert r.content == b"abbccc"
    assert r.headers["Transfer-Encoding"] == "chunked"


def test_write_callable(server):
    assert requests.get(server.url + "/write").content == b"written-returned"


def test_streamed_head_keeps_the_connection(server):
    """HEAD on a streamed body: no body bytes, and no empty message (mongrel2 would close)."""
    prefix = server.handler.route.rstrip("/")
    data, sock = raw_exchange(server.mongrel2.port,
                              f"HEAD {prefix}/big?size=262144 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                              expect=(b"\r\n\r\n", 1), until_close=False)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"\r\n\r\n")
    assert sock is not None and not is_closed(sock, 0.5)
    sock.close()


def test_head_has_no_body(server):
    data, sock = raw_exchange(server.mongrel2.port,
                              f"HEAD {server.handler.route.rstrip('/')}/hello HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(),
                              expect=(b"\r\n\r\n", 1), until_close=False)
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"\r\n\r\n") and b"Content-Length: 13" in data
    # keep-alive: the same connection serves a GET afterwards
    sock.sendall(f"GET {server.handler.route.rstrip('/')}/hello HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    time.sleep(0.3)
    assert sock.recv(65536).endswith(b"Hello, World!")
    sock.close()


def test_keep_alive_and_pipelining(stack):
    """Pipelined requests on one connection come back in order (one worker serves them)."""
    server = stack["limited"]
    prefix = server.handler.route.rstrip("/")
    reqs = b"".join(f"GET {prefix}/env/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode() for i in range(5))
    data, sock = raw_exchange(server.mongrel2.port, reqs, expect=(b"HTTP/1.1 200 OK", 5), until_close=False)
    assert data.count(b"HTTP/1.1 200 OK") == 5
    order = [json.loads(body)["PATH_INFO"] for _, body in split_responses(data)]
    assert order == [f"/env/{i}" for i in range(5)]
    assert not is_closed(sock, 0.5)
    sock.close()


def test_pipelined_slow_then_fast_stay_in_order(server):
    """Two workers: the fast request must not overtake the slow one on the same connection
    (the broker holds a connection's next request until its previous one is answered)."""
    prefix = server.handler.route.rstrip("/")
    reqs = (f"GET {prefix}/sleep?0.3 HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET {prefix}/hello HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    data, sock = raw_exchange(server.mongrel2.port, reqs, expect=(b"HTTP/1.1 200 OK", 2), until_close=False)
    assert [body for _, body in split_responses(data)] == [b"slept", b"Hello, World!"]
    sock.close()


def test_connection_close_request_is_closed(server):
    data, sock = raw_exchange(server.mongrel2.port,
                              f"GET {server.handler.route.rstrip('/')}/hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    assert sock is None, "mongrel2 should have closed the connection"
    assert b"Connection: close" in data and data.endswith(b"Hello, World!")


def test_http10_without_keep_alive_is_closed(server):
    data, sock = raw_exchange(server.mongrel2.port, f"GET {server.handler.route.rstrip('/')}/nolength HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    assert sock is None
    assert data.endswith(b"\r\n\r\nabbccc")  # no chunked framing for HTTP/1.0


def test_http10_keep_alive(server):
    data, sock = raw_exchange(server.mongrel2.port,
                              f"GET {server.handler.route.rstrip('/')}/hello HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode(),
                              expect=(b"Hello, World!", 1), until_close=False)
    assert b"Connection: keep-alive" in data
    assert sock is not None and not is_closed(sock, 0.5)
    sock.close()


def test_app_connection_close_header_closes(server):
    data, sock = raw_exchange(server.mongrel2.port, f"GET {server.handler.route.rstrip('/')}/close-me HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sock is None and data.endswith(b"bye")


@pytest.mark.parametrize("path", ["/error", "/bad-header", "/bad-status", "/twice", "/not-bytes", "/no-start",
                                  "/no-start-iter"])
def test_app_errors_answer_500_and_worker_lives(server, path):
    r = requests.get(server.url + path)
    assert r.status_code == 500
    assert "Traceback" not in r.text and "Injected" not in r.headers
    assert requests.get(server.url + "/hello").status_code == 200


def test_traceback_goes_to_the_log(server):
    requests.get(server.url + "/error")
    time.sleep(0.2)
    assert "ValueError: the app failed" in server.log()


def closed_count(server):
    return int(requests.get(server.url + "/closed").text)


def test_error_after_headers_closes_connection_and_calls_close(stack):
    server = stack["limited"]  # one worker: the close() counter is in that process
    before = closed_count(server)
    route = server.handler.route.rstrip("/")
    data, sock = raw_exchange(server.mongrel2.port, f"GET {route}/error-after-headers HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sock is None, "connection must be closed after a failure mid-response"
    assert b"first" in data and not data.endswith(b"0\r\n\r\n")
    assert closed_count(server) == before + 1
    assert "RuntimeError: boom after headers" in server.log() and "Traceback" in server.log()


def test_exc_info_replaces_status_before_headers_sent(server):
    r = requests.get(server.url + "/exc-info")
    assert r.status_code == 503 and r.text == "replaced"


def test_file_wrapper(server):
    r = requests.get(server.url + "/file")
    assert b"A bare WSGI app" in r.content


def test_large_streamed_response(server):
    """A fast generator of 64 KiB chunks: paced and merged, so mongrel2 (which drops a
    client with more than 16 queued replies) delivers all of it."""
    with requests.get(server.url + "/big", params={"size": 64 * 1048576}, stream=True) as r:
        total = sum(len(c) for c in r.iter_content(1 << 20))
    assert total == 64 * 1048576


def test_validator_wrapped_app(server):
    """wsgiref.validate raises on any PEP 3333 violation by the server."""
    for path in ["/validated/hello", "/validated/env", "/validated/nolength", "/validated/write"]:
        r = requests.get(server.url + path)
        assert r.status_code == 200, (path, r.text)
    r = requests.post(server.url + "/validated/echo", data=b"x" * 1000)
    assert r.status_code == 200 and len(r.content) == 1000
    assert "AssertionError" not in server.log()


def test_iterable_close_always_called(stack):
    server = stack["limited"]
    before = closed_count(server)
    assert requests.get(server.url + "/tracked").content == b"onetwo"
    assert closed_count(server) == before + 1


def test_websocket_handshake_is_closed_not_served(server, front):
    """mongrel2 hands the handshake to wsgid, which closes it; our front end does not do
    websockets yet and says so with 501."""
    data, sock = raw_exchange(server.mongrel2.port, (
        f"GET {server.handler.route.rstrip('/')}/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    if front == "mongrel2":
        assert sock is None and data == b""
    else:
        assert data.startswith(b"HTTP/1.1 501 "), data
    assert requests.get(server.url + "/hello").status_code == 200


def test_forged_short_request_headers_cannot_crash(server, front):
    """mongrel2 passes a client's X-Mongrel2-Upload-Done on: wsgid refuses the request. Our
    front end strips every client X-Mongrel2-* header: the app never sees it."""
    route = server.handler.route.rstrip('/')
    data, _ = raw_exchange(server.mongrel2.port,
                           f"GET {route}/env HTTP/1.1\r\nHost: x\r\nX-Mongrel2-Upload-Done: /etc/passwd\r\n"
                           "X-Mongrel2-Upload-Start: /etc/passwd\r\nConnection: close\r\n\r\n".encode())
    if front == "mongrel2":
        assert data.startswith(b"HTTP/1.1 400")
    else:
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"MONGREL2" not in data.upper().split(b"\r\n\r\n", 1)[1]


def test_flask_app(stack):
    url, root = stack["flask"].url, stack["flask"].handler.route.rstrip("/")
    r = requests.get(url + "/")
    assert r.status_code == 200 and "Flask" in r.text
    r = requests.get(url + "/greet/J%C3%B6rg", params={"q": "1"})
    assert r.json() == {"greeting": "Hello, Jörg!", "script_root": root, "args": {"q": "1"}}
    r = requests.post(url + "/form", data={"a": ["1", "2"], "b": "é"})
    assert r.json() == {"form": {"a": ["1", "2"], "b": ["é"]}}
    assert requests.get(url + "/missing").status_code == 404


def test_django_app_autodetected(stack):
    url, root = stack["django"].url, stack["django"].handler.route.rstrip("/")
    r = requests.get(url + "/")
    assert r.status_code == 200 and "Django" in r.text
    info = requests.get(url + "/info", params={"x": "y"}).json()
    assert info["script_name"] == root and info["path"] == root + "/info" and info["query"] == {"x": "y"}
    assert "using the Django loader" in stack["django"].log()


def test_cli_spec_validation_and_version():
    bad = subprocess.run([str(WSGID), "--recv", "tcp://127.0.0.1", "--send", "tcp://127.0.0.1:1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "tcp needs HOST:PORT" in bad.stderr
    version = subprocess.run([str(WSGID), "-v"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("wsgid ")
    help_ = subprocess.run([str(WSGID), "-h"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--wsgi-app" in help_.stdout and "--mongrel2-chroot" in help_.stdout


@pytest.mark.parametrize("status", ["099 Odd", "100 Continue", "101 Switching Protocols", "600 Too Big"])
def test_statuses_outside_200_599_answer_500(server, status):
    """A final 1xx or an out-of-range status would leave the client waiting: 500 instead."""
    reply = requests.get(server.url + "/status?" + status.replace(" ", "%20"), timeout=5)
    assert reply.status_code == 500
    assert "a response's status must be 200-599" in server.log()


@pytest.mark.parametrize("header", ["X-Bad=a%01b", "X-Bad=a%7Fb", "Content-Length=%2B5", "Content-Length=5%205"])
def test_bad_header_values_answer_500(server, header):
    reply = requests.get(server.url + "/header?" + header, timeout=5)
    assert reply.status_code == 500


def test_no_length_on_204_and_no_hop_by_hop_headers_from_the_app(server):
    route = server.handler.route.rstrip("/")
    for status in ("204%20No%20Content", "304%20Not%20Modified"):
        data, _ = raw_exchange(server.mongrel2.port,
                               f"GET {route}/status?{status} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert b"content-length" not in data.lower(), data
    for name in ("Keep-Alive=timeout%3D5", "Upgrade=h2c", "TE=trailers", "Trailer=X", "Proxy-Connection=keep-alive"):
        reply = requests.get(server.url + "/header?" + name, timeout=5)
        assert reply.status_code == 200
        assert name.split("=")[0].lower() not in {k.lower() for k in reply.headers}


def test_forwarded_headers_count_only_from_trusted_front_ends(server, make, front):
    """X-Forwarded-Proto/-For set wsgi.url_scheme and REMOTE_ADDR from 127.0.0.1 (the
    default --forwarded-allow-ips, and where mongrel2 sees this client), never otherwise."""
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    env = requests.get(server.url + "/env", headers=headers, timeout=5).json()
    assert env["wsgi.url_scheme"] == "https"
    # mongrel2 replaces the client's X-Forwarded-For with the address it saw; serving HTTP
    # ourselves, a trusted peer's (a proxy's) is believed, as gunicorn does.
    assert env["REMOTE_ADDR"] == ("203.0.113.9" if front == "bind" else "127.0.0.1")
    untrusting = make(args=("--wsgi-app", "testapp:application", "--forwarded-allow-ips", "192.0.2.1"))
    env = requests.get(untrusting.url + "/env", headers=headers, timeout=5).json()
    assert (env["wsgi.url_scheme"], env["REMOTE_ADDR"]) == ("http", "127.0.0.1")

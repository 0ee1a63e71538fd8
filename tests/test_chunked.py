"""Chunked request bodies, read by real frameworks: mongrel2 de-chunks them into a file, and
the environ must then look like any delimited body (no Transfer-Encoding, a CONTENT_LENGTH,
wsgi.input_terminated), or Werkzeug reads nothing."""
import hashlib
import json

import pytest

from faults import exchange


def chunked(body, piece=1000):
    out = b""
    for i in range(0, len(body), piece):
        part = body[i:i + piece]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


@pytest.mark.parametrize("framework", ["flask", "django"])
@pytest.mark.parametrize("size", [13, 32 * 1024])
def test_frameworks_read_the_whole_chunked_body(stack, framework, size):
    body = bytes(i % 251 for i in range(size))
    server = stack[framework]
    request = (f"POST {server.handler.route.rstrip('/')}/body HTTP/1.1\r\nHost: localhost\r\n"
               "Transfer-Encoding: chunked\r\n"
               "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n").encode() + chunked(body)
    status, _, reply, complete = exchange(server.mongrel2.port, request)
    assert (status, complete) == (200, True), reply
    assert json.loads(reply) == {"size": size, "sha256": hashlib.sha256(body).hexdigest()}


def test_environ_of_a_chunked_body(server):
    body = b"x" * 5000
    path = server.handler.route.rstrip("/") + "/env"
    request = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
               "Connection: close\r\n\r\n").encode() + chunked(body)
    status, _, reply, _ = exchange(server.mongrel2.port, request)
    env = json.loads(reply)
    assert status == 200
    assert "HTTP_TRANSFER_ENCODING" not in env
    assert env["CONTENT_LENGTH"] == "5000"
    assert env["wsgi.input_terminated"] is True

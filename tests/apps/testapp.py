"""A bare WSGI app exercising PEP 3333 corners, for the integration tests."""
import hashlib
import json
import os
import time
from wsgiref.validate import validator

CLOSED = {"count": 0}
KEPT = {}


class Tracked:
    """An iterable whose close() the server must call."""

    def __init__(self, chunks, fail_after=None):
        self.chunks = chunks
        self.fail_after = fail_after

    def __iter__(self):
        for i, chunk in enumerate(self.chunks):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("boom after headers")
            yield chunk

    def close(self):
        CLOSED["count"] += 1


def text(start_response, body, status="200 OK", extra=()):
    body = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *extra])
    return [body]


def environ_json(environ):
    out = {}
    for key, value in environ.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (bool, int, tuple)):
            out[key] = list(value) if isinstance(value, tuple) else value
        else:
            out[key] = type(value).__name__
    return json.dumps(out)


def inner(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/env" or path.startswith("/env/"):
        return text(start_response, environ_json(environ), extra=[("X-Path-Info-Latin1", path.encode("latin-1").hex())])
    if path == "/hello":
        return text(start_response, "Hello, World!")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen():
            for i in range(3):
                yield f"chunk {i} at {time.time():.3f}\n".encode()
                time.sleep(0.4)
        return gen()
    if path == "/nolength":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"a", b"bb", b"", b"ccc"])
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written-")
        return [b"returned"]
    if path == "/echo":
        length = environ.get("CONTENT_LENGTH")
        body = environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read()
        return text(start_response, body, extra=[("X-Content-Length", environ.get("CONTENT_LENGTH", "absent"))])
    if path == "/lines":
        inp = environ["wsgi.input"]
        first = inp.readline()
        limited = inp.readline(3)
        rest = list(inp)
        tail = inp.read()
        return text(start_response, json.dumps([first.decode(), limited.decode(), [r.decode() for r in rest], tail.decode()]))
    if path == "/sha256":
        inp = environ["wsgi.input"]
        digest, size = hashlib.sha256(), 0
        while True:
            block = inp.read(65536)
            if not block:
                break
            digest.update(block)
            size += len(block)
        return text(start_response, json.dumps({"sha256": digest.hexdigest(), "size": size,
                                                "content_length": environ.get("CONTENT_LENGTH"),
                                                "upload_path": environ.get("wsgid.upload_path")}))
    if path == "/keep-input":  # an app that wrongly keeps wsgi.input past its request
        KEPT["input"] = environ["wsgi.input"]
        return text(start_response, "kept")
    if path == "/read-kept":
        try:
            return text(start_response, "read " + repr(KEPT["input"].read(100)))
        except OSError as e:
            return text(start_response, f"refused: {e}")
    if path == "/move-upload":
        target = environ["QUERY_STRING"]
        os.rename(environ["wsgid.upload_path"], target)
        return text(start_response, "moved")
    if path == "/error":
        raise ValueError("the app failed")
    if path == "/error-after-headers":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Tracked([b"first\n", b"never"], fail_after=1)
    if path == "/tracked":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Tracked([b"one", b"two"])
    if path == "/closed":
        return text(start_response, str(CLOSED["count"]))
    if path == "/bad-header":
        start_response("200 OK", [("X-Bad", "a\r\nInjected: yes")])
        return [b"no"]
    if path == "/bad-status":
        start_response("OK", [])
        return [b"no"]
    if path == "/twice":
        start_response("200 OK", [])
        start_response("200 OK", [])
        return [b"no"]
    if path == "/exc-info":
        try:
            raise KeyError("inner")
        except KeyError:
            import sys
            start_response("200 OK", [])
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"replaced"]
    if path == "/not-bytes":
        start_response("200 OK", [])
        return ["a str"]
    if path == "/no-start":
        return [b"forgot start_response"]
    if path == "/no-start-iter":
        return iter([b"body before start_response"])
    if path == "/file":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(__file__, "rb"))
    if path == "/big":
        size = int(environ["QUERY_STRING"].partition("=")[2] or 1048576)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (b"x" * 65536 for _ in range(size // 65536))
    if path == "/tiny":  # many small chunks: n pieces of `size` bytes, each naming its index
        q = dict(kv.split("=") for kv in environ["QUERY_STRING"].split("&") if kv)
        n, size = int(q.get("n", 600)), int(q.get("size", 4))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (str(i % 10).encode() * size for i in range(n))
    if path == "/events":  # progressive streaming: one small event every `every` seconds
        q = dict(kv.split("=") for kv in environ["QUERY_STRING"].split("&") if kv)
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def events():
            for i in range(int(q.get("n", 5))):
                yield f"data: {i} {time.time():.6f}\n\n".encode()
                time.sleep(float(q.get("every", 0.1)))
        return events()
    if path == "/id":  # answers with what the client asked for: a misdelivered reply shows
        return text(start_response, "id=" + environ["QUERY_STRING"])
    if path == "/slow-id":  # the same, after a while
        time.sleep(1.0)
        return text(start_response, "id=" + environ["QUERY_STRING"])
    if path == "/status":  # any status line the client names (validation tests)
        start_response(environ["QUERY_STRING"].replace("%20", " "), [("Content-Type", "text/plain")])
        return [b"body"]
    if path == "/header":  # one header the client names, raw (validation tests)
        name, _, value = environ["QUERY_STRING"].partition("=")
        from urllib.parse import unquote
        start_response("200 OK", [(unquote(name), unquote(value))])
        return [b"body"]
    if path == "/close-me":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close"), ("Content-Length", "3")])
        return [b"bye"]
    if path == "/pid":
        return text(start_response, str(os.getpid()))
    if path == "/fork-child":  # a child that keeps the worker's descriptors, as multiprocessing's fork does
        child = os.fork()
        if child == 0:
            time.sleep(float(environ["QUERY_STRING"] or 10))
            os._exit(0)
        return text(start_response, str(child))
    if path == "/sleep-pid":  # who served a short wait (balancing tests)
        time.sleep(float(environ["QUERY_STRING"]))
        return text(start_response, str(os.getpid()))
    if path == "/sleep":
        time.sleep(float(environ["QUERY_STRING"] or 1))
        return text(start_response, "slept")
    if path == "/whereami":
        return text(start_response, json.dumps({"file": __file__, "uid": os.getuid(), "gid": os.getgid(),
                                                "groups": os.getgroups(), "cwd": os.getcwd()}))
    if path == "/envvar":
        return text(start_response, os.environ.get(environ["QUERY_STRING"], "<unset>"))
    if path == "/version":
        return text(start_response, VERSION)
    return text(start_response, "not found: " + path, status="404 Not Found")


VERSION = "v1"
_validated = validator(inner)


def application(environ, start_response):
    if environ["PATH_INFO"].startswith("/validated/"):
        environ["PATH_INFO"] = environ["PATH_INFO"][len("/validated"):]
        return _validated(environ, start_response)
    return inner(environ, start_response)

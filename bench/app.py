"""The one app every server in the benchmark serves (as in shared/reference/peers.md)."""
import time

HELLO = b"Hello, World!"
K64 = b"x" * 65536
DOWNLOAD_MIB = 1024


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/download":  # 1 GiB streamed in 64 KiB chunks: memory must stay flat
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(DOWNLOAD_MIB * 2**20))])
        return (K64 for _ in range(DOWNLOAD_MIB * 16))
    if path == "/sleep":  # the isolation workload's slow endpoint
        time.sleep(1)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"slept"]
    if path == "/64k":
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", "65536")])
        return [K64]
    if path in ("/post", "/stream"):
        stream, total = environ["wsgi.input"], 0
        remaining = int(environ.get("CONTENT_LENGTH") or 0)
        while remaining > 0:
            block = stream.read(min(65536, remaining))
            if not block:
                break
            total += len(block)
            remaining -= len(block)
        body = str(total).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [HELLO]

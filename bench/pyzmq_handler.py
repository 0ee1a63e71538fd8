"""A minimal mongrel2 WSGI handler in Python with pyzmq: the floor of any Python handler.

Bare environ, buffered response, JSON protocol, temp-file uploads read from the chroot.
Usage: pyzmq_handler.py RECV_SPEC SEND_SPEC MONGREL2_CHROOT
"""
import json
import os
import sys

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app import application  # noqa: E402


class Input:
    def __init__(self, data=None, path=None):
        self.file = open(path, "rb") if path else None
        self.data, self.pos = data or b"", 0

    def read(self, size=-1):
        if self.file:
            return self.file.read(size)
        end = len(self.data) if size is None or size < 0 else self.pos + size
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


def netstring(data):
    length, _, rest = data.partition(b":")
    n = int(length)
    return rest[:n], rest[n + 1:]


def main():
    recv_spec, send_spec, chroot = sys.argv[1:4]
    ctx = zmq.Context()
    pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
    pull.connect(recv_spec)
    pub.connect(send_spec)
    while True:
        msg = pull.recv()
        sender, conn_id, path, rest = msg.split(b" ", 3)
        headers, rest = netstring(rest)
        body, _ = netstring(rest)
        headers = json.loads(headers, strict=False)
        if path == b"@*":
            continue
        start = headers.get("x-mongrel2-upload-start")
        upload = None
        if start:
            if headers.get("x-mongrel2-upload-done") != start:
                continue  # upload start: accept by saying nothing
            upload = os.path.join(chroot, start.lstrip("/"))
        environ = {
            "REQUEST_METHOD": headers["METHOD"], "PATH_INFO": headers["PATH"],
            "QUERY_STRING": headers.get("QUERY", ""), "SERVER_PROTOCOL": headers["VERSION"],
            "SCRIPT_NAME": "", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
            "CONTENT_LENGTH": headers.get("content-length", ""), "wsgi.url_scheme": "http",
            "wsgi.input": Input(body, upload), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
            "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        }
        state = {}

        def start_response(status, response_headers, exc_info=None):
            state["status"], state["headers"] = status, response_headers

        result = application(environ, start_response)
        payload = b"".join(result)
        head = "HTTP/1.1 %s\r\n%s\r\n" % (state["status"], "".join("%s: %s\r\n" % h for h in state["headers"]))
        pub.send(b"%s %d:%s, %s%s" % (sender, len(conn_id), conn_id, head.encode("latin-1"), payload))
        if upload:
            os.unlink(upload)


if __name__ == "__main__":
    main()

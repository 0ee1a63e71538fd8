"""Raw HTTP over a socket, for what requests hides: pipelining, HTTP/1.0, connection close."""
import socket
import time


def raw_exchange(port, payload, timeout=5.0, until_close=True, expect=None):
    """Sends raw bytes, returns what came back: everything until the server closes, or until
    `expect` bytes have arrived (then the socket is left open and returned too)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(payload)
    data = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if expect is not None and data.count(expect[0]) >= expect[1]:
            return data, sock
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            sock.close()
            return data, None
        data += chunk
    return data, sock


def is_closed(sock, wait=1.0):
    """Whether the server closed `sock` (EOF within `wait` seconds)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def split_responses(data):
    """Splits concatenated HTTP responses framed by Content-Length: [(head, body)]."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((head, rest[:length]))
        data = rest[length:]
    return out

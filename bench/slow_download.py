"""A client reading at a fixed rate downloads a large streamed response (64 KiB chunks from a
generator) through the real mongrel2 and wsgid: does it arrive whole, in how long, and how
large do the wsgid processes grow. With mongrel2's download.flow_control on (the default
here) and off, to see what the credits change.

Usage: .venv/bin/python bench/slow_download.py [--mib 50] [--rate-kib 64] [--no-flow-control]
       (WSGID_BIN=target/release/wsgid by default)
"""
import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WSGID_BIN", str(ROOT / "target" / "release" / "wsgid"))
sys.path.insert(0, str(ROOT / "tests"))
from stack import APPS, Handler, Mongrel2, Wsgid  # noqa: E402


def rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def family(pid):
    out = [pid]
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(child.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--rate-kib", type=int, default=64)
    parser.add_argument("--no-flow-control", action="store_true")
    args = parser.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        handler = Handler("/", "tnetstring")
        settings = {} if args.no_flow_control else {"download.flow_control": 1}
        m2 = Mongrel2(Path(tmp) / "m2", [handler], extra_settings=settings)
        m2.start()
        server = Wsgid(Path(tmp) / "app", handler, m2, APPS["testapp"],
                       ["--wsgi-app", "testapp:application"], workers=1)
        try:
            server.start(wait_path="/hello")
            pids = family(server.proc.pid)
            peak = {pid: rss_kib(pid) for pid in pids}
            done = threading.Event()

            def sample():
                while not done.wait(0.05):
                    for pid in pids:
                        peak[pid] = max(peak[pid], rss_kib(pid))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            sock = socket.create_connection(("127.0.0.1", m2.port), timeout=30)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            started, received, tail = time.time(), 0, b""
            per_tick = args.rate_kib * 1024 // 10
            while not tail.endswith(b"\r\n0\r\n\r\n"):
                tick = time.time()
                got = 0
                while got < per_tick:
                    chunk = sock.recv(min(65536, per_tick - got))
                    if not chunk:
                        break
                    got += len(chunk)
                    tail = (tail + chunk)[-16:]
                    if tail.endswith(b"\r\n0\r\n\r\n"):
                        break
                received += got
                if got == 0 or tail.endswith(b"\r\n0\r\n\r\n"):
                    break
                time.sleep(max(0.0, 0.1 - (time.time() - tick)))
            done.set()
            sampler.join()
            whole = tail.endswith(b"\r\n0\r\n\r\n") and received > size
            print(f"flow control: {'off' if args.no_flow_control else 'on'}; {args.mib} MiB at "
                  f"{args.rate_kib} KiB/s: {'whole' if whole else 'CUT'} after {received / 2**20:.1f} MiB, "
                  f"{time.time() - started:.0f} s")
            for pid in pids:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                role = argv[1].decode() if argv[1:2] in ([b"worker"], [b"broker"]) else "master"
                print(f"  {role:8} peak RSS {peak[pid] / 1024:.1f} MiB")
        finally:
            server.stop()
            m2.stop()


if __name__ == "__main__":
    main()

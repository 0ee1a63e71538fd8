"""Counts requests lost when workers are replaced under load (issue 4's "no dropped request").

A client sends serial requests while every worker retires after --max-requests, so
the loop crosses many handovers; a request that times out was lost.
Usage: .venv-bench/bin/python bench/handover.py [WORKERS] [REQUESTS] [MAX_REQUESTS]
"""
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import stack  # noqa: E402


def main():
    workers, total, max_requests = (int(a) for a in (sys.argv[1:] + ["2", "3000", "20"][len(sys.argv[1:]):]))
    tmp = Path(tempfile.mkdtemp(prefix="wsgid-handover-"))
    handler = stack.Handler("/", "tnetstring")
    m2 = stack.Mongrel2(tmp / "m2", [handler])
    m2.start()
    server = stack.Wsgid(tmp / "app", handler, m2, stack.APPS["testapp"],
                         ["--wsgi-app", "testapp:application", "--max-requests", str(max_requests)],
                         workers=workers)
    try:
        server.start(wait_path="/hello")
        lost, pids = 0, set()
        for _ in range(total):
            try:
                pids.add(requests.get(server.url + "/pid", timeout=1).text)
            except requests.RequestException:
                lost += 1
        print(f"{total} requests, {len(pids)} workers seen ({len(pids) - workers} handovers): {lost} lost")
    finally:
        server.stop()
        m2.stop()


if __name__ == "__main__":
    main()

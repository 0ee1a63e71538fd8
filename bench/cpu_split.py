"""CPU per hello request of each process of wsgid behind mongrel2 (master, broker, workers,
mongrel2), under `wrk -t2 -c64`: where the gateway's time goes, for profiling work.
Usage: WSGID_LOG=warn .venv-bench/bin/python bench/cpu_split.py [SECONDS]
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main():
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    server = bench.OursTnet(Path(tempfile.mkdtemp(prefix="wsgid-split-")))
    server.start()
    try:
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", server.url + "/"], capture_output=True)
        pids = server.pids()
        before = {p: bench.cpu_seconds([p]) for p in pids}
        out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", server.url + "/"],
                             capture_output=True, text=True).stdout
        n = int(re.search(r"(\d+) requests in", out).group(1))
        for pid in sorted(pids):
            used = bench.cpu_seconds([pid]) - before[pid]
            print(f"{bench.cmdline(pid)[:70]:70s} {used * 1e6 / n:6.1f} µs/req")
        print(f"{n / seconds:,.0f} req/s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

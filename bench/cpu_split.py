"""Where the time of a hello request goes, process by process (mongrel2, the wsgid broker and
workers, or the pyzmq handler): user and system CPU µs per request under `wrk`, and with
--syscalls the system calls and context switches per request (perf stat, from Debian's
linux-perf; its tracing slows every process: compare counts, not CPU, in that mode). For profiling work: the optimisations
in the closing notes were measured this way, alternating the builds (--binary-dir).

Usage: .venv-bench/bin/python bench/cpu_split.py [--server bind|granian|ours|ours-ipc|pyzmq|...]
           [--workers N] [--connections C] [--seconds S] [--browser-headers] [--syscalls]
           [--binary-dir target/release]
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

BROWSER_HEADERS = [
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language: en-US,en;q=0.5", "Accept-Encoding: gzip, deflate, br",
    "Cookie: session=abcdef0123456789; theme=dark", "Referer: http://localhost/previous",
    "Upgrade-Insecure-Requests: 1", "Sec-Fetch-Dest: document", "Sec-Fetch-Mode: navigate",
    "Cache-Control: max-age=0",
]


def user_sys(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / bench.TICK, int(fields[12]) / bench.TICK
    except (OSError, IndexError):
        return 0.0, 0.0


def role(pid):
    words = bench.cmdline(pid).split()
    name = Path(words[0]).name if words else "?"
    if name == "wsgid":
        return "wsgid " + (words[1] if len(words) > 1 and words[1] in ("broker", "worker", "front") else "master")
    return "pyzmq handler" if "pyzmq_handler" in " ".join(words) else name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="bind", choices=sorted(bench.SERVERS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--browser-headers", action="store_true", help="10 headers a browser sends")
    parser.add_argument("--syscalls", action="store_true", help="count system calls (perf stat)")
    parser.add_argument("--binary-dir", type=Path, default=bench.RELEASE, help="where wsgid is")
    args = parser.parse_args()
    bench.RELEASE = args.binary_dir.resolve()

    server = bench.SERVERS[args.server](Path(tempfile.mkdtemp(prefix="wsgid-split-")))
    server.workers = args.workers
    server.start()
    try:
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", server.url + "/"], capture_output=True)
        pids = sorted(server.pids())
        before = {p: user_sys(p) for p in pids}
        perf = None
        if args.syscalls:
            perf = subprocess.Popen(["perf", "stat", "-x", ",", "--per-thread", "-e",
                                     "raw_syscalls:sys_enter,context-switches", "-p", ",".join(map(str, pids))],
                                    stderr=subprocess.PIPE, text=True)
        headers = sum((["-H", h] for h in BROWSER_HEADERS), []) if args.browser_headers else []
        out = subprocess.run(["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s", *headers,
                              server.url + "/"], capture_output=True, text=True).stdout
        counts = {}
        if perf:
            perf.send_signal(2)
            for line in perf.communicate()[1].splitlines():
                fields = line.split(",")
                thread = re.match(r".*-(\d+)$", fields[0]) if fields else None
                if thread and len(fields) > 3 and fields[1].replace(".", "").isdigit():
                    counts.setdefault(int(thread.group(1)), {})[fields[3]] = float(fields[1])
        n = int(re.search(r"(\d+) requests in", out).group(1))
        print(f"{args.server}, {args.workers} workers, wrk -c{args.connections}: {n / args.seconds:,.0f} req/s")
        totals = {}
        for pid in pids:
            (u0, s0), (u1, s1) = before[pid], user_sys(pid)
            threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()] if Path(f"/proc/{pid}").exists() else []
            calls = sum(counts.get(t, {}).get("raw_syscalls:sys_enter", 0) for t in threads)
            switches = sum(counts.get(t, {}).get("context-switches", 0) for t in threads)
            extra = f"  {calls / n:5.2f} syscalls/req  {switches / n:5.2f} switches/req" if perf else ""
            who = role(pid)
            per = [(u1 - u0) * 1e6 / n, (s1 - s0) * 1e6 / n]
            print(f"  {who:15s} pid {pid:<7d} user {per[0]:6.1f}  sys {per[1]:6.1f} µs/req{extra}")
            group = "mongrel2" if who == "mongrel2" else "gateway"
            totals[group] = totals.get(group, 0) + sum(per)
        print("  " + "  ".join(f"{k} {v:.1f} µs/req" for k, v in sorted(totals.items())))
    finally:
        server.stop()


if __name__ == "__main__":
    main()

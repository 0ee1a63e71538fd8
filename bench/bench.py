"""Side-by-side benchmark of wsgid and the WSGI servers people would otherwise pick.

Every server serves bench/app.py with 2 workers where that applies. Servers run in
alternation (A B C ... per round), workloads per server: hello world, a 64 KiB response and a
1 MiB POST under `wrk -t2 -c64`, the same POST offered at one fixed rate to every server
(`hey`: latency at equal load), a 64 KiB static file (front ends and nginx), a 1 GiB upload
and download with curl (elapsed time, peak RSS sampled every 50 ms), idle RSS, and 10,000 idle
keep-alive connections held while hello is served (front ends). CPU per request is user+sys of
the server's processes over the run divided by the requests wrk completed; the front end's
share (mongrel2, `wsgid server`, or the front end process of `wsgid --bind`) is its own column.
"Connections served" counts wrk's connections the server had sent bytes on near the end of the
hello run (from `ss`): a server that serves a few keep-alive connections and leaves the rest
in its backlog scores less than 64 and its req/s are not comparable. The isolation workload
runs hello on 63 connections while one connection keeps requesting an endpoint that sleeps
1 s, and reports the hello p99. Medians over rounds, ratios of ours to
each peer; the table goes to bench/results/ with the date, versions and commands. Run it with
bench/run.
"""
import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
import stack  # noqa: E402
from stack import Handler, Mongrel2, Wsgid, free_port, wait_for  # noqa: E402

BENCH_VENV = ROOT / ".venv-bench"
RELEASE = ROOT / "target" / "release"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- processes -------------------------------------------------------------------------

def children_of(roots):
    """Every live process in the trees rooted at `roots`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = set(), [r for r in roots if r in parents]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier.extend(p for p, parent in parents.items() if parent == pid and p not in tree)
    return tree


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / TICK


def rss_bytes(pid):
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- servers ---------------------------------------------------------------------------

class Server:
    """Something serving bench/app.py over HTTP at self.url."""
    name = "?"
    gateway_marker = None  # cmdline substring of the gateway's own processes, if separable
    serves_static = False  # /static/64k.bin from a static route
    serves_app = True
    has_front = False  # an HTTP front end process of its own, measured apart
    keeps_alive = True  # False: closes each connection after a response (wrk reconnects)

    def __init__(self, tmp):
        self.tmp = Path(tmp) / self.name
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.procs = []

    def roots(self):
        return [p.pid for p in self.procs]

    def pids(self):
        return children_of(self.roots())

    def gateway_pids(self):
        if not self.gateway_marker:
            return self.pids()
        return {p for p in self.pids() if self.gateway_marker in cmdline(p)} - self.front_pids()

    def front_pids(self):
        """The HTTP front end's processes, when it is one of its own (mongrel2, wsgid server)."""
        return set()

    def popen(self, args, **kw):
        log = open(self.tmp / "server.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def wait_ready(self):
        import requests
        wait_for(lambda: requests.get(self.url + "/", timeout=2).status_code == 200, timeout=30,
                 what=f"{self.name} to serve")

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.procs = []


class BehindMongrel2(Server):
    protocol = "tnetstring"
    ipc = False
    workers = 2
    front = "mongrel2"
    serves_static = True
    has_front = True

    def start(self):
        self.handler = Handler("/", self.protocol, ipc_chroot=(self.tmp / "m2") if self.ipc else None)
        self.m2 = Mongrel2(self.tmp / "m2", [self.handler], front=self.front, dirs={"/static/": "static/"})
        make_static(self.tmp / "m2" / "static")
        self.m2.start()
        self.url = self.m2.url
        self.start_handler()
        self.wait_ready()

    def roots(self):
        return super().roots() + [self.m2.proc.pid]

    def front_pids(self):
        return {self.m2.proc.pid}

    def stop(self):
        super().stop()
        self.m2.stop()


def make_static(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "64k.bin").write_bytes(os.urandom(64 * 1024))
    (folder / "index.html").write_text("static\n")


class Ours(BehindMongrel2):
    gateway_marker = "wsgid"

    def start_handler(self):
        folder = self.tmp / "app-folder"
        folder.mkdir(exist_ok=True)
        link = folder / "app"
        if not link.exists():
            link.symlink_to(HERE)
        self.popen([str(RELEASE / "wsgid"), "--app-path", str(folder), "--wsgi-app", "app:application",
                    "--recv", self.handler.send_spec, "--send", self.handler.recv_spec, "--workers", str(self.workers),
                    "--no-daemon", "--stdout", "--mongrel2-chroot", str(self.m2.root),
                    "--upload-temp-store", self.m2.upload_template],
                   env={**os.environ, "WSGID_LOG": "warn"})


class OursTnet(Ours):
    name = "wsgid (tnetstring)"


class OursJson(Ours):
    name = "wsgid (json)"
    protocol = "json"


class OursIpc(Ours):
    name = "wsgid (tnetstring, ipc)"
    ipc = True


class Pyzmq(BehindMongrel2):
    name = "mongrel2 + pyzmq handler"
    protocol = "json"
    gateway_marker = "pyzmq_handler"

    def start_handler(self):
        for _ in range(self.workers):
            self.popen([str(BENCH_VENV / "bin" / "python"), str(HERE / "pyzmq_handler.py"),
                        self.handler.send_spec, self.handler.recv_spec, str(self.m2.root)])


class PyzmqIpc(Pyzmq):
    name = "mongrel2 + pyzmq handler (ipc)"
    ipc = True


class FrontOurs(Ours):
    name = "wsgid server + wsgid (tnetstring)"
    front = "wsgid"


class FrontOursIpc(Ours):
    name = "wsgid server + wsgid (tnetstring, ipc)"
    front = "wsgid"
    ipc = True


class FrontPyzmq(Pyzmq):
    name = "wsgid server + pyzmq handler"
    front = "wsgid"


class OneCommand(Server):
    """`wsgid --bind`: one command, no mongrel2."""
    name = "wsgid --bind (one command)"
    gateway_marker = "wsgid"
    has_front = True

    def start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder = self.tmp / "app-folder"
        folder.mkdir(exist_ok=True)
        if not (folder / "app").exists():
            (folder / "app").symlink_to(HERE)
        self.popen([str(RELEASE / "wsgid"), "--bind", f"127.0.0.1:{self.port}", "--app-path", str(folder),
                    "--wsgi-app", "app:application", "--workers", "2", "--no-daemon", "--stdout"],
                   env={**os.environ, "WSGID_LOG": "warn"})
        self.wait_ready()

    def front_pids(self):
        return {p for p in self.pids() if cmdline(p).split(" ")[1:2] == ["front"]}


class Direct(Server):
    def start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.popen(self.command(), cwd=HERE)
        self.wait_ready()


class Gunicorn(Direct):
    name = "gunicorn (sync)"
    keeps_alive = False  # the sync worker closes after each response

    def command(self):
        return [str(BENCH_VENV / "bin" / "gunicorn"), "-w", "2", "-k", "sync", "-b", f"127.0.0.1:{self.port}",
                "--access-logfile", "/dev/null", "app:application"]


class Granian(Direct):
    name = "Granian (WSGI)"

    def command(self):
        return [str(BENCH_VENV / "bin" / "granian"), "--interface", "wsgi", "--workers", "2", "--host", "127.0.0.1",
                "--port", str(self.port), "--no-ws", "app:application"]


class Uwsgi(Direct):
    """Its workers accept connections themselves and serve one at a time: with 2 processes
    and 64 keep-alive connections, most wait in the backlog (see "connections served")."""
    name = "uWSGI (--http11-socket)"

    def command(self):
        return [str(BENCH_VENV / "bin" / "uwsgi"), "--http11-socket", f"127.0.0.1:{self.port}", "--processes", "2",
                "--wsgi-file", "app.py", "--disable-logging", "--master", "--die-on-term"]


class UwsgiHttp(Direct):
    """uWSGI behind its own HTTP router (`--http`), which serves every connection."""
    name = "uWSGI (--http router)"

    def command(self):
        return [str(BENCH_VENV / "bin" / "uwsgi"), "--http", f"127.0.0.1:{self.port}", "--processes", "2",
                "--wsgi-file", "app.py", "--disable-logging", "--master", "--die-on-term", "--http-keepalive"]


class Nginx(Direct):
    """Debian's nginx-light, 2 workers, serving the same static file (no app)."""
    name = "nginx (static)"
    serves_static = True
    serves_app = False

    def start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        make_static(self.tmp / "www" / "static")
        (self.tmp / "www" / "index.html").write_text("nginx\n")
        conf = self.tmp / "nginx.conf"
        t = f'"{self.tmp}'
        # The bench's temp dirs are private to us: the workers run as we do.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(f"""{user} worker_processes 2; daemon off; pid {t}/nginx.pid"; error_log {t}/error.log";
events {{ worker_connections 16384; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  types {{ application/octet-stream bin; text/html html; }}
  client_body_temp_path {t}"; proxy_temp_path {t}"; fastcgi_temp_path {t}";
  uwsgi_temp_path {t}"; scgi_temp_path {t}";
  server {{ listen 127.0.0.1:{self.port}; root {t}/www"; }} }}
""")
        self.popen(["nginx", "-c", str(conf)])
        self.wait_ready()


class Ceiling(Direct):
    name = "tiny Rust server (ceiling)"

    def command(self):
        return [str(RELEASE / "ceiling"), str(self.port)]


SERVERS = {"bind": OneCommand, "ours": OursTnet, "ours-json": OursJson, "pyzmq": Pyzmq, "ours-ipc": OursIpc,
           "pyzmq-ipc": PyzmqIpc, "front": FrontOurs, "front-ipc": FrontOursIpc, "front-pyzmq": FrontPyzmq,
           "gunicorn": Gunicorn, "granian": Granian, "uwsgi": Uwsgi, "uwsgi-http": UwsgiHttp, "nginx": Nginx,
           "ceiling": Ceiling}


# --- workloads -------------------------------------------------------------------------

def connections_served(port):
    """wrk's connections to `port` (accepted or still in the backlog), and how many of them the
    server has sent bytes on."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    # Each socket is a line of addresses followed by a line of details.
    details = [line for line in out.splitlines() if line.startswith(("\t", " ")) and "rtt:" in line]
    return len(details), sum(1 for line in details if "bytes_sent:" in line)


def with_cpu(server, args):
    """Runs the load command `args`: its output, and the CPU seconds the server's processes used
    meanwhile (all, the gateway's, the front end's)."""
    pids, gateway, front = server.pids(), server.gateway_pids(), server.front_pids()
    cpu0, gw0, fr0 = cpu_seconds(pids), cpu_seconds(gateway), cpu_seconds(front)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    pids |= server.pids()
    return out, (cpu_seconds(pids) - cpu0, cpu_seconds(gateway) - gw0, cpu_seconds(front) - fr0)


def per_request(server, cpu, requests):
    total, gateway, front = (seconds * 1e6 / max(requests, 1) for seconds in cpu)
    return {"cpu_us": total, "gateway_cpu_us": gateway, "front_cpu_us": front if server.front_pids() else None}


def run_wrk(server, path, seconds, script=None, connections=64):
    args = [*"wrk -t2".split(), f"-c{connections}", f"-d{seconds}s", "--latency"] + \
        (["-s", str(script)] if script else []) + [server.url + path]
    seen = {}
    sampler = threading.Timer(seconds * 0.9, lambda: seen.update(
        zip(("open", "served"), connections_served(int(server.url.rsplit(":", 1)[1])))))
    sampler.start()
    out, cpu = with_cpu(server, args)
    sampler.join()
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)] if p99 else None
    return {"rps": requests / seconds, "requests": requests, "p99_ms": p99_ms, **per_request(server, cpu, requests),
            "errors": errors + (int(non2xx.group(1)) if non2xx else 0), "command": " ".join(args),
            "served_conns": seen.get("served"), "open_conns": seen.get("open")}


def run_isolation(server, seconds):
    """Hello on 63 connections while one keep-alive connection requests /sleep (1 s) again and
    again: whether a slow request holds up others."""
    import requests
    stop, slow = threading.Event(), {"done": 0, "failed": 0}

    def sleeper():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    ok = session.get(server.url + "/sleep", timeout=30).text == "slept"
                    slow["done" if ok else "failed"] += 1
                except requests.RequestException:
                    slow["failed"] += 1
    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.2)
    try:
        hello = run_wrk(server, "/", seconds, connections=63)
    finally:
        stop.set()
        thread.join()
    return {**hello, "slow_done": slow["done"], "slow_failed": slow["failed"]}


def run_post_rate(server, seconds, rate, body, connections=64):
    """1 MiB POSTs offered at the same rate to every server (`hey -q`, per connection), below what
    each serves at most: latency compared at equal load. wrk's runs measure latency at each
    server's own saturation, where the client may be what saturates (see the README)."""
    per_connection = rate / connections
    args = ["hey", "-z", f"{seconds}s", "-c", str(connections), "-q", f"{per_connection:g}", "-m", "POST",
            "-D", str(body), "-T", "application/octet-stream", server.url + "/post"]
    out, cpu = with_cpu(server, args)
    ok = sum(int(n) for n in re.findall(r"\[2\d\d\]\s+(\d+) responses", out))
    every = sum(int(n) for n in re.findall(r"\[\d+\]\s+(\d+) responses", out))
    failed = re.search(r"Error distribution:(.*)", out, re.S)
    failed = sum(int(n) for n in re.findall(r"\[(\d+)\]", failed.group(1))) if failed else 0
    seconds_of = {q: float(v) * 1000 for q, v in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    return {"rps": ok / seconds, "offered": rate, "p50_ms": seconds_of.get("50"), "p99_ms": seconds_of.get("99"),
            **per_request(server, cpu, ok), "errors": every - ok + failed,
            "command": " ".join(args).replace(str(body), "BODY_1MIB")}


def run_upload(server, big_file):
    return peak_rss_during(server, ["curl", "-sS", "-T", str(big_file), server.url + "/stream"],
                           str(big_file.stat().st_size))


def run_download(server):
    return peak_rss_during(server, ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                                    server.url + "/download"], str(2**30))


def peak_rss_during(server, command, expected_output):
    """Runs `command` (curl), sampling the RSS of the server's processes every 50 ms."""
    samples = {"total": 0, "gateway": 0, "worker": 0, "front": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = server.pids()
            rss = {p: rss_bytes(p) for p in pids}
            samples["total"] = max(samples["total"], sum(rss.values()))
            gateway = server.gateway_pids()
            samples["gateway"] = max(samples["gateway"], sum(rss[p] for p in gateway if p in rss))
            workers = [rss[p] for p in gateway if p in rss and "worker" in cmdline(p)]
            samples["worker"] = max([samples["worker"], *workers])
            samples["front"] = max(samples["front"], sum(rss.get(p, 0) for p in server.front_pids()))
            time.sleep(0.05)
    thread = threading.Thread(target=sample)
    thread.start()
    started = time.time()
    out = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.time() - started
    done.set()
    thread.join()
    ok = out.returncode == 0 and out.stdout.strip() == expected_output
    return {"seconds": elapsed, "peak_rss_mib": samples["total"] / 2**20, "gateway_peak_rss_mib": samples["gateway"] / 2**20,
            "worker_peak_rss_mib": samples["worker"] / 2**20, "front_peak_rss_mib": samples["front"] / 2**20, "ok": ok}


def held_connections(server, count, seconds):
    """Opens `count` keep-alive connections, makes one request on each, leaves them idle, and
    serves hello under wrk meanwhile: the front end's RSS, req/s, and whether every idle
    connection is still open and answers afterwards."""
    import resource
    import selectors
    import socket
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1024)), hard))
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    front = server.front_pids()
    rss0 = sum(rss_bytes(p) for p in front) / 2**20
    socks, sel = [], selectors.DefaultSelector()
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    def round_trip(batch):
        for s in batch:
            s.sendall(request)
            sel.register(s, selectors.EVENT_READ)
        pending = set(batch)
        deadline = time.time() + 60
        while pending and time.time() < deadline:
            for key, _ in sel.select(1):
                data = key.fileobj.recv(65536)
                if data.startswith(b"HTTP/1.1 200") or not data:
                    pending.discard(key.fileobj)
                    sel.unregister(key.fileobj)
        return len(batch) - len(pending)
    answered = 0
    for i in range(0, count, 500):
        batch = [socket.create_connection((host, port)) for _ in range(min(500, count - i))]
        socks += batch
        answered += round_trip(batch)
    rss_held = sum(rss_bytes(p) for p in front) / 2**20
    hello = run_wrk(server, "/", seconds)
    again = round_trip(socks[:1000])
    for s in socks:
        s.close()
    return {"connections": count, "answered": answered, "answered_after": again, "front_rss_mib": rss_held,
            "front_rss_before_mib": rss0, "rps": hello["rps"]}


def idle_rss(server):
    time.sleep(0.5)
    return sum(rss_bytes(p) for p in server.pids()) / 2**20


# --- report ----------------------------------------------------------------------------

def versions():
    def run(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    pip = subprocess.run([str(BENCH_VENV / "bin" / "pip"), "freeze"], capture_output=True, text=True).stdout
    wanted = {"gunicorn", "granian", "uwsgi", "pyzmq"}
    return {
        "wsgid": run(str(RELEASE / "wsgid"), "-v"), "mongrel2-core": run("dpkg-query", "-W", "-f=${Version}", "mongrel2-core"),
        "libzmq": run("dpkg-query", "-W", "-f=${Version}", "libzmq5"), "wrk": run("wrk", "--version").split(" [")[0],
        "hey": run("dpkg-query", "-W", "-f=${Version}", "hey"),
        "python": platform.python_version(), "rustc": run("rustc", "--version"), "cpus": str(os.cpu_count()),
        **{line.split("==")[0]: line.split("==")[1] for line in pip.splitlines() if line.split("==")[0].lower() in wanted},
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0):
    return "–" if value is None else f"{value:,.{digits}f}"


def report(results, servers, args, stamp):
    names = [SERVERS[s].name for s in servers]
    med = {n: {} for n in names}
    rate_fields = ("rps", "p50_ms", "p99_ms", "cpu_us", "gateway_cpu_us", "front_cpu_us", "errors", "served_conns",
                   "open_conns", "slow_done", "slow_failed")
    for name in names:
        for key in ("hello", "64k", "post", "post-rate", "static", "isolation"):
            runs = [r[name][key] for r in results if key in r.get(name, {})]
            if runs:
                med[name][key] = {f: median([run.get(f) for run in runs]) for f in rate_fields}
        for key in ("upload", "download"):
            runs = [r[name][key] for r in results if key in r.get(name, {})]
            if runs:
                med[name][key] = {f: median([u.get(f) for u in runs]) for f in
                                  ("seconds", "peak_rss_mib", "gateway_peak_rss_mib", "worker_peak_rss_mib", "front_peak_rss_mib")}
                med[name][key]["ok"] = all(u["ok"] for u in runs)
        held = [r[name]["held"] for r in results if "held" in r.get(name, {})]
        if held:
            med[name]["held"] = {f: median([h[f] for h in held]) for f in held[0]}
        idles = [r[name]["idle"] for r in results if "idle" in r.get(name, {})]
        if idles:
            med[name]["idle"] = median(idles)
    lines = [f"# Benchmark {stamp}", "", f"Command: `{' '.join(['bench/run', *sys.argv[1:]])}`; "
             f"{args.rounds} rounds in alternation, wrk -t2 -c64 -d{args.seconds}s, medians.", ""]
    lines += ["| server | hello req/s | connections served | p99 ms | CPU µs/req | front end µs/req | gateway µs/req | "
              "64 KiB req/s | p99 ms | CPU µs/req | front end µs/req | POST 1 MiB req/s | p99 ms | CPU µs/req | "
              "static 64 KiB req/s | CPU µs/req | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        m = med[name]
        h, k, p, st = m.get("hello", {}), m.get("64k", {}), m.get("post", {}), m.get("static", {})
        gateway = fmt(h.get("gateway_cpu_us"), 1) if SERVERS_BY_NAME[name].gateway_marker else "–"
        errors = sum(int(x.get("errors") or 0) for x in (h, k, p, st))
        served = (f"{fmt(h.get('served_conns'))} of {fmt(h.get('open_conns'))}"
                  if h.get("open_conns") is not None else "–")
        if not SERVERS_BY_NAME[name].keeps_alive:
            served = "each closed after its response"
        elif h.get("open_conns") and (h.get("served_conns") or 0) < 64:
            served += " (not comparable)"
        lines.append(f"| {name} | {fmt(h.get('rps'))} | {served} | {fmt(h.get('p99_ms'), 1)} | {fmt(h.get('cpu_us'), 1)} | "
                     f"{fmt(h.get('front_cpu_us'), 1)} | {gateway} | {fmt(k.get('rps'))} | {fmt(k.get('p99_ms'), 1)} | "
                     f"{fmt(k.get('cpu_us'), 1)} | {fmt(k.get('front_cpu_us'), 1)} | {fmt(p.get('rps'))} | "
                     f"{fmt(p.get('p99_ms'), 1)} | {fmt(p.get('cpu_us'), 1)} | "
                     f"{fmt(st.get('rps'))} | {fmt(st.get('cpu_us'), 1)} | {errors} |")
    iso_names = [n for n in names if "isolation" in med[n]]
    if iso_names:
        lines += ["", "Isolation: hello on 63 connections while one connection keeps requesting a 1 s endpoint:", "",
                  "| server | hello req/s | hello p99 ms | connections served | slow requests done | errors |",
                  "|---|---|---|---|---|---|"]
        for name in iso_names:
            i = med[name]["isolation"]
            served = (f"{fmt(i.get('served_conns'))} of {fmt(i.get('open_conns'))}"
                      if SERVERS_BY_NAME[name].keeps_alive else "each closed after its response")
            lines.append(f"| {name} | {fmt(i.get('rps'))} | {fmt(i.get('p99_ms'), 1)} | "
                         f"{served} | {fmt(i.get('slow_done'))} | "
                         f"{fmt((i.get('errors') or 0) + (i.get('slow_failed') or 0))} |")
    rate_names = [n for n in names if "post-rate" in med[n]]
    if rate_names:
        lines += ["", f"POST 1 MiB offered at {args.post_rate:,} req/s to each server (`hey`, 64 connections), "
                  "latency at equal load:", "",
                  "| server | req/s served | p50 ms | p99 ms | CPU µs/req | errors |", "|---|---|---|---|---|---|"]
        for name in rate_names:
            pr = med[name]["post-rate"]
            short = " (fell behind)" if (pr.get("rps") or 0) < 0.95 * args.post_rate else ""
            lines.append(f"| {name} | {fmt(pr.get('rps'))}{short} | {fmt(pr.get('p50_ms'), 1)} | "
                         f"{fmt(pr.get('p99_ms'), 1)} | {fmt(pr.get('cpu_us'), 1)} | {fmt(pr.get('errors'))} |")
    lines += ["", "| server | idle RSS MiB | 1 GiB upload s | upload peak RSS MiB (all) | front end peak | wsgid worker peak | "
              "1 GiB download s | download peak RSS MiB (all) | front end peak | wsgid worker peak |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        m = med[name]
        cells = [fmt(m.get("idle"), 1)]
        for key in ("upload", "download"):
            u = m.get(key, {})
            worker = fmt(u.get("worker_peak_rss_mib"), 1) if SERVERS_BY_NAME[name].gateway_marker == "wsgid" else "–"
            front = fmt(u.get("front_peak_rss_mib"), 1) if SERVERS_BY_NAME[name].has_front else "–"
            bad = "" if u.get("ok", True) else " (failed)"
            cells += [f"{fmt(u.get('seconds'), 2)}{bad}", fmt(u.get("peak_rss_mib"), 1), front, worker]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    held_names = [n for n in names if "held" in med[n]]
    if held_names:
        lines += ["", f"Idle keep-alive connections held (one request each first), hello served under wrk meanwhile:", "",
                  "| server | connections | answered | front end RSS before MiB | front end RSS held MiB | hello req/s meanwhile | "
                  "1,000 of them answer again |", "|---|---|---|---|---|---|---|"]
        for name in held_names:
            h = med[name]["held"]
            lines.append(f"| {name} | {fmt(h['connections'])} | {fmt(h['answered'])} | {fmt(h['front_rss_before_mib'], 1)} | "
                         f"{fmt(h['front_rss_mib'], 1)} | {fmt(h['rps'])} | {fmt(h['answered_after'])} |")

    def ratio_row(a, b, keys=("hello", "64k", "post", "static")):
        cells = []
        for key in keys:
            ratios = [r[a][key]["rps"] / r[b][key]["rps"] for r in results
                      if key in r.get(a, {}) and key in r.get(b, {}) and r[b][key]["rps"]]
            cells.append(f"{median(ratios):.2f}x" if ratios else "–")
        return f"| {a} | {b} | {' | '.join(cells)} |" if set(cells) != {"–"} else None
    ours = SERVERS["ours"].name
    # ours (mongrel2 + wsgid) against the other servers; our own variants are paired below.
    own = (Ours, FrontPyzmq, OneCommand)
    pairs = [(ours, name) for name in names if ours in names and name != ours
             and SERVERS_BY_NAME[name].serves_app and not issubclass(SERVERS_BY_NAME[name], own)]
    for a, b in (("bind", "granian"), ("bind", "gunicorn"), ("bind", "uwsgi-http"), ("bind", "front-ipc"),
                 ("ours-ipc", "pyzmq-ipc"), ("front-ipc", "ours-ipc"), ("front", "ours"), ("front-pyzmq", "pyzmq"),
                 ("front-ipc", "granian"), ("front", "nginx"), ("front-ipc", "nginx")):
        if SERVERS[a].name in names and SERVERS[b].name in names:
            pairs.append((SERVERS[a].name, SERVERS[b].name))
    if pairs:
        lines += ["", "Ratios of req/s (median of per-round ratios; higher is better for the first). Behind "
                  "a front end, each pair uses the same transport (tcp:// unless marked ipc).", "",
                  "| ours | peer | hello | 64 KiB | POST 1 MiB | static 64 KiB |", "|---|---|---|---|---|---|"]
        lines += [row for row in (ratio_row(a, b) for a, b in pairs) if row]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
              "Load commands (PORT is each server's): " + "; ".join(sorted({
                  "`" + re.sub(r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:PORT", run[key]["command"]) + "`"
                  for r in results for run in r.values() if isinstance(run, dict)
                  for key in ("hello", "64k", "post", "post-rate", "static") if key in run})),
              "1 GiB upload: `curl -sS -T FILE http://127.0.0.1:PORT/stream`; 1 GiB download (a generator of "
              "64 KiB chunks): `curl -sS -o /dev/null http://127.0.0.1:PORT/download`; RSS of every server process "
              "sampled every 50 ms. wsgid runs with WSGID_LOG=warn (no access log), gunicorn with "
              "--access-logfile /dev/null, uWSGI with --disable-logging; both front ends write their access log."]
    return "\n".join(lines) + "\n", med


SERVERS_BY_NAME = {cls.name: cls for cls in SERVERS.values()}


def main():
    stack.WSGID = RELEASE / "wsgid"  # the front end too: `wsgid server`
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ", ".join(SERVERS))
    parser.add_argument("--workloads", default="hello,64k,post,post-rate,static,isolation,upload,download,idle,held")
    parser.add_argument("--post-rate", type=int, default=1280,
                        help="req/s offered by post-rate, in all (64 connections share it)")
    parser.add_argument("--held", type=int, default=10_000, help="idle keep-alive connections held")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--upload-mib", type=int, default=1024)
    args = parser.parse_args()
    servers = args.servers.split(",")
    workloads = set(args.workloads.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="wsgid-bench-"))
    big, post_body = tmp / "upload.bin", tmp / "post.bin"
    if "post-rate" in workloads:
        post_body.write_bytes(b"x" * 2**20)
    if "upload" in workloads:
        with open(big, "wb") as f:
            block = os.urandom(2**20)
            for _ in range(args.upload_mib):
                f.write(block)
    results = []
    for round_no in range(args.rounds):
        order = servers[round_no % len(servers):] + servers[:round_no % len(servers)]
        round_results = {}
        for key in order:
            server = SERVERS[key](tmp / f"r{round_no}")
            print(f"round {round_no + 1}/{args.rounds}: {server.name}", file=sys.stderr, flush=True)
            try:
                server.start()
                subprocess.run(["wrk", "-t1", "-c4", "-d1s", server.url + "/"], capture_output=True)  # warm-up
                r = {}
                app = server.serves_app
                if "idle" in workloads:
                    r["idle"] = idle_rss(server)
                if "hello" in workloads and app:
                    r["hello"] = run_wrk(server, "/", args.seconds)
                if "64k" in workloads and app:
                    r["64k"] = run_wrk(server, "/64k", args.seconds)
                if "post" in workloads and app:
                    r["post"] = run_wrk(server, "/post", args.seconds, HERE / "post.lua")
                if "post-rate" in workloads and app:
                    r["post-rate"] = run_post_rate(server, args.seconds, args.post_rate, post_body)
                if "static" in workloads and server.serves_static:
                    r["static"] = run_wrk(server, "/static/64k.bin", args.seconds)
                if "isolation" in workloads and app:
                    r["isolation"] = run_isolation(server, args.seconds)
                if "upload" in workloads and app:
                    r["upload"] = run_upload(server, big)
                if "download" in workloads and app:
                    r["download"] = run_download(server)
                if "held" in workloads and server.front_pids():
                    r["held"] = held_connections(server, args.held, args.seconds)
                round_results[server.name] = r
            finally:
                server.stop()
        results.append(round_results)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    # Two runs ending in the same minute: the second gets a suffix, not the first's name.
    minute = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    stamp, n = minute, 1
    while (out / f"{stamp}.json").exists():
        n += 1
        stamp = f"{minute}-{n}"
    text, med = report(results, servers, args, stamp)
    previous = sorted(out.glob("*.json"))
    (out / f"{stamp}.md").write_text(text)
    (out / f"{stamp}.json").write_text(json.dumps({"args": vars(args), "rounds": results, "medians": med}, indent=1))
    print(text)
    if previous:
        before = json.loads(previous[-1].read_text())["medians"]
        ours = SERVERS["ours"].name
        for key in ("hello", "64k", "post"):
            old, new = before.get(ours, {}).get(key, {}).get("rps"), med.get(ours, {}).get(key, {}).get("rps")
            if old and new:
                print(f"{ours} {key}: {new:,.0f} req/s vs {old:,.0f} in {previous[-1].name} ({new / old:.2f}x)")


if __name__ == "__main__":
    main()

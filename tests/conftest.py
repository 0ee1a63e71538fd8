"""Integration fixtures: the real mongrel2 and real wsgid processes serving real apps
(see stack.py). Every test talks HTTP to mongrel2; nothing is mocked."""
import os
import signal

import pytest

import stack as stack_module
from stack import APPS, ROOT, UPLOAD_TEMPLATE, VENV, WSGID, Handler, Mongrel2, Wsgid, free_port, wait_for  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "mongrel2_only: tests mongrel2's own behaviour (its bugs), not ours")
    config.addinivalue_line("markers", "one_front: needs no front end of the suite's, so runs once")
    config.addinivalue_line("markers", "zmq_front: needs a front end over ZeroMQ (a fake or restarted "
                            "mongrel2, its settings): not run in one-command mode")


@pytest.fixture(scope="session", params=stack_module.FRONTS, autouse=True)
def front(request):
    """The whole suite runs behind the real mongrel2, behind `wsgid server`, and with wsgid
    serving HTTP itself (`--bind`)."""
    stack_module.DEFAULT_FRONT = request.param
    return request.param


@pytest.fixture(autouse=True)
def _front_markers(request, front):
    if front != "mongrel2" and request.node.get_closest_marker("mongrel2_only"):
        pytest.skip("tests mongrel2's own behaviour")
    if front != stack_module.FRONTS[0] and request.node.get_closest_marker("one_front"):
        pytest.skip("does not depend on the front end: run once")
    if front == "bind" and request.node.get_closest_marker("zmq_front"):
        pytest.skip("needs a front end over ZeroMQ")

@pytest.fixture(scope="session")
def stack(tmp_path_factory, front):
    """One mongrel2 with five handler routes, each served by its own wsgid. In one-command
    mode each wsgid serves its own port at /, and they share one upload directory."""
    tmp = tmp_path_factory.mktemp("stack")
    bind = front == "bind"
    handlers = {
        "json": Handler("/", "json"),
        "tnet": Handler("/" if bind else "/tnet", "tnetstring"),
        "flask": Handler("/" if bind else "/flask", "tnetstring"),
        "django": Handler("/" if bind else "/django", "json"),
        "limited": Handler("/" if bind else "/limited", "tnetstring"),
    }
    m2 = Mongrel2(tmp / "m2", list(handlers.values()))
    fronts = {name: Mongrel2(tmp / "m2", [h]) if bind and name != "json" else m2 for name, h in handlers.items()}
    apps = {
        "json": (APPS["testapp"], ["--wsgi-app", "testapp:application"]),
        "tnet": (APPS["testapp"], ["--wsgi-app", "testapp.application"]),
        "flask": (APPS["flask"], ["--wsgi-app", "app:app"]),
        "django": (APPS["django"], []),
        "limited": (APPS["testapp"], ["--wsgi-app", "testapp:application", "--max-body-size", str(1024 * 1024)]),
    }
    servers = {name: Wsgid(tmp / name, handlers[name], fronts[name], source, args,
                           **({"workers": 1} if name == "limited" else {}))
               for name, (source, args) in apps.items()}
    try:
        m2.start()
        for server in servers.values():
            server.start()
        yield {"mongrel2": m2, **servers}
    finally:
        for server in servers.values():
            server.stop()
        m2.stop()


@pytest.fixture(params=["json", "tnet"])
def server(request, stack):
    """The test app behind a JSON handler and behind a tnetstring handler."""
    return stack[request.param]


@pytest.fixture
def mongrel2(stack):
    return stack["mongrel2"]


def pytest_runtest_makereport(item, call):
    """On failure, show the logs of every process the test used."""
    if call.when == "call" and call.excinfo is not None:
        servers = dict(item.funcargs.get("stack") or {})
        made = item.funcargs.get("make")
        for i, server in enumerate(getattr(made, "started", [])):
            servers[f"make-{i}"] = server
        for name, server in servers.items():
            if isinstance(server, Wsgid):
                tail = server.log()[-3000:]
                if tail:
                    print(f"\n----- wsgid [{name}] log tail -----\n{tail}")


@pytest.fixture
def make(tmp_path):
    """Starts a mongrel2 with one tnetstring handler and a wsgid for it; stops both after."""
    started = []

    def make(app="testapp", args=("--wsgi-app", "testapp:application"), start=True, content_length=20480,
             ipc=False, m2_settings=None, **kw):
        root = tmp_path / f"m2-{len(started)}"
        handler = Handler("/", "tnetstring", ipc_chroot=root if ipc else None)
        m2 = Mongrel2(root, [handler], content_length=content_length, extra_settings=m2_settings)
        m2.start()
        source = APPS.get(app, ROOT / "tests" / app)
        server = Wsgid(tmp_path / f"app-{len(started)}", handler, m2, source, list(args), **kw)
        started.append(server)
        if start:
            server.start(wait_path="/hello" if app == "testapp" else "/")
        return server
    make.started = started
    yield make
    for server in started:
        server.stop(signal.SIGQUIT if server.proc and server.proc.poll() is None else signal.SIGTERM)
        for pid in server.master_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.mongrel2.stop()

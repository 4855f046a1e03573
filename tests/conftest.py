"""Fixtures on real components: a private systemd --user manager for the session,
and a fresh sandbox (bare origin, prod clone, dev worktree, sample app units) per test.

Tests that need the user manager fail, never skip, when it cannot start."""

import compileall
import inspect
import itertools
import os
import resource
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.sandbox import REPO_ROOT, Sandbox, UserManager, signals_as_on_a_terminal  # noqa: E402
from preloaded import Preloaded  # noqa: E402

_count = itertools.count(1)


def pytest_configure(config):
    """The package and the demo compiled once, into their __pycache__: every script a test runs (some 1,400 a
    suite) imports the package, and where PYTHONDONTWRITEBYTECODE is set (as on the CI machine) Python reads
    .pyc files but writes none, so each run compiled its ~90 modules from source again: 0.12 s of CPU a run
    (0.32 s against 0.20 s for `status.py --help`), about 170 s a suite. Each xdist worker runs this too:
    compileall skips what is up to date, and writes each file atomically."""
    config.addinivalue_line("markers", "both_converted: the sandbox fixture converts prod too before the test "
                                       "(it breaks what a conversion started later would read)")
    signals_as_on_a_terminal()
    root = Path(__file__).resolve().parent.parent
    for folder in ("safedeploy", "demo"):
        compileall.compile_dir(str(root / folder), quiet=1)


@pytest.fixture(scope="session")
def user_manager(tmp_path_factory):
    manager = UserManager(tmp_path_factory.mktemp("systemd-user"))
    manager.start()         # raises: a test that needs it fails, never skips
    os.environ.update(manager.env)
    yield manager
    manager.stop()


_servers: list[Preloaded] = []          # this worker's preloaded server, once started: what its forks cost
_stopped_server_cpu = 0.0               # what it had cost when it was stopped


def server_cpu(server):
    """CPU seconds of a preloaded server and the runs it forked and reaped (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(ticks) for ticks in fields[11:15]) / os.sysconf("SC_CLK_TCK")    # utime, stime, cutime, cstime
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_seconds():
    """This worker's CPU so far, in four parts (seconds): its own (the tests' code, their writers and probes);
    its reaped children's (the scripts a test ran and what they started, a hog it killed); every user manager
    it started (each one's cgroup: the manager, the apps and all they started); and the preloaded server with
    the runs it forked and reaped. A manager or server counts live while it runs and by what it had used when
    it was stopped (UserManager.stopped_cpu, _stopped_server_cpu), which then leaves the children's part."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    managers = UserManager.stopped_cpu + sum(m.cpu() for m in UserManager.started if not m.counted)
    server = _stopped_server_cpu + sum(server_cpu(s) for s in _servers)
    reaped = children.ru_utime + children.ru_stime - UserManager.stopped_cpu - _stopped_server_cpu
    return (own.ru_utime + own.ru_stime, reaped, managers, server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With SAFEDEPLOY_TEST_CPU=FILE: one line per test appended to FILE: its CPU seconds, its wall seconds,
    the CPU's four parts (cpu_seconds: the worker, the scripts it reaped, the user managers, the preloaded
    server) and the test's id. Set-up and teardown are included, and so a module's or session's fixtures in
    its first or last test: where a suite's CPU goes (bench/suite_under_hog.py --cpu-top N). Not counted: a
    process a test leaves running for its parent to reap elsewhere (the children of a killed stress-ng)."""
    out = os.environ.get("SAFEDEPLOY_TEST_CPU")
    if not out:
        yield
        return
    cpu, wall = cpu_seconds(), time.monotonic()
    yield
    parts = [after - before for before, after in zip(cpu, cpu_seconds())]
    line = f"{sum(parts):.2f} {time.monotonic() - wall:.2f} {' '.join(f'{p:.2f}' for p in parts)} {item.nodeid}\n"
    fd = os.open(os.path.abspath(out), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def preloaded():
    """The fixtures' conversions (deploy.py --install-units) forked from a process that imported the
    package once (tests/preloaded.py): ~0.6 s of CPU less each. What a test runs itself is a new process.
    Only from a venv's python: from another, a new process would re-run itself in .venv, a forked one not."""
    global _stopped_server_cpu
    if sys.prefix == sys.base_prefix:
        yield None
        return
    server = Preloaded(sys.executable, REPO_ROOT).start()
    _servers.append(server)
    yield server
    _servers.remove(server)
    try:
        _stopped_server_cpu += server_cpu(server)
    finally:
        server.stop()


def make_sandbox(user_manager, tmp_path, converted, preloaded=None):
    sb = Sandbox(tmp_path / "host", user_manager, health_timeout=5, name=f"t{next(_count)}")
    sb.preloaded = preloaded
    sb.root.mkdir()
    sb.build()
    if converted:
        sb.convert()
    return sb


@pytest.fixture
def sandbox(user_manager, preloaded, tmp_path, request):
    """The layout users have: both envs converted to releases and socket units (as adopt.py leaves them).
    A test whose text (or parameters) never names prod gets prod converted only when it runs a script that
    may touch prod (Sandbox.convert_when_used): ~95 of ~140 tests never do, and each conversion is a
    deploy.py run of ~1 s of CPU. A test that breaks the config or the state before its first such script
    (which the conversion would then meet) is marked `both_converted`: both envs converted first."""
    sb = make_sandbox(user_manager, tmp_path, converted=False, preloaded=preloaded)
    if names_prod(request):
        sb.convert()
    else:
        sb.convert("dev")
        sb.convert_when_used("prod")
    yield sb
    sb.stop_units()


def names_prod(request):
    if request.node.get_closest_marker("both_converted"):
        return True
    text = inspect.getsource(request.function)
    params = getattr(request.node, "callspec", None)
    return any(word in text for word in ("prod", "promote")) or \
        any("prod" in str(value) for value in (params.params.values() if params else ()))


@pytest.fixture
def in_place(user_manager, tmp_path):
    """Both envs still run from their work trees (a host before conversion): for the tests about that."""
    sb = make_sandbox(user_manager, tmp_path, converted=False)
    yield sb
    sb.stop_units()


# The tests that take longest (real migrations of 15 and 40 s, rehearsed first; a rebuilt host) start
# first, so the three workers do not wait on one of them at the end: the suite's wall time is the
# longest worker's.
SLOW_FIRST = ("test_migrations.py::test_a_40_s", "test_migrations.py::test_an_additive", "test_migrations.py",
              "test_advice.py::test_a_rebuilt_host", "test_borg.py", "test_many_hosts.py::test_three_hosts")


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, key in enumerate(SLOW_FIRST) if key in item.nodeid), len(SLOW_FIRST))
    items.sort(key=rank)        # stable: the rest keep their order

"""Scripts run by the test fixtures in a process forked from one that has imported them already.

What for: the `sandbox` fixture converts dev (and often prod) with `deploy.py ENV --install-units --yes`
before each of some 500 tests. Of the ~0.9 s of CPU such a run costs here, ~0.6 s is Python importing the
package, requests and GitPython; paid once per pytest worker instead, a suite spends some 300 s less CPU.
Only the fixture's setup runs this way: every script a test is about still runs as users run it, a new
`python3 deploy.py ...` process (Sandbox.run).

How: one server per pytest worker (`python -c SERVER`, single-threaded, its modules imported) listens on a
Unix socket in a private folder. Each connection is one run: the server forks; the child reads the request
(argv, environment, working folder, output file), closes the connection, points fds 0/1/2 at /dev/null and
the output file, and runs the script as __main__ (runpy); then the child exits as a Python process does
(SystemExit's message and code masked to 8 bits, non-daemon threads joined, atexit, buffers flushed). The
server reaps its children from a SIGCHLD handler and sends each one's status, as the kernel gives it, on
that child's connection: a process the script forks cannot answer for it, and a killed child is a negative
status, an error for the caller, never a success. (Never SIG_IGN for SIGCHLD: a child would inherit it,
and Python's subprocess reads a status it cannot get then as 0.)

What a forked child does not redo: what Python reads from the environment at start-up (PYTHON* variables,
the hash seed, the locale coercion) and the venv re-exec of safedeploy/__init__.py. So a run is forked only
when the request's PYTHON*, LANG and LC_* variables are the server's (Preloaded.fits), and the fixture
preloads only from a venv python (where a new process would not re-exec either); TZ is re-read (tzset).
"""

import json
import os
import select
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER = r"""
import json, os, runpy, signal, socket, sys, time, traceback
sys.path[0] = sys.argv[1]     # not '' (the working folder), as for `python script.py`: the script's folder
import requests, git  # noqa: F401  (what the scripts import when they run)
import safedeploy.cli, safedeploy.convert, safedeploy.recovery, safedeploy.planning, safedeploy.probe  # noqa: F401
import safedeploy.rehearsal, safedeploy.replica, safedeploy.runbook, safedeploy.gitrepo  # noqa: F401

children = {}       # pid -> the connection its status goes back on


def reap(signum, frame):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))
            except OSError:
                pass
            conn.close()


def setup(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            os._exit(3)
        data += chunk
    conn.close()
    for other in children.values():
        other.close()
    req = json.loads(data)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    time.tzset()
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
    sys.stdin = open(os.devnull)


signal.signal(signal.SIGCHLD, reap)
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[2])
listener.listen(16)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})     # registered before it can be reaped
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)     # the script waits for its own children
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        try:
            listener.close()
            setup(conn)
        except BaseException:
            traceback.print_exc()
            os._exit(3)
        runpy.run_path(sys.argv[0], run_name="__main__")
        sys.exit(0)         # as the end of a script: the interpreter's own exit
    children[pid] = conn
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
"""

class Preloaded:
    """One worker's server (see the module's text); start() it, run_all() scripts, stop() it."""

    def __init__(self, python, repo_root):
        self.python, self.repo_root = str(python), str(repo_root)
        self.folder = Path(tempfile.mkdtemp(prefix="preloaded-"))       # 0700, a name of its own
        if len(str(self.folder)) > 90:          # a Unix socket's path has ~108 bytes
            os.rmdir(self.folder)
            self.folder = Path(tempfile.mkdtemp(prefix="preloaded-", dir="/tmp"))
        self.address = str(self.folder / "socket")
        self.proc = None
        self.startup = self.startup_of(os.environ)

    @staticmethod
    def startup_of(env):
        return {k: v for k, v in env.items() if k.startswith(("PYTHON", "LC_")) or k == "LANG"}

    def fits(self, python, env):
        """True when a run of python with env starts as a new process would: the server's python, and what
        Python reads at start-up the same; and the server still runs (one that died, killed by a test or by
        the kernel, leaves the fixtures to new processes, as without it)."""
        return python == self.python and self.startup_of(env) == self.startup and \
            self.proc is not None and self.proc.poll() is None

    def start(self, timeout=60):
        self.proc = subprocess.Popen([self.python, "-c", SERVER, self.repo_root, self.address],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        ready = self.proc.stdout.readline() if select.select([self.proc.stdout], [], [], timeout)[0] else ""
        if ready.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the preloaded script server did not start within {timeout} s (said {ready!r})")
        return self

    def run_all(self, runs, timeout=180):
        """[(exit code, output)] of each (argv, env, cwd) in runs, run at once, each `python argv...` as
        __main__ in a forked child (argv[0] is the script). Every run is waited for before any failure is
        raised (a run the caller gave up on would go on past its test)."""
        pending = []
        try:
            for argv, env, cwd in runs:
                fd, out = tempfile.mkstemp(dir=self.folder, suffix=".out")
                os.close(fd)
                conn = socket.socket(socket.AF_UNIX)
                pending.append((argv, conn, out))
                conn.settimeout(timeout)
                conn.connect(self.address)
                conn.sendall(json.dumps({"argv": [str(a) for a in argv], "env": dict(env), "cwd": str(cwd),
                                         "out": out}).encode() + b"\n")
            results = [self.result(argv, conn, out) for argv, conn, out in pending]
        finally:
            for _, conn, out in pending:
                conn.close()
                Path(out).unlink(missing_ok=True)
        for argv, result in zip((argv for argv, _, _ in pending), results):
            if isinstance(result, str):
                raise RuntimeError(f"{argv[0]} {result}")
        return results

    @staticmethod
    def result(argv, conn, out):
        """(exit code, output), or what went wrong as a string."""
        reply = b""
        try:
            while not reply.endswith(b"\n"):
                chunk = conn.recv(64)       # the connection's timeout bounds each wait
                if not chunk:
                    break
                reply += chunk
        except OSError as exc:
            reply = b""
            problem = f"got no exit status ({exc})"
        else:
            problem = "ended without an exit status (the server died?)"
        output = Path(out).read_text(errors="replace")
        if not reply.endswith(b"\n"):
            return f"{problem}: {output}"
        code = int(reply)
        if code < 0:
            return f"was killed by signal {-code}: {output}"
        return code, output

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc.stdout.close()
        for name in os.listdir(self.folder):
            os.unlink(self.folder / name)
        os.rmdir(self.folder)

"""Scripts run by the test fixtures in a process forked from one that has imported them already.

What for: the `sandbox` fixture converts dev (and often prod) with `deploy.py ENV --install-units --yes`
before each of some 500 tests. Of the ~0.9 s of CPU such a run costs here, ~0.6 s is Python importing the
package, requests and GitPython; paid once per pytest worker instead, a suite spends some 300 s less CPU.
Only the fixture's setup runs this way: every script a test is about still runs as users run it, a new
`python3 deploy.py ...` process (Sandbox.run).

How: one server per pytest worker (`python -c SERVER`, single-threaded, its modules imported) listens on a
Unix socket in a private folder. Each connection is one run: the server forks; the child reads the request
(argv, environment, working folder, output file), points fds 0/1/2 at /dev/null and the output file, runs
the script as __main__ (runpy) and sends its exit status back on the connection. The server reaps its children
from a SIGCHLD handler (never SIG_IGN: a child would inherit it, and Python's subprocess reads a status it
cannot get then as 0); the child puts SIGCHLD back to the default first. A child that dies without a
status (killed, or the script exec'd itself) is an error for the caller, never a success.
"""

import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER = r"""
import json, os, runpy, signal, socket, sys, traceback
sys.path[0] = sys.argv[1]     # not '' (the working folder), as for `python script.py`: the script's folder
import requests, git  # noqa: F401  (what the scripts import when they run)
import safedeploy.cli, safedeploy.convert, safedeploy.recovery, safedeploy.planning, safedeploy.probe  # noqa: F401
import safedeploy.rehearsal, safedeploy.replica, safedeploy.runbook, safedeploy.gitrepo  # noqa: F401

def serve(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            os._exit(3)
        data += chunk
    req = json.loads(data)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    sys.stdin = open(os.devnull)
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    conn.sendall(b"%d\n" % code)
    os._exit(0)

def reap(signum, frame):
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass

signal.signal(signal.SIGCHLD, reap)
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[2])
listener.listen(16)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    if os.fork() == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)     # the script waits for its own children
        listener.close()
        try:
            serve(conn)
        finally:
            os._exit(3)
    conn.close()
"""


class Preloaded:
    """One worker's server (see the module's text); start() it, run() scripts, stop() it."""

    def __init__(self, python, repo_root):
        self.python, self.repo_root = str(python), str(repo_root)
        self.folder = Path(tempfile.mkdtemp(prefix="preloaded-"))       # 0700, a name of its own
        self.address = str(self.folder / "socket")
        self.proc = None

    def start(self, timeout=60):
        self.proc = subprocess.Popen([self.python, "-c", SERVER, self.repo_root, self.address],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the preloaded script server did not start (said {ready!r})")
        return self

    def run_all(self, runs, timeout=180):
        """[(exit code, output)] of each (argv, env, cwd) in runs, run at once, each `python argv...` as
        __main__ in a forked child (argv[0] is the script)."""
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
            return [self.result(argv, conn, out) for argv, conn, out in pending]
        finally:
            for _, conn, out in pending:
                conn.close()
                Path(out).unlink(missing_ok=True)

    @staticmethod
    def result(argv, conn, out):
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(64)       # the connection's timeout bounds each wait
            if not chunk:
                break
            reply += chunk
        output = Path(out).read_text(errors="replace")
        if not reply.endswith(b"\n"):
            raise RuntimeError(f"{argv[0]} ended without an exit status (killed?): {output}")
        return int(reply), output

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for name in os.listdir(self.folder):
            os.unlink(self.folder / name)
        os.rmdir(self.folder)


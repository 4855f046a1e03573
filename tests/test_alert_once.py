"""One `status.py --alert` at a time per config (issue 29, finding 9): three runs at once (two timers, or
a slow webhook) send one alert, not three; a run that cannot get its turn says so and sends nothing."""

import http.server
import json
import subprocess
import threading
import time

from demo.sandbox import REPO_ROOT



class SlowReceiver:
    """A real webhook on 127.0.0.1 that takes `delay` seconds to answer each alert."""

    def __init__(self, delay):
        self.events = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.events.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                time.sleep(delay)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def alert_runs(sb, n):
    sb.ready_for()
    argv = [sb.python, str(REPO_ROOT / "status.py"), "--alert", "--quiet", "--config", str(sb.config)]
    procs = [subprocess.Popen(argv, env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(n)]
    return [(p.wait(120), *p.communicate()) for p in procs]


def test_three_alert_runs_at_once_send_one_alert(sandbox):
    sb = sandbox
    receiver = SlowReceiver(delay=2.0)
    try:
        sb.config.write_text(sb.config.read_text() + f'\n[alerts]\nwebhook = "{receiver.url}"\n')
        assert sb.run("backup.py", "--all").returncode == 0
        assert sb.run("status.py").returncode == 0     # both OK to begin with
        sb.stop_app("dev")                              # dev turns not OK
        results = alert_runs(sb, 3)
        assert all(code == 1 for code, _, _ in results), results     # dev is not OK: exit 1, as before
        problems = [e for e in receiver.events if e["event"] == "problem" and e["env"] == "dev"]
        assert len(problems) == 1, receiver.events
        sb.manager.systemctl("start", sb.unit("dev").replace(".service", ".socket"), check=False)
        sb.manager.systemctl("start", sb.unit("dev"))
        sb.wait_serving("dev")
        alert_runs(sb, 3)
        recovered = [e for e in receiver.events if e["event"] == "recovered" and e["env"] == "dev"]
        assert len(recovered) == 1, receiver.events
    finally:
        receiver.close()


def test_a_run_that_cannot_get_its_turn_says_so_and_sends_nothing(tmp_path):
    from safedeploy import alertlock

    class Env:
        state_dir = tmp_path / "state"

    class Config:
        envs = {"dev": Env()}

    with alertlock.one_at_a_time(Config()) as first:
        assert first
        start = time.monotonic()
        with alertlock.one_at_a_time(Config(), wait=0.5) as second:
            assert not second
        assert 0.5 <= time.monotonic() - start < 2
    with alertlock.one_at_a_time(Config(), wait=0.5) as again:
        assert again

"""The probe (safedeploy.probe): its tallying and classification as pure functions, and the thread on a
real loopback server (a refused port, a 503, a slow answer), stopped however it ends."""

import http.client
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from safedeploy import decisions, probe
from safedeploy.probe import Outcome, classify, tally


def test_the_tally_counts_refused_and_errors_and_the_longest_wait():
    outcomes = [Outcome("ok", 0.01), Outcome("refused", 0.001), Outcome("error", 2.0), Outcome("ok", 0.4123)]
    assert tally(outcomes) == {"requests": 4, "refused": 1, "errors": 1, "slowest_s": 2.0}
    assert tally([]) == {"requests": 0, "refused": 0, "errors": 0, "slowest_s": 0.0}
    assert tally([Outcome("ok", 0.41234)])["slowest_s"] == 0.412


def test_what_counts_as_refused_and_as_an_error():
    assert classify(200, None) == "ok" and classify(302, None) == "ok" and classify(404, None) == "ok"
    assert classify(500, None) == classify(503, None) == "error"
    assert classify(None, ConnectionRefusedError(111, "refused")) == "refused"
    assert classify(None, ConnectionResetError(104, "reset")) == "refused"
    assert classify(None, http.client.RemoteDisconnected("closed without an answer")) == "refused"
    assert classify(None, TimeoutError("timed out")) == "error"
    assert classify(None, socket.timeout("timed out")) == "error"
    assert classify(None, http.client.BadStatusLine("garbage")) == "error"


def test_the_summary_line_says_it_in_words():
    assert probe.describe(None) == "not measured"
    line = probe.describe({"requests": 12, "refused": 0, "errors": 2, "slowest_s": 0.41})
    assert line.startswith("12 requests ") and "none refused" in line and "2 errors" in line and "0.41 s" in line
    assert "1 request " in probe.describe({"requests": 1, "refused": 1, "errors": 0, "slowest_s": 0.0})
    assert "no errors" in probe.describe({"requests": 1, "refused": 1, "errors": 0, "slowest_s": 0.0})


class Answers(BaseHTTPRequestHandler):
    status, delay, seen = 200, 0.0, []

    def do_GET(self):
        type(self).seen.append((self.headers.get("User-Agent"), self.headers.get("X-Safe-Deploy-Probe")))
        time.sleep(type(self).delay)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_the_thread_on_a_real_server_then_a_closed_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/health"
    Answers.status, Answers.delay, Answers.seen = 503, 0.3, []
    with probe.Probe(url, interval=0.05, timeout=1.0) as p:
        time.sleep(0.8)
        Answers.status, Answers.delay = 200, 0.0
        time.sleep(0.3)
        server.shutdown()
        server.server_close()           # the port closes: the next requests are refused
        time.sleep(0.3)
    got = p.stop()
    assert got["requests"] >= 4 and got["errors"] >= 1 and got["refused"] >= 1, got
    assert 0.3 <= got["slowest_s"] < 1.0, got
    assert got["requests"] <= 1.1 / 0.05 + 2                     # one at a time, never faster than the interval
    assert set(Answers.seen) == {(probe.USER_AGENT, "1")}      # the app can tell the probe from its users
    assert not p.running and p.stop() == got                     # stopped; the same tally again


def test_stop_is_bounded_when_the_app_never_answers():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)                 # accepts into its queue and never answers: every request waits
    try:
        p = probe.Probe(f"http://127.0.0.1:{listener.getsockname()[1]}/health", interval=0.05, timeout=5.0).start()
        time.sleep(0.2)
        began = time.monotonic()
        p.stop()
        assert time.monotonic() - began < probe.STOP_WAIT + 0.5
    finally:
        listener.close()


def facts(**kw):
    return decisions.AnswerFacts(**{"unit": "app.service", "active": "active", "sub": "running", **kw})


def test_whose_answer_it_is():
    assert decisions.answer_problem(facts()) == ""
    # a counter carried over from the release being replaced: the port shown to be the unit's own, it is its answer
    assert decisions.answer_problem(facts(restarts_since_start=1, port_confirmed=True)) == ""
    # a restart since the tool's own start where /proc cannot tell whose the port is: not trusted
    assert "something else may answer" in decisions.answer_problem(facts(restarts_since_start=1))
    assert "something else answers" in decisions.answer_problem(facts(active="activating", sub="auto-restart"))
    assert "something else answers" in decisions.answer_problem(facts(port_problem="port 1 is held by pid 7"))
    # the process being replaced, still stopping, answers from the release before
    assert "still stopping" in decisions.answer_problem(facts(process_release="r1", expected_release="r2"))
    assert decisions.answer_problem(facts(process_release="r2", expected_release="r2")) == ""
    assert "not cccccccccccc" in decisions.answer_problem(facts(served_commit="b" * 40, expected_commit="c" * 40))


def test_the_probe_thread_takes_no_signal_meant_for_the_operation():
    """SIGINT, SIGTERM and SIGHUP are blocked in the probe's thread: the kernel hands them to the main thread,
    so a block the main thread defers them in (writing a record) holds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    p = probe.Probe(f"http://127.0.0.1:{listener.getsockname()[1]}/health", interval=0.05, timeout=5.0).start()
    try:
        time.sleep(0.2)
        status = open(f"/proc/self/task/{p._thread.native_id}/status").read()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            assert blocked & (1 << (sig - 1)), sig
    finally:
        p.stop()
        listener.close()

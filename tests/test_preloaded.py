"""The fixtures' preloaded script runner (tests/preloaded.py): a script run in a child forked from it sees its
own argv, environment, working folder and output, and its exit status is the script's; a child that dies
without one is an error, never a success."""

import os
import sys

import pytest

from preloaded import Preloaded

from demo.sandbox import REPO_ROOT


@pytest.fixture
def server():
    s = Preloaded(sys.executable, REPO_ROOT).start()
    yield s
    s.stop()


def test_a_script_gets_its_argv_environment_folder_and_exit_status(server, tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nprint(sys.argv[1:], os.environ.get('ONLY_HERE'), os.getcwd(), sys.path[0])\n"
                      "print('to stderr', file=sys.stderr)\nsys.exit(int(sys.argv[1]))\n")
    (code3, out3), (code0, out0) = server.run_all([([script, "3"], {"ONLY_HERE": "yes"}, tmp_path),
                                                   ([script, "0"], {}, REPO_ROOT)])
    assert (code3, code0) == (3, 0)
    assert out3 == f"['3'] yes {tmp_path} {tmp_path}\nto stderr\n"
    assert out0 == f"['0'] None {REPO_ROOT} {tmp_path}\nto stderr\n"     # imports from the script's folder


def test_the_tools_own_error_boundary_answers_as_from_a_new_process(server, tmp_path):
    [(code, out)] = server.run_all([([REPO_ROOT / "deploy.py", "dev", "--config", tmp_path / "none.toml"], {},
                                     tmp_path)])
    assert code == 2 and out.startswith("error: ") and "none.toml" in out and "Traceback" not in out


def test_a_child_killed_before_its_status_is_an_error(server, tmp_path):
    script = tmp_path / "die.py"
    script.write_text("import os, signal\nprint('dying')\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        server.run_all([([script], {}, tmp_path)])
    [(code, out)] = server.run_all([([script.with_name("ok.py")], {}, tmp_path)])   # the server still serves
    assert code == 1 and "No such file" in out       # runpy's error: a traceback and 1, as python would


def test_the_exit_is_pythons_own_message_code_threads_and_atexit(server, tmp_path):
    script = tmp_path / "ends.py"
    script.write_text("import atexit, sys, threading, time\n"
                      "atexit.register(print, 'atexit ran')\n"
                      "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
                      "sys.exit(sys.argv[1] if sys.argv[1] != '256' else 256)\n")
    (message, m), (wrapped, w) = server.run_all([([script, "fatal: the message"], {}, tmp_path),
                                                 ([script, "256"], {}, tmp_path)])
    assert (message, wrapped) == (1, 0)         # a string exits 1; 256 is 0 to the kernel
    assert m.splitlines() == ["fatal: the message", "thread done", "atexit ran"] and w.endswith("atexit ran\n")


def test_a_process_the_script_forks_cannot_answer_for_it(server, tmp_path):
    script = tmp_path / "forker.py"
    script.write_text("import os, sys, time\n"
                      "if os.fork() == 0:\n    sys.exit(0)\n"
                      "time.sleep(0.3)\nprint('parent fails')\nsys.exit(5)\n")
    [(code, out)] = server.run_all([([script], {}, tmp_path)])
    assert (code, out) == (5, "parent fails\n")


def test_a_failed_run_is_raised_only_after_the_others_ended(server, tmp_path):
    (tmp_path / "die.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(1)\nopen('done', 'w').write('yes')\n")
    with pytest.raises(RuntimeError, match="die.py was killed"):
        server.run_all([([tmp_path / "die.py"], {}, tmp_path), ([tmp_path / "slow.py"], {}, tmp_path)])
    assert (tmp_path / "done").read_text() == "yes"


def test_only_an_environment_python_starts_with_alike_is_forked(server, tmp_path):
    py = sys.executable
    assert server.fits(py, dict(os.environ)) and not server.fits(py, {**os.environ, "PYTHONHASHSEED": "1234"})
    assert not server.fits("/usr/bin/python3", dict(os.environ))     # another python: a new process
    assert server.fits(py, {**os.environ, "TZ": "Asia/Tokyo"})      # re-read by the child:
    (tmp_path / "zone.py").write_text("import time\nprint(time.strftime('%Z'))\n")
    assert server.run_all([([tmp_path / "zone.py"], {"TZ": "Asia/Tokyo"}, tmp_path)]) == [(0, "JST\n")]


def test_a_script_sees_the_exit_status_of_its_own_children(server, tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import signal, subprocess, sys\n"
                      "assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL\n"
                      "sys.exit(subprocess.run([sys.executable, '-c', 'raise SystemExit(7)']).returncode)\n")
    [(code, out)] = server.run_all([([script], {}, tmp_path)])
    assert code == 7, out


def test_a_server_that_died_fits_no_run(tmp_path):
    """The fixtures fork from the server only while it runs: one that died (killed by the kernel, by a test)
    leaves them to new processes, as without it, instead of failing every test after it."""
    server = Preloaded(sys.executable, REPO_ROOT).start()
    try:
        assert server.fits(sys.executable, dict(os.environ))
        server.proc.kill()
        server.proc.wait(timeout=30)
        assert not server.fits(sys.executable, dict(os.environ))
    finally:
        server.stop()

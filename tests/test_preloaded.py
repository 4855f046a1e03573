"""The fixtures' preloaded script runner (tests/preloaded.py): a script run in a child forked from it sees its
own argv, environment, working folder and output, and its exit status is the script's; a child that dies
without one is an error, never a success."""

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
    with pytest.raises(RuntimeError, match="without an exit status"):
        server.run_all([([script], {}, tmp_path)])
    [(code, _)] = server.run_all([([script.with_name("ok.py")], {}, tmp_path)])   # the server still serves
    assert code == 1        # no such file: runpy's error, a traceback and 1


def test_a_script_sees_the_exit_status_of_its_own_children(server, tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import signal, subprocess, sys\n"
                      "assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL\n"
                      "sys.exit(subprocess.run([sys.executable, '-c', 'raise SystemExit(7)']).returncode)\n")
    [(code, out)] = server.run_all([([script], {}, tmp_path)])
    assert code == 7, out

"""Primitives shared by deploy.py, verify.py, status.py, rollback.py, backup.py and adopt.py.

One module per concern (see docs/how-it-works.md). The package returns values or raises
DeployError; scripts decide what to print.

The one exception is here, the interpreter. The tool installs its requirements (requests,
GitPython; tomli on Python 3.10) into a venv beside the scripts, `.venv/`, because Debian 12,
Ubuntu 23.04 and later refuse `pip install` into the system python (PEP 668). So that the
command an operator types, `python3 deploy.py dev`, and every command the tool prints work with
the system python (cron's PATH is /usr/bin:/bin), a script started by a python that is not in a
venv re-runs itself with `.venv/bin/python` when that venv exists. A python that is in a venv
is used as it is: the operator chose it. And a python that lacks the requirements and has no
tool venv to go to says, in one line, the command that installs them on this host, and exits 2
(a usage error: the setup).
"""

import importlib.util
import os
import shlex
import sys
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
TOOL_VENV = SCRIPTS_DIR / ".venv"
REEXEC_MARK = "SAFE_DEPLOY_REEXEC"      # set for the re-run: never twice (a venv python that does not look like one)
REQUIRED = {"requests": "requests", "git": "GitPython", **({"tomli": "tomli"} if sys.version_info < (3, 11) else {})}


def in_a_venv():
    return sys.prefix != sys.base_prefix


def tool_python():
    """The tool venv's python, or None when there is none."""
    path = TOOL_VENV / "bin" / "python"
    return path if os.access(path, os.X_OK) else None


def install_command(executable=None):
    """The shell line that installs the requirements for this host's python (a venv beside the scripts;
    the venv module first where Debian and Ubuntu ship python without it)."""
    executable = executable or sys.executable
    requirements = shlex.quote(str(SCRIPTS_DIR / "requirements.txt"))
    if in_a_venv():
        return f"{shlex.quote(executable)} -m pip install -r {requirements}"
    venv = shlex.quote(str(TOOL_VENV))
    line = f"{shlex.quote(executable)} -m venv {venv} && {venv}/bin/pip install -r {requirements}"
    if importlib.util.find_spec("ensurepip") is None:     # Debian and Ubuntu: the venv module is python3-venv
        line = f"{'' if os.geteuid() == 0 else 'sudo '}apt-get install -y python3-venv && {line}"
    return line


def _script_run():
    """Whether this process runs one of the scripts (not a test or a bench importing the package)."""
    try:
        return Path(sys.argv[0]).resolve().parent == SCRIPTS_DIR and sys.argv[0].endswith(".py")
    except (IndexError, OSError):
        return False


def _bootstrap():
    rerun = os.environ.pop(REEXEC_MARK, None)
    venv_python = tool_python()
    if not rerun and not in_a_venv() and venv_python and _script_run():
        os.environ[REEXEC_MARK] = "1"
        os.execv(venv_python, [str(venv_python), *sys.argv])
    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing and _script_run():      # an import from elsewhere (a test, a bench) gets the plain ImportError
        print(f"error: {Path(sys.argv[0]).name} needs {', '.join(missing)}, which {sys.executable} does not have; "
              f"install them with: {install_command()}", file=sys.stderr)
        sys.exit(2)


_bootstrap()

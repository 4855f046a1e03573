"""Primitives shared by deploy.py, verify.py, status.py, rollback.py, backup.py and adopt.py.

One module per concern (see docs/how-it-works.md). The package returns values or raises
DeployError; scripts decide what to print.

The one exception is here, the interpreter. The tool installs its requirements (requests,
GitPython; tomli on Python 3.10) into a venv beside the scripts, `.venv/`, because Debian 12,
Ubuntu 23.04 and later refuse `pip install` into the system python (PEP 668). So that the
command an operator types, `python3 deploy.py dev`, and every command the tool prints work with
the system python (cron's PATH is /usr/bin:/bin), a script started by any python but the tool
venv's own re-runs itself with `.venv/bin/python` when that venv works: another venv that is
active in the operator's shell (the app's) is not the tool's, and is never installed into (a venv
that holds the requirements, named on purpose, runs as it is). A
python that lacks the requirements and has no working tool venv to go to says, in one line, the
command that makes the tool venv on this host (`-m venv --clear` where a broken one is in the way,
its interpreter removed by an upgrade), and exits 2 (a usage error: the setup).
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


def in_tool_venv():
    """Whether this python is the tool venv's own (not an app's venv that happens to be active)."""
    try:
        return in_a_venv() and Path(sys.prefix).resolve() == TOOL_VENV.resolve()
    except OSError:
        return False


def tool_python():
    """The tool venv's python, or None when there is none (or its interpreter is gone: a dangling link
    left by an upgrade of the system python)."""
    path = TOOL_VENV / "bin" / "python"
    return path if os.access(path, os.X_OK) else None


def base_python():
    """The system python this one comes from (outside any venv): the one that makes the tool venv."""
    if not in_a_venv():
        return sys.executable
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return "python3"


def install_command(executable=None):
    """The shell line that installs the requirements for this host's python: into the tool venv beside the
    scripts, never into another venv that is active (an app's); the venv made anew (--clear) where a
    broken one is in the way; the venv module first where Debian and Ubuntu ship python without it."""
    requirements = shlex.quote(str(SCRIPTS_DIR / "requirements.txt"))
    if in_tool_venv():
        return f"{shlex.quote(executable or sys.executable)} -m pip install -r {requirements}"
    venv = shlex.quote(str(TOOL_VENV))
    clear = " --clear" if os.path.lexists(TOOL_VENV) else ""
    line = f"{shlex.quote(executable or base_python())} -m venv{clear} {venv} && {venv}/bin/pip install -r {requirements}"
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
    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    # the system python goes to the tool venv; so does any other venv's python that lacks the requirements
    # (an app's venv active in the shell); one that has them was chosen on purpose and runs as it is
    if not rerun and not in_tool_venv() and venv_python and _script_run() and (missing or not in_a_venv()):
        os.environ[REEXEC_MARK] = "1"
        os.execv(venv_python, [str(venv_python), *sys.argv])
    if missing and _script_run():      # an import from elsewhere (a test, a bench) gets the plain ImportError
        print(f"error: {Path(sys.argv[0]).name} needs {', '.join(missing)}, which {sys.executable} does not have; "
              f"install them with: {install_command()}", file=sys.stderr)
        sys.exit(2)


_bootstrap()

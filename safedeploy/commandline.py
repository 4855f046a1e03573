"""The commands an operator pastes: the scripts, named with the interpreter that runs them when pasted
under cron's PATH, and --config when the config was named. Pure text; nothing here prints."""

import os
import shlex
import shutil
import sys
from pathlib import Path

from . import SCRIPTS_DIR, TOOL_VENV, in_a_venv
from . import config as configmod


def python_word():
    """How a pasted command names the interpreter: `python3` where the system python3 (cron's PATH is
    /usr/bin:/bin) runs the scripts as this process does (it re-runs itself in the tool's venv, see
    safedeploy/__init__.py), else this interpreter's full path (a venv the operator chose)."""
    if Path(sys.prefix).resolve() == TOOL_VENV.resolve():
        return "python3"
    system = shutil.which("python3", path="/usr/bin:/bin")
    if not in_a_venv() and system and Path(system).resolve() == Path(sys.executable).resolve():
        return "python3"
    return sys.executable


def script_command(config, script, *args):
    """The exact command line to run one of the scripts against this config."""
    return command_line(script, *args, config_file=config.file if config is not None and config.explicit else None)


def command_line(script, *args, config_file=None):
    """script (a file beside the scripts) with args, and --config config_file when one is named and the
    lookup (no --config, no other $DEPLOY_CONFIG) would not find it."""
    words = [python_word(), str(SCRIPTS_DIR / script), *args]
    if config_file is not None and not found_without_naming(Path(config_file).absolute()):
        words += ["--config", str(config_file)]
    return shlex.join(words)


def found_without_naming(file: Path) -> bool:
    """Whether a command without --config loads file: the file the lookup ends at (your own, or the one
    beside the scripts), and no $DEPLOY_CONFIG naming another."""
    named = os.environ.get("DEPLOY_CONFIG")
    if named and Path(named).absolute() != file:
        return False
    return file == configmod.default_config_file().absolute()


"""Primitives shared by deploy.py, verify.py, status.py, rollback.py and backup.py.

One module per concern (see the README's Files section). The package returns values or raises
DeployError; scripts decide what to print.

The one exception is here: a script started with a python3 that lacks the requirements
(requests, GitPython) would die in an import with a traceback; instead it says, in one line,
what is missing and the command that installs it, and exits 2 (a usage error: the setup).
"""

import importlib.util
import sys
from pathlib import Path

_REQUIRED = {"requests": "requests", "git": "GitPython"}
_missing = [package for module, package in _REQUIRED.items() if importlib.util.find_spec(module) is None]
if _missing:
    _requirements = Path(__file__).resolve().parent.parent / "requirements.txt"
    print(f"error: {Path(sys.argv[0]).name} needs {', '.join(_missing)}, which {sys.executable} does not have: "
          f"run {sys.executable} -m pip install -r {_requirements}", file=sys.stderr)
    sys.exit(2)

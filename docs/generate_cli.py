#!/usr/bin/env python3
"""Write docs/cli.md, the flags reference, from the scripts' own --help (so the page cannot drift).

    python3 docs/generate_cli.py            # rewrite docs/cli.md (make docs)
    python3 docs/generate_cli.py --check    # exit 1 when docs/cli.md is not what the scripts print now

Each script runs with --help in a subprocess of this python, with COLUMNS=100 so that argparse wraps
the same way on every terminal. tests/test_docs.py compares the committed page with render().
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "cli.md"
SCRIPTS = ["deploy.py", "verify.py", "status.py", "rollback.py", "backup.py", "adopt.py"]

HEADER = """\
# Flags reference

Generated from the scripts' own `--help` by `docs/generate_cli.py` (`make docs`); do not edit by
hand, a test compares this page with what the scripts print.

Every script takes `--config FILE` and `--help`. Where a command would ask (an env with
`promote_from`: type its name), it needs `--yes` when standard input is not a terminal, and says
so. Exit codes: [how-it-works.md](how-it-works.md#exit-codes). The "seed" in adopt.py's help is
the first user's host; its "safe migration plan" is the runbook this tool implements: back up
everything, tag git, test in dev first, promote to prod only when verified, roll back at any time.

{index}
"""


def help_text(script, python=None):
    """What `python3 SCRIPT --help` prints, at 100 columns."""
    env = dict(os.environ, COLUMNS="100", NO_COLOR="1", PYTHON_COLORS="0")
    proc = subprocess.run([python or sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} --help exited {proc.returncode}: {proc.stderr.strip()}")
    # Python 3.10's argparse says "optional arguments:", 3.11 and later "options:"
    return proc.stdout.replace("\noptional arguments:\n", "\noptions:\n").rstrip() + "\n"


def anchor(script):
    return script.replace(".", "")


def render(python=None):
    index = "\n".join(f"- [{s}](#{anchor(s)})" for s in SCRIPTS)
    parts = [HEADER.format(index=index)]
    for script in SCRIPTS:
        parts.append(f"## {script}\n\n```text\n{help_text(script, python)}```\n")
    return "\n".join(parts)


def main():
    p = argparse.ArgumentParser(description="Write docs/cli.md from the scripts' --help.")
    p.add_argument("--check", action="store_true", help="exit 1 when docs/cli.md differs; write nothing")
    args = p.parse_args()
    text = render()
    if args.check:
        same = PAGE.exists() and PAGE.read_text() == text
        print(f"{PAGE} is {'up to date' if same else 'out of date: run make docs'}")
        return 0 if same else 1
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

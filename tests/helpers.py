"""Small helpers for the tests: listings of folders, one-line error checks."""

import json
import os
from pathlib import Path


def listing(*folders):
    """Every file under the folders with its size and mtime, to prove nothing changed."""
    result = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                p = Path(root) / name
                st = p.stat()
                result[str(p)] = (st.st_size, st.st_mtime_ns)
    return result


def one_line_error(proc):
    """The process failed with one clear line on stderr and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def log_records(sandbox, env):
    path = sandbox.root / "state" / f"{env}.deploys.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]

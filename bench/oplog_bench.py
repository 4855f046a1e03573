#!/usr/bin/env python3
"""Benchmark: what keeping a command's whole output in the operation's log costs a build.

A command that writes LINES lines (about 100 bytes each, like pip's) runs through commands.run_one,
first with no operation log open, then with one (each line stamped, redacted, written). Prints the
seconds of each, the overhead, and the log's size. The goal: under 20% on a build that only writes.

    python3 bench/oplog_bench.py [--lines 200000] [--rounds 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safedeploy import commands, oplog, redaction  # noqa: E402


class Env:
    def __init__(self, state_dir):
        self.name, self.state_dir = "bench", state_dir


def timed(argv):
    start = time.monotonic()
    assert commands.run_one(argv, None, 600) is None
    return time.monotonic() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    redaction.register(["a-registered-secret-value-12345", "another-secret-XYZ987"])   # redact() has work to do
    line = "Collecting example-package==1.2.3 (from -r requirements.txt (line 7)) " + "x" * 30
    argv = [sys.executable, "-c", f"import sys\nfor i in range({args.lines}): print({line!r}, i)"]
    with tempfile.TemporaryDirectory() as state:
        for n in range(1, args.rounds + 1):
            bare = timed(argv)
            oplog.open_logs([Env(state)], "bench")
            logged = timed(argv)
            path = oplog.current().path
            oplog.close_all(0)
            size = Path(path).stat().st_size
            print(f"round {n}: {args.lines} lines: no log {bare:.2f}s, logged {logged:.2f}s "
                  f"(+{(logged - bare) / bare * 100:.0f}%), log {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: what clients see during a deploy whose pre_restart migrates the schema, on a flaskr-like
app under gunicorn (2 workers), converted to releases and socket units, with a prober sending GET / at
a steady rate. For each migration shape: requests, answered 200, 503 (all with Retry-After), other 5xx,
failed (refused, reset or timed out) and the slowest answer.

- additive: a new column, then --additive seconds of work: online, the old release serves throughout;
- rename, not rehearsed, migration_mode = "online": what every request between the migration and the
  switch got before the rehearsal checked the running release (old code on the new schema);
- rename, rehearsed: the rehearsal finds it breaking, the old release stops first, requests queue;
- long rename (--long seconds, rehearsed): past 30 s, the tool's listener answers 503 with Retry-After.

    python3 bench/migration_bench.py [--rate 40] [--additive 15] [--long 40]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo import flaskr  # noqa: E402
from demo.load import Load, shapes  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402


def host(root, manager, name, extra=""):
    sb = Sandbox(root / name, manager, health_timeout=30, name=name)
    sb.root.mkdir()
    sb.build()
    flaskr.set_up(sb, extra=extra)
    return sb


def deploy(sb, rate, rehearse):
    if rehearse:
        proc = sb.run("deploy.py", "dev", "--rehearse", timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    load = Load(sb.url("dev", "/"), rate=rate, timeout=60).start()
    time.sleep(1.0)
    start = time.monotonic()
    proc = sb.run("deploy.py", "dev", timeout=600)
    seconds = time.monotonic() - start
    time.sleep(1.0)
    seen = shapes(load.stop())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return seconds, seen


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=40)
    p.add_argument("--additive", type=float, default=15.0)
    p.add_argument("--rename", type=float, default=5.0)
    p.add_argument("--long", type=float, default=40.0)
    args = p.parse_args()
    cases = [
        (f"additive {args.additive:g}s", "", flaskr.release_files(2, "body", f"additive {args.additive}"), False),
        (f"rename {args.rename:g}s online", 'migration_mode = "online"\n',
         flaskr.release_files(2, "content", f"rename {args.rename}"), False),
        (f"rename {args.rename:g}s rehearsed", "", flaskr.release_files(2, "content", f"rename {args.rename}"), True),
        (f"rename {args.long:g}s rehearsed", "", flaskr.release_files(2, "content", f"rename {args.long}"), True),
    ]
    rows = []
    with scratch_host("migration-bench-") as (root, manager):
        for i, (what, extra, files, rehearse) in enumerate(cases):
            sb = host(root, manager, f"m{i}", extra)
            sb.release("dev", files, what)
            seconds, seen = deploy(sb, args.rate, rehearse)
            rows.append((what, seconds, seen))
            sb.stop_units()
    print(f"flaskr under gunicorn (2 workers), releases + socket units, GET / at {args.rate}/s during the deploy")
    print(f"{'migration':<24} {'deploy s':>8} {'requests':>8} {'200':>5} {'503':>5} {'5xx':>5} {'failed':>6} "
          f"{'slowest s':>9}")
    for what, seconds, s in rows:
        print(f"{what:<24} {seconds:8.1f} {s['requests']:8} {s['ok']:5} {s['503']:5} {s['5xx']:5} {s['failed']:6} "
              f"{s['slowest']:9.2f}")
    print("503s without Retry-After: " + str(sum(s["503 without Retry-After"] for _, _, s in rows)))


if __name__ == "__main__":
    main()

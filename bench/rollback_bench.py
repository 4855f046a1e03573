#!/usr/bin/env python3
"""Benchmark: rollback.py ENV --yes, from the command to healthy, split into steps,
next to the app's own bare restart (systemctl --user restart + first healthy answer)
measured in the same run, on a sandbox with the sample app.

    python3 bench/rollback_bench.py [--rounds 5] [--startup 1.0]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.sandbox import Sandbox, scratch_host  # noqa: E402


def bare_restart(sb, env):
    start = time.monotonic()
    sb.manager.systemctl("restart", sb.unit(env))
    return time.monotonic() - start + sb.wait_serving(env, 30, interval=0.005)


def deploy(sb):
    proc = sb.run("deploy.py", "dev")
    if proc.returncode != 0:
        raise SystemExit(f"deploy failed: {proc.stderr}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--startup", type=float, default=0.0, help="seconds the sample app takes to start")
    args = p.parse_args()
    with scratch_host("rollback-bench-") as (root, manager):
        sb = Sandbox(root / "host", manager, health_timeout=30, name="bench")
        sb.root.mkdir()
        sb.build()
        mode = f"slow {args.startup}\n" if args.startup else "ok\n"
        if args.startup:
            sb.release("dev", {"MODE": mode}, "startup time")
            deploy(sb)
        bare, code_only, with_db, steps = [], [], [], {}
        for i in range(args.rounds):
            sb.release("dev", {"VERSION": f"{i + 2}\n", "MODE": mode}, f"release {i}")
            deploy(sb)
            bare.append(bare_restart(sb, "dev"))
            for flag, bucket in (("--code-only", code_only), ("--with-db", with_db)):
                start = time.monotonic()
                proc = sb.run("rollback.py", "dev", "--yes", flag)
                bucket.append(time.monotonic() - start)
                assert proc.returncode == 0, proc.stderr
                record = [json.loads(line) for line in (sb.root / "state" / "dev.deploys.jsonl").read_text().splitlines()][-1]
                for name, secs in record["steps"].items():
                    steps.setdefault((flag, name), []).append(secs)
                if flag == "--code-only":          # go forward again for the --with-db round
                    sb.release("dev", {"VERSION": f"{i + 2}b\n", "MODE": mode}, f"release {i}b")
                    deploy(sb)
        sb.stop_units()
    med = statistics.median
    print(f"sample app start-up {args.startup:.1f}s, {args.rounds} rounds, medians:")
    print(f"  bare restart to healthy (systemctl restart + polling every 5 ms): {med(bare):.3f}s")
    print(f"  rollback.py --code-only, command to exit (healthy): {med(code_only):.3f}s "
          f"(+{med(code_only) - med(bare):.3f}s over the bare restart)")
    print(f"  rollback.py --with-db,   command to exit (healthy): {med(with_db):.3f}s "
          f"(+{med(with_db) - med(bare):.3f}s)")
    for flag in ("--code-only", "--with-db"):
        parts = ", ".join(f"{name} {med(v):.3f}" for (f, name), v in steps.items() if f == flag)
        print(f"  steps {flag}: {parts}")


if __name__ == "__main__":
    main()

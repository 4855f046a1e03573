#!/usr/bin/env python3
"""Benchmark: how long `deploy.py ENV --rehearse` takes on the sample app, by database size
(the copy of the live database dominates), with its stages from the rehearsals log.

    python3 bench/rehearsal_bench.py [--sizes 100,1000]   # MB
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.data_rollback_bench import fill  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000", help="database sizes in MB")
    args = p.parse_args()
    with scratch_host("rehearsal-bench-") as (root, manager):
        rows = []
        for mb in (int(x) for x in args.sizes.split(",")):
            sb = Sandbox(root / f"db{mb}", manager, health_timeout=30, name=f"rh{mb}")
            sb.root.mkdir()
            sb.build()
            fill(sb.db_path("dev"), mb)
            sb.release("dev", {"VERSION": "2\n"}, "v2")
            start = time.monotonic()
            proc = sb.run("deploy.py", "dev", "--rehearse", timeout=900)
            took = time.monotonic() - start
            assert proc.returncode == 0, proc.stdout + proc.stderr
            record = json.loads((sb.root / "state" / "dev.deploys.jsonl").read_text().splitlines()[-1])
            rows.append((mb, took, record["steps"]))
            sb.stop_units()
            shutil.rmtree(sb.root, ignore_errors=True)
    print("deploy.py dev --rehearse, sample app (command to exit; stages):")
    for mb, took, steps in rows:
        print(f"  {mb:>5} MB: {took:.2f}s  " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))


if __name__ == "__main__":
    main()

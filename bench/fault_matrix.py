#!/usr/bin/env python3
"""The fault matrix: deploy, rollback and backup killed at every step by every signal, on a
sandbox with the sample app and a writer posting notes. For each cell: recovered (the env
serves a known commit, integrity_check ok, no temp files or journal left), writes lost (acknowledged
notes found neither in the live database nor in any backup), seconds from the next command to
healthy. Uses the test-only switch SAFE_DEPLOY_FAULT=OP:STEP:SIGNAL.

    python3 bench/fault_matrix.py                      # every op, step and signal (about 5 minutes)
    python3 bench/fault_matrix.py --signals KILL --ops deploy
    python3 bench/fault_matrix.py --releases           # on an env converted to releases (adds build, ...)
"""

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.faults import RELEASE_STEPS, STEPS, run_cell  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="deploy,rollback,backup")
    p.add_argument("--signals", default="KILL,TERM,INT,HUP")
    p.add_argument("--releases", action="store_true", help="convert the env to releases first")
    args = p.parse_args()
    steps = {**STEPS, **RELEASE_STEPS} if args.releases else STEPS
    with scratch_host("fault-matrix-") as (root, manager):
        cells = []
        n = 0
        for op in args.ops.split(","):
            for step in steps[op]:
                for sig in args.signals.split(","):
                    n += 1
                    sb = Sandbox(root / f"cell{n}", manager, health_timeout=5, name=f"fm{n}")
                    sb.root.mkdir()
                    sb.build()
                    try:
                        cell = run_cell(sb, op, step, sig, releases=args.releases)
                    finally:
                        sb.stop_units()
                        shutil.rmtree(sb.root, ignore_errors=True)
                    cells.append(cell)
                    print(f"{op:<9} {step:<12} {sig:<5} {'yes' if cell.recovered else 'NO':<10} "
                          f"{cell.writes_lost:>11} {cell.seconds_to_healthy:>17.2f}  {'; '.join(cell.problems)}",
                          flush=True)
    ok = sum(c.recovered for c in cells)
    lost = sum(c.writes_lost for c in cells)
    worst = max((c.seconds_to_healthy for c in cells), default=0)
    print(f"\ntotal: {len(cells)} cells, {ok} recovered, {len(cells) - ok} not; {lost} writes lost; "
          f"slowest back to healthy {worst:.2f}s")
    print(f"matrix: {ok} passed, {len(cells) - ok} failed")
    return 0 if ok == len(cells) and lost == 0 else 1


if __name__ == "__main__":
    print(f"{'operation':<9} {'step':<12} {'sig':<5} {'recovered':<10} {'writes lost':>11} "
          f"{'s to healthy':>17}")
    sys.exit(main())

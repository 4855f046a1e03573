#!/usr/bin/env python3
"""The fault matrix: deploy, rollback, backup and rehearsal killed at every step the runner takes, by
every signal, on a sandbox with the sample app and a writer posting notes. The steps are generated
from the runbook's own lists (demo.faults.cell_steps); first each operation runs once unfaulted and
the steps it recorded must be those (a step added to an operation is faulted without being listed
anywhere). For each cell: recovered (the env serves a known commit, integrity_check ok, no temp file,
journal, transient unit or scratch folder left), writes lost (acknowledged notes found neither in the
live database nor in any backup), seconds from the next command to healthy. Uses the test-only switch
SAFE_DEPLOY_FAULT=OP:STEP:SIGNAL. Two cells run at once (2 cores).

    python3 bench/fault_matrix.py                       # releases and in place, every op, step and signal
    python3 bench/fault_matrix.py --signals KILL --ops deploy --layouts releases
"""

import argparse
import itertools
import json
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.faults import OPS, Cell, cell_steps, prepare, run_cell  # noqa: E402
from demo.sandbox import Sandbox, scratch_host, signals_as_on_a_terminal  # noqa: E402

COUNTER = itertools.count(1)
PRINT = threading.Lock()


def sandbox(root, manager):
    n = next(COUNTER)
    sb = Sandbox(root / f"cell{n}", manager, health_timeout=5, name=f"fm{n}")
    sb.root.mkdir()
    sb.build()
    return sb


def recorded_steps(root, manager, op, releases):
    """The steps op records when it runs unfaulted in a cell's configuration."""
    sb = sandbox(root, manager)
    try:
        prepare(sb, releases=releases, watch=True)
        if op == "deploy":
            sb.release("dev", {"VERSION": "3\n"}, "v3")
            proc = sb.run("deploy.py", "dev")
        elif op == "rollback":
            proc = sb.run("rollback.py", "dev", "--yes", "--with-db")
        else:
            sb.release("dev", {"VERSION": "3\n"}, "v3")
            proc = sb.run("deploy.py", "dev", "--rehearse")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        log = [json.loads(line) for line in (sb.root / "state" / "dev.deploys.jsonl").read_text().splitlines()]
        return list(log[-1]["steps"])
    finally:
        sb.stop_units()
        shutil.rmtree(sb.root, ignore_errors=True)


def one(root, manager, layout, op, step, sig):
    sb = sandbox(root, manager)
    try:
        cell = run_cell(sb, op, step, sig, releases=layout == "releases")
    except Exception as exc:            # a cell that cannot even run is a failed cell, not a crashed matrix
        cell = Cell(op, step, sig, problems=[f"{type(exc).__name__}: {exc}"])
    finally:
        sb.stop_units()
        shutil.rmtree(sb.root, ignore_errors=True)
    with PRINT:
        print(f"{layout:<8} {op:<9} {step:<12} {sig:<5} {'yes' if cell.recovered else 'NO':<10} "
              f"{cell.writes_lost:>11} {cell.seconds_to_healthy:>12.2f}  {'; '.join(cell.problems)}", flush=True)
    return cell


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--signals", default="KILL,TERM,INT,HUP")
    p.add_argument("--layouts", default="releases,in-place")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    signals_as_on_a_terminal()          # the INT cells send SIGINT: it must not be ignored from the start
    ops, layouts = args.ops.split(","), args.layouts.split(",")
    with scratch_host("fault-matrix-") as (root, manager):
        drift = []
        for layout, op in itertools.product(layouts, ops):
            if op == "backup" or (op == "rehearse" and layout == "in-place"):
                continue
            seen, expected = recorded_steps(root, manager, op, layout == "releases"), cell_steps(op, layout == "releases")
            if seen != expected:
                drift.append(f"{layout} {op}: the run recorded {seen}, the matrix would fault {expected}")
        for line in drift:
            print(f"DRIFT {line}", flush=True)
        cells = [(layout, op, step, sig) for layout in layouts for op in ops
                 if not (layout == "in-place" and op in ("backup", "rehearse"))      # the same on both layouts
                 for step in cell_steps(op, layout == "releases") for sig in args.signals.split(",")]
        print(f"{'layout':<8} {'operation':<9} {'step':<12} {'sig':<5} {'recovered':<10} {'writes lost':>11} "
              f"{'s to healthy':>12}", flush=True)
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(lambda c: one(root, manager, *c), cells))
    ok = sum(c.recovered for c in results)
    lost = sum(c.writes_lost for c in results)
    worst = max((c.seconds_to_healthy for c in results), default=0)
    print(f"\ntotal: {len(results)} cells ({', '.join(layouts)}), {ok} recovered, {len(results) - ok} not; "
          f"{lost} writes lost; slowest back to healthy {worst:.2f}s; {len(drift)} step list(s) drifted")
    print(f"matrix: {ok} passed, {len(results) - ok} failed")
    return 0 if ok == len(results) and lost == 0 and not drift else 1


if __name__ == "__main__":
    sys.exit(main())

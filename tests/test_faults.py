"""Fault injection against the real user manager and the sample app with a writer running, on the
layout users have (an env converted to releases): deploy, rollback, backup and rehearsal killed
(SIGKILL) at every step the runner takes, the steps read from the runbook's own lists
(demo.faults.cell_steps), and SIGTERM, SIGINT and SIGHUP at the steps where they matter. After each,
the next command recovers; the env serves a known commit, the database passes integrity_check, no
acknowledged write is missing from the live database plus the backups, and nothing is left half done.
The full matrix, every step with every signal on both layouts, is bench/fault_matrix.py, which CI runs
after the suite (.ci/run) and which fails CI on a cell not recovered, a write lost or a step list that
drifted; so the suite keeps one cell of each kind it has (a deploy killed at its switch, a rollback killed
while its data moves, a rehearsal stopped by TERM, an env still in place) and the cells only it has (the
handover helper). That cut 19 cells, about 200 s of the suite's test time (issue 32, item 7).
(The switch: SAFE_DEPLOY_FAULT.)"""

import pytest

from demo.faults import cell_steps, run_cell

# one cell of each kind; every step with every signal is bench/fault_matrix.py's (CI)
KILLS = [("deploy", "switch", "KILL"), ("rollback", "database", "KILL")]
SIGNALS = [("rehearse", "health", "TERM")]
assert all(step in cell_steps(op) for op, step, _ in KILLS + SIGNALS)     # a renamed step fails here, not quietly


@pytest.mark.parametrize("op, step, sig", KILLS + SIGNALS, ids=[":".join(c) for c in KILLS + SIGNALS])
def test_fault_on_releases(sandbox, op, step, sig):
    cell = run_cell(sandbox, op, step, sig)
    assert cell.recovered, cell.problems
    assert cell.writes_lost == 0


IN_PLACE = [("rollback", "code")]


@pytest.mark.parametrize("op, step", IN_PLACE, ids=[":".join(c) for c in IN_PLACE])
def test_fault_in_place(in_place, op, step):
    """An env that still runs from its work tree (not converted): the steps only it has, killed."""
    assert step in cell_steps(op, releases=False)
    cell = run_cell(in_place, op, step, "KILL", releases=False)
    assert cell.recovered, cell.problems
    assert cell.writes_lost == 0


@pytest.mark.parametrize("op, fault_at", [("deploy", "restart:handover"), ("deploy", "deploy:health"),
                                          ("rollback", "rollback:restart"), ("rollback", "restart:held")])
def test_fault_with_the_handover_helper(sandbox, op, fault_at):
    """Killed in the middle of a handover (or just before): the next command recovers, one slot serves.
    (The rollback here restores the database, so it restarts from stopped, without the helper; restart:held
    kills it with the app started and the socket still activating the holder.)"""
    cell = run_cell(sandbox, op, fault_at.split(":")[1], "KILL", handover=True, fault_at=fault_at)
    assert cell.recovered, cell.problems
    helper = sandbox.unit("dev").replace(".service", "-handover.service")
    active = [u for u in (sandbox.unit("dev"), helper)
              if sandbox.manager.systemctl("is-active", u, check=False).stdout.strip() == "active"]
    assert len(active) == 1, active         # one slot serves; never both after the recovery

"""Fault injection against the real user manager and the sample app with a writer running:
deploy, rollback and backup killed (SIGKILL) at every step, and SIGTERM, SIGINT and SIGHUP at
the steps where they matter. After each, the next command recovers; the env serves a known
commit, the database passes integrity_check, no acknowledged write is missing from the live
database plus the backups, and nothing is left half done. (The switch: SAFE_DEPLOY_FAULT.)"""

import pytest

from demo.faults import STEPS, run_cell

KILLS = [(op, step, "KILL") for op, steps in STEPS.items() for step in steps]
SIGNALS = [("deploy", "switch", "TERM"), ("deploy", "health", "TERM"), ("deploy", "pre_restart", "INT"),
           ("deploy", "restart", "HUP"), ("deploy", "backup", "INT"), ("rollback", "database", "TERM"),
           ("rollback", "restart", "INT"), ("backup", "copy", "TERM")]


@pytest.mark.parametrize("op, step, sig", KILLS + SIGNALS, ids=[":".join(c) for c in KILLS + SIGNALS])
def test_fault(sandbox, op, step, sig):
    cell = run_cell(sandbox, op, step, sig)
    assert cell.recovered, cell.problems
    assert cell.writes_lost == 0


@pytest.mark.parametrize("op, fault_at", [("deploy", "restart:handover"), ("deploy", "deploy:health"),
                                          ("rollback", "rollback:restart")])
def test_fault_with_the_handover_helper(sandbox, op, fault_at):
    """Killed in the middle of a handover (or just before): the next command recovers, one slot serves.
    (The rollback here restores the database, so it restarts from stopped, without the helper.)"""
    cell = run_cell(sandbox, op, fault_at.split(":")[1], "KILL", handover=True, fault_at=fault_at)
    assert cell.recovered, cell.problems
    helper = sandbox.unit("dev").replace(".service", "-handover.service")
    active = [u for u in (sandbox.unit("dev"), helper)
              if sandbox.manager.systemctl("is-active", u, check=False).stdout.strip() == "active"]
    assert len(active) == 1, active         # one slot serves; never both after the recovery


RELEASE_CELLS = [("deploy", "build"), ("deploy", "switch"), ("deploy", "pre_restart"), ("rollback", "prepare"),
                 ("rollback", "save"), ("rollback", "code"), ("rollback", "database"), ("rollback", "seal")]


@pytest.mark.parametrize("op, step", RELEASE_CELLS, ids=[":".join(c) for c in RELEASE_CELLS])
def test_fault_on_releases(sandbox, op, step):
    """The steps a converted env adds (build, the switch of `current`, the prepared restore and the
    sealing of the renamed save), killed: the next command recovers and no acknowledged write is lost."""
    cell = run_cell(sandbox, op, step, "KILL", releases=True)
    assert cell.recovered, cell.problems
    assert cell.writes_lost == 0

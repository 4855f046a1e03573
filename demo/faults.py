"""Fault injection: kill deploy, rollback, backup and rehearsal at a chosen step, then check the env.

Driven by the test-only switch SAFE_DEPLOY_FAULT=OP:STEP:SIGNAL (safedeploy.state): the process
sends itself SIGNAL as it enters STEP. Used by tests/test_faults.py and bench/fault_matrix.py.
While the operation runs, a writer posts notes to the app; afterwards every acknowledged note must
be in the live database or in a backup (or a database moved aside by a restore), nothing may be
left half done (no temp file, journal, transient unit or scratch folder), and the env must serve a
known commit.

The cells are generated from the runbook's own lists (cell_steps): the steps the runner takes for
the cell's configuration, so a step added to an operation is faulted without anyone listing it here.
bench/fault_matrix.py also runs each operation once unfaulted and checks that the steps it recorded
are those.
"""

import glob
import os
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import requests

from demo.sandbox import REPO_ROOT
from safedeploy import rehearsal, runbook, runner, unitfiles

OPS = ("deploy", "rollback", "backup", "rehearse")
BACKUP_STEPS = ["copy", "verify", "publish"]        # backups.backup_database's clock


def cell_steps(op, releases=True):
    """The steps the runner takes for op in a matrix cell's configuration (prepare(): pre_restart that
    changes the schema, watch for the watch cell, a database restored by the rollback), in order:
    runner.planned() over the runbook's own list, on a stand-in of the run's context."""
    from types import SimpleNamespace as NS
    env = NS(pre_restart=[["migrate"]], watch=2, db=NS(exists=lambda: True), converted=releases, rehearse_paths=[])
    if op == "deploy":
        plan = NS(converted=releases, migration_mode="online", target="0" * 40)
        return [s.name for s in runner.planned(runbook.deploy_operation(), runbook.DeployRun(None, env, plan))]
    if op == "rollback":
        ctx = runbook.RollbackRun(None, env, None, NS(commit="0" * 40), True, "", "", unit_action="keep",
                                  watch_seconds=2)
        return [s.name for s in runner.planned(runbook.rollback_operation(), ctx)]
    if op == "rehearse":
        ctx = rehearsal.Run(env=env, repo=None, commit="", scratch=None,
                            record=NS(schema_changes=["+ table t"], running_commit="1" * 40))
        return [s.name for s in runner.planned(rehearsal.REHEARSAL_OPERATION, ctx)]
    return list(BACKUP_STEPS)


MIGRATION = ("import pathlib, sqlite3; v = pathlib.Path('VERSION').read_text().strip(); "
             "sqlite3.connect('instance/app.db').execute(f'CREATE TABLE IF NOT EXISTS t{v} (x)')")


class NoteWriter(threading.Thread):
    """Posts notes to the env's app as fast as a client would; remembers the acknowledged ids."""

    def __init__(self, url, pause=0.01, timeout=2.0):
        """timeout: how long a client waits for an answer (a stop-first deploy holds requests in the socket's
        queue for the length of the migration and the start: a client that waits longer sees none fail)."""
        super().__init__(daemon=True)
        self.url, self.pause, self.timeout = url, pause, timeout
        self.acked, self.failed = set(), 0
        self.halt = threading.Event()

    def run(self):
        n = 0
        while not self.halt.is_set():
            n += 1
            try:
                r = requests.post(self.url, data=f"note {n}", timeout=self.timeout)
                if r.status_code == 201:
                    self.acked.add(r.json()["id"])
                else:
                    self.failed += 1
            except requests.RequestException:
                self.failed += 1
            time.sleep(self.pause)

    def stop(self):
        self.halt.set()
        self.join(timeout=10)


@dataclass
class Cell:
    op: str
    step: str
    signal: str
    recovered: bool = False
    writes_lost: int = 0
    seconds_to_healthy: float = 0.0
    problems: list = field(default_factory=list)


def note_ids(path):
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return {r[0] for r in conn.execute("SELECT id FROM notes")}
        finally:
            conn.close()
    except sqlite3.Error:
        return set()


def everywhere(sb, env):
    """Note ids in the live database, every backup, and every database a restore moved aside."""
    ids = set()
    db = sb.db_path(env)
    paths = [db]
    paths += glob.glob(str(sb.root / "backups" / env / "*.sqlite3"))
    paths += [p for p in glob.glob(f"{db}.rolled-back-*") if not p.endswith(("-wal", "-shm"))]
    for p in paths:
        ids |= note_ids(p)
    return ids


def leftovers(sb, env):
    found = glob.glob(str(sb.root / "backups" / env / ".*tmp-*"))
    found += glob.glob(str(sb.root / "backups" / env / ".rehearsal-*"))
    found += glob.glob(str(sb.root / "backups" / env / ".drill-*"))
    active = sb.manager.systemctl("list-units", "--no-legend", "--plain", f"{sb.unit(env).removesuffix('.service')}-*",
                                  check=False).stdout
    found += [line.split()[0] for line in active.splitlines() if "-rehearsal-" in line and " active " in line]
    found += glob.glob(str(sb.db_path(env).parent / ".app.db.restore-*"))
    found += [p for p in glob.glob(f"{sb.path(env)}.releases/releases/*") if not os.path.exists(f"{p}/REVISION")]
    found += glob.glob(str(sb.root / "state" / ".*tmp-*"))
    found += glob.glob(str(sb.root / "state" / f"{env}.*journal.json"))
    found += [str(p) for p in unitfiles.port_holder_files(sb.unit(env)) if p.exists()]     # the socket held
    return found


def wait_healthy(sb, env, timeout=30):
    try:
        return sb.wait_serving(env, timeout, interval=0.02)
    except RuntimeError:
        return None


def prepare(sb, handover=False, releases=True, watch=False):
    """dev at v2 with a before-deploy point and a pre_restart that adds a table (a migration: the schema
    changes with every version, so a rollback restores the database); returns the commits.
    handover: the socket units with the handover helper are installed first.
    releases: dev is converted to releases first (with a quick build command); False: in place."""
    extra = f'pre_restart = [["{sys.executable}", "-c", "{MIGRATION}"]]'
    if watch:               # the watch step runs only when the env has one
        extra += "\nwatch = 2"
    if releases:
        extra += f'\nbuild = [["{sys.executable}", "-c", "open(\'BUILT\', \'w\').close()"]]'
    sb.write_config(dev=extra)
    if handover or releases:
        args = ["--notify"] if handover else []
        proc = sb.run("deploy.py", "dev", "--install-units", "--yes", *args)
        assert proc.returncode == 0, proc.stderr
    v1 = sb.head("dev")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    return {v1: "1", sb.head("dev"): "2"}


def run_cell(sb, op, step, sig, handover=False, fault_at=None, releases=True):
    """One cell of the matrix on a fresh sandbox (fault_at: another OP:STEP for the switch)."""
    cell = Cell(op, step, sig)
    known = prepare(sb, handover, releases, watch=step == "watch")
    writer = NoteWriter(sb.url("dev", "/notes"))
    writer.start()
    time.sleep(0.3)
    fault = {"SAFE_DEPLOY_FAULT": f"{fault_at or f'{op}:{step}'}:{sig}"}
    if op == "deploy":
        known[sb.release("dev", {"VERSION": "3\n"}, "v3")] = "3"
        proc = run(sb, fault, "deploy.py", "dev")
    elif op == "rollback":
        proc = run(sb, fault, "rollback.py", "dev", "--yes", "--with-db")
    elif op == "rehearse":
        sb.release("dev", {"VERSION": "3\n"}, "v3 (rehearsed only)")
        proc = run(sb, fault, "deploy.py", "dev", "--rehearse")
    else:
        proc = run(sb, fault, "backup.py", "dev")
    start = time.monotonic()
    if sig == "KILL" and op != "backup":
        status = sb.run("status.py", "dev")
        if "INTERRUPTED" not in status.stdout or status.returncode != 1:
            cell.problems.append(f"status.py did not show the interrupted operation with exit 1 (exit {status.returncode})")
    if op == "backup":
        follow = sb.run("backup.py", "dev")
    elif op == "rollback":          # a finished rollback marks v2 bad: deploying it again takes --force
        follow = sb.run("deploy.py", "dev", "--force", "--reason", "after the fault")
    elif op == "rehearse":          # the next command cleans up after it; there is nothing to deploy
        follow = sb.run("deploy.py", "dev", "--ref", sb.head("dev"))
    else:
        follow = sb.run("deploy.py", "dev")
    if follow.returncode != 0:
        cell.problems.append(f"the next command exited {follow.returncode}: {follow.stderr.strip()[-300:]}")
    if sig == "KILL" and op != "backup" and "recovering:" not in follow.stdout:
        cell.problems.append("the next command did not say it recovered")
    healthy = wait_healthy(sb, "dev")
    cell.seconds_to_healthy = round(time.monotonic() - start, 2) if healthy is not None else float("nan")
    time.sleep(0.2)
    writer.stop()
    check_env(sb, cell, known, writer)
    if proc.returncode not in (-9, 0, 1):
        cell.problems.append(f"the interrupted command exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    cell.recovered = not cell.problems
    return cell


def run(sb, extra_env, *args):
    sb.ready_for(*args[1:])
    argv = [sys.executable, str(REPO_ROOT / args[0]), *args[1:], "--config", str(sb.config)]
    return subprocess.run(argv, env={**sb.env, **extra_env}, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def check_env(sb, cell, known, writer):
    head = sb.head("dev")
    if head not in known:
        cell.problems.append(f"the work tree is at an unknown commit {head[:12]}")
    try:
        served = requests.get(sb.url("dev", "/"), timeout=3).json()["version"]
        if known.get(head) != served:
            cell.problems.append(f"serves version {served}, work tree at {known.get(head)}")
    except (requests.RequestException, ValueError, KeyError) as exc:
        cell.problems.append(f"not serving: {exc}")
    conn = sqlite3.connect(f"file:{sb.db_path('dev')}?mode=ro", uri=True)
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    if verdict != "ok":
        cell.problems.append(f"integrity_check: {verdict}")
    lost = writer.acked - everywhere(sb, "dev")
    cell.writes_lost = len(lost)
    if lost:
        cell.problems.append(f"{len(lost)} acknowledged writes are nowhere: {sorted(lost)[:5]}")
    if not writer.acked:
        cell.problems.append("the writer got no write through")
    left = leftovers(sb, "dev")
    if left:
        cell.problems.append(f"left behind: {left}")

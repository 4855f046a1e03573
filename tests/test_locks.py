"""Locks that say who holds them (issue 29, finding 3): a lock held by something other than the tool is
named (pid, command line, since when) from the kernel's view, never taken for a backup; status still
reports everything else about the env; a wait says that it waits, for whom, and how long at most."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from demo.sandbox import REPO_ROOT
from helpers import one_line_error


def corrupt(db):
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(db, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xff" * 4096)


def outside_flock(path):
    """`flock FILE sleep 120`, as an operator (or another script) holds a lock: returns the process once
    the lock is held. `-o`: flock holds it, not its sleep, so that let_go(proc) lets go of it."""
    proc = subprocess.Popen(["flock", "-o", str(path), "sleep", "120"], stdin=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(100):
        if f" {proc.pid} " in open("/proc/locks").read():
            return proc
        time.sleep(0.05)
    let_go(proc)
    raise RuntimeError("flock did not take the lock")


def let_go(proc):
    """Stop an outside_flock, its sleep as well."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_an_outside_holder_is_named_and_hides_nothing(sandbox):
    sb = sandbox
    sb.manager.systemctl("stop", sb.unit("prod"))
    corrupt(sb.db_path("prod"))
    sb.manager.systemctl("start", sb.unit("prod"))
    lock = sb.root / "state" / "prod.lock"
    lock.parent.mkdir(exist_ok=True, mode=0o700)
    lock.touch(mode=0o600)
    holder = outside_flock(lock)
    try:
        status = sb.run("status.py", "prod")
        assert status.returncode == 1
        assert f"pid {holder.pid}" in status.stdout and "flock" in status.stdout, status.stdout
        assert "not a safe-deploy operation" in status.stdout
        assert "fails quick_check" in status.stdout, status.stdout      # the lock hides nothing
        start = time.monotonic()
        proc = sb.run("rollback.py", "prod", "--yes", timeout=60)
        took = time.monotonic() - start
        assert proc.returncode == 3, proc.stderr
        line = one_line_error(proc)
        assert f"pid {holder.pid}" in line and "sleep 120" in line
        assert took < 20, took                                           # not taken for a backup: no 300 s wait
    finally:
        let_go(holder)


def test_a_wait_says_for_whom_and_how_long(tmp_path):
    from safedeploy.errors import DeployError
    from safedeploy.state import EnvLock

    ready, done = threading.Event(), threading.Event()

    def hold():
        with EnvLock(tmp_path, "dev", "backup (nightly)"):
            ready.set()
            done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    ready.wait(5)
    told = []
    threading.Timer(0.8, done.set).start()
    with EnvLock(tmp_path, "dev", "deploy", backup_wait=30, on_wait=told.append):
        pass
    t.join()
    assert len(told) == 1, told
    assert "waiting for a backup of dev" in told[0] and f"pid {os.getpid()}" in told[0] and "up to 30s" in told[0]
    # an unknown holder (an outside flock) is not waited for as a backup: exit 3 at once, named
    lock = tmp_path / "dev.lock"
    holder = outside_flock(lock)
    try:
        start = time.monotonic()
        try:
            with EnvLock(tmp_path, "dev", "deploy", backup_wait=30, on_wait=told.append):
                raise AssertionError("took a held lock")
        except DeployError as exc:
            assert exc.code == 3 and f"pid {holder.pid}" in str(exc) and "flock" in str(exc)
        assert time.monotonic() - start < 2
        told.clear()
        try:
            with EnvLock(tmp_path, "dev", "deploy", wait=0.6, on_wait=told.append):
                raise AssertionError("took a held lock")
        except DeployError:
            pass
        assert len(told) == 1 and f"pid {holder.pid}" in told[0] and "up to 0.6s" in told[0]
    finally:
        let_go(holder)


def test_a_lock_let_go_while_its_holder_is_looked_up_is_taken(tmp_path, monkeypatch):
    """CI at stop 45: a backup let go of dev's lock between a deploy's try and its look at /proc/locks; the
    deploy saw no holder, said "a process this host does not show" and exit 3 (status would have said to
    wait for it). The lock is tried again after each look. The holder here is a real flock on a second open
    of the file, let go at the moment the other looks it up: before its name is read (no holder seen), and
    between its name and the kernel's list (a rollback named, gone); a holder never seen is still named."""
    from safedeploy import holders
    from safedeploy.errors import DeployError
    from safedeploy.state import EnvLock, UNSEEN_RETRIES, lock_holder

    real_identify, real_kernel = holders.identify, holders.kernel_holders
    holder = EnvLock(tmp_path, "dev", "backup (manual)", wait=5)

    def let_go_then(real):
        def look(path):
            holder.__exit__(None, None, None)
            return real(path)
        return look

    try:
        for name, real in (("identify", real_identify), ("kernel_holders", real_kernel)):
            for operation in ("backup (manual)", "rollback"):
                holder.operation = operation
                holder.__enter__()
                monkeypatch.setattr(holders, name, let_go_then(real))
                with EnvLock(tmp_path, "dev", "deploy", backup_wait=30) as deploy:
                    assert json.loads((tmp_path / "dev.lock").read_text())["operation"] == "deploy", deploy
                holder.__enter__()
                assert lock_holder(tmp_path, "dev") is None     # status: free, not a holder gone
                monkeypatch.undo()

        looks = []

        def never_seen(path):
            looks.append(path)
            return holders.Holder(None, "", "", "", False)

        holder.__enter__()
        monkeypatch.setattr(holders, "identify", never_seen)
        start = time.monotonic()
        try:
            with EnvLock(tmp_path, "dev", "deploy", backup_wait=30):
                raise AssertionError("took a held lock")
        except DeployError as exc:
            assert exc.code == 3 and "does not show" in str(exc)
        assert len(looks) == UNSEEN_RETRIES + 1 and time.monotonic() - start < 2
    finally:
        holder.__exit__(None, None, None)


def test_a_status_look_at_the_lock_is_looked_at_again_then_named_as_ours(tmp_path):
    """status.py takes the lock shared for an instant to see whether it is free: a deploy starting in that
    instant looked it up and said "pid N (... status.py), not a safe-deploy operation", exit 3. One of the
    tool's scripts that has not written its name is passing: looked at again (it lets go at once), and only
    if it does not, named as the tool's (here a status.py that keeps holding it), also when the lock file
    still has the name of a holder that was killed."""
    from safedeploy import holders
    from safedeploy.errors import DeployError
    from safedeploy.state import EnvLock, UNSEEN_RETRIES

    lock = tmp_path / "dev.lock"
    lock.touch(mode=0o600)
    tool = tmp_path / "checkout"                # a checkout of the tool: its scripts beside its package
    (tool / "safedeploy").mkdir(parents=True)
    (tool / "safedeploy" / "__init__.py").touch()
    script = tool / "status.py"
    script.write_text("import fcntl, sys, time\nfd = open(sys.argv[1])\nfcntl.flock(fd, fcntl.LOCK_SH)\n"
                      "print('held', flush=True)\ntime.sleep(60)\n")
    looker = subprocess.Popen([sys.executable, "-u", str(script), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert looker.stdout.readline() == "held\n"
        for left in ("", json.dumps({"pid": 999999999, "operation": "deploy", "command": "deploy.py dev"})):
            lock.write_text(left)       # "": as the tool leaves it; a name left by a deploy killed with -9
            seen = holders.identify(lock)
            assert seen.pid == looker.pid and seen.ours and seen.passing and not seen.is_backup, seen
            start = time.monotonic()
            try:
                with EnvLock(tmp_path, "dev", "deploy", backup_wait=30):
                    raise AssertionError("took a held lock")
            except DeployError as exc:
                assert exc.code == 3 and f"safe-deploy's status.py by pid {looker.pid}" in str(exc), exc
                assert "not a safe-deploy operation" not in str(exc)
            assert UNSEEN_RETRIES * 0.01 <= time.monotonic() - start < 5
    finally:
        looker.kill()
        looker.wait()


def test_our_scripts_are_known_by_their_command_line_whatever_the_interpreter_options(tmp_path):
    """One of the tool's script names, in a folder with the tool's package beside it: the real checkout here,
    by its full path or from its folder, whatever the interpreter's options. The same name elsewhere (an
    operator's own backup.py) is not the tool's."""
    from safedeploy.holders import our_script

    tool = str(REPO_ROOT)
    assert our_script(["/usr/bin/python3", f"{tool}/backup.py", "prod", "--quiet"], None) == "backup.py"
    assert our_script(["python3", "-u", "backup.py", "dev"], REPO_ROOT) == "backup.py"
    assert our_script(["python3", "-X", "dev", "-W", "ignore", f"{tool}/deploy.py", "prod"], tmp_path) == "deploy.py"
    assert our_script(["python3", "-u", "backup.py", "dev"], None) == ""            # cwd not readable: not known
    assert our_script(["python3", "-u", "backup.py", "dev"], tmp_path) == ""        # an operator's own backup.py
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "backup.py").symlink_to(REPO_ROOT / "backup.py")           # the tool's, through a link
    assert our_script(["python3", str(tmp_path / "bin" / "backup.py"), "dev"], None) == "backup.py"
    assert our_script(["python3", "bin/backup.py", "dev"], tmp_path) == "backup.py"
    assert our_script(["/usr/bin/python3", "/srv/app/backup.py", "prod"], None) == ""
    assert our_script(["python3", "-c", "import x", f"{tool}/backup.py"], None) == ""
    assert our_script(["python3", "/srv/other.py", f"{tool}/backup.py"], None) == ""
    assert our_script(["flock", "state/prod.lock", "sleep", "120"], None) == ""
    assert our_script([], None) == ""


def test_an_operators_own_backup_py_holding_the_lock_is_not_waited_for_as_a_backup(tmp_path):
    """A deploy waits up to backup_wait for the tool's backup, and for nothing else. An operator's own
    script that happens to be called backup.py (a cron job's, in its own folder) holding the env's lock is
    an unknown holder: exit 3 at once, named, never a wait of minutes."""
    from safedeploy import holders
    from safedeploy.errors import DeployError
    from safedeploy.state import EnvLock

    lock = tmp_path / "dev.lock"
    lock.touch(mode=0o600)
    theirs = tmp_path / "cron"
    theirs.mkdir()
    (theirs / "backup.py").write_text("import fcntl, sys, time\nfd = open(sys.argv[1])\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                                      "print('held', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-u", "backup.py", str(lock)], cwd=theirs, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        seen = holders.identify(lock)
        assert seen.pid == proc.pid and not seen.ours and not seen.is_backup, seen
        start = time.monotonic()
        try:
            with EnvLock(tmp_path, "dev", "deploy", backup_wait=30):
                raise AssertionError("took a held lock")
        except DeployError as exc:
            assert exc.code == 3 and f"pid {proc.pid}" in str(exc) and "not a safe-deploy operation" in str(exc), exc
        assert time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait()


def test_status_in_the_middle_of_a_rollback_says_wait_with_no_false_cause_and_no_command(sandbox):
    """Status looked at dev while a rollback held its lock (stop 45, an operator's session): it said "an
    operation was interrupted between the switch and the restart" (it was not: still running), that the
    rollback's tag had no mark (the rollback records it last), and gave a deploy command. The rollback here
    is killed as it enters its restart, and its lock held again as it would be under way."""
    from safedeploy.state import EnvLock

    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    argv = [sb.python, str(REPO_ROOT / "rollback.py"), "dev", "--yes", "--config", str(sb.config)]
    killed = subprocess.run(argv, env={**sb.env, "SAFE_DEPLOY_FAULT": "rollback:restart:KILL"}, capture_output=True,
                            text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert killed.returncode != 0
    with EnvLock(sb.root / "state", "dev", "rollback"):
        status = sb.run("status.py", "dev")
    assert status.returncode == 1 and "holds dev's lock" in status.stdout, status.stdout
    for said in ("interrupted between the switch", "holds no mark", "do 1."):
        assert said not in status.stdout, status.stdout
    after = sb.run("status.py", "dev")          # let go: the killed rollback is said, with what to run
    assert after.returncode == 1 and "do 1." in after.stdout, after.stdout


def frozen_at(sb, script, *args, step):
    """script run until it enters step, then stopped there (SAFE_DEPLOY_FAULT=OP:STEP:STOP): an operation under
    way, held still. Returns the process; os.kill(proc.pid, SIGCONT) lets it go on."""
    op = script.removesuffix(".py")
    argv = [sb.python, str(REPO_ROOT / script), *args, "--config", str(sb.config)]
    proc = subprocess.Popen(argv, env={**sb.env, "SAFE_DEPLOY_FAULT": f"{op}:{step}:STOP"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T":
            return proc
        time.sleep(0.02)
    raise AssertionError(f"{script} did not reach {step}: {proc.communicate()[0] if proc.poll() is not None else ''}")


def test_status_in_the_middle_of_a_rollback_with_its_database_states_no_false_cause(sandbox, monkeypatch):
    """A rollback with the database, held still at its database step (stop 46, a helper's attack): its app is
    stopped, its socket held for the holder, the live database renamed aside, its tag made and its mark not yet
    written. Status said "did not finish", "the database is missing", "a release that was rolled back", and a
    status whose one read of the lock came just before the rollback took it gave `do 1.` commands (a restore, a
    rollback) or read the backup's journal as interrupted. Now: wait, what is so, no cause that is not, and no
    command; a look that an operation started during is taken again."""
    from safedeploy import config, report

    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    cfg = config.load(str(sb.config))
    env = cfg.envs["dev"]
    before = report.settled(env)                # what a status read just before the rollback took the lock
    proc = frozen_at(sb, "rollback.py", "dev", "--with-db", "--yes", step="database")
    try:
        status = sb.run("status.py", "dev")
        shown = json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]
        calls = []
        real = report.settled
        monkeypatch.setattr(report, "settled", lambda e: before if not calls.append(e) and len(calls) == 1 else real(e))
        raced = report.look_at(cfg, env)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out
    assert status.returncode == 1 and "holds dev's lock" in status.stdout, status.stdout
    assert "is not in place now: the operation under way may be replacing it" in status.stdout, status.stdout
    assert "while the operation under way has the app stopped" in status.stdout, status.stdout
    for said in ("did not finish", "is missing", "a release that was rolled back", "holds no mark", "interrupted",
                 "do 1."):
        assert said not in status.stdout, status.stdout
    assert shown["lock"] and shown["advice"] == [] and shown["interrupted"] is None, shown
    assert len(calls) >= 2 and raced.lock and raced.advice == [] and raced.interrupted is None, raced
    assert not any("is missing" in p or "was rolled back" in p for p in raced.problems), raced.problems
    after = sb.run("status.py", "dev")
    assert "holds dev's lock" not in after.stdout and "is not in place" not in after.stdout, after.stdout


def test_a_lost_mark_is_still_said_while_a_backup_holds_the_lock(sandbox):
    """Only a deploy, a rollback or a conversion holding the lock makes a tag without its mark that operation's
    middle. While a backup holds it (minutes, with an off-site push), a mark really lost (here: the bad log
    emptied after a rollback) is said as ever, with no command while the lock is held."""
    from safedeploy import config
    from safedeploy.marks import bad_log
    from safedeploy.state import EnvLock

    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.run("rollback.py", "dev", "--yes").returncode == 0
    bad_log(config.load(str(sb.config)).envs["dev"]).path.write_text("")
    with EnvLock(sb.root / "state", "dev", "backup (nightly)"):
        status = sb.run("status.py", "dev")
    assert "holds dev's lock" in status.stdout and "holds no mark" in status.stdout, status.stdout
    assert "do 1." not in status.stdout, status.stdout

"""Every operation keeps its full output (issue 32, item 5), and status.py --metrics (item 6)."""

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from demo.sandbox import REPO_ROOT
from safedeploy import metrics, oplog
from test_offsite import receiver  # noqa: F401 (a fixture)


SECRET = "hunter2-not-for-logs-93kd"
FAILING_BUILD = [[sys.executable, "-c",
                  "import os, sys; print('the build says: wheel 7f3a not found'); "
                  "print('password is', os.environ.get('DEPLOY_TEST_PASSWORD'), file=sys.stderr); sys.exit(1)"]]


def status_json(sb, *args):
    proc = sb.run("status.py", *args, "--json")
    return json.loads(proc.stdout)["envs"]


def test_a_failed_deploy_names_its_full_output_in_its_message_status_and_alert(sandbox, receiver):  # noqa: F811
    sb = sandbox
    sb.write_config(dev=f"build = {json.dumps(FAILING_BUILD)}")
    sb.config.write_text(sb.config.read_text() + f'\n[alerts]\nwebhook = "{receiver.url}"\n')
    sb.release("dev", {"NEWS": "a change\n"}, "a change")
    # a secret-named variable in the tool's environment, which the build inherits: never in a log
    proc = subprocess.run([sb.python, str(REPO_ROOT / "deploy.py"), "dev", "--yes", "--config", str(sb.config)],
                          env={**sb.env, "DEPLOY_TEST_PASSWORD": SECRET}, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    found = re.search(r"\(full output: (\S+)\)$", error)
    assert found, proc.stderr
    log = Path(found.group(1))
    assert log.parent == sb.root / "state" / "logs" and re.match(r"dev-\d{8}-\d{6}-deploy\.log$", log.name)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    text = log.read_text()
    assert "| the build says: wheel 7f3a not found" in text            # the command's stdout
    assert "| password is <redacted>" in text and SECRET not in text    # its stderr, the secret hidden
    assert error.removeprefix("error: ") in text                        # the tool's own lines
    assert '# end {"result": "failed", "code": 1' in text

    envs = status_json(sb)
    assert envs["dev"]["log"] == str(log)
    assert envs["dev"]["last_operation"]["result"] == "failed"
    assert envs["prod"]["log"] is None
    shown = sb.run("status.py", "dev").stdout
    assert f"its full output: {log}" in shown

    sent = [e for e in receiver.events if e["event"] == "deploy-failed"]
    assert len(sent) == 1, receiver.events
    assert sent[0]["log"] == str(log)
    assert any("the build says: wheel 7f3a not found" in line for line in sent[0]["log_tail"])
    assert not any(SECRET in line for line in sent[0]["log_tail"])

    # fixed: the next deploy goes live, and its log says so; the failed one is still the last failed
    sb.write_config()
    sb.config.write_text(sb.config.read_text() + f'\n[alerts]\nwebhook = "{receiver.url}"\n')
    assert sb.run("deploy.py", "dev", "--yes").returncode == 0
    envs = status_json(sb, "dev")
    assert envs["dev"]["last_operation"]["result"] == "ok"
    assert envs["dev"]["log"] == str(log)
    assert "its full output" not in sb.run("status.py", "dev").stdout


def test_a_deploy_that_rolled_back_by_itself_names_its_output_last(sandbox):
    sb = sandbox
    sb.write_config(dev='pre_restart = [["sh", "-c", "echo migration 51c0 broke; exit 3"]]')
    sb.release("dev", {"NEWS": "a change\n"}, "a change")
    proc = sb.run("deploy.py", "dev", "--yes")
    assert proc.returncode == 1, proc.stderr
    found = re.fullmatch(r"\(full output: (\S+)\)", proc.stderr.splitlines()[-1])
    assert found, proc.stderr
    text = Path(found.group(1)).read_text()
    assert "| migration 51c0 broke" in text and "rolled back by itself" in text
    assert status_json(sb, "dev")["dev"]["log"] == found.group(1)


def test_metrics_match_status_json(sandbox, tmp_path):
    sb = sandbox
    assert sb.run("backup.py", "--all").returncode == 0
    sb.release("dev", {"NEWS": "a change\n"}, "a change")
    assert sb.run("deploy.py", "dev", "--yes").returncode == 0
    assert sb.run("rollback.py", "dev", "--drill").returncode == 0
    (tmp_path / "textfile").mkdir()
    out = tmp_path / "textfile" / "safe_deploy.prom"
    proc = sb.run("status.py", "--metrics", str(out), "--json")
    envs = json.loads(proc.stdout)["envs"]
    assert out.exists() and not [p for p in out.parent.iterdir() if p != out]     # no temp file left
    found = {}
    for family in text_string_to_metric_families(out.read_text()):
        for sample in family.samples:
            found[(sample.name, sample.labels.get("env"))] = (sample.value, sample.labels)
    for env, r in envs.items():
        assert found[("safe_deploy_up", env)][0] == float(r["unit"]["active"])
        assert found[("safe_deploy_healthy", env)][0] == float(r["health"]["ok"])
        assert found[("safe_deploy_ok", env)][0] == float(r["ok"])
        assert found[("safe_deploy_problems", env)][0] == len(r["problems"])
        value, labels = found[("safe_deploy_commit_info", env)]
        assert value == 1 and labels["commit"] == r["commit"] and labels["branch"] == r["branch"]
        assert abs(found[("safe_deploy_last_backup_age_seconds", env)][0] - r["last_backup"]["age_seconds"]) < 60
        assert found[("safe_deploy_last_backup_rows", env)][0] == r["last_backup"]["rows"]
        assert ("safe_deploy_replica_lag_seconds", env) not in found        # no [replica]
    deploy = envs["dev"]["last_deploy"]
    assert found[("safe_deploy_last_deploy_timestamp_seconds", "dev")][0] == metrics.timestamp(deploy["time"])
    assert found[("safe_deploy_last_deploy_success", "dev")][0] == 1.0
    assert found[("safe_deploy_last_drill_timestamp_seconds", "dev")][0] == \
        metrics.timestamp(envs["dev"]["last_drill"]["time"])
    assert found[("safe_deploy_last_drill_success", "dev")][0] == 1.0
    assert found[("safe_deploy_last_operation_failed", "dev")][0] == 0.0


# -- the pure parts -----------------------------------------------------------------------------------
def test_metric_samples_leave_out_what_is_not_known():
    report = {"unit": {"active": False}, "health": {"ok": False}, "ok": False, "problems": ["a", "b"],
              "commit": None, "last_deploy": None, "last_backup": None, "replica": {"lag_s": 2.5},
              "last_drill": None, "last_operation": {"result": "interrupted"}}
    found = metrics.samples({"prod": report})
    assert found["problems"] == [({"env": "prod"}, 2.0)]
    assert found["replica_lag_seconds"] == [({"env": "prod"}, 2.5)]
    assert found["last_operation_failed"] == [({"env": "prod"}, 1.0)]
    assert "commit" not in found and "last_deploy_success" not in found and "last_backup_rows" not in found


def test_logs_are_kept_per_env_up_to_the_retention(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(oplog.KEEP_PER_ENV + 5):
        (logs / f"prod-20260101-{i:06d}-deploy.log").write_text("x\n")
    (logs / "dev-20250101-000000-backup.log").write_text("x\n")
    removed = oplog.prune(logs, "prod")
    assert [p.name for p in removed] == [f"prod-20260101-{i:06d}-deploy.log" for i in range(5)]
    assert len(oplog.env_logs(tmp_path, "prod")) == oplog.KEEP_PER_ENV
    assert (logs / "dev-20250101-000000-backup.log").exists()         # another env's logs are its own


def test_a_log_without_its_end_is_an_interrupted_operation(tmp_path):
    log = oplog.OpLog(tmp_path, "prod", "deploy")
    assert oplog.ending(log.path).result == "running"          # its run holds it
    os.close(log.fd)                                            # killed: no end line, nobody holds it
    assert oplog.ending(log.path).result == "interrupted"
    assert oplog.last_failed(tmp_path, "prod") == str(log.path)
    ok = oplog.OpLog(tmp_path, "prod", "backup")
    ok.write_line("backed up")
    ok.close(0)
    assert oplog.last_operation(tmp_path, "prod").result == "ok"
    assert oplog.last_failed(tmp_path, "prod") == str(log.path)
    assert oplog.tail(ok.path)[-1].endswith("backed up")
    time.sleep(1.1)                                             # a log's name has the second it started
    refused = oplog.OpLog(tmp_path, "prod", "rollback")
    refused.close(2)                                            # needs --yes: nothing was attempted
    assert oplog.last_operation(tmp_path, "prod").result == "refused"
    assert oplog.last_failed(tmp_path, "prod") == str(log.path)    # a refusal is no failure


def test_a_command_that_prints_without_end_cannot_fill_the_disk(tmp_path):
    """Past its cap a log keeps its head and the last bytes of the rest (the error at the end), says how much
    it dropped, and still ends as a log is read: a real command through commands.run_one."""
    from safedeploy import commands
    log = oplog.OpLog(tmp_path, "prod", "deploy", max_bytes=200_000, tail_kept=20_000)
    oplog._OPEN["prod"] = log
    try:
        failure = commands.run_one([sys.executable, "-c",
                                    "import sys\nfor i in range(100000): print('row', i)\n"
                                    "print('the error: disk quota', file=sys.stderr); sys.exit(3)"], tmp_path, 60)
    finally:
        oplog.close_all(1)
    assert failure is not None and "exit 3" in failure.why and "the error: disk quota" in failure.output
    size = log.path.stat().st_size
    assert 20_000 < size < 200_000 + 20_000 + 1000       # the head stops before the read that would pass the cap
    text = log.path.read_text()
    assert "| row 0\n" in text and "| row 99999\n" in text and "| the error: disk quota" in text
    assert "| row 50000\n" not in text
    assert "reached its cap of 200000 bytes" in text
    dropped = int(re.search(r"# (\d+) bytes past the cap dropped; the last (\d+) bytes:\n", text).group(1))
    assert dropped > 1_000_000                                      # ~1.5 MB printed, ~0.2 MB kept
    kept = text.split(" bytes:\n", 1)[1]
    assert kept.splitlines()[0].split(" ", 1)[1].startswith("| row ")   # whole lines: the first is stamped
    assert oplog.ending(log.path).result == "failed"
    assert "$ (exit 3 in " in oplog.tail(log.path)[-1]               # what an alert carries: how it ended


def test_the_timer_writes_metrics_when_asked():
    from status import timer_arguments
    assert timer_arguments(True, None) == ["--alert", "--quiet"]
    assert timer_arguments(True, "/m/s.prom") == ["--alert", "--metrics", "/m/s.prom", "--quiet"]
    assert timer_arguments(False, "/m/s.prom") == ["--metrics", "/m/s.prom", "--quiet"]


def test_the_status_timer_writes_the_metrics_file(sandbox, tmp_path):
    sb = sandbox
    folder = tmp_path / "textfile"
    folder.mkdir()
    out = folder / "safe_deploy.prom"
    proc = sb.run("status.py", "--install-timer", "--metrics", str(out))      # no [alerts]: metrics only
    assert proc.returncode == 0, proc.stderr
    try:
        service = (sb.manager.unit_dir / "safe-deploy-status.service").read_text()
        assert f"--metrics {out} --quiet" in service and "--alert" not in service
        sb.manager.systemctl("start", "safe-deploy-status.service", timeout=120)      # one run, as the timer's
        names = {f.name for f in text_string_to_metric_families(out.read_text())}
        assert {"safe_deploy_up", "safe_deploy_healthy", "safe_deploy_commit_info"} <= names, names
    finally:
        sb.manager.systemctl("disable", "--now", "safe-deploy-status.timer", check=False)


def test_a_run_that_starts_or_ends_as_status_looks_is_not_read_as_killed(tmp_path):
    """Backups starting and ending in a loop (another process, as cron's would), status reading their logs
    all the while: never "interrupted" (metrics' last_operation_failed, an alert), never a traceback when a
    new run prunes a log being listed. Before: 28 of 17,192 looks in 10 s read "interrupted", and a pruned
    log made env_logs raise FileNotFoundError."""
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
from safedeploy import oplog
end, runs = time.monotonic() + 3, 0
while time.monotonic() < end:
    log = oplog.OpLog({str(tmp_path)!r}, "dev", "backup", tail_kept=64)
    log.write_line("backed up")
    log.close(0)
    runs += 1
print(runs)
"""], stdout=subprocess.PIPE, text=True)
    looks, read_as = 0, set()
    while writer.poll() is None:
        for path in oplog.env_logs(tmp_path, "dev")[-2:]:
            looks += 1
            ending = oplog.ending(path)
            read_as.add(ending.result if ending else "pruned since listed")
    runs = int(writer.stdout.read())
    assert writer.returncode == 0
    assert looks > 100 and read_as <= {"ok", "running", "pruned since listed"}, (looks, read_as)
    kept = min(runs, oplog.KEEP_PER_ENV)
    assert len(oplog.env_logs(tmp_path, "dev")) == kept
    assert len(list((tmp_path / "logs").iterdir())) == kept        # nothing half-made left behind


def test_each_window_of_that_race_one_at_a_time(tmp_path, monkeypatch):
    """The three windows of the race above, each made to happen: a log is named only once it is locked and
    has its first line; a run that ends between a reader's read and its lock is read as ended; a log
    pruned after it was listed is skipped (not read as killed, and last_failed goes on to the older ones)."""
    real_link, real_flock = os.link, oplog.fcntl.flock
    seen_at_link = []

    def link(src, dst, **kwargs):
        other = os.open(src, os.O_RDONLY)
        try:
            real_flock(other, oplog.fcntl.LOCK_SH | oplog.fcntl.LOCK_NB)
            seen_at_link.append("unlocked")
        except BlockingIOError:
            seen_at_link.append(os.pread(other, 200, 0).decode())
        finally:
            os.close(other)
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(oplog.os, "link", link)
    log = oplog.OpLog(tmp_path, "prod", "deploy")
    monkeypatch.undo()
    assert len(seen_at_link) == 1 and "# deploy of prod, started" in seen_at_link[0], seen_at_link

    def end_then_lock(fd, how):
        log.close(0)                        # the run ends as the reader is about to lock
        return real_flock(fd, how)

    monkeypatch.setattr(oplog.fcntl, "flock", end_then_lock)
    assert oplog.ending(log.path).result == "ok"
    monkeypatch.undo()

    killed = oplog.OpLog(tmp_path, "prod", "backup")
    os.close(killed.fd)
    listed = oplog.env_logs(tmp_path, "prod")
    later = tmp_path / "logs" / "prod-29990101-000000-backup.log"
    assert oplog.ending(later) is None
    monkeypatch.setattr(oplog, "env_logs", lambda state_dir, env: listed + [later])
    assert oplog.last_failed(tmp_path, "prod") == str(killed.path)
    assert oplog.last_operation(tmp_path, "prod").path in map(str, listed)


def test_a_fifo_or_a_link_under_a_logs_name_is_read_as_an_interrupted_run_at_once(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    fifo = logs / "prod-20260101-000000-deploy.log"
    os.mkfifo(fifo, 0o600)
    (logs / "prod-20260101-000001-backup.log").symlink_to("/etc/passwd")
    (logs / "prod-20260101-000002-backup.log").symlink_to(logs / "nowhere")
    start = time.monotonic()
    assert [oplog.ending(p).result for p in oplog.env_logs(tmp_path, "prod")] == ["interrupted"] * 3
    assert oplog.tail(fifo) == [] and time.monotonic() - start < 2


def test_where_no_unnamed_file_can_be_linked_a_log_is_named_first(tmp_path, monkeypatch):
    """No /proc, or a file system without O_TMPFILE: the log is made under its name (O_EXCL), then locked,
    waiting for a reader's instant shared look rather than failing the operation."""
    import errno
    import fcntl
    import threading

    def no_link(*args, **kwargs):
        raise OSError(errno.ENOENT, "no /proc")

    monkeypatch.setattr(oplog.os, "link", no_link)
    first = oplog.OpLog(tmp_path, "prod", "deploy", max_bytes=10)
    assert oplog.ending(first.path).result == "running"
    first.close(0)
    lines = first.path.read_text().splitlines()
    assert "reached its cap of 10 bytes" in lines[0] and lines[-1].startswith("# end "), lines

    real_open = os.open
    looked = threading.Event()

    def open_then_look(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if flags & os.O_EXCL:               # a reader's look in the instant before the writer's lock
            reader = real_open(path, os.O_RDONLY, dir_fd=dir_fd)
            fcntl.flock(reader, fcntl.LOCK_SH)
            threading.Timer(0.2, lambda: (looked.set(), os.close(reader))).start()   # said, then let go
        return fd

    monkeypatch.setattr(oplog.os, "open", open_then_look)
    second = oplog.OpLog(tmp_path, "prod", "backup")
    monkeypatch.undo()
    assert looked.is_set() and oplog.ending(second.path).result == "running"
    second.close(0)
    assert oplog.last_operation(tmp_path, "prod").result == "ok"

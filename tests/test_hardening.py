"""Bad input (a corpus of malformed configs and arguments), hardening, hanging units and
endpoints, full disks for the state folder, and concurrent operations."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests

from demo.faults import NoteWriter, everywhere
from demo.sandbox import REPO_ROOT
from helpers import listing, log_records, one_line_error, tmpfs

# -- the bad-input corpus ---------------------------------------------------------------
CONFIG_BREAKS = [
    ("empty file", lambda t: ""),
    ("TOML syntax", lambda t: t + "\n[env.prod\n"),
    ("unclosed string", lambda t: t.replace('branch = "main"', 'branch = "main')),
    ("non-UTF-8", lambda t: t.replace('branch = "main"', 'branch = "m\udcffain"')),
    ("unknown top key", lambda t: "[default]\nremote = \"\"\n" + t),
    ("unknown env key", lambda t: t.replace('branch = "main"', 'branch = "main"\nbrnch = "x"')),
    ("missing path", lambda t: t.replace('path = "{root}/prod"\n', "")),
    ("missing branch", lambda t: t.replace('branch = "main"\n', "")),
    ("missing port", lambda t: t.replace("port = {prod_port}\n", "")),
    ("missing db", lambda t: t.replace('db = "instance/app.db"\n', "", 1)),
    ("missing unit", lambda t: t.replace('unit = "{prod_unit}"\n', "")),
    ("port string", lambda t: t.replace("port = {prod_port}", 'port = "{prod_port}"')),
    ("port zero", lambda t: t.replace("port = {prod_port}", "port = 0")),
    ("port too big", lambda t: t.replace("port = {prod_port}", "port = 65536")),
    ("port float", lambda t: t.replace("port = {prod_port}", "port = 80.5")),
    ("port shared", lambda t: t.replace("port = {dev_port}", "port = {prod_port}")),
    ("unit shared", lambda t: t.replace('unit = "{dev_unit}"', 'unit = "{prod_unit}"')),
    ("unit not .service", lambda t: t.replace('unit = "{prod_unit}"', 'unit = "app.timer"')),
    ("unit with slash", lambda t: t.replace('unit = "{prod_unit}"', 'unit = "../evil.service"')),
    ("db shared", lambda t: t.replace('db = "instance/app.db"', 'db = "/tmp/shared.db"')),
    ("one work tree, two branches", lambda t: t.replace('path = "{root}/dev"', 'path = "{root}/prod"')),
    ("path does not exist", lambda t: t.replace('path = "{root}/dev"', 'path = "/nonexistent/dev"')),
    ("path traversal env name", lambda t: t.replace("[env.dev]", "[env.'../dev']")),
    ("env name with shell", lambda t: t.replace("[env.dev]", "[env.'dev;rm -rf ~']")),
    ("env name with space", lambda t: t.replace("[env.dev]", "[env.'my dev']")),
    ("branch with ..", lambda t: t.replace('branch = "dev"', 'branch = "dev/../main"')),
    ("branch with shell", lambda t: t.replace('branch = "dev"', 'branch = "dev;reboot"')),
    ("branch starting with -", lambda t: t.replace('branch = "dev"', 'branch = "-dev"')),
    ("remote with space", lambda t: t.replace('remote = "origin"', 'remote = "orig in"')),
    ("pre_restart a string", lambda t: t.replace('promote_from = "dev"', 'promote_from = "dev"\npre_restart = "pip install -r requirements.txt"')),
    ("pre_restart a list of strings", lambda t: t.replace('promote_from = "dev"', 'promote_from = "dev"\npre_restart = ["pip", "install"]')),
    ("pre_restart empty argv", lambda t: t.replace('promote_from = "dev"', 'promote_from = "dev"\npre_restart = [[]]')),
    ("promote_from unknown", lambda t: t.replace('promote_from = "dev"', 'promote_from = "staging"')),
    ("promote_from itself", lambda t: t.replace('promote_from = "dev"', 'promote_from = "prod"')),
    ("health_path without /", lambda t: t.replace('health_path = "/health"', 'health_path = "health"')),
    ("health_timeout zero", lambda t: t.replace("health_timeout = {health_timeout}", "health_timeout = 0")),
    ("health_timeout string", lambda t: t.replace("health_timeout = {health_timeout}", 'health_timeout = "5s"')),
    ("retention negative", lambda t: t + "\n[retention]\ndaily = -1\n"),
    ("retention unknown", lambda t: t + "\n[retention]\nyearly = 2\n"),
    ("domain with scheme", lambda t: t.replace('unit = "{dev_unit}"', 'unit = "{dev_unit}"\ndomain = "https://x.org"')),
    ("env not a table", lambda t: t.replace("[env.dev]", "[env]\ndev = 3\n[env.dev2]")),
]

ARGUMENTS = [
    ("deploy.py", ["nosuchenv"]), ("deploy.py", ["../prod"]), ("deploy.py", ["prod;ls"]),
    ("deploy.py", ["dev", "--ref", "$(reboot)"]), ("deploy.py", ["dev", "--ref", "../../etc/passwd"]),
    ("deploy.py", ["dev", "--ref", "--upload-pack=touch /tmp/x"]), ("deploy.py", ["dev", "--force"]),
    ("deploy.py", ["dev", "--reason", "x"]), ("deploy.py", ["dev", "--bogus"]), ("deploy.py", []),
    ("rollback.py", ["dev", "--to", "../../etc/passwd", "--yes"]), ("rollback.py", ["dev", "--to", "x;reboot", "--yes"]),
    ("rollback.py", ["dev", "--with-db", "--code-only"]), ("rollback.py", ["dev", "--json"]),
    ("verify.py", ["dev", "extra"]), ("status.py", ["nosuchenv"]), ("backup.py", ["dev", "--all"]),
    ("backup.py", ["--reason", "Nightly Run", "dev"]), ("backup.py", ["--verify", "/etc/passwd"]),
    ("backup.py", ["--install-timer", "3am"]),
]


@pytest.fixture
def watched(sandbox):
    """The sandbox, and a listing of everything the tool could change, to compare after."""
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    folders = [sb.root / "state", sb.root / "backups", sb.path("dev"), sb.path("prod"), sb.root / "origin.git"]
    return sb, folders


def test_every_malformed_config_is_refused_and_changes_nothing(watched):
    sb, folders = watched
    from demo.sandbox import CONFIG_TEMPLATE
    assert len(CONFIG_BREAKS) + len(ARGUMENTS) >= 40
    values = dict(root=sb.root, prod_port=sb.ports["prod"], dev_port=sb.ports["dev"], prod_unit=sb.unit("prod"),
                  dev_unit=sb.unit("dev"), health_timeout=5, prod_extra="", dev_extra="")
    before = listing(*folders)
    for name, breaker in CONFIG_BREAKS:
        text = breaker(CONFIG_TEMPLATE).format(**values)
        bad = sb.root / "bad.toml"
        bad.write_bytes(text.encode("utf-8", "surrogateescape"))
        for script, args in (("deploy.py", ["dev", "--yes"]), ("status.py", [])):
            proc = subprocess.run([sys.executable, str(REPO_ROOT / script), *args, "--config", str(bad)],
                                  env=sb.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert proc.returncode == 2, (name, script, proc.stdout, proc.stderr)
            line = one_line_error(proc)
            assert str(bad) in line, (name, line)
    assert listing(*folders) == before


@pytest.mark.both_converted         # it breaks the config or the state first
def test_every_bad_argument_is_refused_and_changes_nothing(watched):
    sb, folders = watched
    before = listing(*folders)
    for script, args in ARGUMENTS:
        proc = sb.run(script, *args)
        assert proc.returncode == 2, (script, args, proc.stdout, proc.stderr)
        one_line_error(proc)
    assert listing(*folders) == before
    assert not os.path.exists("/tmp/x")


# -- hardening ----------------------------------------------------------------------------------
@pytest.mark.both_converted         # it breaks the config or the state first
def test_config_or_state_writable_by_others_is_refused(watched):
    sb, _ = watched
    os.chmod(sb.config, 0o664)
    proc = sb.run("status.py")
    assert proc.returncode == 2 and f"chmod go-w {sb.config}" in one_line_error(proc)
    os.chmod(sb.config, 0o600)
    os.chmod(sb.root / "state", 0o777)
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 2 and "state folder is writable by group or others" in one_line_error(proc)
    os.chmod(sb.root / "state", 0o700)
    proc = sb.run("status.py")
    assert proc.returncode in (0, 1) and "== dev" in proc.stdout       # read again (1: an env needs attention)


def test_nothing_the_tool_writes_is_readable_by_others(watched):
    sb, _ = watched
    assert sb.run("backup.py", "--all").returncode == 0
    for folder in (sb.root / "state", sb.root / "backups"):
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                mode = os.stat(os.path.join(root, name)).st_mode
                assert not mode & 0o077, (os.path.join(root, name), oct(mode))


def test_a_full_state_folder_stops_a_deploy_before_it_changes_anything(watched, tmp_path):
    sb, _ = watched
    small = sb.root / "state"
    saved = tmp_path / "state-saved"
    os.rename(small, saved)
    small.mkdir(mode=0o700)
    with tmpfs(small, "size=1m,mode=0700"):
        for f in saved.iterdir():
            if not f.is_file():
                continue            # the row ledger's cache (state/ledger/): a cache, computed again
            (small / f.name).write_bytes(f.read_bytes())
            os.chmod(small / f.name, 0o600)
        subprocess.run(["dd", "if=/dev/zero", f"of={small}/filler", "bs=64k"], capture_output=True)
        sb.release("dev", {"VERSION": "3\n"}, "v3")
        head = sb.head("dev")
        proc = sb.run("deploy.py", "dev")
        assert proc.returncode == 1
        assert "not enough free disk in the state folder" in one_line_error(proc)
        assert sb.head("dev") == head


def test_a_unit_that_hangs_on_stop_is_still_deployed(sandbox):
    sb = sandbox
    sb.release("dev", {"MODE": "hangstop\n"}, "ignores SIGTERM")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.release("dev", {"MODE": "ok\n", "VERSION": "3\n"}, "v3")
    start = time.monotonic()
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start >= 3                       # TimeoutStopSec=3, then SIGKILL
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "3"


def test_a_health_endpoint_that_hangs_times_out_and_rolls_back(sandbox):
    sb = sandbox
    good = sb.head("dev")
    sb.release("dev", {"MODE": "hanghealth\n"}, "health never answers")
    start = time.monotonic()
    proc = sb.run("deploy.py", "dev")
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and "no answer within" in proc.stderr
    assert elapsed < 5 + 15
    assert sb.head("dev") == good


# -- concurrency ---------------------------------------------------------------------------------
def test_two_deploys_of_one_env_at_once(sandbox):
    sb = sandbox
    sb.write_config(dev=f'pre_restart = [["{sys.executable}", "-c", "import time; time.sleep(2)"]]')
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    argv = [sys.executable, str(REPO_ROOT / "deploy.py"), "dev", "--config", str(sb.config)]
    first = subprocess.Popen(argv, env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    second = sb.run("deploy.py", "dev")
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert second.returncode == 3 and f"pid {first.pid}" in one_line_error(second)


def test_deploys_of_two_envs_at_once(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.merge_to_main()
    sb.release("dev", {"VERSION": "3\n"}, "v3")
    results = {}

    def deploy(env, *extra):
        results[env] = sb.run("deploy.py", env, *extra)

    threads = [threading.Thread(target=deploy, args=("dev",)), threading.Thread(target=deploy, args=("prod", "--yes"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["dev"].returncode == 0, results["dev"].stderr
    assert results["prod"].returncode == 0, results["prod"].stderr
    assert requests.get(sb.url("prod", "/"), timeout=5).json()["version"] == "2"
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "3"


def test_backups_every_half_second_during_deploys_and_rollbacks(sandbox):
    sb = sandbox
    writer = NoteWriter(sb.url("dev", "/notes"))
    writer.start()
    stop = threading.Event()
    codes = []

    def back_up():
        while not stop.is_set():
            codes.append(sb.run("backup.py", "dev", "--quiet", "--lock-wait", "60").returncode)
            time.sleep(0.5)

    backer = threading.Thread(target=back_up)
    backer.start()
    try:
        for i in range(3):
            sb.release("dev", {"VERSION": f"{i + 2}\n"}, f"v{i + 2}")
            assert sb.run("deploy.py", "dev").returncode == 0
            time.sleep(0.5)
            assert sb.run("rollback.py", "dev", "--yes", "--with-db").returncode == 0
            time.sleep(0.5)
            sb.release("dev", {"VERSION": f"{i + 2}b\n"}, f"v{i + 2}b: the fix")    # the rolled-back one stays out
            assert sb.run("deploy.py", "dev").returncode == 0
    finally:
        stop.set()
        backer.join()
        writer.stop()
    assert codes and set(codes) == {0}
    assert sb.run("backup.py", "--verify", "--quiet").returncode == 0
    lost = writer.acked - everywhere(sb, "dev")
    assert writer.acked and not lost
    kinds = [r["kind"] for r in log_records(sb, "dev")]
    assert kinds.count("rollback") == 3 and kinds.count("deploy") == 6
    listed = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]
    assert len([b for b in listed if b["reason"] == "nightly"]) >= 3


def test_a_deploy_lock_waits_for_a_backup_but_not_for_another_deploy(tmp_path):
    from safedeploy.errors import EXIT_LOCKED, DeployError
    from safedeploy.state import EnvLock

    def hold(operation, seconds, ready):
        with EnvLock(tmp_path, "dev", operation):
            ready.set()
            time.sleep(seconds)

    for operation, waits in (("backup (nightly)", True), ("prune", True), ("deploy", False)):
        ready = threading.Event()
        holder = threading.Thread(target=hold, args=(operation, 1.0, ready))
        holder.start()
        ready.wait(5)
        time.sleep(0.1)                 # the holder has written who it is
        told = []
        start = time.monotonic()
        try:
            with EnvLock(tmp_path, "dev", "deploy", backup_wait=10, on_wait=told.append):
                acquired = True
        except DeployError as exc:
            acquired = False
            assert exc.code == EXIT_LOCKED
        took = time.monotonic() - start
        holder.join()
        assert acquired == waits, operation
        if waits:
            assert told and "waiting for a backup" in told[0] and took >= 0.5
        else:
            assert took < 0.9      # refused before its holder lets go (1.0 s): not a wait (and not acquired, above)

"""Off-site copies with real restic (a local repository, and sftp: to a real OpenSSH server started
on 127.0.0.1 with a key made here), and alerts received by a real HTTP server on a loopback port."""

import http.server
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo.sandbox import free_port
from safedeploy import backups, config, offsite, retention
from tests import cheap_restic
from tests.helpers import one_line_error

PASSWORD = "correct horse battery staple 7f3a"


# -- a webhook receiver ----------------------------------------------------------------------------
class Receiver:
    """A real HTTP server on 127.0.0.1 that records the JSON it is sent; mode "ok", "500" or "hang"."""

    def __init__(self, mode="ok"):
        self.events, self.mode = [], mode
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.events.append(json.loads(body))
                if receiver.mode == "hang":
                    time.sleep(30)
                    return
                self.send_response(500 if receiver.mode == "500" else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def enable_offsite(sb, repository=None, options=(), webhook=None, command=None, password=PASSWORD, engine=None,
                   premade=True):
    """[offsite] in the sandbox's config. A restic repository of the sandbox's own (repository None) is made
    ahead with a cheap key (tests/cheap_restic.py) unless premade=False: the tool's first use makes it then."""
    pw = sb.root / "restic-password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    if repository is None and premade and engine in (None, "restic"):
        cheap_restic.premade(sb.root / "offsite-repo", password)
    repository = repository or str(sb.root / "offsite-repo")
    text = sb.config.read_text().split("\n[offsite]")[0] + f'\n[offsite]\nrepository = "{repository}"\npassword_file = "{pw}"\n'
    text += f'engine = "{engine}"\n' if engine else ""
    if options:
        text += "options = [" + ", ".join(json.dumps(o) for o in options) + "]\n"
    if webhook or command:
        text += "\n[alerts]\n" + (f'webhook = "{webhook}"\n' if webhook else "")
        text += f"command = {json.dumps(command)}\n" if command else ""
    sb.config.write_text(text)
    return config.load(str(sb.config)).offsite        # with this config's identity (host, id), as the scripts see it


def restic_snapshots(off):
    return offsite.Restic(off).copies()


def no_password(*procs):
    for proc in procs:
        assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr


# -- local repository --------------------------------------------------------------------------------
def test_a_backup_goes_offsite_tagged_and_is_listed_in_both_places(sandbox):
    off = enable_offsite(sandbox, premade=False)        # the first push makes the repository
    proc = sandbox.run("backup.py", "prod")
    assert proc.returncode == 0, proc.stderr
    assert "off-site: snapshot" in proc.stdout
    (copy,) = restic_snapshots(off)
    local = backups.list_backups(sandbox.root / "backups" / "prod")[0]
    assert copy.env == "prod" and copy.sha256 == local.sha256 and copy.file == Path(local.path).name
    assert copy.reason == "manual" and copy.commit == local.commit
    listed = json.loads(sandbox.run("backup.py", "--list", "--json").stdout)["backups"]
    assert [b["location"] for b in listed] == ["both"]
    # a deploy's own backup is not pushed during the deploy, but by the next backup.py run
    sandbox.release("dev", {"VERSION": "2\n"}, "v2")
    assert sandbox.run("deploy.py", "dev").returncode == 0
    listed = json.loads(sandbox.run("backup.py", "--list", "--json").stdout)["backups"]
    assert sorted(b["location"] for b in listed) == ["both", "local"]
    shown = sandbox.run("rollback.py", "dev", "--list").stdout          # the deploy's point: said to be on this host only
    assert "(database: this host only, not off-site yet)" in shown.splitlines()[0], shown
    nightly = sandbox.run("backup.py", "--all")
    assert nightly.returncode == 0 and "earlier backup(s) that were on this host only: dev-" in nightly.stdout, nightly.stderr
    listed = json.loads(sandbox.run("backup.py", "--list", "--json").stdout)["backups"]
    assert len(listed) == 4 and {b["location"] for b in listed} == {"both"}
    no_password(proc, nightly)
    assert PASSWORD not in json.dumps(listed) and PASSWORD not in (sandbox.root / "state").joinpath(
        "prod.offsite.json").read_text()


def test_a_rebuilt_host_brings_the_database_back_from_offsite(sandbox):
    """The local backup folder is gone (a lost disk): the config, the repository and the password
    are enough; the commands the README gives bring prod's rows back."""
    enable_offsite(sandbox)
    db = sandbox.db_path("prod")
    with sqlite3.connect(db) as conn:
        conn.execute("create table if not exists precious (x)")
        conn.executemany("insert into precious values (?)", [(i,) for i in range(100)])
    assert sandbox.run("backup.py", "prod", "--reason", "nightly").returncode == 0
    with sqlite3.connect(db) as conn:
        conn.execute("delete from precious")
    shutil.rmtree(sandbox.root / "backups")
    shutil.rmtree(sandbox.root / "state")          # the deploy log went with the disk too
    listed = sandbox.run("backup.py", "--list")
    assert listed.returncode == 0 and "offsite" in listed.stdout and "off-site only" in listed.stdout
    points = json.loads(sandbox.run("rollback.py", "prod", "--list", "--json").stdout)["points"]
    offsite_only = [p for p in points if p["offsite"] and p["backup"] is None]
    assert offsite_only, points
    proc = sandbox.run("rollback.py", "prod", "--to", offsite_only[0]["id"], "--with-db", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fetched" in proc.stdout and "sha256" in proc.stdout
    with sqlite3.connect(sandbox.db_path("prod")) as conn:
        assert conn.execute("select count(*) from precious").fetchone()[0] == 100


def test_an_unreachable_repository_keeps_the_local_backup_says_so_and_alerts(sandbox, receiver):
    dead = free_port()
    enable_offsite(sandbox, repository="sftp:root@127.0.0.1:/nowhere", webhook=receiver.url,
                   options=[f"sftp.command=ssh -p {dead} -o BatchMode=yes -o ConnectTimeout=5 root@127.0.0.1 -s sftp"])
    proc = sandbox.run("backup.py", "prod")
    assert proc.returncode == 1
    assert "off-site copy of prod's backup" in proc.stderr and "is verified" in proc.stderr
    assert len(backups.list_backups(sandbox.root / "backups" / "prod")) == 1
    (event,) = [e for e in receiver.events if e["event"] == "offsite-failed"]
    assert event["env"] == "prod" and event["host"] and event["time"] and "backup.py prod" in event["command"]
    no_password(proc)


def test_a_wrong_password_is_said_and_the_local_backup_stays(sandbox):
    off = enable_offsite(sandbox)
    assert sandbox.run("backup.py", "prod").returncode == 0
    enable_offsite(sandbox, password="not the password")
    sandbox.config.write_text(sandbox.config.read_text().split("\n[offsite]")[0]
                              + f'\n[offsite]\nrepository = "{off.repository}"\npassword_file = "{sandbox.root / "restic-password"}"\n')
    proc = sandbox.run("backup.py", "prod")
    assert proc.returncode == 1 and "does not open it" in proc.stderr
    assert len(backups.list_backups(sandbox.root / "backups" / "prod")) == 2
    no_password(proc)


def test_verify_finds_a_corrupted_pack(sandbox):
    off = enable_offsite(sandbox)
    assert sandbox.run("backup.py", "prod").returncode == 0
    good = sandbox.run("backup.py", "--verify")
    assert good.returncode == 0 and "restic check passed" in good.stdout and "newest off-site copy" in good.stdout
    packs = sorted((Path(off.repository) / "data").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    pack = packs[-1]
    data = bytearray(pack.read_bytes())
    for i in range(100, len(data), 97):
        data[i] ^= 0xFF
    pack.chmod(0o600)
    pack.write_bytes(bytes(data))
    bad = sandbox.run("backup.py", "--verify")
    assert bad.returncode == 1 and "error" in bad.stderr


def test_a_password_file_others_can_read_is_refused(sandbox):
    enable_offsite(sandbox)
    (sandbox.root / "restic-password").chmod(0o644)
    proc = sandbox.run("backup.py", "prod")
    assert proc.returncode == 2 and "offsite.password_file" in one_line_error(proc) and "chmod 600" in proc.stderr
    assert not (sandbox.root / "backups" / "prod").exists() or not backups.list_backups(sandbox.root / "backups" / "prod")


def test_prune_forgets_offsite_by_the_same_rules_and_keeps_what_a_rollback_needs(sandbox):
    off = enable_offsite(sandbox)
    for _ in range(3):
        assert sandbox.run("backup.py", "prod").returncode == 0
    assert len(restic_snapshots(off)) == 3
    proc = sandbox.run("backup.py", "--prune")
    assert proc.returncode == 0, proc.stderr
    left = restic_snapshots(off)
    local = {Path(b.path).name for b in backups.list_backups(sandbox.root / "backups" / "prod")}
    assert {c.file for c in left} == local and len(left) < 3       # the same rules as the local prune: the same copies


def test_prune_plan_on_offsite_copies_is_the_local_rule():
    copies = [offsite.Copy(id=f"id{i}", env="prod", file=f"prod-2026110{i}-031700-nightly.sqlite3",
                           time=f"2026-11-0{i}T03:17:00+00:00", reason="nightly", commit="c", sha256="s", paths=[])
              for i in range(1, 10)]
    keep, remove = retention.prune_plan(copies, {"daily": 3, "weekly": 0, "monthly": 0},
                                      {"prod-20261101-031700-nightly.sqlite3": "rollback point"})
    assert set(keep) == {"prod-20261109-031700-nightly.sqlite3", "prod-20261108-031700-nightly.sqlite3",
                         "prod-20261107-031700-nightly.sqlite3", "prod-20261101-031700-nightly.sqlite3"}
    assert len(remove) == 5


# -- alerts ------------------------------------------------------------------------------------------
def test_a_failed_deploy_alerts_the_webhook_and_the_command(sandbox, receiver):
    got = sandbox.root / "alert.json"
    enable_offsite(sandbox, webhook=receiver.url,
                   command=[sys.executable, "-c", f"import sys; open({str(got)!r}, 'w').write(sys.stdin.read())"])
    sandbox.release("dev", {"MODE": "http500\n"}, "broken")
    proc = sandbox.run("deploy.py", "dev")
    assert proc.returncode == 1
    (event,) = [e for e in receiver.events if e["event"] == "deploy-failed"]
    assert event["env"] == "dev" and event["message"] and set(event) >= {"time", "host", "command"}
    assert json.loads(got.read_text())["event"] == "deploy-failed"


def test_test_alert_and_a_hanging_or_dead_webhook_never_hold_up_the_operation(sandbox):
    hanging = Receiver("hang")
    try:
        enable_offsite(sandbox, webhook=hanging.url)
        start = time.monotonic()
        proc = sandbox.run("backup.py", "--test-alert")
        took = time.monotonic() - start
        assert proc.returncode == 1 and "did not answer in time" in proc.stderr and took < 12     # 5 s read timeout
        sandbox.release("dev", {"MODE": "http500\n"}, "broken")
        start = time.monotonic()
        proc = sandbox.run("deploy.py", "dev")
        assert proc.returncode == 1 and "did not answer in time" in proc.stderr     # the exit code is the deploy's
        assert len(hanging.events) == 2 and hanging.events[1]["event"] == "deploy-failed"
    finally:
        hanging.close()
    ok = Receiver()
    try:
        text = sandbox.config.read_text().replace(hanging.url, ok.url)
        sandbox.config.write_text(text)
        proc = sandbox.run("backup.py", "--test-alert")
        assert proc.returncode == 0 and "delivered" in proc.stdout and ok.events[0]["event"] == "test"
        sandbox.config.write_text(text.replace(ok.url, f"http://127.0.0.1:{free_port()}/x"))
        proc = sandbox.run("backup.py", "--test-alert")
        assert proc.returncode == 1 and "could not be reached" in proc.stderr
    finally:
        ok.close()


def test_a_night_that_never_reached_offsite_is_an_offsite_stale_event(sandbox, receiver):
    enable_offsite(sandbox, webhook=receiver.url)
    assert sandbox.run("backup.py", "prod").returncode == 0
    record = sandbox.root / "state" / "prod.offsite.json"
    data = json.loads(record.read_text())
    data["time"] = "2026-01-01T03:17:00+00:00"
    record.write_text(json.dumps(data))
    proc = sandbox.run("backup.py", "prod")
    assert proc.returncode == 0 and "stale" in proc.stderr
    (event,) = [e for e in receiver.events if e["event"] == "offsite-stale"]
    assert event["env"] == "prod" and "reached off-site" in event["message"]


# -- sftp: to a real OpenSSH server --------------------------------------------------------------------
@pytest.fixture
def sshd(tmp_path):
    """sshd on a loopback port, accepting one key made here; restic reaches it through sftp.command."""
    proc, port, user, key = start_sshd(tmp_path)
    yield (f"sftp:{user}@127.0.0.1:{tmp_path / 'sftp-repo'}",
           f"{ssh_command(port, key)} {user}@127.0.0.1 -s sftp")
    proc.terminate()
    proc.wait(timeout=10)


def ssh_command(port, key):
    return f"ssh -i {key} -p {port} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


def start_sshd(tmp_path):
    """(the sshd process, its port, the user, the client key): sshd on 127.0.0.1, one key made here."""
    folder = tmp_path / "sshd"
    folder.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True, timeout=30)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\nStrictModes no\n"
        "UsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "wb"))
    user = os.environ.get("USER") or "root"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(ssh_command(port, folder / "client_key").split() + [f"{user}@127.0.0.1", "true"],
                               capture_output=True, timeout=15)
        if probe.returncode == 0:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(f"sshd did not come up: {(folder / 'sshd.log').read_text()[-400:]}")
    return proc, port, user, folder / "client_key"


def test_offsite_over_sftp_to_a_real_sshd(sandbox, sshd):
    repository, command = sshd
    off = enable_offsite(sandbox, repository=repository, options=[f"sftp.command={command}"])
    proc = sandbox.run("backup.py", "prod")
    assert proc.returncode == 0, proc.stderr
    (copy,) = restic_snapshots(off)
    assert copy.env == "prod"
    lose_local_copies_then_verify(sandbox, "prod", proc)


def lose_local_copies_then_verify(sb, env, pushed):
    """The local backups gone: the off-site copy is a point of env, and --verify reads it back; no password
    printed by the push or the verify."""
    shutil.rmtree(sb.root / "backups")
    for _ in range(3):      # a rollback waits 5 s at most for the listing (ROLLBACK_LIST_TIMEOUT): a loaded host may not
        listed = sb.run("rollback.py", env, "--list", "--json")
        shown = json.loads(listed.stdout)
        if "did not finish within" not in shown.get("offsite_problem", ""):
            break
    assert listed.returncode == 0 and "offsite_problem" not in shown, (listed.stdout, listed.stderr)
    assert any(p["offsite"] and p["backup"] is None for p in shown["points"]), shown
    verify = sb.run("backup.py", "--verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    no_password(pushed, verify)


def test_prune_before_any_copy_went_off_site_exits_0_and_makes_no_repository(sandbox):
    off = enable_offsite(sandbox, premade=False)
    proc = sandbox.run("backup.py", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert not Path(off.repository).exists()


def test_a_listing_that_fails_is_said_in_the_json_too_never_an_empty_off_site(sandbox):
    """rollback.py --list --json when the off-site copies cannot be listed: it printed the local points with
    "offsite": false and nothing else, so a script read "no copy off-site" where nothing was known (stop 46).
    Now the JSON names the problem (offsite_problem) and stderr says it; exit 0, the local points being right (a
    rolling rollback goes on with them). The text form exits 1."""
    sb = sandbox
    enable_offsite(sb)
    assert sb.run("backup.py", "dev").returncode == 0
    (sb.root / "restic-password").write_text("not the password\n")
    listed = sb.run("rollback.py", "dev", "--list", "--json")
    shown = json.loads(listed.stdout)
    assert listed.returncode == 0 and "could not be listed" in listed.stderr, (listed.stdout, listed.stderr)
    assert shown["offsite_problem"] and shown["points"] and all(p["backup"] for p in shown["points"]), shown
    text = sb.run("rollback.py", "dev", "--list")
    assert text.returncode == 1 and "the points above are local only" in text.stderr, text.stderr

"""verify.py and status.py (and backup.py's basics) on the real sandbox."""

import json
import os
import stat

from helpers import log_records


def checks_of(proc):
    data = json.loads(proc.stdout)
    return data, {c["name"]: c for c in data["checks"]}


def deployed(sb):
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    return log_records(sb, "dev")[-1]


def test_verify_passes_after_a_deploy_and_records_the_tree(sandbox):
    sb = sandbox
    record = deployed(sb)
    proc = sb.run("verify.py", "dev", "--json")
    assert proc.returncode == 0, proc.stdout
    data, checks = checks_of(proc)
    assert data["env"] == "dev" and data["ok"] is True
    assert list(checks) == ["unit", "health", "domain", "commit", "release", "database", "backup", "rollback point",
                           "rollback drill", "restart"]
    assert all(c["ok"] for c in checks.values())
    assert record["tag"] in checks["rollback point"]["detail"]
    verified = (sb.root / "state" / "dev.verified.jsonl").read_text().splitlines()
    assert json.loads(verified[-1])["by"] == "verify" and json.loads(verified[-1])["commit"] == record["to"]
    text = sb.run("verify.py", "dev")
    assert text.returncode == 0 and "PASS  unit" in text.stdout and "dev verified" in text.stdout


def test_verify_fails_on_a_stopped_unit_dirty_tree_and_bad_backup(sandbox):
    sb = sandbox
    record = deployed(sb)
    sb.stop_app("dev")
    (sb.path("dev") / "app.py").write_text("# changed\n")
    with open(record["backup"], "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    before = (sb.root / "state" / "dev.verified.jsonl").read_text()
    proc = sb.run("verify.py", "dev", "--json")
    assert proc.returncode == 1
    data, checks = checks_of(proc)
    assert data["ok"] is False
    assert not checks["unit"]["ok"] and "inactive" in checks["unit"]["detail"]
    assert not checks["health"]["ok"] and "cannot connect" in checks["health"]["detail"]
    assert not checks["commit"]["ok"] and "tracked files changed" in checks["commit"]["detail"]
    assert not checks["backup"]["ok"] and "sha256" in checks["backup"]["detail"]
    assert checks["database"]["ok"] and checks["rollback point"]["ok"]
    assert (sb.root / "state" / "dev.verified.jsonl").read_text() == before
    assert "FAIL" in sb.run("verify.py", "dev").stdout


def test_verify_fails_before_any_deploy(sandbox):
    proc = sandbox.run("verify.py", "prod", "--json")
    assert proc.returncode == 1
    _, checks = checks_of(proc)
    assert not checks["backup"]["ok"] and not checks["rollback point"]["ok"] and checks["health"]["ok"]


def test_status_json_follows_the_contract(sandbox):
    sb = sandbox
    record = deployed(sb)
    proc = sb.run("status.py", "--json")
    assert proc.returncode == 1          # prod has never been backed up: that needs attention
    assert any("no local backup" in p for p in json.loads(proc.stdout)["envs"]["prod"]["problems"])
    assert sb.run("backup.py", "prod").returncode == 0
    proc = sb.run("status.py", "--json")
    assert proc.returncode == 0, proc.stdout
    envs = json.loads(proc.stdout)["envs"]
    assert set(envs) == {"prod", "dev"}
    dev = envs["dev"]
    assert dev["commit"] == record["to"] and dev["branch"] == "dev"
    assert dev["unit"]["active"] is True and dev["unit"]["state"] == "active"
    assert dev["health"]["ok"] is True and dev["health"]["status"] == 200 and dev["health"]["ms"] > 0
    assert dev["last_deploy"]["result"] == "ok"
    assert dev["last_backup"]["path"] == record["backup"] and dev["last_backup"]["time"]
    assert dev["rollback"].startswith("python3 ") and f"rollback.py dev --to {record['tag']}" in dev["rollback"]
    assert envs["prod"]["last_deploy"] is None and envs["prod"]["rollback"] is None
    text = sb.run("status.py")
    assert "== dev OK" in text.stdout and f"--to {record['tag']}" in text.stdout


def test_status_exits_1_when_an_env_is_down_and_shows_only_one_env(sandbox):
    sb = sandbox
    assert sb.run("backup.py", "--all").returncode == 0
    sb.stop_app("prod")
    proc = sb.run("status.py")
    assert proc.returncode == 1 and "== prod PROBLEM" in proc.stdout
    proc = sb.run("status.py", "dev", "--json")
    assert proc.returncode == 0 and list(json.loads(proc.stdout)["envs"]) == ["dev"]


def test_backup_list_verify_and_quiet(sandbox):
    sb = sandbox
    proc = sb.run("backup.py", "--all", "--quiet")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    listed = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]
    assert {b["env"] for b in listed} == {"prod", "dev"} and all(b["reason"] == "nightly" for b in listed)
    for b in listed:
        assert stat.S_IMODE(os.stat(b["path"]).st_mode) == 0o600 and b["bytes"] > 0
    assert sb.run("backup.py", "--verify").returncode == 0
    victim = listed[0]["path"]
    with open(victim, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01")
    proc = sb.run("backup.py", "--verify", "--quiet")
    assert proc.returncode == 1 and f"BAD backup {victim}" in proc.stderr and proc.stdout == ""
    assert sb.run("backup.py", "--verify", listed[1]["path"]).returncode == 0

"""A clock stepped back (issue 29, finding 4): a copy dated in the future is said, with the command
that resolves it, and never blocks newer copies, verify.py or a promotion."""

import json
from datetime import datetime, timedelta
from pathlib import Path


def test_a_copy_dated_in_the_future_blocks_nothing(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    listed = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]
    newest = next(b for b in listed if b["env"] == "dev")
    manifest = Path(newest["path"] + ".json")
    data = json.loads(manifest.read_text())
    data["time"] = (datetime.fromisoformat(data["time"]) + timedelta(hours=3)).isoformat()
    manifest.write_text(json.dumps(data))                   # made while the clock was 3 h ahead
    proc = sb.run("verify.py", "dev", "--json")
    check = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "backup")
    assert not check["ok"] and "in the future" in check["detail"]
    assert "backup.py dev" in check["detail"]                # the command that resolves it
    status = sb.run("status.py", "dev")
    assert status.returncode == 1 and "in the future" in status.stdout and "backup.py dev" in status.stdout
    assert sb.run("backup.py", "dev").returncode == 0        # a copy made now is the newest
    proc = sb.run("verify.py", "dev", "--json")
    report = json.loads(proc.stdout)
    check = next(c for c in report["checks"] if c["name"] == "backup")
    assert check["ok"] and "in the future" in check["detail"], check
    assert report["ok"], report
    status = sb.run("status.py", "dev")
    assert status.returncode == 0 and "in the future" in status.stdout, status.stdout
    sb.merge_to_main()
    proc = sb.run("deploy.py", "prod", "--yes")               # the promotion is not blocked
    assert proc.returncode == 0, proc.stderr

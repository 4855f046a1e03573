"""The tests' restic repositories with a cheap key (tests/cheap_restic.py): real restic opens them with the
password and only with it, checks them clean, and reads the cheap parameters from the key file."""

import json
import os
import subprocess

from tests import cheap_restic


def restic(repository, password, *args):
    return subprocess.run(["restic", "--repo", str(repository), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RESTIC_PASSWORD": password})


def test_a_premade_repository_opens_with_its_password_only_and_checks_clean(tmp_path):
    repository = tmp_path / "repo"
    cheap_restic.premade(repository, "the password")
    (key,) = (repository / "keys").iterdir()
    assert {k: json.loads(key.read_text())[k] for k in ("N", "r", "p")} == cheap_restic.CHEAP
    assert restic(repository, "the password", "backup", "--quiet", str(key)).returncode == 0
    check = restic(repository, "the password", "check")
    assert check.returncode == 0 and "no errors were found" in check.stdout, check.stdout + check.stderr
    wrong = restic(repository, "not the password", "snapshots")
    assert wrong.returncode != 0 and "wrong password" in wrong.stderr
    cheap_restic.premade(repository, "another password")        # one is there: left as it is
    assert restic(repository, "the password", "snapshots", "--json").returncode == 0

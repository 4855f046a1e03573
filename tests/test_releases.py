"""Releases on the real sandbox: conversion of an env that runs from its work tree, builds in real
venvs from a wheel folder made here (no network), rollback as a switch with the wheel folder
gone, a failed build that changes nothing, a crash after the switch, retention, immutability."""

import hashlib
import json
import os
import shutil
import sqlite3
import sys

import pytest
import requests

from demo.sandbox import git
from demo.wheels import make_wheel
from safedeploy.releases import Release, to_remove

from helpers import log_records


def served(sb, env="dev"):
    return requests.get(sb.url(env, "/"), timeout=5).json()


def main_pid(sb, env="dev"):
    return sb.manager.systemctl("show", sb.unit(env), "-p", "MainPID", "--value").stdout.strip()


def current(sb, env="dev"):
    return os.readlink(f"{sb.path(env)}.releases/current")


def toml_list(value):
    return json.dumps(value)


def venv_build(wheels):
    """A release's own venv, its requirements installed from the wheel folder only."""
    return [[sys.executable, "-m", "venv", "--without-pip", "venv"],
            [sys.executable, "-m", "pip", "--python", "venv/bin/python", "install", "--quiet",
             "--disable-pip-version-check", "--no-index", "--find-links", str(wheels), "-r", "requirements.txt"]]


def notes(sb, env="dev", n=3):
    for i in range(n):
        assert requests.post(sb.url(env, "/notes"), data=f"note {i}", timeout=5).status_code == 201


def count_notes(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM notes").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def deps_host(in_place, tmp_path):
    """dev as a host runs today: v1 pins pinlib 1.0, installed in a venv inside the work tree,
    and the unit runs that venv's python; then converted to releases with a venv build."""
    sb = in_place
    wheels = tmp_path / "wheels"
    for version in ("1.0", "2.0"):
        make_wheel(wheels, "pinlib", version)
    sb.release("dev", {"requirements.txt": "pinlib==1.0\n", "MODE": "needs pinlib 1.0\n", "VERSION": "1\n"},
               "v1: pins pinlib 1.0")
    tree = sb.path("dev")
    sb.pull("dev")
    for argv in venv_build(wheels):
        import subprocess
        subprocess.run(argv, cwd=tree, check=True, timeout=120)
    sb.write_unit("dev", python=f"{tree}/venv/bin/python")
    sb.manager.systemctl("daemon-reload")
    sb.manager.systemctl("restart", sb.unit("dev"))
    sb.wait_serving("dev")
    assert served(sb)["deps"] == {"pinlib": "1.0"}
    sb.write_config(dev=f"build = {toml_list(venv_build(wheels))}\nshared = [\"uploads\"]")
    notes(sb)
    proc = sb.run("deploy.py", "dev", "--install-units", "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return sb, wheels


def test_conversion_moves_the_data_and_runs_the_first_release(deps_host):
    sb, _ = deps_host
    tree, root = sb.path("dev"), sb.path("dev").parent / "dev.releases"
    assert served(sb)["deps"] == {"pinlib": "1.0"} and served(sb)["notes"] == 3
    rel = current(sb)
    assert rel.startswith("releases/") and (root / rel / "venv" / "bin" / "python").exists()
    # the database moved (renamed) into the shared folder; the release links it
    assert not (tree / "instance" / "app.db").exists()
    assert count_notes(root / "shared" / "instance" / "app.db") == 3
    assert os.readlink(root / rel / "instance") == "../../shared/instance"
    unit = (sb.manager.unit_dir / sb.unit("dev")).read_text()
    assert f"WorkingDirectory={root}/current" in unit and f"ExecStart={root}/current/venv/bin/python" in unit
    assert (sb.manager.unit_dir / sb.unit("dev").replace(".service", ".socket")).exists()
    assert git(tree, "status", "--porcelain", "--untracked-files=no") == ""
    # the app serves REVISION from its release
    assert requests.get(sb.url("dev", "/_deploy/status"), timeout=5).json()["release"] == rel.split("/")[1]


def test_rollback_after_a_dependency_upgrade_is_a_switch_with_no_index(deps_host):
    sb, wheels = deps_host
    first = current(sb)
    sb.release("dev", {"requirements.txt": "pinlib==2.0\n", "MODE": "needs pinlib 2.0\n", "VERSION": "2\n"},
               "v2: upgrades pinlib to 2.0")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert served(sb)["deps"] == {"pinlib": "2.0"} and served(sb)["version"] == "2"
    second = current(sb)
    assert second != first
    shutil.rmtree(wheels)          # the package index is unreachable from now on
    proc = sb.run("rollback.py", "dev", "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "kept; no rebuild" in proc.stdout
    assert current(sb) == first
    body = served(sb)
    assert body["deps"] == {"pinlib": "1.0"} and body["version"] == "1" and body["notes"] == 3
    # the work tree follows the commit that runs
    assert sb.head("dev") == json.loads((sb.path("dev").parent / "dev.releases" / first / "REVISION").read_text())["commit"]


def test_a_failed_build_changes_nothing_live(deps_host):
    sb, _ = deps_host
    before = (current(sb), main_pid(sb), sb.head("dev"), git(sb.path("dev"), "tag", "-l"))
    releases_dir = sb.path("dev").parent / "dev.releases" / "releases"
    kept = sorted(os.listdir(releases_dir))
    sb.release("dev", {"requirements.txt": "pinlib==3.0\n", "VERSION": "3\n"}, "v3: needs a pinlib nobody has")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1, proc.stderr
    assert "build command" in proc.stderr and "stopped before any change" in proc.stderr
    assert (current(sb), main_pid(sb), sb.head("dev"), git(sb.path("dev"), "tag", "-l")) == before
    assert sorted(os.listdir(releases_dir)) == kept          # no half-built release is left
    assert served(sb)["version"] == "1"
    assert log_records(sb, "dev")[-1]["failed_step"] == "build"


def test_a_crash_after_the_switch_rolls_back_to_a_release_on_its_own_packages(deps_host):
    sb, _ = deps_host
    first = current(sb)
    sb.release("dev", {"requirements.txt": "pinlib==2.0\n", "MODE": "crash\n", "VERSION": "2\n"},
               "v2: upgrades pinlib, and crashes")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1, proc.stderr
    assert "rolled back by itself" in proc.stderr
    assert current(sb) == first
    assert served(sb)["deps"] == {"pinlib": "1.0"} and served(sb)["version"] == "1"


def tree_snapshot(folder):
    """Every file under folder (links not followed) with its inode, size, mtime and hash."""
    snap = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, name)
            st = os.lstat(p)
            digest = "" if os.path.islink(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
            snap[p] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return snap


def test_building_a_release_never_changes_an_older_one_and_retention_keeps_what_points_need(deps_host):
    sb, _ = deps_host
    root = sb.path("dev").parent / "dev.releases"
    first = root / current(sb)
    before = tree_snapshot(first)
    sb.write_config(dev=sb.config.read_text().split("[env.dev]")[1].split("unit = ")[1].split("\n", 1)[1]
                    + "keep_releases = 2")
    for n in (2, 3, 4):
        sb.release("dev", {"VERSION": f"{n}\n"}, f"v{n}")
        proc = sb.run("deploy.py", "dev")
        assert proc.returncode == 0, proc.stderr + proc.stdout
    assert tree_snapshot(first) == before or not first.exists()
    kept = sorted(os.listdir(root / "releases"))
    # keep 2: the current and the previous; the first (v1) went, as no point of the last 5 operations needs it
    assert len(kept) >= 2 and current(sb).split("/")[1] in kept
    records = [r for r in log_records(sb, "dev") if r.get("kind") == "deploy"]
    assert records[-1]["previous_release"] in kept


def test_retention_decision():
    rel = [Release(f"2026110{i}-000000-c{i}", None, f"c{i}", "") for i in range(1, 8)]
    ids = lambda rs: sorted(r.id for r in rs)       # noqa: E731
    # keep 3 newest; the current (newest) and the previous are among them
    assert ids(to_remove(rel, rel[6].id, rel[5].id, set(), 3)) == ids(rel[:4])
    # a release an old point needs stays, as do the current and previous even when old
    assert ids(to_remove(rel, rel[0].id, rel[1].id, {"c3"}, 2)) == ids([rel[3], rel[4]])
    assert to_remove(rel, None, None, set(), 10) == []


def test_conversion_is_put_back_when_the_first_release_is_not_healthy(in_place):
    sb = in_place
    notes(sb)
    unit_before = (sb.manager.unit_dir / sb.unit("dev")).read_text()
    build = [[sys.executable, "-c", "open('MODE', 'w').write('crash')"]]
    sb.write_config(dev=f"build = {toml_list(build)}")
    proc = sb.run("deploy.py", "dev", "--install-units", "--yes")
    assert proc.returncode == 1, proc.stderr
    assert "everything is put back" in proc.stderr
    assert (sb.manager.unit_dir / sb.unit("dev")).read_text() == unit_before
    assert not (sb.manager.unit_dir / sb.unit("dev").replace(".service", ".socket")).exists()
    assert not os.path.islink(f"{sb.path('dev')}.releases/current")
    assert count_notes(sb.path("dev") / "instance" / "app.db") == 3
    assert served(sb)["notes"] == 3
    # and a deploy says the env still runs from its tree, naming the command that converts it
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    sb.write_config()
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0 and "--install-units" in proc.stdout


def test_data_rollback_saves_the_live_database_by_rename_and_seals_it(deps_host):
    sb, _ = deps_host
    root = sb.path("dev").parent / "dev.releases"
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    notes(sb, n=2)        # written after the point: the restore takes them out of the live database
    proc = sb.run("rollback.py", "dev", "--yes", "--with-db")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "notes: 2 row(s)" in proc.stdout
    assert count_notes(root / "shared" / "instance" / "app.db") == 3
    record = log_records(sb, "dev")[-1]
    saved = record["pre_rollback"]
    manifest = json.loads(open(saved + ".json").read())
    assert manifest["reason"] == "pre-rollback" and count_notes(saved) == 5
    assert hashlib.sha256(open(saved, "rb").read()).hexdigest() == manifest["sha256"]
    assert not os.path.exists(saved + "-wal")
    assert set(record["steps"]) >= {"prepare", "stop", "save", "database", "restart", "seal"}


def test_status_names_files_of_the_running_release_changed_by_hand(deps_host):
    sb, _ = deps_host
    root = sb.path("dev").parent / "dev.releases"
    proc = sb.run("backup.py", "--all")
    assert proc.returncode == 0
    assert sb.run("status.py", "dev").returncode == 0, sb.run("status.py", "dev").stdout
    (root / current(sb) / "VERSION").write_text("hot-patched in place\n")
    proc = sb.run("status.py", "dev", "--json")
    st = json.loads(proc.stdout)["envs"]["dev"]
    assert proc.returncode == 1 and any("differs from its commit: VERSION" in p for p in st["problems"])


def test_the_shared_folder_holding_the_database_is_private(deps_host):
    sb, _ = deps_host
    import stat
    root = sb.path("dev").parent / "dev.releases"
    for folder in (root / "shared", root / "shared" / "instance"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder


def test_the_drill_tests_the_kept_release_not_a_rebuild_with_today_s_build(deps_host):
    """After the build changed (the wheel v1 needs is gone from the wheel folder), v1's point is still
    good: its kept release has its own venv. The drill boots that release, and says so."""
    sb, wheels = deps_host
    sb.release("dev", {"requirements.txt": "pinlib==2.0\n", "MODE": "needs pinlib 2.0\n", "VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    (wheels / "pinlib-1.0-py3-none-any.whl").unlink()
    proc = sb.run("rollback.py", "dev", "--drill")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "its kept release" in proc.stdout and "REBUILT" not in proc.stdout
    drill = log_records(sb, "dev")[-1]
    assert drill["kind"] == "drill" and drill["release"] and drill["rebuilt"] is False

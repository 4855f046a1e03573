"""Which config file a command reads: --config FILE, else $DEPLOY_CONFIG, else the operator's own
$XDG_CONFIG_HOME/safe-deploy/config.toml (~/.config/... when XDG_CONFIG_HOME is unset) when it exists, else
config.toml beside the scripts. find_config_file directly, then the scripts in a subprocess with real files
and a HOME of their own; and adopt.py --discover --write, which writes the operator's own file."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from safedeploy import SCRIPTS_DIR, cli, config
from safedeploy.errors import DeployError
from safedeploy.files import write_new

from helpers import one_line_error

ROOT = Path(__file__).resolve().parent.parent


def env_config(folder: Path, env: str, port: int) -> Path:
    """A config with one env named env, its tree beside the file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / env).mkdir(exist_ok=True)
    file = folder / "config.toml"
    file.write_text(f'[env.{env}]\npath = "{env}"\nbranch = "main"\nport = {port}\ndb = "instance/app.db"\n'
                    f'unit = "{env}-app.service"\n')
    file.chmod(0o600)
    return file


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME of its own, no XDG_CONFIG_HOME, no DEPLOY_CONFIG."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("DEPLOY_CONFIG", raising=False)
    return home


# -- find_config_file --------------------------------------------------------------------------------
def test_own_config_is_under_xdg_config_home_else_dot_config(home, monkeypatch, tmp_path):
    assert config.own_config_file() == home / ".config" / "safe-deploy" / "config.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.own_config_file() == tmp_path / "xdg" / "safe-deploy" / "config.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/xdg")        # the XDG spec: a relative value is ignored
    assert config.own_config_file() == home / ".config" / "safe-deploy" / "config.toml"


def test_lookup_order(home, monkeypatch, tmp_path):
    own = home / ".config" / "safe-deploy" / "config.toml"
    # nothing of the operator's: the shipped one beside the scripts
    assert config.find_config_file() == (SCRIPTS_DIR / "config.toml", False)
    # the operator's own, once it exists
    env_config(own.parent, "own", 8101)
    assert config.find_config_file() == (own, False)
    # $DEPLOY_CONFIG before it
    named = env_config(tmp_path / "named", "named", 8102)
    monkeypatch.setenv("DEPLOY_CONFIG", str(named))
    assert config.find_config_file() == (named, True)
    # --config before everything
    given = env_config(tmp_path / "given", "given", 8103)
    assert config.find_config_file(str(given)) == (given, True)
    # an empty $DEPLOY_CONFIG names nothing
    monkeypatch.setenv("DEPLOY_CONFIG", "")
    assert config.find_config_file() == (own, False)


def test_a_dangling_own_link_is_an_error_not_a_silent_fallback(home):
    own = home / ".config" / "safe-deploy" / "config.toml"
    own.parent.mkdir(parents=True)
    own.symlink_to(home / "gone.toml")
    assert config.find_config_file() == (own, False)
    with pytest.raises(DeployError, match="config file not found"):
        config.load()


def test_printed_commands_name_the_file_only_when_the_lookup_would_not_find_it(home, monkeypatch, tmp_path):
    own = env_config(home / ".config" / "safe-deploy", "own", 8104)
    assert "--config" not in cli.command_line("status.py", config_file=own)
    other = env_config(tmp_path / "other", "other", 8105)
    assert f"--config {other}" in cli.command_line("status.py", config_file=other)
    # a $DEPLOY_CONFIG naming another file: a pasted command would read that one, so the file is named
    monkeypatch.setenv("DEPLOY_CONFIG", str(other))
    assert f"--config {own}" in cli.command_line("status.py", config_file=own)


# -- end to end: the scripts, real files, their own HOME -------------------------------------------------
def run(script, *args, env):
    full = {k: v for k, v in os.environ.items() if k not in ("XDG_CONFIG_HOME", "DEPLOY_CONFIG")}
    full.update(env)
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=60,
                          env=full, stdin=subprocess.DEVNULL)


def loaded(proc) -> str:
    """The config file a `rollback.py nosuch --list` loaded: its error names the file and its envs."""
    assert proc.returncode == 2, proc.stderr
    return one_line_error(proc)


def test_scripts_follow_the_lookup_order(tmp_path):
    home = tmp_path / "home"
    own = env_config(home / ".config" / "safe-deploy", "own", 8111)
    xdg = env_config(tmp_path / "xdg" / "safe-deploy", "xdg", 8112)
    named = env_config(tmp_path / "named", "named", 8113)
    given = env_config(tmp_path / "given", "given", 8114)
    base = {"HOME": str(home)}
    # the operator's own file, found without naming it; a command that loads it and prints
    proc = run("backup.py", "--list", "--json", env=base)
    assert proc.returncode == 0 and '"backups": []' in proc.stdout, proc.stderr
    assert loaded(run("rollback.py", "nosuch", "--list", env=base)).startswith(f"error: {own}: no env named 'nosuch' (envs: own)")
    # $XDG_CONFIG_HOME moves the operator's own
    line = loaded(run("rollback.py", "nosuch", "--list", env={**base, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}))
    assert f"{xdg}: " in line and "(envs: xdg)" in line
    # $DEPLOY_CONFIG comes first, --config before it
    line = loaded(run("rollback.py", "nosuch", "--list", env={**base, "DEPLOY_CONFIG": str(named)}))
    assert f"{named}: " in line and "(envs: named)" in line
    line = loaded(run("rollback.py", "nosuch", "--list", "--config", str(given), env={**base, "DEPLOY_CONFIG": str(named)}))
    assert f"{given}: " in line and "(envs: given)" in line
    # no own file: the shipped config.toml beside the scripts (the seed host's, whose folders are not here)
    line = loaded(run("rollback.py", "nosuch", "--list", env={"HOME": str(tmp_path / "empty")}))
    assert f"{ROOT / 'config.toml'}: env.prod.path: /home/ubuntu/datatracker is not an existing folder" in line


# -- adopt.py --discover --write: the operator's own file ---------------------------------------------------
def test_write_goes_to_the_operator_s_own_file_private_and_never_over_one(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    sys.path.insert(0, str(ROOT))
    try:
        import adopt
    finally:
        sys.path.remove(str(ROOT))
    own = home / ".config" / "safe-deploy" / "config.toml"
    assert adopt.write_target("") == own and adopt.write_target("x.toml") == Path("x.toml")
    assert adopt.write_target(None) is None
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    # the data the config names stays out of ~/.config: backups in the data folder, state in the state folder
    assert adopt.data_folders() == (str(home / ".local/share/safe-deploy/backups"),
                                    str(tmp_path / "state-home/safe-deploy"))
    adopt.make_own_folder(own.parent)
    for folder in (own.parent, own.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    write_new(own, "[env.a]\n")
    assert stat.S_IMODE(own.stat().st_mode) == 0o600 and own.read_text() == "[env.a]\n"
    with pytest.raises(FileExistsError):
        write_new(own, "[env.b]\n")
    assert own.read_text() == "[env.a]\n" and sorted(p.name for p in own.parent.iterdir()) == ["config.toml"]


def test_write_refuses_an_existing_own_file_and_says_so(tmp_path):
    home = tmp_path / "home"
    own = env_config(home / ".config" / "safe-deploy", "own", 8121)
    before = own.read_text()
    proc = run("adopt.py", "--discover", "--write", env={"HOME": str(home)})
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert f"--write {own}: the file exists; adopt.py never overwrites a config" in line
    assert own.read_text() == before


def test_write_still_takes_a_file_and_parses_both_ways(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    target = tmp_path / "mine.toml"
    target.write_text("x")
    for args in (["--discover", "--write", str(target)], ["--write", str(target), "--discover"]):
        proc = run("adopt.py", *args, env={"HOME": str(home)})
        assert proc.returncode == 2 and f"--write {target}: the file exists" in one_line_error(proc)
    proc = run("adopt.py", "dev", "--write", env={"HOME": str(home)})
    assert proc.returncode == 2 and "--write goes with --discover" in one_line_error(proc)


def test_the_shipped_example_that_does_not_fit_this_host_says_what_it_is(tmp_path):
    """No --config, no $DEPLOY_CONFIG, no file of one's own: the example beside the scripts is loaded; where it
    does not fit (the seed's host paths), the one line says so and how to write one's own."""
    home = tmp_path / "home"
    home.mkdir()
    proc = run("status.py", env={"HOME": str(home)})
    if proc.returncode == 2:                 # on the seed's own host the example loads as it is
        line = one_line_error(proc)
        assert "the example config.toml shipped beside the scripts" in line and "adopt.py --discover --write" in line

"""config.toml: the shipped example, good configs, and bad ones (exit 2, one line naming file and key)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safedeploy import config
from safedeploy.errors import DeployError

from helpers import listing, one_line_error

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    (tmp_path / "prod").mkdir(exist_ok=True)
    (tmp_path / "dev").mkdir(exist_ok=True)
    f = tmp_path / "config.toml"
    f.write_bytes(text.encode() if isinstance(text, str) else text)
    return f


GOOD = """
[defaults]
health_path = "/health"

[retention]
daily = 3

[env.prod]
path = "prod"
branch = "main"
port = 8000
db = "instance/app.db"
unit = "app.service"
promote_from = "dev"
pre_restart = [["venv/bin/pip", "install", "-r", "requirements.txt"]]

[env.dev]
path = "dev"
branch = "dev"
port = 8001
db = "/srv/dev.db"
unit = "app-dev.service"
remote = ""
"""


def test_good_config_resolves_paths_and_defaults(tmp_path):
    cfg = config.load(str(write(tmp_path, GOOD)))
    prod, dev = cfg.envs["prod"], cfg.envs["dev"]
    assert prod.path == tmp_path / "prod"
    assert prod.db == tmp_path / "prod" / "instance" / "app.db"
    assert dev.db == Path("/srv/dev.db")
    assert prod.backup_dir == tmp_path / "backups" / "prod"
    assert prod.state_dir == tmp_path / "state"
    assert prod.remote == "origin" and dev.remote == ""
    assert prod.health_url == "http://127.0.0.1:8000/health"
    assert prod.health_timeout == 30
    assert cfg.retention == {"daily": 3, "weekly": 4, "monthly": 6}
    assert prod.pre_restart == [["venv/bin/pip", "install", "-r", "requirements.txt"]]


def test_shipped_config_is_the_seed_host_and_loads(tmp_path):
    """config.toml beside the scripts is shipped (in git): the seed's host, commented. The real loader takes
    it as it is but for the seed host's folders, which do not exist here: with them made (the same file,
    /home/ubuntu/ moved under tmp_path), it loads, every check passing."""
    assert "config.toml" in subprocess.run(["git", "-C", str(ROOT), "ls-files", "config.toml"],
                                           capture_output=True, text=True, timeout=30).stdout
    text = (ROOT / "config.toml").read_text()
    data = config.read_toml(ROOT / "config.toml")
    assert data["env"]["prod"]["branch"] == "main" and data["env"]["prod"]["port"] == 8000
    assert data["env"]["dev"]["unit"] == "datatracker-dev.service"
    with pytest.raises(DeployError, match=r"env\.prod\.path: /home/ubuntu/datatracker is not an existing folder"):
        config.parse(data, ROOT / "config.toml")
    home = tmp_path / "home" / "ubuntu"
    for tree in ("datatracker", "datatracker-dev"):
        (home / tree).mkdir(parents=True)
    copy = tmp_path / "tool" / "config.toml"
    copy.parent.mkdir()
    copy.write_text(text.replace("/home/ubuntu/", f"{home}/"))
    cfg = config.load(str(copy))
    assert list(cfg.envs) == ["prod", "dev"]
    prod = cfg.envs["prod"]
    assert prod.path == home / "datatracker" and prod.db_setting == "instance/datatracker.db"
    assert prod.promote_from == "dev" and prod.watch == 60 and prod.keep_releases == 5
    assert prod.build and prod.pre_restart == [["venv/bin/flask", "db", "upgrade"]]
    assert prod.backup_dir == copy.parent / "backups" / "prod" and cfg.retention == {"daily": 7, "weekly": 4, "monthly": 6}


def test_config_found_by_env_variable(tmp_path, monkeypatch):
    f = write(tmp_path, GOOD)
    monkeypatch.setenv("DEPLOY_CONFIG", str(f))
    cfg = config.load()
    assert cfg.file == f and cfg.explicit


BAD = [
    ("", r"env: no environments"),
    ("[env.prod\n", r"TOML syntax error"),
    (GOOD.replace("port = 8000", "port = 70000"), r"env\.prod\.port: expected an integer from 1 to 65535"),
    (GOOD.replace("port = 8000", 'port = "8000"'), r"env\.prod\.port"),
    (GOOD.replace("port = 8000", "port = true"), r"env\.prod\.port"),
    (GOOD.replace("port = 8001", "port = 8000"), r"env\.dev\.port: 8000 is also env prod's"),
    (GOOD.replace('unit = "app-dev.service"', 'unit = "app.service"'), r"env\.dev\.unit: .*also env prod's"),
    (GOOD.replace('unit = "app.service"', 'unit = "app"'), r"env\.prod\.unit: expected a systemd unit name"),
    (GOOD.replace('branch = "main"\n', ""), r"env\.prod\.branch: missing"),
    (GOOD.replace("brach", "x").replace('branch = "dev"', 'brnch = "dev"'), r"env\.dev\.brnch: unknown key \(did you mean 'branch'\?\)"),
    (GOOD.replace("[retention]", "[retension]"), r"retension: unknown key \(did you mean 'retention'\?\)"),
    (GOOD.replace("daily = 3", "daily = -1"), r"retention\.daily"),
    (GOOD.replace('health_path = "/health"', 'health_pth = "/health"'), r"defaults\.health_pth: unknown key \(did you mean 'health_path'\?\)"),
    (GOOD.replace('health_path = "/health"', 'health_path = "health"'), r"defaults\.health_path"),
    (GOOD.replace('[["venv/bin/pip", "install", "-r", "requirements.txt"]]', '"pip install -r requirements.txt"'),
     r"env\.prod\.pre_restart: .*without a shell"),
    (GOOD.replace('[["venv/bin/pip", "install", "-r", "requirements.txt"]]', '[[]]'), r"env\.prod\.pre_restart\[0\]"),
    (GOOD.replace('promote_from = "dev"', 'promote_from = "stage"'), r"env\.prod\.promote_from: no env named 'stage'"),
    (GOOD.replace('promote_from = "dev"', 'promote_from = "prod"'), r"promote_from: an env cannot promote from itself"),
    (GOOD.replace("[env.dev]", "[env.'dev;rm -rf']"), r"env\.dev;rm -rf: env names may hold only"),
    (GOOD.replace("[env.dev]", "[env.'../x']"), r"env names may hold only"),
    (GOOD.replace('branch = "dev"', 'branch = "de..v"'), r"env\.dev\.branch"),
    (GOOD.replace('path = "dev"', 'path = "nowhere"'), r"env\.dev\.path: .*nowhere is not an existing folder"),
    (GOOD.replace('path = "dev"', 'path = "prod"').replace('db = "/srv/dev.db"', 'db = "x.db"'),
     r"env\.dev\.path: .*also env prod's work tree, but on branch 'main', not 'dev'.*git -C .*prod worktree add .*prod-dev dev"),
    (GOOD.replace("health_timeout", "x").replace('[defaults]', '[defaults]\nhealth_timeout = 0'), r"defaults\.health_timeout"),
    (GOOD.replace('remote = ""', 'remote = "a b"'), r"env\.dev\.remote"),
    (GOOD + "\n[extra]\n", r"extra: unknown key"),
    (b"[env.prod]\npath = \"\xff\"\n", r"not UTF-8"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_is_refused_naming_file_and_key(tmp_path, text, message):
    f = write(tmp_path, text)
    with pytest.raises(DeployError, match=message) as info:
        config.load(str(f))
    assert info.value.code == 2
    assert str(f) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("script", ["deploy.py", "verify.py", "status.py", "rollback.py", "backup.py", "adopt.py"])
def test_scripts_report_a_bad_config_in_one_line_and_change_nothing(tmp_path, script):
    f = write(tmp_path, GOOD.replace("port = 8000", "port = 0"))
    before = listing(tmp_path)
    args = [] if script in ("status.py", "backup.py") else ["prod"]
    if script == "backup.py":
        args = ["--all"]
    proc = subprocess.run([sys.executable, str(ROOT / script), *args, "--config", str(f)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert str(f) in line and "env.prod.port" in line
    assert listing(tmp_path) == before


def test_missing_config_file_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "status.py"), "--config", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "config file not found" in one_line_error(proc)


@pytest.mark.parametrize("script", ["deploy.py", "verify.py", "status.py", "rollback.py", "backup.py", "adopt.py"])
def test_help_has_an_example(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert f"python3 {script}" in proc.stdout and "--config" in proc.stdout


def test_every_script_without_its_requirements_says_what_to_install(tmp_path):
    """A venv's python3 without requests and GitPython (an app's venv): the script re-runs in the tool's own
    .venv; where it cannot (here: told it already did), one line naming them and the command that makes the
    tool's venv, never a pip install into that other venv, exit 2 (issue 29)."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    for script in ("deploy.py", "verify.py", "status.py", "rollback.py", "backup.py", "adopt.py"):
        proc = subprocess.run([str(bare / "bin" / "python"), str(ROOT / script), "--help"], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
        proc = subprocess.run([str(bare / "bin" / "python"), str(ROOT / script), "--help"], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path, env={**os.environ, "SAFE_DEPLOY_REEXEC": "1"})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "GitPython" in lines[0] and "requests" in lines[0] and "pip install -r" in lines[0]
        assert f"{bare}/bin/python -m pip" not in lines[0] and "/.venv/bin/pip install -r" in lines[0]


# -- issue 19: one confinement rule for every configured path ---------------------------------------------
CONFINED = """
[env.prod]
path = "prod"
branch = "main"
port = 8000
db = "instance/app.db"
unit = "app.service"
{prod}

[env.dev]
path = "dev"
branch = "dev"
port = 8001
db = "instance/app.db"
unit = "app-dev.service"
{dev}
"""


def confined(tmp_path, prod="", dev="", top=""):
    """CONFINED with the lines given for each env: a key the template sets already is replaced."""
    sections = CONFINED.format(prod="", dev="").split("[env.dev]")
    for i, extra in enumerate((prod, dev)):
        for line in filter(None, extra.splitlines()):
            key = line.split("=", 1)[0].strip()
            lines = sections[i].splitlines()
            hit = [n for n, old in enumerate(lines) if old.split("=", 1)[0].strip() == key]
            if hit:
                lines[hit[0]] = line
            else:
                lines.insert(len(lines) - 1, line)
            sections[i] = "\n".join(lines) + "\n"
    return write(tmp_path, top + "[env.dev]".join(sections))


REFUSED = [
    # 1: a shared path inside the database's folder (always shared): the build removed the live uploads
    ({"prod": 'shared = ["instance/uploads"]'},
     r"env\.prod\.shared: 'instance/uploads' lies inside 'instance' \(the database's folder, always shared\)"),
    ({"prod": 'shared = ["static", "static/img"]'}, r"env\.prod\.shared: 'static/img' lies inside 'static', also shared"),
    ({"prod": 'db = "data/sqlite/app.db"\nshared = ["data"]'},
     r"env\.prod\.db: 'data/sqlite' \(the database's folder, always shared\) lies inside 'data', also shared"),
    # 2: a db that climbs out of its tree (its folder became the shared path ../data: prod's live
    # database was renamed into dev's releases)
    ({"dev": 'db = "../data/dev.sqlite"'}, r"env\.dev\.db: '\.\./data/dev\.sqlite' climbs out of env dev's tree"),
    ({"dev": 'db = "instance/../../prod/instance/x.db"'}, r"env\.dev\.db: .* climbs out of env dev's tree"),
    # no two envs overlap
    ({"prod": 'db = "{root}/dev/instance/prod.db"'}, r"env\.prod\.db: .*/dev/instance/prod\.db lies inside env dev's tree"),
    ({"dev": 'path = "prod/dev"'}, r"env\.dev\.path: .*/prod/dev lies inside env prod's tree"),
    ({"prod": 'backup_dir = "prod/backups"'}, r"env\.prod\.backup_dir: .*/prod/backups/prod lies inside env prod's tree"),
    ({"dev": 'state_dir = "prod/instance/state"'}, r"env\.dev\.state_dir: .*/prod/instance/state lies inside env prod's tree"),
]


@pytest.mark.parametrize("keys, message", REFUSED, ids=[f"refused{i}" for i in range(len(REFUSED))])
def test_paths_that_overlap_are_refused_at_load_naming_both(tmp_path, keys, message):
    f = confined(tmp_path, **{k: v.replace("{root}", str(tmp_path)) for k, v in keys.items()})
    (tmp_path / "prod" / "dev").mkdir()
    with pytest.raises(DeployError, match=message) as info:
        config.load(str(f))
    assert info.value.code == 2 and str(f) in str(info.value) and "\n" not in str(info.value)


def test_a_db_folder_linked_into_another_env_s_tree_is_refused(tmp_path):
    """Through links too: prod's instance/ is a link to dev's instance/ (two file names, one folder)."""
    f = confined(tmp_path, prod='db = "instance/prod.db"')
    (tmp_path / "dev" / "instance").mkdir()
    (tmp_path / "prod" / "instance").symlink_to(tmp_path / "dev" / "instance")
    with pytest.raises(DeployError, match=r"env\.prod\.db: .*/dev/instance/prod\.db lies inside env dev's tree") as info:
        config.load(str(f))
    assert info.value.code == 2


def test_what_stays_inside_is_accepted(tmp_path):
    """The database's folder named in `shared` too, distinct shared paths, an absolute db elsewhere,
    and the two envs' dbs in one folder outside both trees (absolute: that folder is never moved)."""
    (tmp_path / "data").mkdir()
    f = confined(tmp_path, prod='shared = ["instance", "./uploads", "static/img"]\ndb = "instance/app.db"',
                 dev=f'db = "{tmp_path}/data/dev.db"')
    cfg = config.load(str(f))
    assert cfg.envs["dev"].db == tmp_path / "data" / "dev.db"


def test_a_relative_offsite_repository_is_the_config_s_folder_not_the_current_one(tmp_path, monkeypatch):
    """13: copies scattered into whatever folder cron or a shell was started in."""
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    pw.chmod(0o600)
    f = confined(tmp_path, top='[offsite]\nrepository = "offsite-repo"\npassword_file = "pw"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert config.load(str(f)).offsite.repository == str(tmp_path / "offsite-repo")
    f = confined(tmp_path, top='[offsite]\nrepository = "local:../repo"\npassword_file = "pw"\n')
    assert config.load(str(f)).offsite.repository == str(tmp_path.parent / "repo")
    f = confined(tmp_path, top='[offsite]\nrepository = "sftp:u@nas:relative/on/the/nas"\npassword_file = "pw"\n')
    assert config.load(str(f)).offsite.repository == "sftp:u@nas:relative/on/the/nas"
    f = confined(tmp_path, top='[offsite]\nrepository = "prod/offsite"\npassword_file = "pw"\n')
    with pytest.raises(DeployError, match=r"offsite\.repository: .*/prod/offsite lies inside env prod's tree"):
        config.load(str(f))

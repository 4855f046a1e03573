"""adopt.py on the seed's starting host: prod and dev both on main (two clones), two units, two
databases, no config. Real git, SQLite, HTTP and a real systemd --user manager of this module's
own, so that discovery sees only the units these tests start."""

import json
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from demo.sandbox import Sandbox, UserManager, git
from demo.wheels import make_wheel
from safedeploy import discovery
from tests.helpers import listing, one_line_error

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    m = UserManager(tmp_path_factory.mktemp("adopt-manager"))
    m.start()           # raises: these tests fail, never skip, without a user manager
    yield m
    m.stop()


@pytest.fixture
def seed(manager, tmp_path):
    sb = Sandbox(tmp_path / "host", manager, health_timeout=5, name="datatracker", seed=True)
    sb.root.mkdir()
    sb.build_seed()
    yield sb
    sb.stop_units()
    for name in ("datatracker.socket", "datatracker-dev.socket"):
        manager.systemctl("stop", name, check=False)
        (manager.unit_dir / name).unlink(missing_ok=True)
    for path in manager.unit_dir.glob("datatracker*"):
        manager.systemctl("stop", path.name, check=False)
        path.unlink()
    manager.systemctl("daemon-reload", check=False)


def adopt(sb, *args, config=True):
    argv = [sys.executable, str(REPO / "adopt.py"), *args] + (["--config", str(sb.config)] if config else [])
    return subprocess.run(argv, env=sb.env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def discovered(sb):
    """adopt.py --discover --write, then the edit the proposal asks for (its GUESSed health page), and a
    shorter health timeout than its 30 s (the sample app starts in a tenth of a second)."""
    proc = adopt(sb, "--discover", "--write", str(sb.config), config=False)
    assert proc.returncode == 0, proc.stderr
    sb.config.write_text(sb.config.read_text().replace('health_path = "/"', 'health_path = "/health"')
                         .replace("health_timeout = 30", "health_timeout = 5"))
    return sb.config.read_text()


def main_pid(sb, env):
    return int(sb.manager.systemctl("show", sb.unit(env), "--property=MainPID", "--value").stdout.strip())


def remote_refs(sb):
    out = git(sb.root, "--git-dir", str(sb.root / "origin.git"), "for-each-ref", "--format=%(refname)")
    return set(out.split())


def test_discover_proposes_the_seeds_config_and_never_overwrites(seed):
    text = discovered(seed)
    assert "[env.prod]" in text and "[env.dev]" in text
    assert text.index("[env.prod]") < text.index("[env.dev]")
    prod, dev = text.split("[env.dev]")
    assert f'path = "{seed.path("prod")}"' in prod and 'branch = "main"' in prod
    assert f"port = {seed.ports['prod']}" in prod and 'promote_from = "dev"' in prod
    assert 'db = "instance/app.db"' in prod and 'unit = "datatracker.service"' in prod
    assert 'branch = "dev"' in dev and f"port = {seed.ports['dev']}" in dev and "datatracker-dev.service" in dev
    assert "GUESS" in text          # the health page: said, not hidden
    assert oct(seed.config.stat().st_mode & 0o777) == "0o600"
    before = seed.config.read_bytes()
    again = adopt(seed, "--discover", "--write", str(seed.config), config=False)
    assert again.returncode == 2 and "never overwrites" in one_line_error(again)
    assert seed.config.read_bytes() == before
    status = subprocess.run([sys.executable, str(REPO / "status.py"), "--config", str(seed.config)], env=seed.env,
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in status.stderr and status.returncode in (0, 1), status.stderr


def test_discover_write_alone_writes_the_operator_s_own_config(seed):
    """--write without FILE: $XDG_CONFIG_HOME/safe-deploy/config.toml (the user manager's, here), its folder
    0700 and the file 0600; every script then finds it without --config, and a second --write refuses."""
    own = Path(seed.env["XDG_CONFIG_HOME"]) / "safe-deploy" / "config.toml"
    assert not own.parent.exists()
    try:
        proc = adopt(seed, "--discover", "--write", config=False)
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {own}" in proc.stdout and "--config" not in proc.stdout
        assert stat.S_IMODE(own.stat().st_mode) == 0o600 and stat.S_IMODE(own.parent.stat().st_mode) == 0o700
        assert "[env.prod]" in own.read_text() and "[env.dev]" in own.read_text()
        before = own.read_bytes()
        again = adopt(seed, "--discover", "--write", config=False)
        assert again.returncode == 2 and f"--write {own}: the file exists" in one_line_error(again)
        assert own.read_bytes() == before
        # found without naming it: rollback.py's error names the file it loaded
        listed = subprocess.run([sys.executable, str(REPO / "rollback.py"), "nosuch", "--list"], capture_output=True,
                                text=True, timeout=60, env={k: v for k, v in seed.env.items() if k != "DEPLOY_CONFIG"})
        assert f"{own}: no env named 'nosuch'" in one_line_error(listed)
    finally:
        shutil.rmtree(own.parent, ignore_errors=True)


def test_the_seeds_migration_dev_first_prod_untouched_until_its_turn(seed):
    discovered(seed)
    prod_pid, prod_head = main_pid(seed, "prod"), seed.head("prod")

    refused = adopt(seed, "prod", "--yes")
    assert refused.returncode == 1 and "after dev, which is not adopted yet" in one_line_error(refused)
    assert not (seed.root / "state" / "adoption.json").exists()

    dry = adopt(seed, "dev", "--dry-run")
    assert dry.returncode == 0 and "dry run: nothing was changed" in dry.stdout, dry.stderr
    assert not (seed.root / "state" / "adoption.json").exists() and not Path(f"{seed.path('dev')}.releases").exists()

    done = adopt(seed, "dev", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((seed.root / "state" / "adoption.json").read_text())
    day = doc["phase1"]["time"][:10].replace("-", "")
    refs = remote_refs(seed)
    assert {f"refs/tags/production-stable-{day}", f"refs/tags/dev-stable-{day}", "refs/heads/dev"} <= refs
    for env in ("prod", "dev"):
        entry = doc["envs"][env]
        assert entry["commit"] == prod_head and entry["branch"] == "main" and entry["port"] == seed.ports[env]
        assert Path(entry["backup"]).exists() and Path(entry["unit_copy"]).exists() and len(entry["db_sha256"]) == 64
    assert doc["envs"]["dev"]["adopted"]["commit"] == prod_head
    assert git(seed.path("dev"), "rev-parse", "--abbrev-ref", "HEAD") == "dev"
    assert Path(f"{seed.path('dev')}.releases/current").is_symlink()
    # prod: same process, same commit, same branch, no socket unit
    assert main_pid(seed, "prod") == prod_pid and seed.head("prod") == prod_head
    assert git(seed.path("prod"), "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert not (seed.manager.unit_dir / "datatracker.socket").exists()

    not_yet = adopt(seed, "--checklist")
    assert not_yet.returncode == 1 and "FAIL dev tested" in not_yet.stdout
    early = adopt(seed, "prod", "--yes")
    assert early.returncode == 1 and "dev tested" in one_line_error(early) and main_pid(seed, "prod") == prod_pid

    v2 = seed.release("dev", {"VERSION": "2\n"}, "version 2")
    assert seed.run("deploy.py", "dev").returncode == 0
    assert seed.run("verify.py", "dev").returncode == 0
    pruned = seed.run("backup.py", "--prune")          # the day's newest is the deploy's: adoption's is kept
    assert pruned.returncode == 0 and "the host before adoption" not in pruned.stderr
    assert Path(doc["envs"]["dev"]["backup"]).exists()
    ready = adopt(seed, "--checklist")
    assert ready.returncode == 0, ready.stdout
    assert ready.stdout.count("PASS") == 6
    assert main_pid(seed, "prod") == prod_pid and seed.head("prod") == prod_head

    prod = adopt(seed, "prod", "--yes")
    assert prod.returncode == 0, prod.stdout + prod.stderr
    assert main_pid(seed, "prod") != prod_pid and seed.head("prod") == prod_head
    assert Path(f"{seed.path('prod')}.releases/current").is_symlink()
    assert adopt(seed, "prod", "--yes").returncode == 0      # adopted already: says so, changes nothing

    main = seed.merge_to_main()
    promoted = seed.run("deploy.py", "prod", "--yes")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert seed.head("prod") == main and git(seed.root / "seed", "rev-parse", f"{main}^{{tree}}") == \
        git(seed.root / "seed", "rev-parse", f"{v2}^{{tree}}")


def test_the_checklist_fails_dev_tested_for_a_verified_release_rolled_back_since(seed):
    """A verify passed, then the release was rolled back (marked bad): it is not a tested release."""
    discovered(seed)
    assert adopt(seed, "dev", "--yes").returncode == 0
    again = adopt(seed, "--discover", config=False)
    assert again.returncode == 0 and "datatracker-dev.service: adopted already: it runs releases from" in again.stdout
    seed.release("dev", {"VERSION": "2\n"}, "version 2")
    assert seed.run("deploy.py", "dev").returncode == 0 and seed.run("verify.py", "dev").returncode == 0
    assert adopt(seed, "--checklist").returncode == 0
    rolled = seed.run("rollback.py", "dev", "--yes")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    after = adopt(seed, "--checklist")
    assert after.returncode == 1 and "FAIL dev tested" in after.stdout, after.stdout
    assert "then was rolled back in dev" in after.stdout and "(marked bad)" in after.stdout
    refused = adopt(seed, "prod", "--yes")
    assert refused.returncode == 1 and "dev tested" in one_line_error(refused)


def test_phase_one_with_the_remote_unreachable_leaves_nothing_half_done(seed):
    discovered(seed)
    dev_pid = main_pid(seed, "dev")
    (seed.root / "origin.git").rename(seed.root / "origin-away.git")
    before = listing(seed.root / "prod", seed.root / "dev")
    proc = adopt(seed, "dev", "--yes")
    assert proc.returncode == 1 and "cannot reach the remote 'origin'" in one_line_error(proc)
    assert not (seed.root / "state" / "adoption.json").exists()
    assert not list(seed.root.glob("backups/*/*adopt*"))
    assert git(seed.path("dev"), "tag") == "" and git(seed.path("prod"), "tag") == ""
    assert listing(seed.root / "prod", seed.root / "dev").keys() == before.keys()
    assert main_pid(seed, "dev") == dev_pid and not Path(f"{seed.path('dev')}.releases").exists()


def test_a_push_refused_after_the_backups_removes_them_and_the_tags(seed):
    """The remote answers reads but refuses the tag push (a hook): phase 1 takes back what it made."""
    discovered(seed)
    hook = seed.root / "origin.git" / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'refs are frozen' >&2\nexit 1\n")
    hook.chmod(0o755)
    proc = adopt(seed, "dev", "--yes")
    assert proc.returncode == 1 and "phase 1 (back up everything) failed" in one_line_error(proc)
    assert not (seed.root / "state" / "adoption.json").exists()
    assert not list((seed.root / "backups").rglob("*adopt*"))
    assert git(seed.path("dev"), "tag") == "" and git(seed.path("prod"), "tag") == ""
    assert not {r for r in remote_refs(seed) if r.startswith("refs/tags/")}


def test_a_dirty_tree_is_refused_before_anything(seed):
    discovered(seed)
    (seed.path("dev") / "app.py").write_text("# edited on the host\n" + (seed.path("dev") / "app.py").read_text())
    proc = adopt(seed, "dev", "--yes")
    assert proc.returncode == 1 and "uncommitted changes" in one_line_error(proc)
    assert not (seed.root / "state" / "adoption.json").exists() and "refs/heads/dev" not in remote_refs(seed)


def test_an_unhealthy_dev_after_conversion_is_put_back_and_the_old_way_still_works(seed):
    discovered(seed)
    text = seed.config.read_text().replace('unit = "datatracker-dev.service"',
                                           'unit = "datatracker-dev.service"\nbuild = [["sh", "-c", "echo http500 > MODE"]]')
    seed.config.write_text(text)
    unit_before = (seed.manager.unit_dir / "datatracker-dev.service").read_text()
    proc = adopt(seed, "dev", "--yes")
    assert proc.returncode == 1 and "adopting dev failed" in proc.stderr and "is back on main" in proc.stderr
    assert git(seed.path("dev"), "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert "refs/heads/dev" not in remote_refs(seed)
    assert git(seed.path("dev"), "branch", "--list", "dev") == ""
    assert (seed.manager.unit_dir / "datatracker-dev.service").read_text() == unit_before
    assert (seed.path("dev") / "instance" / "app.db").exists() and not Path(f"{seed.path('dev')}.releases/current").exists()
    assert seed.wait_serving("dev") < 5
    # phase 1 stays done (its backups and tags are the host as it was); the old deploy script still works
    assert json.loads((seed.root / "state" / "adoption.json").read_text())["envs"]["dev"]["adopted"] is None
    new = seed.release("main", {"VERSION": "1.1\n"}, "a fix, deployed the old way")
    seed.pull("dev")
    seed.manager.systemctl("restart", seed.unit("dev"))
    seed.wait_serving("dev")
    assert seed.head("dev") == new


def test_a_unit_whose_port_cannot_be_found_is_said_and_left_out(seed):
    worker = seed.root / "worker"
    git(seed.root, "clone", "--quiet", str(seed.root / "origin.git"), str(worker))
    (seed.manager.unit_dir / "datatracker-worker.service").write_text(
        f"[Service]\nWorkingDirectory={worker}\nExecStart={sys.executable} -c 'import time; time.sleep(60)'\n")
    seed.manager.systemctl("daemon-reload")
    seed.manager.systemctl("start", "datatracker-worker.service")
    text = adopt(seed, "--discover", config=False).stdout
    section = text.split("[env.worker]")[1]
    assert "# port = ?" in section and "NOT FOUND" in section and "\nport =" not in section
    assert "# db = ?" in section
    written = seed.root / "proposed.toml"
    proc = adopt(seed, "--discover", "--write", str(written), config=False)
    assert proc.returncode == 0 and "NOT FOUND" in proc.stderr
    load = subprocess.run([sys.executable, str(REPO / "status.py"), "--config", str(written)], env=seed.env,
                          capture_output=True, text=True, timeout=60)
    assert load.returncode == 2 and "env.worker.port" in one_line_error(load)


def test_discovery_reads_ports_from_the_usual_flags():
    assert discovery.port_from_argv(["gunicorn", "-b", "127.0.0.1:8000", "app:app"]) == 8000
    assert discovery.port_from_argv(["gunicorn", "--bind=0.0.0.0:8001", "app:app"]) == 8001
    assert discovery.port_from_argv(["flask", "run", "--port", "5000"]) == 5000
    assert discovery.port_from_argv(["uvicorn", "--port=8002"]) == 8002
    assert discovery.port_from_argv(["gunicorn", "-b", "unix:/run/app.sock"]) is None
    assert discovery.port_from_argv(["python3", "app.py"]) is None


def test_discovery_names_envs_from_units():
    def names(*units):
        found = [discovery.Found(unit=u, path=Path("/"), working_directory="/", exec_start=[], active="active",
                                 main_pid=0) for u in units]
        discovery.name_envs(found)
        return [f.name for f in found]

    assert names("datatracker.service", "datatracker-dev.service") == ["prod", "dev"]
    assert names("app.service") == ["prod"]
    assert names("app.service", "app-dev.service", "app-staging.service") == ["prod", "dev", "staging"]
    assert names("blog.service", "shop.service") == ["blog", "shop"]      # unrelated apps: no prod among them


@pytest.mark.parametrize("args", [["--discover", "prod"], ["--checklist", "dev"], ["--write", "x.toml"],
                                  ["--discover", "--yes"], [], ["--discover", "--config", "c.toml"]])
def test_flags_that_cannot_go_together_exit_2(args, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "adopt.py"), *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2 and one_line_error(proc).startswith("error:")


def test_discovery_picks_the_one_untracked_sqlite_file_or_says_it_is_unsure(tmp_path):
    tree = tmp_path / "app"
    tree.mkdir()
    git(tree, "init", "--quiet")
    (tree / "app.py").write_text("print('app')\n")
    git(tree, "add", "app.py")
    git(tree, "commit", "--quiet", "-m", "app")
    (tree / "instance").mkdir()
    sqlite3.connect(tree / "instance" / "app.db").execute("create table t (x)")
    (tree / "venv" / "lib").mkdir(parents=True)
    sqlite3.connect(tree / "venv" / "lib" / "cache.db").execute("create table t (x)")   # a venv holds no app data
    (tree / "notes.db").write_text("not sqlite")
    env = discovery.Found(unit="app.service", path=tree, working_directory=str(tree), exec_start=[], active="active",
                          main_pid=0)
    assert discovery.find_database(env, [])[:1] == ("instance/app.db",)
    sqlite3.connect(tree / "other.sqlite").execute("create table t (x)")
    db, source, candidates = discovery.find_database(env, [])
    assert db is None and source.startswith("UNSURE") and candidates == ["instance/app.db", "other.sqlite"]


def test_discovery_proposes_a_build_that_reproduces_the_running_venv(tmp_path):
    """The running venv holds the truth (what pip freeze would say): the proposal makes a venv from the
    same base python and installs exactly its distributions, --no-deps; an editable install is noted."""
    (tmp_path / "requirements.txt").write_text("flask\n")          # unpinned: not what runs
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    site = next((tmp_path / "venv").glob("lib/python*/site-packages"))
    for name, version in (("Flask", "3.0.0"), ("gunicorn", "22.0.0"), ("pip", "23.0.1")):
        (site / f"{name}-{version}.dist-info").mkdir()
        (site / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                                                         f"Version: {version}\n")
    (site / "myapp-0.1.dist-info").mkdir()
    (site / "myapp-0.1.dist-info" / "METADATA").write_text("Name: myapp\nVersion: 0.1\n")
    (site / "myapp-0.1.dist-info" / "direct_url.json").write_text('{"url": "file:///src", "dir_info": {"editable": true}}')
    env = discovery.Found(unit="app.service", path=tmp_path, working_directory=str(tmp_path), active="active",
                          exec_start=[f"{tmp_path}/venv/bin/gunicorn", "-b", "127.0.0.1:8000", "app:app"], main_pid=0)
    build = discovery.propose_build(env)
    assert build[0][1:] == ["-m", "venv", "venv"] and Path(build[0][0]).resolve() == Path("/usr/bin/python3").resolve()
    assert build[1] == ["venv/bin/pip", "install", "--no-deps", "Flask==3.0.0", "gunicorn==22.0.0"]
    assert any("myapp" in note and "editable" in note for note in env.notes)
    env.exec_start = ["/usr/bin/python3", "app.py"]
    assert discovery.propose_build(env) == []


@pytest.mark.parametrize("step", ["adopt:tag", "adopt:convert", "convert:build", "convert:switch"])
def test_an_unexpected_error_is_undone_like_any_failure_and_keeps_its_traceback(seed, step):
    """A step that raises something that is not the tool's error type (a bug): what the run made is removed,
    the message says so, and the traceback follows it."""
    discovered(seed)
    unit_before = (seed.manager.unit_dir / "datatracker-dev.service").read_text()
    dev_pid = main_pid(seed, "dev")
    argv = [sys.executable, str(REPO / "adopt.py"), "dev", "--yes", "--config", str(seed.config)]
    proc = subprocess.run(argv, env={**seed.env, "SAFE_DEPLOY_FAULT": f"{step}:RAISE"}, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    said, _, trace = proc.stderr.partition("Traceback")
    assert "an unexpected InjectedFault" in said and ("is removed" in said or "put back" in said), proc.stderr
    assert "InjectedFault: injected fault at" in trace
    assert git(seed.path("dev"), "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert "refs/heads/dev" not in remote_refs(seed) and git(seed.path("dev"), "branch", "--list", "dev") == ""
    assert not Path(f"{seed.path('dev')}.releases").exists()
    assert not list((seed.root / "backups" / "dev").glob("units-*"))
    assert (seed.manager.unit_dir / "datatracker-dev.service").read_text() == unit_before
    assert not (seed.manager.unit_dir / "datatracker-dev.socket").exists()
    if step in ("adopt:tag", "adopt:convert", "convert:build"):
        assert main_pid(seed, "dev") == dev_pid          # the app was not touched before the switch-over
    assert seed.wait_serving("dev") < 5
    doc = seed.root / "state" / "adoption.json"
    if step == "adopt:tag":
        assert not doc.exists() and git(seed.path("dev"), "tag") == ""
    else:
        assert json.loads(doc.read_text())["envs"]["dev"]["adopted"] is None
    again = adopt(seed, "dev", "--yes")                   # nothing half-done: a rerun goes through
    assert again.returncode == 0, again.stdout + again.stderr


def test_the_proposed_build_makes_a_first_release_that_serves_like_the_running_venv(seed, tmp_path):
    """Units that run a venv inside their tree: the proposal reproduces that venv (its python, its packages
    at their versions), so the first release serves as the tree did, on the same dependency."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "pinlib", "1.0")
    seed.release("main", {"MODE": "needs pinlib 1.0\n", ".gitignore": "venv/\ninstance/\n"}, "runs on pinlib 1.0")
    for env in ("prod", "dev"):
        seed.pull(env)
        venv = seed.path(env) / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                        "--no-index", "--find-links", str(wheels), "pinlib==1.0"], check=True, timeout=300)
        seed.write_unit(env, python=venv / "bin" / "python")
    seed.manager.systemctl("daemon-reload")
    for env in ("prod", "dev"):
        seed.manager.systemctl("restart", seed.unit(env))
        seed.wait_serving(env)
    text = discovered(seed)
    dev = text.split("[env.dev]")[1]
    assert "GUESS" in dev and '"install", "--no-deps", "pinlib==1.0"' in dev, dev
    env = {**seed.env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    argv = [sys.executable, str(REPO / "adopt.py"), "dev", "--yes", "--config", str(seed.config)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert requests.get(seed.url("dev", "/"), timeout=5).json()["deps"] == {"pinlib": "1.0"}
    assert Path(f"{seed.path('dev')}.releases/current/venv/bin/python").exists()

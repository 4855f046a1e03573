"""A real Django 5.2 site (demo.django_site: notes in SQLite, the secret key in the unit's Environment=) under
gunicorn with 2 workers, from a venv made once per session from a wheel folder of the installed Django and
gunicorn: adopted and deployed like flaskr, its migrations as pre_restart (additive, a rename through
stop-first, a RunPython that fails half-way), collectstatic into a shared folder, rollback with the database,
a missing variable that is the host's fault, and the secret key shown nowhere. Real git, SQLite, HTTP and the
real systemd --user manager."""

import itertools
import json
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from demo import django_site
from demo.faults import NoteWriter, everywhere
from demo.load import Load, shapes
from demo.sandbox import Sandbox, UserManager, git
from helpers import log_records

REPO = Path(__file__).resolve().parent.parent
_count = itertools.count(1)


@pytest.fixture(scope="session")
def django_venv(tmp_path_factory):
    """One venv with Django and gunicorn for the session (made from this python's own: no network)."""
    return django_site.make_venv(tmp_path_factory.mktemp("django"))


@pytest.fixture
def site(django_venv):
    return django_site.DjangoSite(django_venv)


@pytest.fixture
def host(user_manager, preloaded, tmp_path, site):
    """The Django site in dev and prod, both converted to releases and socket units."""
    sb = Sandbox(tmp_path / "host", user_manager, health_timeout=30, name=f"dj{next(_count)}", app=site)
    sb.preloaded = preloaded
    sb.root.mkdir()
    sb.build()
    sb.convert()
    yield sb
    sb.stop_units()


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    """A user manager of this module's own: adopt.py --discover sees only the units these tests start."""
    m = UserManager(tmp_path_factory.mktemp("django-manager"))
    m.start()
    yield m
    m.stop()


@pytest.fixture
def seed(manager, tmp_path, site):
    """The seed's host before the tool, running the Django site: prod and dev on main, no config."""
    sb = Sandbox(tmp_path / "host", manager, health_timeout=30, name="notes", seed=True, app=site)
    sb.root.mkdir()
    sb.build_seed()
    yield sb
    sb.stop_units()
    for path in manager.unit_dir.glob("notes*"):
        manager.systemctl("stop", path.name, check=False)
        if path.is_file():
            path.unlink()
    manager.systemctl("daemon-reload", check=False)


class Outputs:
    """Every script run's stdout and stderr, to grep them all for the secret."""

    def __init__(self, sb):
        self.sb, self.seen = sb, []

    def __call__(self, script, *args, config=True, timeout=300):
        proc = self.sb.run(script, *args, config=config, timeout=timeout)
        self.seen.append(f"$ {script} {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
        return proc


def probed(sb, *argv, path="/notes"):
    """Run a script while a prober sends GET path and a writer posts notes; (process, answers, writer)."""
    load = Load(sb.url("dev", path), rate=30, timeout=60).start()
    writer = NoteWriter(sb.url("dev", "/notes"), pause=0.05, timeout=60)     # waits as the prober does
    writer.start()
    time.sleep(1.0)
    proc = sb.run(*argv, timeout=300)
    time.sleep(1.0)
    writer.stop()
    return proc, shapes(load.stop()), writer


def columns(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[1] for r in conn.execute("PRAGMA table_info(notes)")]
    finally:
        conn.close()


def version(sb, env="dev"):
    return requests.get(sb.url(env, "/notes"), timeout=10).json()["version"]


def dry_run(sb, env="dev"):
    git(sb.path(env), "fetch", "--quiet", "origin")
    return sb.run("deploy.py", env, "--dry-run").stdout


def bad_marks(sb):
    path = sb.root / "state" / "dev.bad.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- migrations as pre_restart ---------------------------------------------------------------------
def test_an_additive_migration_rehearsed_compatible_is_served_online_and_collectstatic_fills_shared(host):
    sb = host
    sb.release("dev", django_site.release_files("additive"), "v2: notes get a nullable tag")
    assert "migration: stop-first" in dry_run(sb) and "0002_note_tag.py" in dry_run(sb)      # not judged yet
    rehearsal = sb.run("deploy.py", "dev", "--rehearse", timeout=300)
    assert rehearsal.returncode == 0, rehearsal.stdout + rehearsal.stderr
    assert "compatible" in rehearsal.stdout and "BREAKING" not in rehearsal.stdout, rehearsal.stdout
    assert "GET /health HTTP 200" in rehearsal.stdout and "wrote no row" in rehearsal.stdout
    assert "migration: online" in dry_run(sb)
    proc, seen, writer = probed(sb, "deploy.py", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen["failed"] == 0 and seen["5xx"] == 0 and seen["ok"] == seen["requests"], seen
    assert writer.failed == 0 and writer.acked and not writer.acked - everywhere(sb, "dev")
    assert version(sb) == "2" and "tag" in columns(sb.db_path("dev"))
    assert log_records(sb, "dev")[-1]["migration_mode"] == "online"
    shared = Path(f"{sb.path('dev')}.releases/shared/static_root")
    assert (shared / "notes" / "site.css").is_file() and not shared.is_symlink()      # collectstatic, in shared/
    current = Path(f"{sb.path('dev')}.releases/current")
    assert (current / "static_root").resolve() == shared.resolve()


def test_a_rename_with_only_the_health_page_as_probe_is_breaking_and_deploys_stop_first(host):
    """The health page reads no table, so the old release answers it on the renamed column: the schema
    says BREAKING all the same. With /notes as a probe the line shows its 500 and Django's own error."""
    sb = host
    sb.release("dev", django_site.release_files("rename"), "v2: body renamed to text")
    rehearsal = sb.run("deploy.py", "dev", "--rehearse", timeout=300)
    assert rehearsal.returncode == 0, rehearsal.stdout + rehearsal.stderr
    out = rehearsal.stdout
    assert "BREAKING (schema: column notes.body renamed to text" in out, out
    assert "GET /health HTTP 200" in out and "wrote no row" in out, out
    sb.write_config(dev='rehearse_paths = ["/notes"]')
    rehearsal = sb.run("deploy.py", "dev", "--rehearse", timeout=300)
    out = rehearsal.stdout
    assert "GET /notes: HTTP 500" in out and "no such column" in out, out        # status and the app's words
    assert "app said  |" in out and "Booting worker" not in out.split("BREAKING", 1)[1].splitlines()[0]
    assert "migration: stop-first" in dry_run(sb)
    proc, seen, writer = probed(sb, "deploy.py", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen["failed"] == 0 and seen["5xx"] == 0 and seen["ok"] == seen["requests"], seen
    assert writer.failed == 0 and not writer.acked - everywhere(sb, "dev")
    assert version(sb) == "2" and "text" in columns(sb.db_path("dev"))

    # rollback with the database: the schema differs from the point's, so the database goes back too
    back = sb.run("rollback.py", "dev", "--yes", timeout=300)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "body" in columns(sb.db_path("dev")) and version(sb) == "1"
    assert writer.acked <= everywhere(sb, "dev")          # written after the deploy: in the pre-rollback save


def test_a_runpython_that_fails_half_way_fails_its_rehearsal_and_the_deploy_stops_first(host):
    """0002 adds a NOT NULL column, 0003 fails half-way: the rehearsal fails, and the next deploy never lets
    the old release serve the half-migrated schema (it would INSERT without the column); the deploy fails
    at pre_restart and rolls back with the database: no 500, no acknowledged row lost."""
    sb = host
    for n in range(6):
        assert requests.post(sb.url("dev", "/notes"), data=f"word {n} and more", timeout=10).status_code == 201
    sb.release("dev", django_site.release_files("runpython-fail"), "v2: count the words of each note")
    rehearsal = sb.run("deploy.py", "dev", "--rehearse", timeout=300)
    assert rehearsal.returncode == 1 and "failed at pre_restart" in rehearsal.stderr, rehearsal.stderr
    assert "cannot count the words" in rehearsal.stderr
    plan = dry_run(sb)
    assert "migration: stop-first" in plan and "FAILED" in plan, plan
    assert "rehearsal: FAILED" in plan
    proc, seen, writer = probed(sb, "deploy.py", "dev")
    assert proc.returncode == 1 and "rolled back by itself" in proc.stderr, proc.stdout + proc.stderr
    assert "database  restored" in proc.stderr
    assert seen["failed"] == 0 and seen["5xx"] == 0, seen
    assert writer.acked and not writer.acked - everywhere(sb, "dev")
    assert "words" not in columns(sb.db_path("dev")) and version(sb) == "1"
    record = log_records(sb, "dev")[-1]
    assert record["migration_mode"] == "stop-first" and record["blame"] == "release"
    mark = bad_marks(sb)[-1]
    assert mark["bad"] and "pre_restart" in mark["why"] and "migrate" in mark["why"]


def test_a_missing_variable_is_the_hosts_fault_and_once_set_in_the_unit_the_same_commit_deploys(host):
    sb = host
    target = sb.release("dev", django_site.release_files("needs-variable"), "v2: a banner from the environment")
    failed = sb.run("deploy.py", "dev", timeout=300)
    assert failed.returncode == 1 and "rolled back by itself" in failed.stderr, failed.stdout + failed.stderr
    assert "KeyError: 'NOTES_BANNER'" in failed.stderr
    assert "the host or its config, not the release" in failed.stderr and "NOTES_BANNER is not set" in failed.stderr
    assert log_records(sb, "dev")[-1]["blame"] == "host" and not [m for m in bad_marks(sb) if m.get("bad")]
    assert version(sb) == "1"
    unit = sb.manager.unit_dir / sb.unit("dev")
    unit.write_text(unit.read_text().replace("Environment=DEPLOY_STATUS=1",
                                             "Environment=DEPLOY_STATUS=1\nEnvironment=NOTES_BANNER=welcome"))
    fixed = sb.run("deploy.py", "dev", timeout=300)          # no --force
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert sb.head("dev") == target and version(sb) == "2"


# -- adoption, discovery, and the secret -------------------------------------------------------------
def discovered(sb, run, site):
    proc = run("adopt.py", "--discover", "--write", str(sb.config), config=False)
    assert proc.returncode == 0, proc.stderr
    assert "adopt.py dev --dry-run" in proc.stdout and "--checklist" not in proc.stdout
    text = sb.config.read_text().replace('health_path = "/"', 'health_path = "/health"')
    sb.config.write_text(text)
    sb.add_env_keys(site.config_lines())
    return text


def test_discovery_proposes_the_pages_the_access_log_shows_as_probes(seed, site):
    for _ in range(3):
        requests.get(seed.url("dev", "/notes"), timeout=10)
    requests.get(seed.url("dev", "/static/notes/site.css"), timeout=10)
    proc = subprocess.run([sys.executable, str(REPO / "adopt.py"), "--discover"], env=seed.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dev = proc.stdout.split("[env.dev]")[1]
    line = next(line for line in dev.splitlines() if line.startswith("rehearse_paths"))
    assert line.startswith('rehearse_paths = ["/notes"]') and "GUESS" in line and "GET /notes x3" in line
    prod = proc.stdout.split("[env.prod]")[1].split("[env.dev]")[0]
    assert 'rehearse_paths = ["/", "/notes"]' in prod and "pages it links to" in prod     # from the running app


def test_adopted_and_deployed_like_flaskr_and_the_secret_key_is_shown_nowhere(seed, site):
    """adopt dev (moving the key out of the unit), deploy a failing pre_restart that prints the key and gets it
    as an argument, a dry run, a rehearsal, a good deploy, verify, status, a rollback; then every output, the
    deploy log and every file the tool wrote is searched: the key is only in files of mode 0600."""
    sb, run = seed, Outputs(seed)
    secret = site.secret("dev")
    discovered(sb, run, site)
    leaky = [sys.executable, "-c", "import os, sys; print('the key is', os.environ['DJANGO_SECRET_KEY']); "
                                   "sys.exit(int(open('FAIL').read()) if os.path.exists('FAIL') else 0)",
             "--api-key", secret]
    sb.config.write_text(sb.config.read_text().replace(
        "collectstatic\", \"--no-input\"]]", f"collectstatic\", \"--no-input\"], {json.dumps(leaky)}]"))
    dry = run("adopt.py", "dev", "--dry-run")
    assert dry.returncode == 0 and "--move-secrets" in dry.stdout, dry.stdout + dry.stderr
    adopted = run("adopt.py", "dev", "--yes", "--move-secrets")
    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    assert "-Environment=DJANGO_SECRET_KEY=<redacted>" in adopted.stdout, adopted.stdout
    unit = (sb.manager.unit_dir / sb.unit("dev")).read_text()
    moved = sb.manager.config_home / "safe-deploy" / "env" / "notes-dev.env"
    assert secret not in unit and f"EnvironmentFile={moved}" in unit
    assert stat.S_IMODE(moved.stat().st_mode) == 0o600 and secret in moved.read_text()
    handover = sb.manager.unit_dir / "notes-dev-handover.service"
    assert handover.exists() and secret not in handover.read_text()

    sb.release("dev", {**django_site.release_files("additive"), "FAIL": "3\n"}, "v2, whose last command fails")
    failed = run("deploy.py", "dev")
    assert failed.returncode == 1 and "the key is <redacted>" in failed.stderr, failed.stderr
    assert "--api-key <redacted>" in failed.stderr
    assert log_records(sb, "dev")[-1]["blame"] == "release"
    sb.release("dev", {"FAIL": "0\n", "VERSION": "3\n"}, "v3: the last command passes")
    git(sb.path("dev"), "fetch", "--quiet", "origin")          # what the real run fetches first
    for args in (("deploy.py", "dev", "--dry-run"), ("deploy.py", "dev", "--dry-run", "--json"),
                 ("deploy.py", "dev", "--rehearse")):
        assert run(*args).returncode == 0, run.seen[-1]
    done = run("deploy.py", "dev")
    assert done.returncode == 0, done.stdout + done.stderr
    assert version(sb) == "3"
    for args in (("verify.py", "dev"), ("status.py",), ("status.py", "--json"), ("rollback.py", "dev", "--list"),
                 ("backup.py", "--list"), ("rollback.py", "dev", "--yes"), ("status.py", "dev")):
        run(*args)
    assert requests.get(sb.url("dev", "/health"), timeout=10).status_code == 200

    for text in run.seen:
        assert secret not in text, text
    written = [sb.root / "state", sb.root / "backups", sb.manager.unit_dir, sb.manager.config_home / "safe-deploy",
               Path(f"{sb.path('dev')}.releases"), sb.manager.runtime]
    holding = []
    for folder in written:
        for path in (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if secret.encode() in data:
                holding.append(path)
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} holds the key at mode " \
                                                                        f"{stat.S_IMODE(path.stat().st_mode):o}"
                assert sb.root / "state" not in path.parents, f"{path}: a log or record holds the key"
    assert moved in holding and any(p.suffix == ".unit" for p in holding)      # the env file; the unit's copies
    assert not [p for p in holding if str(p).endswith(".jsonl")]

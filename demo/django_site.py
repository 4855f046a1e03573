"""A real Django 5.2 site for the tests and the demo, as demo/flaskr.py is for Flask: "notes", a model
users write to, served by gunicorn (2 workers, --preload) from a venv installed from a wheel folder made
from this python's own Django and gunicorn (no network).

The site (its files: site_files()):
- `notes` table (Note: author, body, created; `db_table = "notes"`, so demo.faults' NoteWriter and
  everywhere() work on it as on the sample app), in SQLite at instance/app.db, WAL mode
  (DATABASES OPTIONS init_command), IMMEDIATE transactions, a 20 s busy timeout;
- SECRET_KEY read from DJANGO_SECRET_KEY in the environment (os.environ[...]: a KeyError when the
  unit's environment does not reach a command), DEBUG = False;
- views: GET /health ({"ok": true}, opens the database but reads no table), GET / (HTML, links to
  /notes), GET /notes (reads every note's body), POST /notes (the request body is the note; 201 and
  {"id": N}), GET /_deploy/status (REVISION, with DEPLOY_STATUS=1 in the environment);
- logging: django.request errors (a 500's traceback) on stderr with DEBUG = False, which the unit
  appends to its log file with gunicorn's access log (stdout);
- STATIC_ROOT = static_root/ (a `shared` path of the config; collectstatic is a pre_restart command).

Its shapes (release_files(shape)): "initial" (0001), "additive" (0002 adds a nullable column: the
running release keeps working), "rename" (0002 RenameField body -> text: the running release breaks),
"runpython-fail" (0002 adds a NOT NULL column, 0003 a non-atomic RunPython that fails half-way, so the
schema is left half-changed), "needs-variable" (settings read NOTES_BANNER from the environment: no
migration, but every command fails without it). Each test moves the site from "initial" to one shape.

Use (the lead's row-ledger tests too):

    from demo import django_site
    from demo.sandbox import Sandbox

    venv = django_site.make_venv(tmp_path_factory.mktemp("django"))   # once per session (uv: ~3 s of CPU)
    site = django_site.DjangoSite(venv)                 # or DjangoSite(wheels=folder): a venv per release
    sb = Sandbox(tmp_path / "host", user_manager, name="dj1", app=site)
    sb.root.mkdir()
    sb.build()          # origin, prod and dev, the units (gunicorn, the key in Environment=), migrated
    sb.convert()        # both envs on releases and socket units (deploy.py ENV --install-units)
    sb.release("dev", django_site.release_files("rename"), "v2: body renamed to text")
    sb.run("deploy.py", "dev", "--rehearse")

With seed=True, Sandbox.build_seed() gives the seed's host before the tool (both trees on main, no
config) with the Django site: adopt.py's start. site.secret(env) is the env's secret key, to grep for.
"""

import json
import secrets
import subprocess
from pathlib import Path

from demo.wheels import uv_build, wheels_of_installed

REQUIREMENTS = ("django", "gunicorn")

MANAGE = '''\
#!/usr/bin/env python3
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notes_site.settings")
    from django.core.management import execute_from_command_line
    execute_from_command_line(sys.argv)
'''

SETTINGS = '''\
"""The notes site's settings: everything secret or host-specific comes from the environment (the unit's
Environment=/EnvironmentFile=), so a release holds no secret and runs in any env."""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
VERSION = (BASE_DIR / "VERSION").read_text().strip()
{extra}
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.staticfiles", "notes"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "notes_site.urls"
WSGI_APPLICATION = "notes_site.wsgi.application"
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "instance" / "app.db",
        "OPTIONS": {{"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
                    "transaction_mode": "IMMEDIATE", "timeout": 20}},
    }}
}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "static_root"          # a `shared` path: collectstatic (pre_restart) fills it

# DEBUG = False logs no traceback by default (it mails admins): send errors to stderr, which the unit
# appends to its log, so a 500 says why
LOGGING = {{
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {{"plain": {{"format": "[django] %(levelname)s %(name)s: %(message)s"}}}},
    "handlers": {{"stderr": {{"class": "logging.StreamHandler", "formatter": "plain"}}}},
    "loggers": {{"django": {{"handlers": ["stderr"], "level": "WARNING"}}}},
}}
'''

URLS = '''\
from django.urls import path

from notes import views

urlpatterns = [
    path("", views.index),
    path("health", views.health),
    path("notes", views.notes),
    path("_deploy/status", views.deploy_status),
]
'''

WSGI = '''\
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notes_site.settings")
application = get_wsgi_application()
'''

APPS = '''\
from django.apps import AppConfig


class NotesConfig(AppConfig):
    name = "notes"
    default_auto_field = "django.db.models.BigAutoField"
'''

MODELS = '''\
from django.db import models

BODY = "{body}"         # the column the text of a note is in


class Note(models.Model):
    author = models.CharField(max_length=100)
    {body} = models.TextField()
    created = models.DateTimeField(auto_now_add=True)
{fields}
    class Meta:
        db_table = "notes"
'''

VIEWS = '''\
import json

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .models import BODY, Note


def health(request):
    connection.ensure_connection()          # the database opens; no table is read
    return JsonResponse({"ok": True})


def index(request):
    return HttpResponse(f"<h1>notes {settings.VERSION}</h1><p><a href=\\"/notes\\">all notes</a></p>")


@csrf_exempt
def notes(request):
    if request.method == "POST":
        note = Note.objects.create(author=request.headers.get("X-Author", "writer"),
                                   **{BODY: request.body.decode(errors="replace")})
        return JsonResponse({"id": note.id}, status=201)
    texts = list(Note.objects.order_by("id").values_list(BODY, flat=True))
    return JsonResponse({"version": settings.VERSION, "notes": len(texts)})


def deploy_status(request):
    import os
    if os.environ.get("DEPLOY_STATUS") != "1":
        return JsonResponse({"error": "not found"}, status=404)
    try:
        return JsonResponse(json.loads((settings.BASE_DIR / "REVISION").read_text()))
    except (OSError, ValueError):
        return JsonResponse({"error": "no REVISION"}, status=404)
'''

INITIAL = '''\
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Note",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("author", models.CharField(max_length=100)),
                ("body", models.TextField()),
                ("created", models.DateTimeField(auto_now_add=True)),
            ],
            options={"db_table": "notes"},
        ),
    ]
'''

ADDITIVE = '''\
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("notes", "0001_initial")]
    operations = [migrations.AddField("note", "tag", models.CharField(max_length=50, null=True, blank=True))]
'''

RENAME = '''\
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("notes", "0001_initial")]
    operations = [migrations.RenameField("note", "body", "text")]
'''

NOT_NULL = '''\
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("notes", "0001_initial")]
    operations = [migrations.AddField("note", "words", models.IntegerField(default=0))]
'''

HALF_WAY = '''\
from django.db import migrations


def count_words(apps, schema_editor):
    Note = apps.get_model("notes", "Note")
    notes = list(Note.objects.order_by("id"))
    for i, note in enumerate(notes):
        if i == len(notes) // 2:
            raise RuntimeError(f"count_words: cannot count the words of note {note.id}")
        note.words = len(note.body.split())
        note.save(update_fields=["words"])


class Migration(migrations.Migration):
    atomic = False          # each save commits: a failure leaves half the rows done
    dependencies = [("notes", "0002_note_words")]
    operations = [migrations.RunPython(count_words, migrations.RunPython.noop)]
'''

GITIGNORE = "instance/\nstatic_root/\nvenv/\n__pycache__/\n"
CSS = "body { font-family: sans-serif; }\n"

UNIT = """\
[Unit]
Description=notes (Django) under gunicorn ({env})

[Service]
WorkingDirectory={path}
ExecStart={gunicorn} --preload --workers 2 --bind 127.0.0.1:{port} --access-logfile - notes_site.wsgi:application
Environment=DJANGO_SECRET_KEY={secret}
Environment=DEPLOY_STATUS=1
StandardOutput=append:{log}
StandardError=inherit
Restart=on-failure
RestartSec=0.5
TimeoutStopSec=5

[Install]
WantedBy=default.target
"""

SHAPES = ("initial", "additive", "rename", "runpython-fail", "needs-variable")


def site_files(version=1):
    """{relative path: text}: the site as its first release (shape "initial")."""
    return {"manage.py": MANAGE, "requirements.txt": "".join(f"{n}\n" for n in REQUIREMENTS), ".gitignore": GITIGNORE,
            "notes_site/__init__.py": "", "notes_site/settings.py": SETTINGS.format(extra=""),
            "notes_site/urls.py": URLS, "notes_site/wsgi.py": WSGI, "notes/__init__.py": "", "notes/apps.py": APPS,
            "notes/models.py": MODELS.format(body="body", fields=""), "notes/views.py": VIEWS,
            "notes/migrations/__init__.py": "", "notes/migrations/0001_initial.py": INITIAL,
            "notes/static/notes/site.css": CSS, "VERSION": f"{version}\n"}


def release_files(shape, version=2):
    """The files that move the site from "initial" to shape (see the module's docstring)."""
    files = {"VERSION": f"{version}\n"}
    if shape == "initial":
        return files
    if shape == "additive":
        files["notes/models.py"] = MODELS.format(body="body", fields="    tag = models.CharField(max_length=50, "
                                                                   "null=True, blank=True)\n")
        files["notes/migrations/0002_note_tag.py"] = ADDITIVE
    elif shape == "rename":
        files["notes/models.py"] = MODELS.format(body="text", fields="")
        files["notes/migrations/0002_rename_body.py"] = RENAME
    elif shape == "runpython-fail":
        files["notes/models.py"] = MODELS.format(body="body", fields="    words = models.IntegerField(default=0)\n")
        files["notes/migrations/0002_note_words.py"] = NOT_NULL
        files["notes/migrations/0003_count_words.py"] = HALF_WAY
    elif shape == "needs-variable":
        files["notes_site/settings.py"] = SETTINGS.format(extra='BANNER = os.environ["NOTES_BANNER"]\n')
    else:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    return files


# -- the venv ------------------------------------------------------------------------------------
def wheel_folder(root):
    """root/wheels: Django, gunicorn and what they need, as this python has them installed (no network)."""
    folder = Path(root) / "wheels"
    if not folder.is_dir() or not any(folder.glob("*.whl")):
        wheels_of_installed(folder, list(REQUIREMENTS))
    return folder


def install_argv(python, wheels):
    """[argv, ...] that make a venv `python` names and install the site's requirements from wheels."""
    return uv_build(wheels, venv=Path(python).parent.parent, python=python, requirements=REQUIREMENTS)


def make_venv(root):
    """A venv with Django and gunicorn under root (the wheel folder beside it); made once, then reused.
    Returns the venv's folder."""
    root = Path(root)
    venv = root / "venv"
    if not (venv / "bin" / "gunicorn").exists():
        for argv in install_argv(venv / "bin" / "python", wheel_folder(root)):
            subprocess.run(argv, check=True, timeout=600, capture_output=True)
    return venv


# -- the site as the sandbox's app ----------------------------------------------------------------
class DjangoSite:
    """What demo.sandbox.Sandbox needs to run the site instead of the sample app (its `app`).

    venv: a venv made by make_venv(), outside every tree: the units run its gunicorn and the commands
    its python (no build: fast). wheels: a wheel folder instead: each tree, and each release, builds its
    own venv from it (`build`), as a real host does; slower (a venv per release)."""

    def __init__(self, venv=None, wheels=None, secret_in="unit"):
        if (venv is None) == (wheels is None):
            raise ValueError("give venv (a shared venv) or wheels (a venv per release)")
        self.venv = Path(venv) if venv else None
        self.wheels = Path(wheels) if wheels else None
        self.secret_in = secret_in          # "unit": Environment= in the unit file; "file": an EnvironmentFile=
        self.secrets = {}

    def secret(self, env):
        """The env's DJANGO_SECRET_KEY (made on first use): what no output, log or record may show."""
        return self.secrets.setdefault(env, f"dj-{env}-{secrets.token_hex(20)}")

    def files(self):
        return site_files()

    def build(self):
        """The config's `build`: none with a shared venv, else a venv from the wheel folder."""
        if self.venv:
            return []
        return uv_build(self.wheels)

    def pre_restart(self):
        python = str(self.venv / "bin" / "python") if self.venv else "venv/bin/python"
        return [[python, "manage.py", "migrate", "--no-input"], [python, "manage.py", "collectstatic", "--no-input"]]

    def config_lines(self):
        """The env keys the site needs besides the sandbox's (its `extra`)."""
        lines = [f"pre_restart = {json.dumps(self.pre_restart())}", 'shared = ["static_root"]', "health_timeout = 30"]
        if self.wheels:
            lines.insert(0, f"build = {json.dumps(self.build())}")
        return "\n".join(lines) + "\n"

    def environment_file(self, root, env):
        return Path(root) / "secrets" / f"{env}.env"

    def unit(self, env, path, port, log, root):
        """The env's unit text: gunicorn on the port, the secret in Environment= (or an EnvironmentFile=
        written 0600 beside the sandbox)."""
        gunicorn = self.venv / "bin" / "gunicorn" if self.venv else Path(path) / "venv" / "bin" / "gunicorn"
        text = UNIT.format(env=env, path=path, gunicorn=gunicorn, port=port, log=log, secret=self.secret(env))
        if self.secret_in == "file":
            file = self.environment_file(root, env)
            file.parent.mkdir(mode=0o700, exist_ok=True)
            file.touch(mode=0o600)
            file.write_text(f"DJANGO_SECRET_KEY={self.secret(env)}\n")
            text = text.replace(f"Environment=DJANGO_SECRET_KEY={self.secret(env)}", f"EnvironmentFile={file}")
        return text

    def environment(self, env):
        """The variables the unit gives the app, for commands run by hand in a tree (prepare)."""
        return {"DJANGO_SECRET_KEY": self.secret(env), "DEPLOY_STATUS": "1"}

    def prepare(self, tree, env):
        """Before the unit first starts in tree: its venv (wheels), the database migrated, static files."""
        import os
        tree = Path(tree)
        (tree / "instance").mkdir(exist_ok=True)
        for argv in self.build():
            subprocess.run(argv, cwd=tree, check=True, timeout=600, capture_output=True)
        for argv in self.pre_restart():
            subprocess.run(argv, cwd=tree, check=True, timeout=300, capture_output=True,
                           env={**os.environ, **self.environment(env)})

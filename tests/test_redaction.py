"""The unit's environment as systemd reads it (safedeploy.unitenv), and what is never shown
(safedeploy.redaction), checked directly; end to end on a real Django site in tests/test_django.py."""

import json

import pytest

from safedeploy import redaction, unitenv, unitfiles
from safedeploy.redaction import REDACTED


def test_environment_words_are_split_as_systemd_does():
    assert unitenv.split_words('A=1 "B=two words" C=x\\ty \'D=single\' E=\\x41') == \
        ["A=1", "B=two words", "C=x\ty", "D=single", "E=A"]


def test_later_settings_win_and_an_empty_environment_clears_what_came_before():
    fragment = "[Service]\nEnvironment=A=1 B=%n\nEnvironment=C=3\nEnvironmentFile=-/etc/x.env\nExecStart=/bin/true a\n"
    dropin = "[Service]\nEnvironment=\nEnvironment=D=4 A=5\nEnvironmentFile=\nEnvironmentFile=/etc/y.env\n"
    table = unitenv.specifiers("notes.service")
    assert unitenv.parse_service([fragment], table) == (["/bin/true", "a"], [("A", "1"), ("B", "notes.service"),
                                                                              ("C", "3")], ["-/etc/x.env"])
    assert unitenv.parse_service([fragment, dropin], table) == (["/bin/true", "a"], [("D", "4"), ("A", "5")],
                                                                ["/etc/y.env"])


def test_an_environment_file_is_read_as_systemd_reads_it():
    text = ('# comment\n; comment too\nA=1\nB="two\nlines"  \nC=plain value   \n'
            "D='single \\ kept'\nE=joined\\\nline\nF=\"esc \\\" \\$ \\\\ \\n\"\nnot an assignment\n")
    assert unitenv.parse_env_file(text) == [("A", "1"), ("B", "two\nlines"), ("C", "plain value"),
                                            ("D", "single \\ kept"), ("E", "joinedline"), ("F", 'esc " $ \\ \\n')]


@pytest.mark.parametrize("value", ["plain", 'with "quotes" and $dollars', "back\\slash", "new\nline", " spaces "])
def test_a_moved_secret_reads_back_whole(value):
    assert unitenv.parse_env_file(unitenv.env_file_line("S", value)) == [("S", value)]


def test_files_override_environment_lines():
    settings = unitenv.ServiceSettings((), (("A", "unit"), ("B", "unit")), ("/x",), ())
    found = unitenv.UnitEnvironment(settings, (("A", "file"),))
    assert found.variables() == {"A": "file", "B": "unit"}


@pytest.mark.parametrize("name, value, secret", [
    ("DJANGO_SECRET_KEY", "short1", True), ("DB_PASSWORD", "hunter2", True), ("GITHUB_TOKEN", "x", True),
    ("API_KEY", "k", True), ("DEPLOY_STATUS", "1", False), ("DJANGO_SETTINGS_MODULE", "notes_site.settings", False),
    ("LANG", "C.UTF-8", False), ("PYTHONPATH", "/srv/app/lib", False), ("STRIPE", "sk9f8a7d6s5a4f3d2s1a", True),
    ("HOME_URL", "https://example.org/a1", False), ("NOTES_AUTHOR", "Ada Lovelace 2", False),
])
def test_which_values_are_secret(name, value, secret):
    assert bool(redaction.secret_values([(name, value)])) is secret
    assert bool(redaction.secret_values([(name, value)], secret_names=[name]))


def test_a_url_password_is_secret_and_the_rest_of_the_url_is_not():
    assert redaction.secret_values([("DATABASE_URL", "postgres://app:s3cret-pw@db/app")]) == ["s3cret-pw"]


def test_free_text_argv_and_unit_files_hide_secrets():
    redaction.register(["k3y-value-0123456789", "pin12"])
    text = redaction.redact('the key is k3y-value-0123456789 {"k": "k3y-value-0123456789"}')
    assert text == f'the key is {REDACTED} {{"k": "{REDACTED}"}}'
    assert json.loads(redaction.redact(json.dumps({"e": 'say "k3y-value-0123456789"'}))) == {"e": f'say "{REDACTED}"'}
    assert redaction.redact("pin12 stays: too short for free text") == "pin12 stays: too short for free text"
    assert redaction.redact_argv(["m.py", "--token", "abc", "--pin=pin12", "pin12", "PASSWORD=x", "--workers", "2"]) == \
        ["m.py", "--token", REDACTED, f"--pin={REDACTED}", REDACTED, f"PASSWORD={REDACTED}", "--workers", "2"]
    assert redaction.shown(["m.py", "--api-key", "abc", "a b"]) == f"m.py --api-key {REDACTED} 'a b'"
    unit = ("[Service]\nEnvironment=DJANGO_SECRET_KEY=k3y-value-0123456789 DEPLOY_STATUS=1 P=/srv/app\n"
            "ExecStart=/v/bin/gunicorn --bind 127.0.0.1:8000 --key=k3y-value-0123456789 app\n"
            "ExecStart=/v/bin/gunicorn --bind 127.0.0.1:8000 app\n")
    assert redaction.redact_unit_text(unit) == (
        f"[Service]\nEnvironment=DJANGO_SECRET_KEY={REDACTED} DEPLOY_STATUS={REDACTED} P=/srv/app\n"
        f"ExecStart=/v/bin/gunicorn --bind 127.0.0.1:8000 --key={REDACTED} app\n"
        "ExecStart=/v/bin/gunicorn --bind 127.0.0.1:8000 app\n")


def test_moving_secrets_out_of_a_unit_keeps_the_rest_and_lets_later_files_win(tmp_path):
    unit = ("[Unit]\nDescription=x\n\n[Service]\nWorkingDirectory=/a\n"
            "Environment=DJANGO_SECRET_KEY=abc123def DEPLOY_STATUS=1\nEnvironment=\"DB_PASSWORD=two words\"\n"
            "EnvironmentFile=-/etc/notes.env\nExecStart=/bin/true\n")
    text, taken = unitenv.without_secrets(unit, "notes.service", file=tmp_path / "notes.env")
    assert taken == [("DJANGO_SECRET_KEY", "abc123def"), ("DB_PASSWORD", "two words")]
    assert text == ("[Unit]\nDescription=x\n\n[Service]\n"
                    f"EnvironmentFile={tmp_path / 'notes.env'}\nWorkingDirectory=/a\nEnvironment=DEPLOY_STATUS=1\n"
                    "EnvironmentFile=-/etc/notes.env\nExecStart=/bin/true\n")
    assert unitenv.without_secrets("[Service]\nEnvironment=A=1\n", "x.service") == ("[Service]\nEnvironment=A=1\n", [])


def test_a_path_into_a_live_folder_is_moved_only_at_a_path_boundary(tmp_path):
    live, copy = tmp_path / "app.releases" / "shared", tmp_path / "scratch" / "shared"
    moves = [(live, copy, False)]
    assert unitenv.move(f"DB={live}/instance/app.db", moves) == f"DB={copy}/instance/app.db"
    assert unitenv.move(f"DB={live}-other/app.db", moves) == f"DB={live}-other/app.db"


def test_a_unit_file_that_holds_environment_values_is_written_0600_whatever_it_had(tmp_path, monkeypatch):
    from safedeploy import units
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    folder = unitfiles.user_unit_dir()
    folder.mkdir(parents=True)
    (folder / "notes.service").write_text("old\n")
    (folder / "notes.service").chmod(0o644)
    service = "[Service]\nEnvironment=DJANGO_SECRET_KEY=abc123def456\nExecStart=/bin/true\n"
    units.install_unit_files({"notes.service": service, "notes-handover.service": service,
                              "notes.socket": "[Socket]\nListenStream=127.0.0.1:8000\n"},
                             modes={folder / "notes-handover.service": 0o644}, reload=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"notes.service": 0o600, "notes-handover.service": 0o600, "notes.socket": 0o644}

"""The docs checked against the code, without a user manager: docs/config.md is what the key tables of
safedeploy/config_keys.py say (docs/generate_config.py), names every key the loader accepts (and none it
does not), with its default as TOML and a meaning; docs/cli.md is what the scripts' --help prints now;
every relative link resolves; no page speaks of the project's own work items."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from safedeploy import config as configmod

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "bench" / "RESULTS.md"]
KEY_HEADER = ["key", "default", "meaning"]


def cells(line):
    """The cells of a markdown table row ("|" inside a cell is written "\\|")."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def is_row(line):
    return line.strip().startswith("|") and line.strip().endswith("|")


def key_tables(text):
    """[(the heading above it, {key: (default cell, meaning cell)})] for every `| key | default | meaning |`
    table of the page."""
    found, heading, current = [], None, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, current = line.lstrip("#").strip(), None
        elif is_row(line):
            row = cells(line)
            if row == KEY_HEADER:
                current = {}
                found.append((heading, current))
            elif current is not None and not set("".join(row)) <= set("-: "):
                key = row[0]
                assert re.fullmatch(r"`[A-Za-z_]+`", key), f"docs/config.md: {key!r} under {heading!r} is not a `key`"
                assert key.strip("`") not in current, f"docs/config.md: {key} twice under {heading!r}"
                assert len(row) == 3, f"docs/config.md: the row of {key} has {len(row)} cells, not 3"
                current[key.strip("`")] = (row[1], row[2])
        else:
            current = None
    return found


# a key table belongs to the section whose heading names the TOML table
SECTIONS = {"[env.NAME]": configmod.ENV_KEYS, "[retention]": configmod.RETENTION_KEYS,
            "[offsite]": configmod.OFFSITE_KEYS, "[alerts]": configmod.ALERT_KEYS, "[replica]": configmod.REPLICA_KEYS}


def config_page():
    text = (DOCS / "config.md").read_text()
    tables = {}
    for heading, keys in key_tables(text):
        named = [name for name in SECTIONS if f"`{name}`" in (heading or "")]
        assert len(named) == 1, f"docs/config.md: a key table under {heading!r}, which names none of {list(SECTIONS)}"
        assert named[0] not in tables, f"docs/config.md: two key tables for {named[0]}"
        tables[named[0]] = keys
    return text, tables


def toml(value):
    """A default as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    raise TypeError(value)


def test_config_page_has_one_key_table_per_section():
    _, tables = config_page()
    assert set(tables) == set(SECTIONS)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_config_page_names_exactly_the_keys_the_loader_accepts(section):
    _, tables = config_page()
    page, code = set(tables[section]), set(SECTIONS[section])
    assert not code - page, f"docs/config.md {section}: keys the loader accepts but the page lacks: {sorted(code - page)}"
    assert not page - code, f"docs/config.md {section}: keys the loader does not know: {sorted(page - code)}"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_key_says_what_it_does(section):
    _, tables = config_page()
    for key, (_, meaning) in tables[section].items():
        assert len(meaning.split()) >= 6, f"docs/config.md {section} {key}: say what it does, not only its type"


def test_env_and_retention_defaults_are_the_loader_s():
    _, tables = config_page()
    for key, (default, _) in configmod.ENV_KEYS.items():
        want = "required" if default is None else f"`{toml(default)}`"
        assert tables["[env.NAME]"][key][0] == want, f"docs/config.md [env.NAME] {key}: default {want}"
    for key, default in configmod.RETENTION_KEYS.items():
        assert tables["[retention]"][key][0] == f"`{toml(default)}`", f"docs/config.md [retention] {key}"


def test_config_page_names_every_table():
    text, _ = config_page()
    for name in configmod.TOP_KEYS:
        shown = "[env.NAME]" if name == "env" else f"[{name}]"
        assert re.search(rf"^\| `{re.escape(shown)}` \|", text, re.M), f"docs/config.md: no row for the table {shown}"
    rows = re.findall(r"^\| `\[([a-z]+)(?:\.NAME)?\]` \|", text, re.M)
    assert set(rows) <= set(configmod.TOP_KEYS), f"docs/config.md: tables the loader does not know: {rows}"


def generator():
    spec = importlib.util.spec_from_file_location("generate_cli", DOCS / "generate_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_is_what_the_scripts_print():
    assert (DOCS / "cli.md").read_text() == generator().render(), "docs/cli.md is stale: run make docs"


def test_config_page_is_what_the_key_tables_say():
    spec = importlib.util.spec_from_file_location("generate_config", DOCS / "generate_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "config.md").read_text() == module.render(), "docs/config.md is stale: run make docs"


# -- links ---------------------------------------------------------------------------------------
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text):
    return CODE.sub("", FENCE.sub("", text))


def slugs(path):
    """The anchors GitHub makes for the page's headings."""
    seen, found = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert page.exists(), f"{page} is missing"
    broken = []
    for m in LINK.finditer(prose(page.read_text())):
        target = m["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue            # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in slugs(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


# -- words ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_page_speaks_of_work_items_and_the_seed_is_explained(page):
    text = page.read_text()
    m = re.search(r"\bissues? #?\d+", text, re.I)
    assert m is None, f"{page.relative_to(ROOT)}: {m.group(0)!r}: say what it does, not which work item made it"
    if re.search(r"\bseed\b", text, re.I):
        assert "the first user's host" in text, f"{page.relative_to(ROOT)} speaks of the seed without saying what it is"


def test_readme_is_short_and_points_to_the_incident_page_on_its_first_screen():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= 1500, f"README.md has {len(text.split())} words (wc -w), at most 1500"
    first = "\n".join(text.splitlines()[:80])
    assert "(docs/incident.md)" in first, "README.md: link docs/incident.md within the first 80 lines"

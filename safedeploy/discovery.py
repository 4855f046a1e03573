"""What the host runs today, read from the user manager (adopt.py --discover): a proposed config.toml.

Reads, never changes. For every service of the user manager whose WorkingDirectory lies in a git
work tree, it finds what the config needs and says how it knows each value, so that the proposal
can mark what it guessed:

- the env's name: a unit ending in `-dev` is `dev`, the other `prod`; with more units, the part
  after the shortest unit name they share (`app-staging` beside `app` is `staging`);
- the branch: prod keeps the one its tree is on; every other env gets its own name (`dev`), the
  branch adopt.py creates from the commit it runs;
- the port: from ExecStart (-b/--bind/--port/-p), else the unit's .socket, else the TCP port its
  processes listen on; none of these: the proposal says NOT FOUND and leaves the key out, so the
  config does not load until someone fills it in;
- the database: the one SQLite file the app's processes hold open, else the one untracked SQLite
  file in its tree; none or several: the key is left out and the candidates are listed;
- rehearse_paths, marked GUESS: the pages its access log shows answered 2xx most often (GET, no
  static file, not the tool's own checks), else the pages the running app links from / that answer
  200 now; the rehearsal asks them of the running release on a migrated copy. Nothing found: no key.

A key left out is deliberate: a config that loads with a wrong database would back up the wrong
file every night.
"""

import json
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import SCRIPTS_DIR, processes, unitfiles, units
from .errors import DeployError

SQLITE_HEADER = b"SQLite format 3\0"
SKIP_DIRS = {"venv", ".venv", "node_modules", "__pycache__", "site-packages", ".git", ".tox"}
GIT_TIMEOUT = 30
MARKS = ("GUESS", "UNSURE", "NOT FOUND")       # what a person must look at in the proposal
HEADER_LINES = 3
PORT_FLAGS = re.compile(r"^(?:-b|--bind|-p|--port)(?:=(?P<value>.+))?$")


@dataclass
class Found:
    """One running unit in a git work tree, and what it tells about its env."""
    unit: str
    path: Path
    working_directory: str
    exec_start: list
    active: str
    main_pid: int
    branch: str | None = None
    remote: str = ""
    name: str = ""
    port: int | None = None
    port_source: str = ""
    db: str | None = None
    db_source: str = ""
    db_candidates: list = field(default_factory=list)
    build: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    probe_paths: list = field(default_factory=list)
    probe_source: str = ""


@dataclass
class Proposal:
    """The envs adopt.py proposes from the user manager, and the units it skipped with why."""
    envs: list
    skipped: list         # (unit, why)


# -- reading the user manager -------------------------------------------------------------------
def user_services():
    """Names of the user manager's loaded services, but for this tool's own handover slots."""
    proc = units.systemctl("list-units", "--type=service", "--all", "--no-legend", "--plain", "--no-pager")
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.endswith(".service") and not n.endswith("-handover.service"))


def show(unit, *props):
    proc = units.systemctl("show", unit, "--property=" + ",".join(props), check=False)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def exec_argv(value):
    """ExecStart as systemctl show prints it: { path=... ; argv[]=prog arg ... ; ... }."""
    match = re.search(r"argv\[\]=(.*?) ;", value)
    return match.group(1).split() if match else []


def git_toplevel(folder):
    try:
        proc = subprocess.run(["git", "-C", folder, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def git_out(path, *args):
    proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def discover():
    """A Proposal from what the user manager runs now."""
    found, skipped = [], []
    for unit in user_services():
        props = show(unit, "WorkingDirectory", "ExecStart", "ActiveState", "MainPID", "FragmentPath")
        if not props.get("FragmentPath", "").startswith(str(unitfiles.user_unit_dir())):
            continue        # the user manager's own and packaged services, transient units: not an app
        workdir = props.get("WorkingDirectory", "").lstrip("-!")
        top = git_toplevel(workdir) if workdir and workdir != "~" else None
        if top is None:
            skipped.append((unit, adopted_already(workdir) or
                            f"its WorkingDirectory ({workdir or 'unset'}) is not in a git work tree"))
            continue
        found.append(Found(unit=unit, path=top, working_directory=workdir, exec_start=exec_argv(props.get("ExecStart", "")),
                           active=props.get("ActiveState", ""), main_pid=int(props.get("MainPID") or 0)))
    name_envs(found)
    found.sort(key=lambda f: (f.name != "prod", f.name != "dev", f.name))
    for env in found:
        describe(env)
    return Proposal(envs=found, skipped=skipped)


def adopted_already(workdir: str) -> str | None:
    """Why a unit that runs a release of this tool (WorkingDirectory X.releases/current) is not proposed."""
    path = Path(workdir) if workdir else None
    if path is None or path.name != "current" or not path.parent.name.endswith(".releases"):
        return None
    tree = path.parent.with_name(path.parent.name.removesuffix(".releases"))
    return (f"adopted already: it runs releases from {path.parent} (of the work tree {tree}); the config "
            "that names it is the one to use (status.py --config FILE)")


def name_envs(found):
    """dev and prod for the seed's pair; with more units, names taken from the units: beside app,
    app-staging is staging; units that share no name (blog, shop) keep their own."""
    stems = [f.unit.removesuffix(".service") for f in found]
    dev = [f for f, s in zip(found, stems) if s.endswith("-dev")]
    if len(found) <= 2 and len(dev) <= 1 and len(found) - len(dev) <= 1:
        for f in found:
            f.name = "dev" if any(f is d for d in dev) else "prod"
        return
    base = min(stems, key=len) if stems else ""
    related = all(s == base or s.startswith(base + "-") for s in stems)
    taken = set()
    for f, stem in zip(found, stems):
        if related and stem == base:
            name = "prod"
        elif related:
            name = stem[len(base) + 1:]
        else:
            name = stem
        name = re.sub(r"[^a-z0-9_-]", "-", name.lower()) or "env"
        while name in taken:
            name += "-2"
        taken.add(name)
        f.name = name


def describe(env):
    env.branch = git_out(env.path, "symbolic-ref", "--quiet", "--short", "HEAD") or None
    remotes = git_out(env.path, "remote").split()
    env.remote = "origin" if "origin" in remotes else (remotes[0] if remotes else "")
    pids = process_tree(env.main_pid)
    env.port, env.port_source = find_port(env, pids)
    env.db, env.db_source, env.db_candidates = find_database(env, pids)
    env.build = propose_build(env)
    env.probe_paths, env.probe_source = propose_probes(env)


def first_to_adopt(proposal):
    """The env adopted first: the one the others promote from (dev), else the first proposed."""
    names = [e.name for e in proposal.envs]
    return "dev" if "dev" in names else (names[0] if names else "dev")


# -- probe paths for rehearsals ------------------------------------------------------------------
ACCESS_RE = re.compile(r'"GET (?P<path>/[^\s"?#]*)(?:\?[^\s"]*)? HTTP/[0-9.]+" (?P<status>[0-9]{3})')
NOT_A_PAGE = re.compile(r"^/(?:static|media|assets|_deploy)/|^/(?:favicon\.ico|robots\.txt)$|^/health|"
                        r"\.(?:css|js|png|jpe?g|gif|svg|ico|woff2?|map|txt)$")
LINK_RE = re.compile(r'href="(?P<path>/(?!/)[^"?#\s]*)"')
MAX_PROBES = 3
LOG_LINES = 2000


def pages_in_log(lines):
    """[(path, times)] of the GETs a log shows answered 2xx, most frequent first (the tool's own checks,
    static files and health pages left out)."""
    counts = {}
    for line in lines:
        if "safe-deploy health check" in line:
            continue
        m = ACCESS_RE.search(line)
        if m and m.group("status").startswith("2") and not NOT_A_PAGE.search(m.group("path")):
            counts[m.group("path")] = counts.get(m.group("path"), 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def propose_probes(env):
    """(paths, how they were found): from the unit's access log, else from the running app's / and its links."""
    found = pages_in_log(units.journal_tail(env.unit, LOG_LINES)) if env.active == "active" else []
    if found:
        top = found[:MAX_PROBES]
        return [p for p, _ in top], ("GUESS: the pages its log shows answered 2xx most often ("
                                     + ", ".join(f"GET {p} x{n}" for p, n in top) + ")")
    if not env.port or env.active != "active":
        return [], ""
    from . import health
    base = f"http://127.0.0.1:{env.port}"
    home = health.check(f"{base}/", timeout=5)
    if not home.ok:
        return [], ""
    links = [p for p in dict.fromkeys(m.group("path") for m in LINK_RE.finditer(home.body.decode(errors="replace")))
             if not NOT_A_PAGE.search(p) and p != "/"]
    answered = [p for p in links[:10] if health.check(f"{base}{p}", timeout=5).status == 200][:MAX_PROBES - 1]
    return ["/", *answered], ("GUESS: / and the pages it links to answered 200 just now" if answered else
                              "GUESS: / answered 200 just now")


# -- the port ------------------------------------------------------------------------------------
def port_from_argv(argv):
    """The port named by -b/--bind/--port/-p in a command line, or None."""
    for i, token in enumerate(argv):
        match = PORT_FLAGS.match(token)
        if not match:
            continue
        value = match.group("value") or (argv[i + 1] if i + 1 < len(argv) else "")
        if value.startswith(("unix:", "fd://")):
            continue
        digits = value.rsplit(":", 1)[-1]
        if digits.isdigit() and 1 <= int(digits) <= 65535:
            return int(digits)
    return None


def find_port(env, pids):
    port = port_from_argv(env.exec_start)
    if port:
        return port, "from ExecStart"
    listen = show(unitfiles.socket_name(env.unit), "Listen", "LoadState")
    if listen.get("LoadState") == "loaded":
        match = re.search(r":(\d+) \(Stream\)", listen.get("Listen", ""))
        if match:
            return int(match.group(1)), f"from {unitfiles.socket_name(env.unit)}"
    ports = listening_ports(pids)
    if len(ports) == 1:
        return ports[0], f"the port its process (pid {env.main_pid}) listens on"
    if ports:
        env.notes.append(f"its processes listen on several ports ({', '.join(map(str, ports))}); the lowest is "
                         "proposed: check it is the one the app answers HTTP on")
        return ports[0], "GUESS: the lowest of the ports its processes listen on"
    why = "not running" if env.active != "active" else "not listening on a TCP port"
    return None, f"NOT FOUND: no -b/--bind/--port in ExecStart, no socket unit, and the unit is {why}"


def process_tree(pid):
    """pid and every process below it (gunicorn's workers hold the files and sockets too)."""
    if not pid:
        return []
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(processes.parent_of(int(entry.name)), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def open_files(pids):
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                yield os.readlink(fd)
            except OSError:
                continue


def listening_ports(pids):
    inodes = {target[len("socket:["):-1] for target in open_files(pids) if target.startswith("socket:[")}
    return sorted({port for inode, port in processes.listening_sockets().items() if inode in inodes})


# -- the database --------------------------------------------------------------------------------
def is_sqlite(path):
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == SQLITE_HEADER
    except OSError:
        return False


def find_database(env, pids):
    """(db as the config says it, how it was found, the candidates when unsure)."""
    held = sorted({p for p in open_files(pids) if p.startswith("/") and not p.endswith(("-wal", "-shm", "-journal"))
                   and os.path.isfile(p) and is_sqlite(p)})
    if len(held) == 1:
        return relative_to_tree(held[0], env.path), "the SQLite file the app holds open", []
    untracked = untracked_sqlite(env.path)
    if len(held) > 1:
        return None, "UNSURE: the app holds several SQLite files open", [relative_to_tree(p, env.path) for p in held]
    if len(untracked) == 1:
        return untracked[0], "the one untracked SQLite file in the tree (the app did not hold it open just now)", []
    if untracked:
        return None, "UNSURE: several untracked SQLite files in the tree", untracked
    return None, "NOT FOUND: the app holds no SQLite file open and the tree has no untracked one", []


def relative_to_tree(path, tree):
    try:
        return str(Path(path).relative_to(tree))
    except ValueError:
        return str(path)


def untracked_sqlite(tree):
    """Untracked files (ignored ones too: a database is usually in .gitignore) that are SQLite."""
    out = git_out(tree, "ls-files", "--others", "-z")
    found = []
    for rel in sorted(out.split("\0")):
        if not rel or set(Path(rel).parts) & SKIP_DIRS or rel.endswith(("-wal", "-shm", "-journal")):
            continue
        if is_sqlite(Path(tree) / rel):
            found.append(rel)
    return found


# -- releases ------------------------------------------------------------------------------------
def propose_build(env):
    """A program run from a venv inside the tree needs that venv in every release once the env is
    converted (the unit then runs it through `current`): a build that makes the same venv. The running
    venv holds the truth, not the tree's requirements file (which may be missing, unpinned or stale):
    the same base python, then exactly the distributions the venv holds, at their versions, with
    --no-deps so that nothing else comes in (pip freeze, read from the venv's own metadata without
    running it)."""
    program = env.exec_start[0] if env.exec_start else ""
    if not program.startswith(str(env.path) + "/"):
        return []
    rel = Path(program).relative_to(env.path).parts
    if len(rel) < 3 or rel[1] != "bin":
        return []
    venv = rel[0]
    folder = env.path / venv
    cfg = pyvenv_cfg(folder)
    create = [base_python(cfg), "-m", "venv"]
    if cfg.get("include-system-site-packages", "false").lower() == "true":
        create.append("--system-site-packages")
    build = [create + [venv]]
    pins, editable = installed_distributions(folder)
    if pins:
        build.append([f"{venv}/bin/pip", "install", "--no-deps", *pins])
    for name, where in editable:
        env.notes.append(f"{folder} holds {name} as an editable install (from {where}): the build does not "
                         "reproduce it; add the command that installs it")
    if not pins and not cfg:
        env.notes.append(f"{folder} could not be read (no pyvenv.cfg): the build only makes an empty venv; add "
                         "the command that installs the app's packages")
    return build


def pyvenv_cfg(folder):
    """{key: value} of the venv's pyvenv.cfg, or {}."""
    try:
        lines = (Path(folder) / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines) if _}


def base_python(cfg):
    """The interpreter the venv was made from (its pyvenv.cfg), so the release's venv runs the same python."""
    candidates = [cfg.get("executable", "")]
    version = cfg.get("version") or cfg.get("version_info", "")
    if cfg.get("home") and version:
        candidates.append(os.path.join(cfg["home"], "python" + ".".join(version.split(".")[:2])))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return "python3"


def installed_distributions(folder):
    """(["name==version", ...] sorted, [(name, where)] editable installs) of the venv at folder, from the
    .dist-info metadata in its site-packages (pip itself is left out: the new venv has its own)."""
    pins, editable = set(), []
    for info in sorted(Path(folder).glob("lib/python*/site-packages/*.dist-info")):
        try:
            fields = dict(line.split(": ", 1) for line in (info / "METADATA").read_text(errors="replace").splitlines()
                          if ": " in line and not line.startswith(" "))
        except OSError:
            continue
        name, version = fields.get("Name", "").strip(), fields.get("Version", "").strip()
        if not name or not version or name.lower() == "pip":
            continue
        try:
            direct = json.loads((info / "direct_url.json").read_text())
        except (OSError, ValueError):
            direct = {}
        if isinstance(direct, dict) and (direct.get("dir_info") or {}).get("editable"):
            editable.append((name, direct.get("url", "?")))
            continue
        pins.add(f"{name}=={version}")
    return sorted(pins, key=str.lower), editable


# -- the proposal as config.toml -----------------------------------------------------------------
def render(proposal, now, folders: tuple[str, str] = ("backups", "state")):
    """config.toml text: every value with a comment saying where it came from. folders: backup_dir and
    state_dir as written (relative ones follow the config file's folder)."""
    if not proposal.envs:
        raise DeployError("no service of the user manager runs from a git work tree: nothing to adopt"
                          + "".join(f"; {u}: {why}" for u, why in proposal.skipped))
    lines = [f"# Proposed by adopt.py --discover on {socket.gethostname()} at {now}, from the running units.",
             "# Lines marked GUESS, UNSURE or NOT FOUND need a look; a key it could not find is left out, so this",
             "# file does not load until it is filled in. Then adopt dev first: "
             + shlex.join(["python3", str(SCRIPTS_DIR / "adopt.py"), "dev", "--dry-run"]),
             "", "[defaults]"]
    remotes = {e.remote for e in proposal.envs}
    remote = remotes.pop() if len(remotes) == 1 else ""
    lines.append(f"remote = {toml(remote)}" + ("" if remote else "             # NOT FOUND: the trees have no "
                                                                       "common remote; tags are then kept locally only"))
    lines += ['health_path = "/"         # GUESS: set a page that answers 200 only when the app works',
              "health_timeout = 30", f"backup_dir = {toml(folders[0])}", f"state_dir = {toml(folders[1])}", ""]
    names = {e.name for e in proposal.envs}
    for env in proposal.envs:
        lines += env_lines(env, "dev" in names)
    for unit, why in proposal.skipped:
        lines.append(f"# not proposed: {unit}: {why}")
    return "\n".join(lines).rstrip() + "\n"


def env_lines(env, has_dev):
    out = [f"[env.{env.name}]", f"# from {env.unit} (named {env.name} {naming_reason(env)})",
           f"path = {toml(str(env.path))}"]
    if env.name == "prod":
        out.append(f"branch = {toml(env.branch or 'main')}"
                   + ("" if env.branch else "   # GUESS: the tree is on a detached HEAD"))
    else:
        now_on = f"now on {env.branch}" if env.branch else "now on a detached HEAD"
        out.append(f"branch = {toml(env.name)}   # {now_on}; adopt.py {env.name} creates it from the commit it runs")
    if env.port:
        out.append(f"port = {env.port}" + (f"   # {env.port_source}" if env.port_source else ""))
    else:
        out.append(f"# port = ?   # {env.port_source}")
    if env.db:
        out.append(f"db = {toml(env.db)}   # {env.db_source}")
    else:
        out.append(f"# db = ?   # {env.db_source}"
                   + (f": {', '.join(env.db_candidates)}" if env.db_candidates else ""))
    out.append(f"unit = {toml(env.unit)}")
    if env.name == "prod" and has_dev:
        out.append('promote_from = "dev"   # prod deploys only what dev verified')
    if env.probe_paths:
        out.append(f"rehearse_paths = [{', '.join(toml(p) for p in env.probe_paths)}]   # {env.probe_source}; a "
                   "rehearsal asks them of the running release on the migrated copy: add pages that read and write")
    if env.build:
        out.append(f"# GUESS: it runs {env.exec_start[0]}, so each release needs its own venv: this makes the same one")
        out.append("# (the running venv's python and packages, pinned); later, install the tree's requirements instead")
        out.append("build = [\n" + "".join(f"    {toml(argv)},\n" for argv in env.build) + "]")
    for note in env.notes:
        out.append(f"# note: {note}")
    return out + [""]


def naming_reason(env):
    if env.name == "dev":
        return "for its -dev suffix"
    if env.name == "prod":
        return "as the unit without a -dev suffix"
    return "from the unit's name"


def toml(value):
    """A TOML value: a basic string, or a list of argv lists."""
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

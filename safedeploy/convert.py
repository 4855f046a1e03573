"""Converting an env that runs from its work tree to releases and socket units (deploy.py ENV
--install-units, and adopt.py ENV): the plan and its primitives. The steps themselves are the
runbook's CONVERSION list (safedeploy.runbook.convert_env), run by the runner like a deploy's.

In order: the running commit is built as the first release (the app still serves from its
tree); the unit files are rendered: the service's absolute paths into the work tree
(WorkingDirectory, Exec*, Environment*) now reach `current`, so a venv inside the tree becomes
each release's own, and it takes its socket from a .socket unit; they are installed while the app
serves; then, in the one short stop: the app stops and its port moves to the socket (new
connections are refused only from the moment the old process lets the port go to the moment the
socket listens: see units.move_port_to_socket), the untracked files of every shared path (the
database's folder always: the database, its -wal and -shm, an instance config) are renamed into
shared/, `current` is created, and the service starts on the socket. Renames only: the stop lasts
as long as systemd's stop and start, whatever the database's size.

put_back() reverses each move it made: the files go back into the tree, `current` and the
built release are removed, the old unit files return, and the service starts as it was.
"""

import difflib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import probe, redaction, releases, replica, restart, unitenv, unitfiles, units
from .errors import DeployError
from .files import fsync_dir, make_private_dir, remove_quietly, write_atomic
from .gitrepo import Repo
from .journals import ConversionJournal
from . import records
from .state import utc_stamp

PORT_MOVE = "0.04 s with the sample app, 0.08 s with gunicorn and 2 workers"      # bench/adopt_bench.py, 50 requests/s
PATH_KEYS = ("WorkingDirectory=", "ExecStart=", "ExecStartPre=", "ExecStartPost=", "ExecReload=", "ExecStop=",
             "Environment=", "EnvironmentFile=")


def rewrite_paths(text, env):
    """The unit text with the work tree's absolute path replaced by `current` in the lines that
    name what runs. A longer path that only starts the same (datatracker-dev) is left alone."""
    old, new = str(env.path), str(env.current_link)
    pattern = re.compile(re.escape(old) + r"(?=[/\s\"':]|$)")
    out = []
    for line in text.splitlines():
        stripped = line.lstrip().lstrip("-")
        if any(stripped.startswith(k) for k in PATH_KEYS):
            line = pattern.sub(new, line)
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


@dataclass
class Moves:
    """The renames made so far, to reverse them in put_back()."""
    done: list = field(default_factory=list)        # (from, to)


def data_to_move(env, repo):
    """[(in the tree, in shared/)] for every untracked entry of each shared path: the live data."""
    tracked = set(repo.run("ls-files", "-z").split("\0"))
    shared = env.releases_root / "shared"
    pairs = []
    for rel in releases.shared_paths(env):
        inside = env.path / rel
        if not inside.exists() and not inside.is_symlink():
            continue
        if inside.is_symlink():         # data linked to another disk: the link itself moves
            if rel not in tracked:
                pairs.append((inside, shared / rel))
        elif inside.is_dir():
            for child in sorted(inside.iterdir()):
                name = os.path.relpath(child, env.path)
                if name not in tracked and not any(t.startswith(name + "/") for t in tracked):
                    pairs.append((child, shared / rel / child.name))
        elif rel not in tracked:
            pairs.append((inside, shared / rel))
    return pairs


def check_moves(pairs):
    """Refuse before anything stops: a name taken in shared/, or shared/ on another file system."""
    for src, dst in pairs:
        if dst.exists() or dst.is_symlink():
            raise DeployError(f"cannot convert: {dst} exists already, and {src} would move there; "
                              "move it away first (nothing was changed)")
        parent = dst.parent
        while not parent.exists():
            parent = parent.parent
        if os.stat(parent).st_dev != os.stat(src.parent).st_dev:
            raise DeployError(f"cannot convert: {src} and {parent} are on different file systems, so the move "
                              "would be a copy while the app is down; nothing was changed")


def move_data(pairs, moves):
    """Rename each pair, then make the renames durable (each folder fsynced once, not once per file:
    this runs while the app is stopped)."""
    folders = set()
    for src, dst in pairs:
        if not src.exists() and not src.is_symlink():
            continue        # SQLite removes -wal and -shm when the stopped app closed the database cleanly
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink() and dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()         # the empty folder the first build made for a shared path that is a link
        os.rename(src, dst)
        moves.done.append((src, dst))
        folders |= {dst.parent, src.parent}
    for folder in folders:
        fsync_dir(folder)


def put_data_back(moves):
    for src, dst in reversed(moves.done):
        if dst.exists() or dst.is_symlink():
            if src.exists():        # something recreated it meanwhile (an app start): keep both
                os.rename(src, src.with_name(src.name + ".created-during-conversion"))
            os.rename(dst, src)
    moves.done.clear()


def remove_layout(env, release):
    """Undo what conversion created in the releases folder: `current` and the first release."""
    if env.current_link.is_symlink():
        env.current_link.unlink()
    if release is not None:
        shutil.rmtree(release.path, ignore_errors=True)


def stop_all(env):
    """The app, its socket (so a request cannot start it mid-move) and its helper."""
    sock = unitfiles.socket_name(env.unit)
    if units.state(sock).known:
        units.systemctl("stop", sock, timeout=units.RESTART_TIMEOUT, check=False)
    units.systemctl("stop", unitfiles.helper_name(env.unit), timeout=units.RESTART_TIMEOUT, check=False)
    units.stop(env.unit)


# -- the whole conversion: plan, then one switch-over, put back when not healthy -------------
@dataclass
class Conversion:
    """What plan() found: the unit files to install, and (converting) the commit and the moves; with
    move_secrets, the secret variables taken out of the service's Environment= into secrets_file."""
    repo: Repo
    files: dict
    converting: bool
    commit: str | None
    pairs: list
    changes: bool
    secrets: list = field(default_factory=list)
    secrets_file: Path | None = None


def plan(env, repo, notify, say, warn, move_secrets=None):
    """Print what the conversion will do (the plan, the unit diff); refuse what it cannot do safely,
    before any change. deploy.py --install-units and adopt.py both start here. move_secrets: True moves
    the service's secret Environment= values into a 0600 EnvironmentFile= outside the work tree; False
    says that it could (adopt.py's --move-secrets); None says nothing."""
    converting = not env.converted
    files = socket_unit_files(env, notify, converting)
    secrets, secrets_file = offer_secrets(env, files, move_secrets, say)
    commit, pairs = (conversion_steps(env, repo, say) if converting else (None, []))
    warn_gunicorn_readiness(files, env, warn)
    if units.restart_method(env.unit) == "plain":
        say(f"  note: {env.unit} holds port {env.port} itself until now, so new connections to it are refused "
            f"briefly, once, while the port moves to {unitfiles.socket_name(env.unit)}: from the moment the app "
            f"lets the port go (its own stop) to the moment the socket listens (measured here: {PORT_MOVE})")
    changed = show_unit_diffs(files, say)
    return Conversion(repo=repo, files=files, converting=converting, commit=commit, pairs=pairs,
                      changes=changed or converting, secrets=secrets, secrets_file=secrets_file)


def offer_secrets(env, files, move_secrets, say):
    """The service's secret Environment= values: moved (move_secrets) out of the unit text in files (the
    service's and the handover slot's) into a file named by EnvironmentFile=, or named in a note."""
    service = unitfiles.user_unit_dir() / env.unit
    target = unitenv.secrets_file(env.unit)
    text, taken = unitenv.without_secrets(files[service], env.unit, env.secret_env, target)
    if not taken or move_secrets is None:
        return [], None
    names = ", ".join(sorted({k for k, _ in taken}))
    if not move_secrets:
        say(f"  note: {env.unit} holds {names} in Environment=, in the unit file itself: add --move-secrets to move "
            f"them into {target} (0600, outside the work tree), which the unit then names with EnvironmentFile=")
        return [], None
    if target.exists() or target.is_symlink():
        raise DeployError(f"cannot move {names} out of {env.unit}: {target} exists already; move it away first "
                          "(nothing was changed)")
    files[service] = text
    helper = unitfiles.user_unit_dir() / unitfiles.helper_name(env.unit)
    if helper in files:
        files[helper] = unitfiles.render_helper(text, env.unit)
    say(f"  move {names} out of {env.unit} into {target} (0600), named by EnvironmentFile=")
    return taken, target


def write_secrets(conversion):
    """The moved secrets' file, 0600 in a 0700 folder, before the unit that names it is installed."""
    if conversion.secrets_file is None:
        return
    make_private_dir(conversion.secrets_file.parent)
    write_atomic(conversion.secrets_file, "".join(unitenv.env_file_line(k, v) for k, v in conversion.secrets),
                 mode=0o600)


def report(env, conversion, run, say):
    """What a conversion that went through says (the plan said what it would do)."""
    helper = unitfiles.helper_name(env.unit)
    serves = f"; {helper} serves while it restarts" if any(p.name == helper for p in conversion.files) else ""
    if run.first is not None:
        say(f"converted: {env.name} runs release {run.first.id} through {env.current_link}; its data is in "
            f"{env.releases_root / 'shared'}; deploys now build a release beside the running one")
    say(f"installed: {unitfiles.socket_name(env.unit)} holds port {env.port}; {env.unit} takes its socket from "
        f"systemd{serves}; the old files are saved in {run.saved}")
    if run.probe is not None:
        say(f"probe: {probe.describe(run.probe.stop())}")


def discard(run):
    """After a failed conversion was put back: the copies of the old unit files (they are back in place)
    and a releases folder this run made go."""
    shutil.rmtree(run.saved, ignore_errors=True)
    if run.conversion.secrets_file is not None:
        remove_quietly(run.conversion.secrets_file)         # the old unit file, with them in it, is back
    if run.made_root:
        shutil.rmtree(run.env.releases_root, ignore_errors=True)


def refuse_dirty(env, repo, action, why=""):
    """Refuse, before any change, a work tree with uncommitted changes to tracked files."""
    dirty = repo.dirty_files()
    if dirty:
        raise DeployError(f"cannot {action} {env.name}: {env.path} has uncommitted changes to tracked files "
                          f"({', '.join(f.strip() for f in dirty[:3])}); {why}commit or stash them first "
                          "(nothing was changed)")


def conversion_steps(env, repo, say):
    refuse_dirty(env, repo, "convert", "the first release is built from a commit, so ")
    commit = records.running_commit(records.read(env)) or repo.head()
    pairs = data_to_move(env, repo)
    check_moves(pairs)
    shared = env.releases_root / "shared"
    say(f"convert {env.name} from its work tree to releases:")
    say(f"  1. build {commit[:12]} (what runs) as the first release in {env.releases_root / 'releases'}"
        + (f", running {len(env.build)} build command(s)" if env.build else ""))
    say("  2. install the unit files below, while the app still serves")
    say(f"  3. stop {env.unit}; the moment the port is free, the socket listens (requests wait in its queue); "
        f"rename into {shared}: "
        + (", ".join(str(src.relative_to(env.path)) for src, _ in pairs) or "nothing (no untracked data)"))
    say(f"  4. point {env.current_link} at the release; start {env.unit} on the socket; wait for health")
    say(f"  5. if it is not healthy: every file goes back, the old units return, {env.unit} restarts as it was")
    return commit, pairs


def warn_gunicorn_readiness(files, env, warn):
    """gunicorn sends READY=1 once its master is up, before its workers have imported the app; a
    handover that trusts it stops the old process while the new one cannot answer yet."""
    service = files[unitfiles.user_unit_dir() / env.unit]
    if "gunicorn" in service and "--preload" not in service:
        warn(f"warning: {env.unit} runs gunicorn without --preload: gunicorn signals ready before its workers "
             "load the app, so requests wait (measured: up to 1.7 s) while the new workers import it. Add "
             "--preload to ExecStart: the app is then loaded before gunicorn says ready")


def socket_unit_files(env, notify, converting=False):
    st = units.require_known(env.unit)
    current = Path(st.fragment_path).read_text()
    notify = notify or "gunicorn" in current or "Type=notify" in current
    folder = unitfiles.user_unit_dir()
    if converting:
        current = rewrite_paths(current, env)
    service = unitfiles.render_socket_service(current, env.unit, notify)
    files = {folder / env.unit: service, folder / unitfiles.socket_name(env.unit): unitfiles.render_socket(env.unit, env.port)}
    if notify:      # the helper needs readiness: systemctl start must return only once it serves
        files[folder / unitfiles.helper_name(env.unit)] = unitfiles.render_helper(service, env.unit)
    return files


def show_unit_diffs(files, say):
    """Say the diff of each unit file that changes, its Environment= values and Exec secrets hidden
    (redaction.redact_unit_text: DJANGO_SECRET_KEY=<redacted>); True when one changes."""
    changed = False
    for path, text in files.items():
        old = path.read_text() if path.exists() else ""
        if old != text:
            changed = True
            say("".join(difflib.unified_diff(redaction.redact_unit_text(old).splitlines(True),
                                             redaction.redact_unit_text(text).splitlines(True),
                                             str(path) if old else "/dev/null", str(path))))
    return changed


def save_unit_files(env, files):
    """Copies of the files it replaces, and the mode each new file gets: the old file's own, or for a
    new file the service's as systemd loaded it (a helper copies the service's Environment=, secrets
    included; an instance of a 0600 template, app@a.service, has no file of its own: the template's
    mode is the one to keep)."""
    folder = make_private_dir(env.backup_dir / f"units-{utc_stamp()}")
    service_mode = stat_mode(Path(units.state(env.unit).fragment_path or unitfiles.user_unit_dir() / env.unit)) or 0o644
    modes = {}
    for path in files:
        modes[path] = stat_mode(path) or service_mode
        if path.exists():
            write_atomic(folder / path.name, path.read_bytes())
    return folder, modes


def stat_mode(path):
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return None


def install_units(run):
    """The unit files with the holder (see unitfiles.holder_name) and the socket enabled, while the app still
    serves: both reload the manager, which takes a few hundred milliseconds that must not fall in the window
    where the port is closed. The holder also when the socket already listens: a request arriving while the
    app stops would otherwise have the socket start the service, and systemd cancels the stop job for it
    ("Job ... canceled", seen under load); with the holder the request waits in the queue."""
    env = run.env
    run.held_by_socket = units.state(unitfiles.socket_name(env.unit)).is_active   # then requests wait throughout
    holder = unitfiles.port_holder_files(env.unit)
    write_secrets(run.conversion)
    units.install_unit_files({**run.conversion.files, **holder}, run.modes, reload=False)
    units.systemctl("enable", "--no-reload", unitfiles.socket_name(env.unit))
    units.daemon_reload()           # once, for both


def stop_for_move(run):
    """Stop the app; the port moves to the socket the moment the old process lets it go. Never `stop` the
    socket here: the new service Requires= it, so systemd would stop the app with it."""
    env = run.env
    units.systemctl("stop", unitfiles.helper_name(env.unit), timeout=units.RESTART_TIMEOUT, check=False)
    if run.held_by_socket:
        units.stop(env.unit)
    else:
        units.move_port_to_socket(env.unit, env.port)     # refused connections only while the port moves
    replica.pause(env)          # the database moves next: its last writes reach the replica first


def put_back_interrupted(env, j: ConversionJournal) -> None:
    """Put back a conversion that was killed after it changed something, from its journal: the data it
    had renamed into shared/ goes back, then as put_back()."""
    saved = Path(j.saved)
    moves = Moves(done=[(Path(a), Path(b)) for a, b in j.pairs if Path(b).exists() or Path(b).is_symlink()])
    first = releases.read_release(env.releases_root / "releases" / j.first) if j.first else None
    folder = unitfiles.user_unit_dir()
    files = [folder / env.unit, folder / unitfiles.socket_name(env.unit), folder / unitfiles.helper_name(env.unit)]
    put_back(env, files, saved, {p: stat_mode(p) or 0o644 for p in files}, first, moves)
    shutil.rmtree(saved, ignore_errors=True)
    if j.made_root:
        shutil.rmtree(env.releases_root, ignore_errors=True)


def put_back(env, files, saved, modes, first, moves):
    stop_all(env)
    units.systemctl("disable", unitfiles.socket_name(env.unit), check=False)
    put_data_back(moves)
    remove_layout(env, first)
    units.release_holder(env.unit)
    for path in files:
        old = saved / path.name
        if old.exists():
            data = old.read_bytes()
            write_atomic(path, data, mode=unitfiles.unit_file_mode(data.decode(errors="replace"), modes[path]))
        else:
            remove_quietly(path)
    units.daemon_reload()
    replica.resume(env, swapped=False)
    restart.wait_until_healthy(env, since=restart.restart_unit(env))

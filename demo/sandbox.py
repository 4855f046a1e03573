"""A throwaway host for the demo and the tests, built from real parts in one folder:

- a private systemd --user manager (its own XDG_RUNTIME_DIR and XDG_CONFIG_HOME),
- a bare `origin`, a prod clone on `main`, a dev work tree (git worktree) on `dev`,
  and a `seed` clone where new releases are committed and pushed,
- the sample app running in both envs as user units, and a config.toml.

Or (build_seed) the seed's host before the tool: prod and dev both on main in two clones,
units named like datatracker.service and datatracker-dev.service, and no config: adopt.py's start.

Nothing outside the folder is touched except a cgroup of its own under
/sys/fs/cgroup/unified, removed again by UserManager.stop().
"""

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_APP = REPO_ROOT / "sample_app"
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


class UserManagerError(RuntimeError):
    pass


class UserManager:
    """A private `systemd --user`, started in a cgroup it may write.

    It runs no generators (SYSTEMD_GENERATOR_PATH and SYSTEMD_ENVIRONMENT_GENERATOR_PATH name an empty
    folder): a host's (xdg autostart, environment.d, gpg-agent's) run at every daemon-reload, 0.055 s of
    CPU a reload against ~0.02 s without, and a suite reloads some 1,200 times. The tool reads nothing
    they make (no autostart unit, no manager environment)."""

    started: list = []      # the managers this process started (for what they cost: cpu(), stopped_cpu)
    stopped_cpu = 0.0       # CPU seconds of the managers this process stopped (each cgroup's usage, once emptied)

    def __init__(self, root):
        self.root = Path(root)
        self.runtime = self.root / "run"
        self.config_home = self.root / "config"
        self.unit_dir = self.config_home / "systemd" / "user"
        self.cgroup = CGROUP_ROOT / f"safedeploy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.proc = None
        self.counted = False    # its CPU is in stopped_cpu

    @property
    def env(self):
        return {"XDG_RUNTIME_DIR": str(self.runtime), "XDG_CONFIG_HOME": str(self.config_home)}

    def start(self, timeout=20):
        systemd = shutil.which("systemd", path="/lib/systemd:/usr/lib/systemd")
        if not systemd:
            raise UserManagerError("no /lib/systemd/systemd on this machine (apt-get install systemd)")
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        try:
            Path("/run/systemd/system").mkdir(parents=True, exist_ok=True)
            self.cgroup.mkdir()
            UserManager.started.append(self)
        except OSError as exc:
            raise UserManagerError(f"cannot prepare a cgroup for systemd --user ({exc}); run as root") from exc
        no_generators = self.root / "no-generators"
        no_generators.mkdir(exist_ok=True)
        log = open(self.root / "systemd-user.log", "wb")
        script = 'echo $$ > "$1/cgroup.procs" && exec "$2" --user'
        self.proc = subprocess.Popen(["sh", "-c", script, "sh", str(self.cgroup), systemd],
                                     env={**os.environ, **self.env, "SYSTEMD_GENERATOR_PATH": str(no_generators),
                                          "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": str(no_generators)},
                                     stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            state = self.systemctl("is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return self
            time.sleep(0.1)
        tail = (self.root / "systemd-user.log").read_text(errors="replace")[-400:]
        self.stop()
        raise UserManagerError(f"systemd --user did not come up (state {state!r}): {tail}")

    def systemctl(self, *args, check=True, timeout=60):
        return subprocess.run(["systemctl", "--user", *args], env={**os.environ, **self.env},
                              capture_output=True, text=True, check=check, timeout=timeout)

    def cpu(self):
        """CPU seconds the manager's cgroup has used so far: the manager, its apps and all they started (0.0
        when there is no cgroup, or it cannot be read)."""
        try:
            words = (self.cgroup / "cpu.stat").read_text().split()
            return int(words[words.index("usage_usec") + 1]) / 1e6
        except (OSError, ValueError, IndexError):
            return 0.0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.kill_leftovers()
        if not self.counted:        # once, its shutdown included: its cgroup goes next, what it used is its parent's now
            self.counted = True
            UserManager.stopped_cpu += self.cpu()
        remove_cgroup(self.cgroup)

    def kill_leftovers(self):
        for procs in self.cgroup.rglob("cgroup.procs") if self.cgroup.exists() else []:
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@contextlib.contextmanager
def scratch_host(prefix):
    """(root, manager): a temp folder and a private user manager started in it, whose environment
    this process takes on; the manager stopped and the folder removed afterwards, however it ends."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    manager = UserManager(root / "systemd")
    try:
        manager.start()
        os.environ.update(manager.env)
        yield root, manager
    finally:
        manager.stop()
        shutil.rmtree(root, ignore_errors=True)


def signals_as_on_a_terminal():
    """Ctrl-C (SIGINT) handled by this process again when it started with it ignored, as a process started in
    the background by a shell without job control does (`cmd &` in a script, nohup, some CI runners): the
    scripts it starts then get SIGINT's default at exec, as from a terminal, and a test or a fault cell that
    sends a script SIGINT tests what it says (a script whose SIGINT is ignored, as Python leaves it, runs on)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def remove_cgroup(path):
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        for _ in range(50):
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    try:
        path.rmdir()
    except OSError:
        pass


def free_port():
    return free_ports(1)[0]


def free_ports(n):
    """n distinct free ports that no other test process is handed meanwhile.

    bind(0) draws from the kernel's ephemeral range, as every outgoing connection does, so a port
    found free and closed again could be handed to another pytest-xdist worker (or be a client's
    local port) before our unit binds it: its health check then reached another test's app. So each
    worker takes ports from its own block below that range (gw0 from 12000, gw1 from 14000, ...),
    in turn (from a place of its own per test run), each checked free by binding it; a process
    outside pytest-xdist (the demo) still asks the kernel."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit() or int(worker[2:]) > 9:
        return _kernel_ports(n)
    base = 12000 + 2000 * int(worker[2:])
    start = zlib.crc32(os.environ.get("PYTEST_XDIST_TESTRUNUID", "").encode()) % 2000   # two runs at once
    found = []
    for _ in range(2000):
        port = base + (start + next(_NEXT_PORT)) % 2000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} free ports in {base}-{base + 1999}")


_NEXT_PORT = itertools.count()


def _kernel_ports(n):
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def git(cwd, *args, check=True):
    env = {**os.environ, "GIT_AUTHOR_NAME": "Sandbox", "GIT_AUTHOR_EMAIL": "sandbox@example.invalid",
           "GIT_COMMITTER_NAME": "Sandbox", "GIT_COMMITTER_EMAIL": "sandbox@example.invalid",
           "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {cwd} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


UNIT_TEMPLATE = """\
[Unit]
Description=sample app ({env})

[Service]
WorkingDirectory={path}
ExecStart={python} app.py --port {port} --db instance/app.db
Environment=DEPLOY_STATUS=1
StandardOutput=append:{log}
StandardError=inherit
Restart=on-failure
RestartSec=0.5
TimeoutStopSec=3

[Install]
WantedBy=default.target
"""

CONFIG_TEMPLATE = """\
# A sandbox host: the sample app in dev and prod.
[defaults]
remote = "origin"
health_path = "/health"
health_timeout = {health_timeout}
backup_dir = "backups"
state_dir = "state"

[env.prod]
path = "{root}/prod"
branch = "main"
port = {prod_port}
db = "instance/app.db"
unit = "{prod_unit}"
promote_from = "dev"
{prod_extra}

[env.dev]
path = "{root}/dev"
branch = "dev"
port = {dev_port}
db = "instance/app.db"
unit = "{dev_unit}"
{dev_extra}
"""


class Sandbox:
    """The sample app in dev and prod, on a private user manager, in one folder."""

    def __init__(self, root, manager, health_timeout=10, name="sample", seed=False, python=None, app=None):
        """seed=True: the seed's host as it runs before the tool (build_seed): units named like
        datatracker.service and datatracker-dev.service, both trees on main, no config.
        python: the interpreter that runs the scripts and the app (default: this one).
        app: another app than the sample app (demo.django_site.DjangoSite): its files, units, config keys."""
        self.app = app
        self.python = str(python or sys.executable)
        self.root = Path(root)
        self.manager = manager
        self.health_timeout = health_timeout
        self.name = name
        self.seed = seed
        self.ports = dict(zip(("prod", "dev"), free_ports(2)))
        self.config = self.root / "config.toml"
        self.convert_on_use: set[str] = set()      # envs converted only when a script may touch them (run())
        self.preloaded = None       # tests.preloaded.Preloaded: the fixture's conversions forked from it

    @property
    def env(self):
        """The environment the scripts run with: the private user manager's."""
        return {**os.environ, **self.manager.env, "NO_COLOR": "1"}

    def path(self, env):
        return self.root / env

    def db_path(self, env):
        """The live database: in the shared folder once the env runs releases, else in the work tree."""
        releases = Path(f"{self.path(env)}.releases")
        if (releases / "current").is_symlink():
            return releases / "shared" / "instance" / "app.db"
        return self.path(env) / "instance" / "app.db"

    def unit(self, env):
        if self.seed:
            return f"{self.name}.service" if env == "prod" else f"{self.name}-{env}.service"
        return f"{self.name}-{env}.service"

    def build(self):
        origin, seed = self.publish_sample_app()
        git(seed, "push", "--quiet", "origin", "main:dev")
        git(seed, "branch", "--quiet", "--track", "dev", "origin/dev")
        git(self.root, "clone", "--quiet", "--branch", "main", str(origin), str(self.path("prod")))
        git(self.path("prod"), "worktree", "add", "--quiet", "-b", "dev", str(self.path("dev")), "origin/dev")
        self.write_config()
        self.start_units()
        return self

    def convert(self, *envs):
        """Convert envs (default both) to releases and socket units with the tool itself, as an operator
        would: the layout every adopted env has."""
        self.convert_on_use.difference_update(envs or ("prod", "dev"))
        argvs = {env: [str(REPO_ROOT / "deploy.py"), env, "--install-units", "--yes", "--config", str(self.config)]
                 for env in envs or ("prod", "dev")}                # the envs are independent: both at once
        if self.preloaded is not None and self.preloaded.fits(self.python, self.env):
            results = self.preloaded.run_all([(argv, self.env, os.getcwd()) for argv in argvs.values()])
        else:
            procs = [subprocess.Popen([self.python, *argv], env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
                     for argv in argvs.values()]
            outs = [proc.communicate(timeout=180)[0] for proc in procs]
            results = [(proc.returncode, out) for proc, out in zip(procs, outs)]
        for env, (code, out) in zip(argvs, results):
            if code != 0:
                raise RuntimeError(f"deploy.py {env} --install-units failed: {out}")
        return self

    def build_seed(self):
        """The seed's starting host: prod and dev both run main (two clones), each its own unit and
        database, and no config.toml: what adopt.py starts from."""
        origin, _ = self.publish_sample_app()
        for env in ("prod", "dev"):
            git(self.root, "clone", "--quiet", "--branch", "main", str(origin), str(self.path(env)))
        self.start_units()
        return self

    def start_units(self):
        for env in ("prod", "dev"):
            if self.app is not None:
                self.app.prepare(self.path(env), env)
            self.write_unit(env)
        self.manager.systemctl("daemon-reload")
        for env in ("prod", "dev"):
            self.manager.systemctl("start", self.unit(env))
        for env in ("prod", "dev"):
            self.wait_serving(env)

    def publish_sample_app(self):
        """origin.git with the sample app on main, pushed from the developer's clone `seed`."""
        origin, seed = self.root / "origin.git", self.root / "seed"
        git(self.root, "init", "--quiet", "--bare", "--initial-branch=main", str(origin))
        git(self.root, "clone", "--quiet", str(origin), str(seed))
        if self.app is not None:
            self.write_files(seed, self.app.files())
        else:
            shutil.copytree(SAMPLE_APP, seed, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "instance"))
        git(seed, "checkout", "--quiet", "-B", "main")
        git(seed, "add", "-A")
        git(seed, "commit", "--quiet", "-m", "sample app, first release")
        git(seed, "push", "--quiet", "origin", "main")
        return origin, seed

    def write_config(self, **extra):
        """(Re)write config.toml; extra={"dev": 'pre_restart = [["false"]]'} adds lines to an env (after
        the app's own keys, which they may not repeat)."""
        if self.app is not None:
            extra = {env: self.app.config_lines() + extra.get(env, "") for env in ("prod", "dev")}
        self.config.write_text(CONFIG_TEMPLATE.format(
            root=self.root, prod_port=self.ports["prod"], dev_port=self.ports["dev"],
            prod_unit=self.unit("prod"), dev_unit=self.unit("dev"), health_timeout=self.health_timeout,
            prod_extra=extra.get("prod", ""), dev_extra=extra.get("dev", "")))
        os.chmod(self.config, 0o600)

    def add_env_keys(self, text):
        """Add lines to every env of a config.toml that adopt.py --discover wrote."""
        config = self.config.read_text()
        for env in ("prod", "dev"):
            line = f'unit = "{self.unit(env)}"'
            config = config.replace(line, f"{line}\n{text}")
        self.config.write_text(config)

    def write_unit(self, env, python=None):
        """The env's unit; python: the interpreter ExecStart runs (default: this one)."""
        (self.root / "logs").mkdir(exist_ok=True)
        log = self.root / "logs" / f"{env}.log"
        if self.app is not None:        # its secrets in Environment=: the unit file is the user's alone
            path = self.manager.unit_dir / self.unit(env)
            path.touch(mode=0o600)
            path.write_text(self.app.unit(env, self.path(env), self.ports[env], log, self.root))
            return
        text = UNIT_TEMPLATE.format(env=env, path=self.path(env), python=python or self.python, port=self.ports[env],
                                    log=log)
        (self.manager.unit_dir / self.unit(env)).write_text(text)

    def url(self, env, path="/health"):
        return f"http://127.0.0.1:{self.ports[env]}{path}"

    def wait_serving(self, env, timeout=15, interval=0.1):
        """Seconds until the app in env answers its health check; RuntimeError after timeout."""
        import requests
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if requests.get(self.url(env), timeout=1).status_code == 200:
                    return time.monotonic() - start
            except requests.RequestException:
                pass
            time.sleep(interval)
        raise RuntimeError(f"sample app in {env} did not start within {timeout}s")

    def release(self, branch, files, message):
        """Commit files ({name: text}) on branch in the seed clone and push it; return the sha."""
        seed = self.root / "seed"
        git(seed, "fetch", "--quiet", "origin")          # a branch adopt.py created on origin
        git(seed, "checkout", "--quiet", branch)
        git(seed, "pull", "--quiet", "--ff-only", "origin", branch)
        self.write_files(seed, files)
        git(seed, "add", "-A")
        git(seed, "commit", "--quiet", "-m", message)
        git(seed, "push", "--quiet", "origin", branch)
        return git(seed, "rev-parse", "HEAD")

    @staticmethod
    def write_files(folder, files):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    def merge_to_main(self, ref="origin/dev", message=None):
        """Promote: merge dev into main in the seed clone and push; return main's sha."""
        seed = self.root / "seed"
        git(seed, "fetch", "--quiet", "origin")
        git(seed, "checkout", "--quiet", "main")
        git(seed, "pull", "--quiet", "--ff-only", "origin", "main")
        args = ["merge", "--quiet", "--no-edit", ref] if message is None else \
            ["merge", "--quiet", "--no-ff", "-m", message, ref]
        git(seed, *args)
        git(seed, "push", "--quiet", "origin", "main")
        return git(seed, "rev-parse", "HEAD")

    def convert_when_used(self, *envs):
        """Leave envs in place until a script is run that may touch them (run(): one not given another env
        as its first argument): what a test of one env saves, a conversion of ~1 s of CPU, with the host
        it sees the same as if both had been converted first."""
        self.convert_on_use.update(envs)

    def ready_for(self, *args):
        """Before a script runs with args: the envs left for later converted, unless args name another env
        first (deploy.py dev ...); run() calls this, and a test that starts a script its own way."""
        if self.convert_on_use and not (args and args[0] in ("prod", "dev") and args[0] not in self.convert_on_use):
            self.convert(*sorted(self.convert_on_use))

    def run(self, script, *args, input=None, timeout=180, config=True):
        self.ready_for(*args)
        argv = [self.python, str(REPO_ROOT / script), *args] + (["--config", str(self.config)] if config else [])
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def stop_app(self, env):
        """The app stopped by hand, as an operator does behind a socket unit: the socket too (else the next
        request starts it again), and the handover slot."""
        stem = self.unit(env).removesuffix(".service")
        for name in (f"{stem}.socket", f"{stem}-handover.service", self.unit(env)):
            self.manager.systemctl("stop", name, check=False)

    def stop_units(self):
        """Stop and remove every unit of the sandbox's envs: the services, their sockets, handover slots,
        and whatever transient units (rehearsals, drills) are left. One `systemctl stop` for all of them
        (it stops every unit it knows and reports the others): a stop and a reload per test, not nine calls."""
        names = [name for env in ("prod", "dev") for stem in [self.unit(env).removesuffix(".service")]
                 for name in (f"{stem}.socket", self.unit(env), f"{stem}-handover.service",
                              f"{stem}-port-holder.service")]
        self.manager.systemctl("stop", *names, check=False)
        for name in names:
            (self.manager.unit_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.manager.unit_dir / f"{name}.d", ignore_errors=True)
        self.manager.systemctl("daemon-reload", check=False)

    def pull(self, env):
        """What an old deploy script does before its restart: fast-forward env's work tree to its branch
        on origin (git pull --ff-only). Nothing is restarted."""
        git(self.path(env), "pull", "--quiet", "--ff-only")

    def head(self, env):
        return git(self.path(env), "rev-parse", "HEAD")

"""Several hosts through the Ansible playbooks (ansible/), all real: four hosts, each a folder with its
own systemd --user manager, its own clone of one shared origin and its own config (three prod hosts
that never saw dev, and a dev host), reached by Ansible over ssh to an sshd started here on 127.0.0.1
with a key made here; the three prod hosts behind a real haproxy started here (its admin socket in
this test's folder), with a prober sending requests through haproxy during every run.

One scenario, in order, on one set of hosts (built once: the hosts are what takes time):
an unverified tree refused on each prod host; dev verified on its own host, its verification shared
through origin's git notes; v2 to the three hosts with no failed request; a v3 that fails on the second
host only; the rollback playbook; a retry after a fix that deploys only the hosts not yet on the commit;
backups and status over all hosts. The parts (the playbooks' filters, haproxy's module, the notes) are
checked one by one in test_many_hosts_parts.py.
"""

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from demo.load import Load
from demo.sandbox import REPO_ROOT, SAMPLE_APP, Sandbox, UserManager, free_port, git
from safedeploy import verified_notes
from tests.helpers import log_records
from tests.test_offsite import start_sshd

ANSIBLE = REPO_ROOT / "ansible"
PROD_HOSTS = ("web1", "web2", "web3")
NOTES = verified_notes.NOTES_REF

HOST_CONFIG = """\
# {name}: one env of a fleet; its other envs live on other hosts
[defaults]
remote = "origin"
health_path = "/health"
health_timeout = 10
backup_dir = "backups"
state_dir = "state"

[env.{env}]
path = "{path}"
branch = "{branch}"
port = {port}
db = "instance/app.db"
unit = "{unit}"
{extra}
"""

HAPROXY = """\
global
    stats socket {socket} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    # without it a check's answer must come within its interval (200 ms below): at a load of 9 on 2 cores
    # the one server left while the other was drained failed two checks and haproxy answered 503
    timeout check 2s
frontend web
    bind 127.0.0.1:{port}
    default_backend app
backend app
    option httpchk GET /health
{servers}
"""


class Host(Sandbox):
    """One host of the fleet: one env (prod or dev), its clone of the shared origin, its unit on its own
    user manager, its own config, state and backups."""

    def __init__(self, root, name, env, origin):
        super().__init__(root, UserManager(Path(root) / "systemd"), health_timeout=10, name=name)
        self.host, self.env_name, self.origin = name, env, origin
        self.branch = "main" if env == "prod" else "dev"

    @property
    def env(self):
        return {**super().env, verified_notes.HOST_VARIABLE: self.host}

    @property
    def port(self):
        return self.ports[self.env_name]

    def build(self):
        self.root.mkdir(parents=True)
        self.manager.start()
        git(self.root, "clone", "--quiet", "--branch", self.branch, str(self.origin), str(self.path(self.env_name)))
        self.config.write_text(HOST_CONFIG.format(
            name=self.host, env=self.env_name, path=self.path(self.env_name), branch=self.branch, port=self.port,
            unit=self.unit(self.env_name), extra='promote_from = "dev"' if self.env_name == "prod" else ""))
        os.chmod(self.config, 0o600)
        self.write_unit(self.env_name)
        self.manager.systemctl("daemon-reload")
        self.manager.systemctl("start", self.unit(self.env_name))
        self.wait_serving(self.env_name)
        return self

    def head(self, env=None):
        return git(self.path(self.env_name), "rev-parse", "HEAD")

    def served_version(self):
        return requests.get(self.url(self.env_name, "/"), timeout=5).json()["version"]

    def records(self):
        return log_records(self, self.env_name)


class Fleet:
    def __init__(self, root):
        self.root = root
        self.origin, self.seed = root / "origin.git", root / "seed"
        self.hosts = {}
        self.haproxy = self.sshd = None
        self.socket = root / "haproxy" / "admin.sock"
        self.front = free_port()
        self.timings = []

    # -- building --------------------------------------------------------------------------------
    def publish(self):
        """origin.git with the sample app (v1) on main and dev, committed from the developer's clone `seed`."""
        git(self.root, "init", "--quiet", "--bare", "--initial-branch=main", str(self.origin))
        git(self.root, "clone", "--quiet", str(self.origin), str(self.seed))
        shutil.copytree(SAMPLE_APP, self.seed, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "instance"))
        git(self.seed, "checkout", "--quiet", "-B", "main")
        git(self.seed, "add", "-A")
        git(self.seed, "commit", "--quiet", "-m", "sample app, v1")
        git(self.seed, "push", "--quiet", "origin", "main", "main:dev")
        git(self.seed, "checkout", "--quiet", "-B", "dev", "origin/dev")
        return git(self.seed, "rev-parse", "HEAD")

    def build(self):
        self.v1 = self.publish()
        names = {"dev1": "dev", **{name: "prod" for name in PROD_HOSTS}}
        with ThreadPoolExecutor(len(names)) as pool:            # four user managers: started side by side
            built = pool.map(lambda item: Host(self.root / item[0], item[0], item[1], self.origin).build(), names.items())
            self.hosts = {h.host: h for h in built}
        self.start_haproxy()
        proc, port, user, key = start_sshd(self.root)
        self.sshd = proc
        self.write_inventory(port, user, key)
        return self

    def start_haproxy(self):
        self.socket.parent.mkdir(mode=0o700)
        servers = "\n".join(f"    server {n} 127.0.0.1:{self.hosts[n].port} check inter 200 rise 1 fall 2"
                            for n in PROD_HOSTS)
        cfg = self.root / "haproxy" / "haproxy.cfg"
        cfg.write_text(HAPROXY.format(socket=self.socket, port=self.front, servers=servers))
        self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.root / "haproxy" / "haproxy.log", "wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.socket.exists() and all(self.server_status(n).startswith("UP") for n in PROD_HOSTS):
                return
            time.sleep(0.1)
        raise RuntimeError(f"haproxy did not come up: {(self.root / 'haproxy' / 'haproxy.log').read_text()[-400:]}")

    def write_inventory(self, port, user, key):
        connection = {"ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": user,
                      "ansible_ssh_private_key_file": str(key), "ansible_python_interpreter": "/usr/bin/python3",
                      "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}

        def host_vars(h):
            return {"safe_deploy_dir": str(REPO_ROOT), "safe_deploy_config": str(h.config),
                    "safe_deploy_environment": h.manager.env}
        inventory = {"all": {"vars": connection, "children": {
            "prod": {"hosts": {n: host_vars(self.hosts[n]) for n in PROD_HOSTS},
                     "vars": {"haproxy_host": "lb", "haproxy_socket": str(self.socket), "haproxy_backend": "app",
                              "haproxy_up_timeout": 15}},
            "dev": {"hosts": {"dev1": host_vars(self.hosts["dev1"])}},
            "balancers": {"hosts": {"lb": {}}}}}}
        self.inventory = self.root / "inventory.yml"
        self.inventory.write_text(json.dumps(inventory, indent=1))     # JSON is YAML
        (self.root / "ansible.cfg").write_text("")

    def stop(self):
        for proc in (self.haproxy, self.sshd):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        for h in self.hosts.values():
            h.manager.stop()

    # -- using ----------------------------------------------------------------------------------
    def playbook(self, name, *extra):
        env = {**os.environ, "ANSIBLE_CONFIG": str(self.root / "ansible.cfg"), "ANSIBLE_HOME": str(self.root / "ah"),
               "ANSIBLE_LOCAL_TEMP": str(self.root / "ah" / "tmp"), "ANSIBLE_REMOTE_TEMP": str(self.root / "ah" / "remote"),
               "ANSIBLE_PIPELINING": "1", "ANSIBLE_HOST_KEY_CHECKING": "0", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.root / "cp"), "ANSIBLE_RETRY_FILES_ENABLED": "0"}
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
                str(ANSIBLE / name), *extra]
        start = time.monotonic()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        proc.output = proc.stdout + proc.stderr
        self.timings.append((" ".join([name, *extra])[:60], round(time.monotonic() - start, 1)))
        (self.root / f"run{len(self.timings)}.log").write_text(proc.output)
        return proc

    def stat(self, server):
        s = __import__("socket").socket(__import__("socket").AF_UNIX)
        s.connect(str(self.socket))
        s.sendall(b"show stat\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        s.close()
        return haproxy_module().server_row(out.decode(), "app", server)

    def server_status(self, server):
        try:
            return self.stat(server)["status"]
        except OSError:
            return ""

    def release(self, files, message):
        """Commit on dev in the seed clone and push; returns the commit."""
        for name, text in files.items():
            (self.seed / name).write_text(text)
        git(self.seed, "add", "-A")
        git(self.seed, "commit", "--quiet", "-m", message)
        git(self.seed, "push", "--quiet", "origin", "dev")
        return git(self.seed, "rev-parse", "HEAD")

    def prober(self):
        return Load(f"http://127.0.0.1:{self.front}/health", rate=25, timeout=10, workers=8).start()

    def runs(self):
        return {n: self.hosts[n].head() for n in PROD_HOSTS}


def haproxy_module():
    spec = importlib.util.spec_from_file_location("safe_deploy_haproxy", ANSIBLE / "library" / "safe_deploy_haproxy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def filters():
    spec = importlib.util.spec_from_file_location("safe_deploy_filters", ANSIBLE / "filter_plugins" / "safe_deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f.build()
    finally:
        f.stop()


def no_failed_request(load):
    samples = load.stop()
    failed = [s for s in samples if not s.ok]
    assert samples and not failed, f"{len(failed)} of {len(samples)} requests through haproxy failed: {failed[:3]}"
    return len(samples)


def notes_of(fleet, commit):
    out = git(fleet.origin, "notes", f"--ref={NOTES}", "show", commit, check=False)
    return verified_notes.parse(out)


def test_three_hosts_behind_haproxy_one_at_a_time(fleet):
    f, web1, web2, web3, dev1 = fleet, *(fleet.hosts[n] for n in (*PROD_HOSTS, "dev1"))

    # an unverified tree is refused on every prod host: by the playbook at the first, which it puts back
    # (nothing changed there) and stops, and by the tool itself on the others
    v2 = f.release({"VERSION": "2\n"}, "v2")
    run = f.playbook("deploy.yml", "-e", "env=prod", "-e", f"ref={v2}")
    assert run.returncode == 2                                       # ansible-playbook: a host failed
    assert "web1: deploy.py prod failed with exit 1 (refused; nothing was changed)" in run.output and "promotion gate" in run.output, run.output
    assert "web2" not in run.stdout.split("PLAY RECAP")[0]          # the hosts after it: not even looked at
    assert all(f.server_status(n).startswith("UP") for n in PROD_HOSTS)
    with ThreadPoolExecutor(2) as pool:
        for proc in pool.map(lambda h: h.run("deploy.py", "prod", "--ref", v2, "--yes"), (web2, web3)):
            assert proc.returncode == 1 and "has not been verified in dev" in proc.stderr, proc.stderr
    assert f.runs() == {n: f.v1 for n in PROD_HOSTS} and not any(h.records() for h in (web1, web2, web3))

    # dev, on its own host: a healthy deploy and a passing verify, each shared through origin's notes
    assert dev1.run("deploy.py", "dev").returncode == 0
    verify = dev1.run("verify.py", "dev")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"shared through origin ({NOTES})" in verify.stdout
    shared = notes_of(f, v2)
    assert {(v.env, v.host, v.by) for v in shared} == {("dev", "dev1", "deploy"), ("dev", "dev1", "verify")}
    assert {v.tree for v in shared} == {git(f.seed, "rev-parse", f"{v2}^{{tree}}")}

    # v2 to the three prod hosts, which never saw dev, one at a time: no request through haproxy fails
    load = f.prober()
    run = f.playbook("deploy.yml", "-e", "env=prod", "-e", f"ref={v2}")
    assert run.returncode == 0, run.output
    requests_v2 = no_failed_request(load)
    assert f.runs() == {n: v2 for n in PROD_HOSTS} and all(h.served_version() == "2" for h in (web1, web2, web3))
    for h in (web1, web2, web3):
        assert not (h.root / "state" / "dev.verified.jsonl").exists()
    assert all(f.server_status(n).startswith("UP") for n in PROD_HOSTS)
    assert {v.host for v in notes_of(f, v2) if v.env == "prod"} == set(PROD_HOSTS)     # prod's verifications too

    # a v3 that crashes on a row only web2's database holds: web1 takes it, web2 rolls itself back and stays out
    # of haproxy, web3 is never touched; the playbook fails naming web2
    requests.post(web2.url("prod", "/notes"), data="poison", timeout=5).raise_for_status()
    v3 = f.release({"VERSION": "3\n", "MODE": "crashonrow poison\n"}, "v3: a crash on a row only prod has")
    run = f.playbook("deploy.yml", "-e", "env=dev", "-e", f"ref={v3}")      # dev's group: no balancer
    assert run.returncode == 0 and dev1.head() == v3, run.output
    records3 = len(web3.records())
    load = f.prober()
    run = f.playbook("deploy.yml", "-e", "env=prod", "-e", f"ref={v3}")
    assert run.returncode != 0
    assert "web2: deploy.py prod failed with exit 1" in run.output and "stays out of the balancer" in run.output, run.output
    requests_v3 = no_failed_request(load)
    assert f.runs() == {"web1": v3, "web2": v2, "web3": v2}
    assert web2.records()[-1]["result"] != "ok" and web2.served_version() == "2"
    assert len(web3.records()) == records3
    assert f.server_status("web2") == "MAINT" and f.server_status("web1").startswith("UP")
    assert f.server_status("web3").startswith("UP")

    # the rollback playbook: with no commit named, the hosts' last deploys differ, so it asks for one;
    # with -e to=v2, web1 goes back, web2 and web3 run v2 already (web2, healthy, comes back in)
    run = f.playbook("rollback.yml", "-e", "env=prod")
    assert run.returncode != 0 and "the hosts' last deploys differ" in run.output and "-e to=COMMIT" in run.output
    load = f.prober()
    run = f.playbook("rollback.yml", "-e", "env=prod", "-e", f"to={v2}")
    assert run.returncode == 0, run.output
    requests_rollback = no_failed_request(load)
    assert f.runs() == {n: v2 for n in PROD_HOSTS} and web1.served_version() == "2"
    assert [r["kind"] for r in web1.records()][-1] == "rollback"
    assert not any(r["kind"] == "rollback" for r in web3.records())
    assert all(f.server_status(n).startswith("UP") for n in PROD_HOSTS)

    # the fix, v4: a first run stops at web2, whose env is locked by another operation (refused, nothing
    # changed: back in haproxy); the retry deploys web2 and web3 only, web1 runs v4 already
    v4 = f.release({"VERSION": "4\n", "MODE": "ok\n"}, "v4: the fix")
    assert dev1.run("deploy.py", "dev").returncode == 0
    lock = os.open(web2.root / "state" / "prod.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(lock, json.dumps({"pid": os.getpid(), "operation": "rehearse", "command": "test", "since": "now"}).encode())
    load = f.prober()
    try:
        run = f.playbook("deploy.yml", "-e", "env=prod", "-e", f"ref={v4}")
    finally:
        os.close(lock)
    assert run.returncode != 0 and "web2: deploy.py prod failed with exit 3" in run.output, run.output
    assert "back in the balancer" in run.output
    assert f.runs() == {"web1": v4, "web2": v2, "web3": v2}
    deploys1 = len(web1.records())
    run = f.playbook("deploy.yml", "-e", "env=prod", "-e", f"ref={v4}")
    assert run.returncode == 0, run.output
    requests_v4 = no_failed_request(load)
    assert "web1 runs " + v4 + " already" in run.output
    assert len(web1.records()) == deploys1
    assert f.runs() == {n: v4 for n in PROD_HOSTS} and all(h.served_version() == "4" for h in (web1, web2, web3))
    assert all(f.server_status(n).startswith("UP") for n in PROD_HOSTS)

    # backups on every host at once, each its own
    run = f.playbook("backup.yml", "-e", "env=prod")
    assert run.returncode == 0, run.output
    for h in (web1, web2, web3):
        listed = json.loads(h.run("backup.py", "--list", "--json").stdout)["backups"]
        assert listed[0]["reason"] == "nightly" and listed[0]["env"] == "prod", listed[0]

    # status over all hosts: one document; web3 down makes the run fail, its problems named with the host
    web3.manager.systemctl("stop", web3.unit("prod"))
    inventory = json.loads(f.inventory.read_text())          # and a host that cannot be reached
    inventory["all"]["children"]["prod"]["hosts"]["web9"] = {"safe_deploy_dir": str(REPO_ROOT), "ansible_port": free_port()}
    f.inventory.write_text(json.dumps(inventory))
    report = f.root / "status.json"
    run = f.playbook("status.yml", "-e", f"status_json={report}")
    assert run.returncode != 0, run.output
    doc = json.loads(report.read_text())
    assert set(doc["hosts"]) == {*PROD_HOSTS, "dev1", "web9"} and doc["ok"] is False
    assert doc["hosts"]["web9"]["ok"] is False and doc["hosts"]["web9"]["problems"][0].startswith("unreachable: ")
    assert doc["hosts"]["web3"]["ok"] is False and doc["hosts"]["web3"]["envs"]["prod"]["commit"] == v4
    assert doc["hosts"]["web1"]["envs"]["prod"]["commit"] == v4 and "dev" in doc["hosts"]["dev1"]["envs"]
    assert any(p.startswith("web3 prod: ") for p in doc["problems"])
    assert not any(p.startswith(("web1", "web2", "dev1")) for p in doc["problems"]), doc["problems"]
    assert doc["advice"] and all(a["host"] == "web3" and a["why"].startswith("on web3, prod: ") for a in doc["advice"])
    print("playbook runs (s):", f.timings)
    print(f"requests through haproxy: v2 {requests_v2}, v3 {requests_v3}, rollback {requests_rollback}, "
          f"v4 {requests_v4}; none failed")


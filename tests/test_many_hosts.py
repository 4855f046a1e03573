"""Several hosts through the Ansible playbooks (ansible/), all real: four hosts, each a folder with its
own systemd --user manager, its own clone of one shared origin and its own config (three prod hosts
that never saw dev, and a dev host), reached by Ansible over ssh to an sshd started here on 127.0.0.1
with a key made here; the three prod hosts behind a real haproxy started here (its admin socket in
this test's folder), with a prober sending requests through haproxy during every run.

One scenario, in order, on one set of hosts (built once: the hosts are what takes time):
an unverified tree refused on each prod host; dev verified on its own host, its verification shared
through origin's git notes; v2 to the three hosts with no failed request; a v3 that fails on the second
host only; the rollback playbook; a retry after a fix that deploys only the hosts not yet on the commit;
status over all hosts. The pure parts (the playbooks' filters, haproxy's stat parsing, the notes) are
checked directly below it.
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
from safedeploy.errors import DeployError
from safedeploy.gitrepo import Repo
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


# -- the playbooks' decisions, directly -------------------------------------------------------------------
def test_a_run_without_one_commit_or_with_an_unknown_env_stops_before_any_host():
    example = ANSIBLE / "inventory.example.yml"
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    for extra, said in ((["-e", "env=prod", "-e", "ref=main"], "-e ref=COMMIT takes a full commit id (main is not one)"),
                        (["-e", "env=prdo", "-e", "ref=" + "a" * 40], "no group named prdo"),
                        (["-e", "ref=" + "a" * 40], "no env given")):
        proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(example),
                               str(ANSIBLE / "deploy.yml"), *extra], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and said in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert "web1" not in proc.stdout and "UNREACHABLE" not in proc.stdout


def status_result(envs, rc=None):
    doc = {"envs": envs}
    ok = all(e.get("ok") for e in envs.values())
    return {"rc": 0 if ok else 1 if rc is None else rc, "stdout": json.dumps(doc), "stderr": ""}


def env_status(ok=True, commit="a" * 40, last=None, problems=(), advice=()):
    return {"ok": ok, "commit": commit, "health": {"ok": ok}, "problems": list(problems), "advice": list(advice),
            "last_deploy": last, "last_rollback": None}


def test_the_status_document_names_each_host_in_its_problems_and_advice():
    hostvars = {
        "web1": {"sd_status": status_result({"prod": env_status()})},
        "web2": {"sd_status": status_result({"prod": env_status(False, problems=["the unit is failed"],
                                                                advice=[{"why": "start it", "command": "systemctl --user start app"}])})},
        "web3": {"sd_status": {"unreachable": True, "msg": "ssh: connect to host web3 port 22: Connection refused"}},
        "web4": {"sd_status": {"rc": 2, "stdout": "", "stderr": "error: config.toml: env.prod.port: not a port\n"}},
        "lb": {"sd_status": {"skipped": True, "changed": False}},
    }
    doc = filters().report(hostvars, ["web1", "web2", "web3", "web4", "lb", "nosuch"])
    assert doc["ok"] is False and set(doc["hosts"]) == {"web1", "web2", "web3", "web4"}
    assert doc["hosts"]["web1"]["ok"] and not doc["hosts"]["web2"]["ok"]
    assert doc["problems"] == ["web2 prod: the unit is failed",
                               "web3: unreachable: ssh: connect to host web3 port 22: Connection refused",
                               "web4: status.py failed (exit 2: usage or configuration error): "
                               "error: config.toml: env.prod.port: not a port"]
    assert doc["advice"] == [{"host": "web2", "env": "prod", "why": "on web2, prod: start it",
                              "command": "systemctl --user start app"}]
    assert filters().report({"web1": hostvars["web1"]}, ["web1"])["ok"] is True


def test_a_rollback_without_a_commit_goes_where_every_host_s_last_deploy_came_from_or_asks():
    a, b, c = "a" * 40, "b" * 40, "c" * 40

    def hv(*states):
        return {f"web{i}": {"sd_status": status_result({"prod": env_status(commit=commit, last=last)})}
                for i, (commit, last) in enumerate(states, 1)}
    same = {"from": a, "to": b, "result": "ok"}
    hosts = ["web1", "web2", "web3"]
    assert filters().rollback_target(hv((b, same), (b, same), (a, same)), hosts, "prod") == {"commit": a}
    differ = filters().rollback_target(hv((b, same), (a, {**same, "result": "rolled-back"}), (a, {"from": c, "to": a,
                                                                                                    "result": "ok"})),
                                       hosts, "prod")
    assert "commit" not in differ and "web2 runs aaaaaaaaaaaa, last deploy aaaaaaaaaaaa -> bbbbbbbbbbbb rolled-back" in \
        differ["error"] and "-e to=COMMIT" in differ["error"]
    assert "error" in filters().rollback_target(hv((a, None)), ["web1"], "prod")


def test_a_host_s_point_at_a_commit_is_its_newest_before_deploy_point_never_a_pre_rollback_save():
    a, b = "a" * 40, "b" * 40
    points = {"points": [
        {"id": "prod-20260101-120500-pre-rollback", "kind": "backup", "commit": a},
        {"id": "prod-before-deploy-20260101-120000", "kind": "before-deploy", "commit": a},
        {"id": "prod-20260101-110000-nightly", "kind": "backup", "commit": a},
        {"id": "prod-before-deploy-20251231-120000", "kind": "before-deploy", "commit": b}]}
    point = filters().point
    assert point(json.dumps(points), a) == "prod-before-deploy-20260101-120000"
    assert point({"points": points["points"][:1] + points["points"][2:3]}, a) == "prod-20260101-110000-nightly"
    assert point({"points": points["points"][:1]}, a) == "" and point(points, "c" * 40) == ""


def test_an_operation_changed_something_when_it_left_a_record():
    changed = filters().changed
    before = {"envs": {"prod": env_status(last={"time": "t1"})}}
    assert not changed(before, json.loads(json.dumps(before)), "prod")
    assert changed(before, {"envs": {"prod": env_status(last={"time": "t2"})}}, "prod")


# -- haproxy's runtime API: a drain that does not end in time puts the server back ------------------------
def test_a_server_whose_connection_does_not_end_is_put_back_as_it_was_and_the_module_fails(tmp_path):
    import socket
    hap = haproxy_module()
    hold = socket.socket()                    # a backend that accepts and never answers: one session stays open
    hold.bind(("127.0.0.1", 0))
    hold.listen(8)
    front, admin = free_port(), tmp_path / "admin.sock"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY.format(socket=admin, port=front, servers=f"    server s1 127.0.0.1:{hold.getsockname()[1]}")
                   .replace("    option httpchk GET /health\n", ""))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        deadline = time.monotonic() + 10
        while not admin.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        params = {"socket": str(admin), "backend": "app", "server": "s1", "timeout": 5.0}
        assert hap.run({**params, "state": "show", "wait": 0})["status"] == "no check"
        client = socket.create_connection(("127.0.0.1", front), timeout=5)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while hap.run({**params, "state": "show", "wait": 0})["scur"] != 1:
            time.sleep(0.05)
        with pytest.raises(hap.HaproxyError, match=r"still had 1 connection\(s\) after 0.5s of draining; put back"):
            hap.run({**params, "state": "maint", "wait": 0.5})
        assert hap.run({**params, "state": "show", "wait": 0})["status"] == "no check"
        held, _ = hold.accept()              # the backend ends it: the session closes
        held.close()
        result = hap.run({**params, "state": "maint", "wait": 5})
        assert result["status"] == "MAINT" and result["scur"] == 0 and result["changed"]
        assert hap.run({**params, "state": "ready", "wait": 5})["status"] == "no check"
        with pytest.raises(hap.HaproxyError, match="no server 'nope' in backend 'app'"):
            hap.run({**params, "server": "nope", "state": "maint", "wait": 1})
    finally:
        if client:
            client.close()
        proc.terminate()
        proc.wait(timeout=10)
        hold.close()


# -- verifications shared through git notes ---------------------------------------------------------------
def clone_pair(tmp_path):
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(origin))
    first = tmp_path / "a"
    git(tmp_path, "clone", "--quiet", str(origin), str(first))
    (first / "f").write_text("1\n")
    git(first, "add", "-A")
    git(first, "commit", "--quiet", "-m", "one")
    git(first, "push", "--quiet", "origin", "main")
    second = tmp_path / "b"
    git(tmp_path, "clone", "--quiet", str(origin), str(second))
    return origin, Repo(str(first)), Repo(str(second))


def test_two_hosts_sharing_at_once_keep_both_lines_and_a_third_reads_them(tmp_path):
    origin, a, b = clone_pair(tmp_path)
    commit = a.head()
    tree = a.tree_of(commit)
    va = verified_notes.Verification("dev", "dev1", commit, tree, "2026-01-01T10:00:00+00:00", "deploy")
    vb = verified_notes.Verification("dev", "dev2", commit, tree, "2026-01-01T10:00:01+00:00", "verify")
    verified_notes.share(a, "origin", va)
    verified_notes.share(b, "origin", vb)               # b never fetched a's note: refused, merged, pushed again
    verified_notes.share(a, "origin", va)               # the same line again: kept once
    assert sorted(notes_line.host for notes_line in verified_notes.parse(
        git(origin, "notes", f"--ref={NOTES}", "show", commit))) == ["dev1", "dev2"]
    third = tmp_path / "c"
    git(tmp_path, "clone", "--quiet", str(origin), str(third))
    found, problem = verified_notes.lookup(Repo(str(third)), "origin", "dev", fetch_first=True)
    assert problem == "" and found == [va, vb]
    assert verified_notes.lookup(Repo(str(third)), "origin", "prod", fetch_first=False) == ([], "")


def test_no_notes_yet_is_no_verification_and_an_unreachable_remote_is_said(tmp_path):
    origin, a, _ = clone_pair(tmp_path)
    assert verified_notes.lookup(a, "origin", "dev", fetch_first=True) == ([], "")
    git(a.path, "remote", "set-url", "origin", str(tmp_path / "gone.git"))
    found, problem = verified_notes.lookup(a, "origin", "dev", fetch_first=True)
    assert found == [] and "could not fetch refs/notes/safe-deploy-verified from origin" in problem
    with pytest.raises(DeployError, match="could not push"):
        verified_notes.share(a, "origin", verified_notes.verification("dev", a.head(), a.tree_of(a.head()), "verify"))
    assert [v.env for v in verified_notes.recorded(a, "dev")] == ["dev"]      # kept here: the next share pushes it


def test_a_note_line_that_is_not_a_verification_is_skipped_and_hosts_are_shown_safely():
    good = {"env": "dev", "host": "dev1\x1b[2J", "commit": "a" * 40, "tree": "b" * 40, "time": "t", "by": "verify"}
    lines = [json.dumps(good), "not json", json.dumps([1]), json.dumps({**good, "commit": "HEAD; rm -rf /"}),
             json.dumps({**good, "env": "dev prod"}), json.dumps({**good, "tree": 7}), ""]
    (v,) = verified_notes.parse("\n".join(lines))
    assert v.host == "dev1\\x1b[2J" and v.commit == "a" * 40


def test_a_prod_only_host_may_promote_from_an_env_of_another_host_when_it_has_a_remote(tmp_path):
    from safedeploy import config
    text = ('[env.prod]\npath = "prod"\nbranch = "main"\nport = 8000\ndb = "instance/app.db"\nunit = "app.service"\n'
            'promote_from = "dev"\n')
    (tmp_path / "prod").mkdir()
    f = tmp_path / "config.toml"
    f.write_text(text)
    os.chmod(f, 0o600)
    assert config.load(str(f)).envs["prod"].promote_from == "dev"
    f.write_text(text + 'remote = ""\n')
    with pytest.raises(DeployError, match="no env named 'dev' here, and no remote to read another host's"):
        config.load(str(f))

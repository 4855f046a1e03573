"""The parts of the several-hosts feature, one by one (the whole runs in test_many_hosts.py): the
playbooks' decisions (ansible/filter_plugins), the haproxy module against a real haproxy, the argument
checks of deploy.yml against real ansible-playbook, the verifications shared through git notes between
real clones of one bare repository, and the config rule for an env of another host."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo.sandbox import free_port, git
from safedeploy import verified_notes
from safedeploy.errors import DeployError
from safedeploy.gitrepo import Repo
from tests.test_many_hosts import ANSIBLE, HAPROXY, NOTES, filters, haproxy_module


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
    try:        # haproxy may not listen yet: the module's command waits for its socket, within its timeout
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


def test_the_module_waits_for_an_admin_socket_that_is_not_listening_yet_and_fails_past_its_timeout(tmp_path):
    """haproxy starting (or reloading: its new process binds the socket a moment before it listens): the module's
    command waits for the socket, within its timeout, rather than failing a rolling deploy on that moment; past
    the timeout it fails, naming the socket. A real haproxy, started after the module's call began."""
    hap = haproxy_module()
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    admin, cfg = tmp_path / "admin.sock", tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY.format(socket=admin, port=free_port(), servers=f"    server s1 127.0.0.1:{backend.getsockname()[1]}")
                   .replace("    option httpchk GET /health\n", ""))
    params = {"socket": str(admin), "backend": "app", "server": "s1", "wait": 0}
    with pytest.raises(hap.HaproxyError, match="admin socket"):
        hap.run({**params, "state": "show", "timeout": 0.3})          # nothing there within the timeout
    result: dict = {}
    call = threading.Thread(target=lambda: result.update(hap.run({**params, "state": "show", "timeout": 10.0})))
    call.start()
    time.sleep(0.5)                                                    # the call is waiting: nothing listens yet
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        call.join(15)
        assert result.get("status") == "no check", result
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.close()

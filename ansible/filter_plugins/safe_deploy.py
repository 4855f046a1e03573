"""Jinja filters for the safe-deploy playbooks: the decisions they take on what the tool's own
scripts printed (status.py --json, rollback.py --list --json), as pure functions the tests call
directly. Nothing here runs a command; the tool on each host does the work.

- safe_deploy_report(hostvars, hosts, var): every host's `status.py --json` (registered as `var`) in
  one document, its problems and advice naming the host;
- safe_deploy_rollback_target(hostvars, hosts, env, var): the commit a rollback of several hosts goes
  back to when none is named: the one every host's last deploy came from, when they agree;
- safe_deploy_point(points_json, commit): the rollback point of one host at a commit;
- safe_deploy_changed(before, after, env): whether an operation left a record (a deploy or rollback
  that ran, as opposed to one refused before it changed anything).
"""

import json
from typing import Any

EXIT_MEANING = {
    1: "failed; everything is back as it was before it (a deploy rolled back)",
    2: "usage or configuration error",
    3: "another operation holds the env's lock",
    4: "failed AND could not restore the previous state: a human is needed",
}


def _get(hostvars: Any, host: str, var: str) -> Any:
    try:
        return hostvars[host].get(var)
    except (KeyError, AttributeError):
        return None


def host_status(result: Any) -> tuple[dict | None, str]:
    """(the status.py --json document, or None; the problem reading it, or "") for one registered result."""
    if not isinstance(result, dict) or result.get("skipped"):
        return None, ""
    if result.get("unreachable"):
        return None, f"unreachable: {result.get('msg', '').strip() or 'no answer'}"
    rc = result.get("rc")
    if rc in (0, 1):
        try:
            doc = json.loads(result.get("stdout") or "")
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("envs"), dict):
            return doc, ""
    lines = [line for line in (result.get("stderr") or result.get("msg") or "").splitlines() if line.strip()]
    return None, f"status.py failed (exit {rc}: {EXIT_MEANING.get(rc, 'unexpected')}): {lines[-1] if lines else 'no output'}"


def report(hostvars: Any, hosts: list, var: str = "sd_status") -> dict:
    """{"ok", "hosts": {host: {"ok", "envs": {...status.py's...}, "problems": [...]}}, "problems": ["HOST ENV: ..."],
    "advice": [{"host", "env", "why", "command"}]}: a host whose status cannot be read is not OK."""
    doc = {"ok": True, "hosts": {}, "problems": [], "advice": []}
    for host in hosts:
        status, problem = host_status(_get(hostvars, host, var))
        if status is None and not problem:
            continue                    # not a host of the tool (a balancer): skipped
        entry = {"ok": status is not None, "envs": (status or {}).get("envs", {}), "problems": []}
        if problem:
            entry["problems"].append(problem)
            doc["problems"].append(f"{host}: {problem}")
        for env, e in sorted(entry["envs"].items()):
            if not e.get("ok", False):
                entry["ok"] = False
            for p in e.get("problems") or []:
                doc["problems"].append(f"{host} {env}: {p}")
            for a in e.get("advice") or []:
                doc["advice"].append({"host": host, "env": env, "why": f"on {host}, {env}: {a.get('why', '')}",
                                      "command": a.get("command", "")})
        doc["hosts"][host] = entry
        doc["ok"] = doc["ok"] and entry["ok"]
    return doc


def rollback_target(hostvars: Any, hosts: list, env: str, var: str = "sd_status") -> dict:
    """{"commit": the commit to go back to} when every host's last deploy of env was the same one (from the
    same commit to the same commit), or {"error": why not, host by host}."""
    seen, lines = set(), []
    for host in hosts:
        status, problem = host_status(_get(hostvars, host, var))
        e = (status or {}).get("envs", {}).get(env)
        if e is None:
            lines.append(f"{host}: {problem or 'no env ' + env}")
            seen.add(None)
            continue
        d = e.get("last_deploy") or {}
        seen.add((d.get("from"), d.get("to")) if d.get("result") == "ok" else None)
        lines.append(f"{host} runs {str(e.get('commit'))[:12]}, last deploy "
                     + (f"{str(d.get('from'))[:12]} -> {str(d.get('to'))[:12]} {d.get('result')}" if d else "none"))
    if len(seen) == 1 and None not in seen:
        return {"commit": next(iter(seen))[0]}
    return {"error": "the hosts' last deploys differ (" + "; ".join(lines) + "), so there is no one state to go back "
                     "to: name the commit with -e to=COMMIT (each host goes back to its newest rollback point at it; a "
                     "host that runs it already is left as it is), or one host with -l HOST"}


def point(points_json: str | dict, commit: str) -> str:
    """The id of the host's rollback point to go back to commit: its newest before-deploy point at it, else its
    newest backup at it that is not a pre-rollback save; "" when there is none."""
    points = json.loads(points_json).get("points", []) if isinstance(points_json, str) else points_json.get("points", [])
    at = [p for p in points if p.get("commit") == commit]
    tagged = [p for p in at if p.get("kind") == "before-deploy"]
    others = [p for p in at if not str(p.get("id", "")).endswith("-pre-rollback")]
    chosen = (tagged or others or [{}])[0]
    return chosen.get("id", "")


def changed(before: dict | None, after: dict | None, env: str) -> bool:
    """Whether a deploy or rollback of env left a record between two status.py --json documents: False when it
    was refused before it changed anything (a gate, the lock, the config)."""
    def last(doc: dict | None) -> tuple:
        e = (doc or {}).get("envs", {}).get(env) or {}
        return e.get("last_deploy"), e.get("last_rollback")
    return last(before) != last(after)


class FilterModule:
    def filters(self) -> dict:
        return {"safe_deploy_report": report, "safe_deploy_rollback_target": rollback_target,
                "safe_deploy_point": point, "safe_deploy_changed": changed}

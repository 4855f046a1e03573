#!/usr/bin/env python3
"""status.py [ENV]: every env at a glance, with the exact rollback command to paste.

For each env: the unit's state and uptime, the commit it runs (subject, branch),
the last deploy and its result, the last backup and its age, HTTP health and
latency, a lock held by a running operation, and the rollback command. The envs
are looked at in parallel, with short timeouts. Exit 0 when every env shown is
active and healthy, 1 otherwise (so monitoring can use it), 2 on a config error.
"""

import json
from concurrent.futures import ThreadPoolExecutor

from safedeploy import backups, cli, health, recovery, releases, units
from safedeploy.errors import EXIT_FAILED, DeployError
from safedeploy.gitrepo import Repo
from safedeploy.points import list_points
from safedeploy import records as logs
from safedeploy.state import age_seconds, bad_mark, human_age, lock_holder

HEALTH_TIMEOUT = 2.0
MAX_BACKUP_AGE = 24 * 3600
NO_SAFE_POINT = ("none to paste: no point on another commit that is neither a rolled-back release nor a "
                 "pre-rollback copy (what runs may be the oldest good state; see rollback.py ENV --list)")


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    envs = [config.env(args.env)] if args.env else list(config.envs.values())
    with ThreadPoolExecutor(max_workers=max(1, len(envs))) as pool:
        reports = dict(zip((e.name for e in envs), pool.map(lambda e: look_at(config, e), envs)))
    show(reports, args.json)
    return 0 if all(r["unit"]["active"] and r["health"]["ok"] and not r["problems"] and not r["interrupted"]
                    for r in reports.values()) else EXIT_FAILED


def parse_arguments():
    p = cli.parser("status.py", "Show every env at a glance, with the rollback command to paste.",
                   ["python3 status.py", "python3 status.py prod --json"])
    p.add_argument("env", metavar="ENV", nargs="?", help="show only this env")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p.parse_args()


def look_at(config, env):
    """Everything status shows about one env; a part that cannot be read says why."""
    report = {"commit": None, "subject": "", "branch": None, "unit": {"active": False, "state": "unknown"},
              "health": {"ok": False, "status": None, "ms": None}, "last_deploy": None, "last_backup": None,
              "rollback": None, "lock": lock_holder(env.state_dir, env.name), "interrupted": None, "problems": [],
              "restart_method": None, "warning": None}
    if not report["lock"]:
        j = recovery.interrupted_any(env)
        if j:
            report["interrupted"] = {k: j.get(k) for k in ("op", "pid", "command", "started", "step")}
    with ThreadPoolExecutor(max_workers=1) as pool:
        probe = pool.submit(health.check, env.health_url, HEALTH_TIMEOUT)
        try:
            records = logs.read(env)          # read once, for every part
        except DeployError as exc:
            records = []
            report["problems"].append(str(exc))
        for part in (unit_part, code_part, log_part, backup_part, rehearsal_part, data_part, running_part):
            try:
                found = part(config, env, records)
                report["problems"] += found.pop("problems", [])
                report.update(found)
            except DeployError as exc:
                report["problems"].append(str(exc))
        result = probe.result()
        served = report.pop("served_commit", None)
        if served and report.get("commit") and served != report["commit"]:
            report["problems"].append(f"the app answers for {served[:12]} (/_deploy/status), the deploy log says "
                                      f"{report['commit'][:12]}: what runs is {served[:12]}")
            report["commit"] = served
    report["health"] = {"ok": result.ok, "status": result.status, "ms": result.ms, "url": env.health_url}
    if result.error:
        report["health"]["error"] = result.error
    return report


def unit_part(config, env, records):
    st = units.serving_state(env.unit)         # with a handover slot, the one that serves
    method = units.restart_method(env.unit)
    problems = []
    if method == "handover" and all(units.state(u).is_active for u in units.slots(env.unit)) \
            and not lock_holder(env.state_dir, env.name):
        problems.append(f"both {env.unit} and {units.helper_name(env.unit)} run outside a deploy (one was "
                        f"killed mid-swap); the next deploy.py or rollback.py stops the older")
    return {"restart_method": method, "problems": problems,
            "warning": None if method != "plain" else units.DROPS_WARNING.format(
                command=cli.script_command(config, "deploy.py", env.name, "--install-units")),
            "unit": {"active": st.is_active, "state": st.active, "sub": st.sub, "name": st.name,
                     "since": units.uptime_text(st) or None, "restarts": st.restarts,
                     "looping": units.is_restart_looping(st) if st.is_active else False}}


def code_part(config, env, records):
    """What runs: on releases, read from the serving process (the release folder it runs in), never from
    `current` or the log, which a killed deploy may have moved ahead of it; in place, the log's commit."""
    repo = Repo(env.path)
    head = repo.head()
    logged = logs.running_commit(records) or head
    problems = []
    commit = logged
    if env.converted:
        st = units.serving_state(env.unit)
        serving = releases.serving(env, st.main_pid) if st.is_active else None
        current = releases.current(env)
        if serving:
            commit = serving.commit
        elif st.is_active:
            problems.append(f"{st.name} runs, but not from a release of {env.name} that can be read: what runs "
                            "cannot be told")
        if releases.dangling_current(env):
            problems.append(f"{env.current_link} names a release folder that is gone: the app cannot start again; "
                            f"{cli.script_command(config, 'deploy.py', env.name)} builds it again")
        elif serving and current and serving.id != current.id:
            problems.append(f"{env.current_link} points at {current.id} ({current.commit[:12]}), but {serving.id} "
                            f"({serving.commit[:12]}) serves: an operation was interrupted between the switch and "
                            "the restart")
        elif serving and serving.commit != logged:
            problems.append(f"the deploy log says {logged[:12]} runs, but {serving.id} ({serving.commit[:12]}) serves")
    part = {"commit": commit, "subject": repo.subject(commit), "branch": repo.current_branch(), "head": head}
    points = list_points(env, repo)
    trees = {}

    def bad(p):
        if p.commit not in trees:
            trees[p.commit] = bad_mark(config, env, repo.tree_of(p.commit)) if repo.resolve(p.commit) else None
        return trees[p.commit]

    # the advice only moves forward in safety: never to a release that was rolled back, nor to a
    # pre-rollback copy (it holds the state a rollback left)
    safe = [p for p in points if p.commit != commit and not bad(p)
            and not (p.backup and p.backup.reason == "pre-rollback")]
    if safe:
        part["rollback"] = cli.script_command(config, "rollback.py", env.name, "--to", safe[0].id)
    last = next(iter(logs.operations(records, 1)), None)
    if last and last.kind == "rollback" and last.ok and last.pre_rollback:
        saved = [p for p in points if p.backup and p.backup.path == last.pre_rollback]
        if saved:
            part["undo_rollback"] = cli.script_command(config, "rollback.py", env.name, "--to", saved[0].id,
                                                       "--with-db")
    dirty = repo.dirty_files()
    if dirty:
        problems.append(f"the work tree {env.path} differs from its commit: {', '.join(f.strip() for f in dirty[:5])}"
                        + (", ..." if len(dirty) > 5 else ""))
    current = releases.current(env)
    if current:
        part["release"] = current.id
        changed = releases.differences(env, repo, current)
        if changed:
            problems.append(f"the running release {current.path} differs from its commit: {', '.join(changed[:5])}"
                            + (", ..." if len(changed) > 5 else ""))
    tip = repo.resolve(f"refs/remotes/{env.remote}/{env.branch}") if env.remote else None
    if tip and bad_mark(config, env, repo.tree_of(tip)):
        problems.append(f"{env.remote}/{env.branch} is still at {tip[:12]}, a release that was rolled back: "
                        "deploy.py refuses it; push a fix")
    part["problems"] = problems
    return part


def log_part(config, env, records):
    deploys, rollbacks = logs.of_kind(records, "deploy"), logs.of_kind(records, "rollback")
    return {"last_deploy": deploys[-1].to_json() if deploys else None,
            "last_rollback": rollbacks[-1].to_json() if rollbacks else None}


def data_part(config, env, records):
    """The database there and readable (quick_check, read-only), the newest backup younger than a day."""
    problems = []
    if not env.db.exists():
        problems.append(f"the database {env.db} is missing")
    else:
        verdict = backups.integrity_of(env.db, quick=True)
        if verdict != "ok":
            problems.append(f"the database {env.db} fails quick_check: {verdict}")
        found = backups.list_backups(env.backup_dir)
        age = age_seconds(found[0].time) if found else None
        if not found:
            problems.append(f"no backup of {env.db} yet: run {cli.script_command(config, 'backup.py', env.name)}")
        elif age is None or age > MAX_BACKUP_AGE:
            problems.append(f"the newest backup is {human_age(age)}, older than a day: is the nightly backup running?")
    return {"problems": problems}


def running_part(config, env, records):
    """What the app says it runs (/_deploy/status, when it serves it) against what the log says."""
    return {"served_commit": health.served_commit(env.base_url, HEALTH_TIMEOUT)}


def rehearsal_part(config, env, records):
    found = logs.of_kind(records, "rehearsal")
    if not found:
        return {"last_rehearsal": None}
    r = found[-1]
    return {"last_rehearsal": {"time": r.time, "commit": r.commit, "result": r.result, "failed": r.failed,
                               "migration_seconds": r.migration_seconds, "compatible": r.compatible}}


def backup_part(config, env, records):
    found = backups.list_backups(env.backup_dir)
    if not found:
        return {"last_backup": None}
    newest = found[0]
    return {"last_backup": {"path": newest.path, "time": newest.time, "reason": newest.reason,
                            "age_seconds": age_seconds(newest.time)}}


def show(reports, as_json):
    if as_json:
        print(json.dumps({"envs": reports}, indent=2))
        return
    for name, r in reports.items():
        unit, h = r["unit"], r["health"]
        good = unit["active"] and h["ok"] and not r["problems"] and not r["interrupted"]
        cli.say(cli.paint(f"== {name} ", "bold") + (cli.paint("OK", "green") if good else cli.paint("PROBLEM", "red")))
        since = f" since {unit['since']}" if unit.get("since") else ""
        loop = " RESTART-LOOPING" if unit.get("looping") else ""
        cli.say(f"  unit      {unit.get('name', '?')}: {unit['state']} ({unit.get('sub', '?')}){since}{loop}")
        if r["commit"]:
            moved = f" (work tree at {r['head'][:12]}!)" if r.get("head") and r["head"] != r["commit"] else ""
            cli.say(f"  commit    {r['commit'][:12]} {r['subject']} [{r['branch']}]{moved}")
        health_text = f"HTTP {h['status']} in {h['ms']:.0f} ms" if h["status"] else h.get("error", "no answer")
        cli.say(f"  health    {h.get('url', '')}: {health_text}")
        d = r["last_deploy"]
        if d:
            cli.say(f"  deploy    {d.get('time')} {d.get('result')}: {str(d.get('from'))[:12]} -> "
                    f"{str(d.get('to'))[:12]} by {d.get('user')}"
                    + (f" (failed at {d.get('failed_step')})" if d.get("result") != "ok" else ""))
        else:
            cli.say("  deploy    none recorded")
        if d and d.get("watch"):
            cli.say(f"  watched   {d['watch']:g}s after it turned healthy")
        rh = r.get("last_rehearsal")
        if rh:
            cli.say(f"  rehearsed {rh.get('time')} {str(rh.get('commit'))[:12]}: {rh.get('result')}"
                    + (f" (failed at {rh.get('failed')})" if rh.get("result") != "ok" else ""))
        rb = r.get("last_rollback")
        if rb:
            cli.say(f"  rolled    back {rb.get('time')} to {rb.get('point')}: {rb.get('result')}")
        b = r["last_backup"]
        cli.say(f"  backup    {b['path']} ({b['reason']}, {human_age(b['age_seconds'])})" if b else "  backup    none")
        if r.get("warning"):
            cli.say(cli.paint(f"  warning   {r['warning']}", "yellow"))
        if r["lock"]:
            cli.say(f"  lock      {r['lock']}")
        if r["interrupted"]:
            cli.say(cli.paint(f"  INTERRUPTED {recovery.describe(r['interrupted'])}; the next deploy.py or "
                              f"rollback.py of {name} finishes or undoes it", "red"))
        for problem in r["problems"]:
            cli.say(cli.paint(f"  problem   {problem}", "red"))
        cli.say(f"  rollback  {r['rollback'] or NO_SAFE_POINT}")
        if r.get("undo_rollback"):
            cli.say(f"  undo      the last rollback (puts back the release it left, and its database): "
                    f"{r['undo_rollback']}")


if __name__ == "__main__":
    cli.run(main)

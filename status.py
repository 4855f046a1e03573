#!/usr/bin/env python3
"""status.py [ENV]: every env at a glance, what is wrong with it, and the commands that fix it.

For each env, the facts (the unit and its socket, HTTP health, what serves and from which release, an
operation running or interrupted, the database and its rows, the backups and off-site copies, the last
deploy, rollback and rehearsal), then safedeploy.diagnosis: the problems, and the advice, the commands
to run in order from the state as it is now to a healthy env with every row. The envs are looked at in
parallel, with short timeouts. Exit 0 when every env shown is OK, 1 otherwise (monitoring can call it),
2 on a config error. --alert sends one alert when an env turns not OK and one when it is OK again;
--install-timer runs that every 5 minutes from a user timer.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from safedeploy import (alertlock, alerts, backups, cli, clock, datafacts, diagnosis, health, journals, metrics, offsite,
                        oplog, planning, probe, recovery, releases, replica, units)
from safedeploy import records as logs
from safedeploy.errors import EXIT_FAILED, DeployError, usage_error
from safedeploy.files import make_private_dir, write_atomic
from safedeploy.gitrepo import Repo
from safedeploy.points import list_points
from safedeploy.marks import bad_mark
from safedeploy.state import age_seconds, human_age, lock_holder, now_iso

HEALTH_TIMEOUT = 2.0
TIMER_NAME = "safe-deploy-status"
NO_SAFE_POINT = ("none to paste: no point on another commit that is neither a rolled-back release nor a "
                 "pre-rollback copy (what runs may be the oldest good state; see rollback.py ENV --list)")


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    if args.install_timer:
        return install_timer(config, args.metrics)
    envs = [config.env(args.env)] if args.env else list(config.envs.values())
    with ThreadPoolExecutor(max_workers=max(1, len(envs))) as pool:
        reports = dict(zip((e.name for e in envs), pool.map(lambda e: look_at(config, e), envs)))
    if args.alert:
        with alertlock.one_at_a_time(config) as alone:        # one --alert at a time: no alert sent twice
            if alone:
                send_changes(config, envs, reports, args.quiet)
            else:
                cli.err(f"another status.py --alert for {config.file} is still sending after "
                        f"{alertlock.ALERT_WAIT:g}s; this run sends nothing (that one sends what changed)")
    if args.metrics:
        metrics.write(args.metrics, reports)
    if not args.quiet:
        show(reports, args.json)
    return 0 if all(r["ok"] for r in reports.values()) else EXIT_FAILED


def parse_arguments():
    p = cli.parser("status.py", "Show every env at a glance: what is wrong, and the commands that fix it.",
                   ["python3 status.py", "python3 status.py prod --json", "python3 status.py --alert --quiet",
                    "python3 status.py --install-timer",
                    "python3 status.py --metrics /var/lib/node_exporter/textfile/safe_deploy.prom"])
    p.add_argument("env", metavar="ENV", nargs="?", help="show only this env")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--alert", action="store_true",
                   help="send an alert for each env that turned not OK since the last --alert, and when it is OK again")
    p.add_argument("--quiet", action="store_true", help="with --alert or --metrics: print nothing (for the timer)")
    p.add_argument("--metrics", metavar="FILE",
                   help="also write each env's state to FILE in the node_exporter textfile format (atomically); "
                        "with --install-timer: the timer writes it every run")
    p.add_argument("--install-timer", action="store_true",
                   help="a user timer running --alert --quiet (and --metrics FILE when given) every 5 minutes")
    args = p.parse_args()
    if args.quiet and not (args.alert or args.metrics):
        raise usage_error("--quiet goes with --alert or --metrics")
    if args.install_timer and (args.env or args.json or args.alert or args.quiet):
        raise usage_error("--install-timer takes no ENV, --json, --alert or --quiet: it installs the timer for every env")
    if args.metrics:
        args.metrics = os.path.abspath(os.path.expanduser(args.metrics))
        if not os.path.isdir(os.path.dirname(args.metrics)):
            raise usage_error(f"--metrics {args.metrics}: its folder {os.path.dirname(args.metrics)} does not exist")
    return args


# -- the facts --------------------------------------------------------------------------------------
def look_at(config, env):
    """Everything status shows about one env; a part that cannot be read says why."""
    report = {"commit": None, "subject": "", "branch": None, "unit": {"active": False, "state": "unknown"},
              "health": {"ok": False, "status": None, "ms": None}, "last_deploy": None, "last_backup": None,
              "rollback": None, "lock": lock_holder(env.state_dir, env.name), "interrupted": None, "problems": [],
              "restart_method": None, "warning": None, "replica": None,
              "log": oplog.last_failed(env.state_dir, env.name), "last_operation": None}
    last_op = oplog.last_operation(env.state_dir, env.name)
    report["last_operation"] = last_op.to_json() if last_op else None
    facts = diagnosis.Facts(env=env.name, db=str(env.db), unit=env.unit, lock=report["lock"],
                            health_timeout=env.health_timeout)
    if not report["lock"]:
        j = recovery.interrupted_any(env)
        if j:
            report["interrupted"] = facts.interrupted = {k: j.get(k) for k in
                                                         ("op", "pid", "command", "started", "step", "from", "commit")}
    unreadable = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        probe = pool.submit(health.check, env.health_url, HEALTH_TIMEOUT)
        try:
            records = logs.read(env)
        except DeployError as exc:
            records = []
            unreadable.append(str(exc))
        local = backups.list_backups(env.backup_dir)         # read once: data, copies and log parts use it
        for part in (unit_part, code_part, replica_part, data_part, log_part):
            try:
                report.update(part(config, env, records, local, facts))
            except DeployError as exc:
                unreadable.append(str(exc))
        result = probe.result()
    facts.healthy, facts.health = result.ok, result.describe()
    report["health"] = {"ok": result.ok, "status": result.status, "ms": result.ms, "url": env.health_url}
    if result.error:
        report["health"]["error"] = result.error
    found = diagnosis.diagnose(facts, lambda script, *a: cli.script_command(config, script, *a))
    report["problems"] = found.problems + unreadable
    report["advice"] = found.advice
    add_record_problems(config, env, report, facts)
    report["ok"] = not report["problems"]
    return report


def add_record_problems(config, env, report, facts):
    """Damaged records and bad marks that only a tag holds (journals.record_problems): said, and repaired by
    the recovery the next deploy runs first (given the commit that runs, it has nothing more to do)."""
    damaged = journals.record_problems(env)
    report["problems"] += damaged
    if damaged and facts.running:
        report["advice"].append({"why": "set the damaged records aside (kept beside them) and write back the marks "
                                        "the rolled-back tags hold: the next deploy does that first",
                                 "command": cli.script_command(config, "deploy.py", env.name, "--ref", facts.running,
                                                               "--yes")})


def unit_part(config, env, records, local, facts):
    st = units.serving_state(env.unit)         # with a handover slot, the one that serves
    method = units.restart_method(env.unit)
    sock = units.state(units.socket_name(env.unit))
    facts.socket = sock.name if sock.known else ""
    facts.socket_active = sock.is_active
    facts.held = [str(path) for path in units.port_holder_files(env.unit) if path.exists()]
    facts.unit_state, facts.serving_unit, facts.uptime = st.active, st.name, st.uptime
    facts.unit_failed = st.active == "failed" or (st.is_active and units.is_restart_looping(st)) or st.sub == "auto-restart"
    if method == "handover" and all(units.state(u).is_active for u in units.slots(env.unit)) \
            and not lock_holder(env.state_dir, env.name):
        facts.mismatch = (f"both {env.unit} and {units.helper_name(env.unit)} run outside a deploy (one was killed "
                          "mid-swap); the next deploy.py or rollback.py stops the older")
    return {"restart_method": method,
            "warning": None if method != "plain" else units.DROPS_WARNING.format(
                command=cli.script_command(config, "deploy.py", env.name, "--install-units")),
            "unit": {"active": st.is_active, "state": st.active, "sub": st.sub, "name": st.name,
                     "since": units.uptime_text(st) or None, "restarts": st.restarts,
                     "looping": units.is_restart_looping(st) if st.is_active else False}}


def code_part(config, env, records, local, facts):
    """What runs: on releases, read from the serving process (the release folder it runs in), never from
    `current` or the log, which a killed deploy may have moved ahead of it; in place, the log's commit."""
    repo = Repo(env.path)
    head = repo.head()
    logged = logs.running_commit(records) or head
    commit, current = logged, releases.current(env)
    if env.converted:
        st = units.serving_state(env.unit)
        serving = releases.serving(env, st.main_pid) if st.is_active else None
        commit = serving.commit if serving else (current.commit if current else logged)
        facts.dangling = releases.dangling_current(env)
        if serving and current and serving.id != current.id:
            facts.mismatch = (f"{env.current_link} points at {current.id} ({current.commit[:12]}), but {serving.id} "
                              f"({serving.commit[:12]}) serves: an operation was interrupted between the switch and "
                              "the restart")
        elif st.is_active and not serving:
            facts.mismatch = f"{st.name} runs, but not from a release of {env.name} that can be read"
        if current:
            facts.edited = releases.differences(env, repo, current)
    else:
        dirty = repo.dirty_files()
        facts.edited = [f.strip() for f in dirty]
        served = health.served_commit(env.base_url, HEALTH_TIMEOUT)
        if served and served != commit:
            facts.mismatch = (f"the app answers for {served[:12]} (/_deploy/status), the deploy log says "
                              f"{commit[:12]}: what runs is {served[:12]}")
            commit = served
    facts.running = commit
    part = {"commit": commit, "subject": repo.subject(commit), "branch": repo.current_branch(), "head": head,
            "release": current.id if current else None}
    if repo.resolve(commit):
        facts.bad_running = bad_mark(config, env, repo.tree_of(commit))
    points = list_points(env, repo)
    safe = planning.safe_points(config, env, repo, points, commit)     # the rollback line only moves forward in safety
    if safe:
        part["rollback"] = cli.script_command(config, "rollback.py", env.name, "--to", safe[0].id)
        # the advice is pasted as it is (a terminal or not): it takes --yes; the rollback line asks first
        facts.rollback = cli.script_command(config, "rollback.py", env.name, "--to", safe[0].id, "--yes")
    last = next(iter(logs.operations(records, 1)), None)
    if last and last.kind == "rollback" and last.ok and last.pre_rollback:
        saved = [p for p in points if p.backup and p.backup.path == last.pre_rollback]
        if saved:
            part["undo_rollback"] = cli.script_command(config, "rollback.py", env.name, "--to", saved[0].id, "--with-db")
            if planning.point_mark(config, env, repo, saved[0]):
                part["undo_warning"] = (f"it brings back {saved[0].commit[:12]}, the release that rollback took out "
                                        "(marked bad: deploys refuse it)")
            part["undo_warning"] = "; ".join(filter(None, [part.get("undo_warning"), (
                "the rows written since the rollback leave the live database (kept aside, as a pre-rollback "
                "copy)")]))
    tip = repo.resolve(f"refs/remotes/{env.remote}/{env.branch}") if env.remote else None
    if tip and tip != commit and bad_mark(config, env, repo.tree_of(tip)):
        facts.tip_bad = (f"{env.remote}/{env.branch} is still at {tip[:12]} (as last fetched), a release that was "
                         "rolled back: deploy.py refuses it; push a fix")
    return part


def data_part(config, env, records, local, facts):
    """The database (there, quick_check), the row ledger over every copy (safedeploy.datafacts), the backups."""
    copies, problem = offsite.copies_for(config, env)
    data = datafacts.gather(config, env, local, records, facts.running, copies)
    for name in ("db_exists", "db_check", "live_rows", "outstanding", "best", "salvage", "deleted_by",
                 "failed_restores"):
        setattr(facts, name, getattr(data, name))
    facts.ledger_incomplete = data.incomplete
    database = {"path": str(env.db), "exists": data.db_exists, "check": data.db_check if data.db_exists else "missing"}
    facts.point_in_time = [b.time for b in local if b.reason == "point-in-time"]
    facts.local_backups = len(local)
    present, future = clock.split(local)        # a copy dated in the future is not the newest (clock.py)
    facts.newest_backup_age = age_seconds(present[0].time) if present else None
    part = {"clock": clock.future_note(future) if future else None, "database": database,
            "rows": {"live": data.live_rows, "outside": [{"copy": o.id, "where": o.where, "missing": o.missing,
                                                          "lower_bound": o.by_count, "restorable": o.restorable}
                                                         for o in data.outstanding]}}
    if problem:
        part["offsite_problem"] = problem
    if part["clock"] and (facts.newest_backup_age is None or facts.newest_backup_age > diagnosis.MAX_BACKUP_AGE):
        facts.failed_checks.append(part["clock"])       # said as a problem; the backup rule gives the command
    if not local:
        return {**part, "last_backup": None}
    newest = (present or local)[0]
    return {**part, "last_backup": {"path": newest.path, "time": newest.time, "reason": newest.reason,
                                    "age_seconds": age_seconds(newest.time), "rows": newest.rows_total}}


def log_part(config, env, records, local, facts):
    deploys, rollbacks = logs.of_kind(records, "deploy"), logs.of_kind(records, "rollback")
    rehearsals, drills = logs.of_kind(records, "rehearsal"), logs.of_kind(records, "drill")
    r = rehearsals[-1] if rehearsals else None
    drill = drills[-1] if drills else None
    return {"last_deploy": deploys[-1].to_json() if deploys else None,
            "last_drill": {"time": drill.time, "result": drill.result, "point": drill.point} if drill else None,
            "last_rollback": rollbacks[-1].to_json() if rollbacks else None,
            "last_rehearsal": {"time": r.time, "commit": r.commit, "result": r.result, "failed": r.failed,
                               "migration_seconds": r.migration_seconds, "compatible": r.compatible} if r else None}


def replica_part(config, env, records, local, facts):
    """The continuous copies ([replica]): the replicator, the replica's newest moment and how far behind it is."""
    state = replica.look(config, env, lambda script, *a: cli.script_command(config, script, *a))
    if state is not None:
        facts.replica_problem, facts.replica_fix = state.problem, state.fix
        facts.replicated, facts.replica_newest = True, state.newest
    return {"replica": state.to_json() if state else None}


# -- monitoring ---------------------------------------------------------------------------------------
def send_changes(config, envs, reports, quiet):
    """One alert per change: "problem" when an env turns not OK (its command: the first advice), "recovered"
    when it is OK again. The state is kept per env (state/ENV.status.json), so a run that finds what the
    last one found sends nothing."""
    for env in envs:
        r, path = reports[env.name], env.state_dir / f"{env.name}.status.json"
        try:
            last = json.loads(path.read_text())
            was, was_corrupt = last.get("ok"), last.get("corrupt", False)
        except (OSError, ValueError, AttributeError):
            was, was_corrupt = None, False  # never looked: a problem now is news, an OK is not
        corrupt = r.get("database", {}).get("check", "ok") != "ok"
        if corrupt and not was_corrupt:     # at once, whatever else was already said: the data is at stake
            was = None if was is False else was
        if (r["ok"] == was and corrupt == was_corrupt) or (r["ok"] and was is None):
            if was is None:
                remember(path, r)
            continue
        first = r["advice"][0]["command"] if r["advice"] else None
        name = "database-corrupt" if corrupt and not was_corrupt else "problem"
        op = r.get("last_operation") or {}
        failed_log = op.get("log") if op.get("result") in ("failed", "interrupted") else None
        event = (alerts.event("recovered", env.name, f"{env.name} is OK again", None) if r["ok"] else
                 alerts.event(name, env.name, "; ".join(r["problems"]), first, log=failed_log))
        problems = alerts.send(config.alerts, event)
        for problem in problems:
            cli.err(f"warning: {problem}")
        if not problems:
            remember(path, r)               # not delivered: the next run tries again
    for env in envs:                        # and replica-behind, once, when an env's replica turns not OK
        for problem in replica.alert_change(config, env, reports[env.name].get("replica"),
                                            lambda body: alerts.send(config.alerts, body), alerts.event):
            cli.err(f"warning: {problem}")


def remember(path, report):
    make_private_dir(path.parent)
    write_atomic(path, json.dumps({"ok": report["ok"], "time": now_iso(), "problems": report["problems"],
                                   "corrupt": report.get("database", {}).get("check", "ok") != "ok"}) + "\n")


def timer_arguments(has_alerts, metrics_file):
    """What the timer's status.py runs with: --alert when [alerts] is set, --metrics FILE when given."""
    return [*(["--alert"] if has_alerts else []), *(["--metrics", metrics_file] if metrics_file else []), "--quiet"]


def install_timer(config, metrics_file=None):
    if config.alerts is None and not metrics_file:
        raise usage_error(f"{config.file}: no [alerts] table: status.py --alert has nowhere to send (add a webhook or "
                          "a command first, or give --metrics FILE for a timer that only writes metrics)")
    command = cli.script_command(config, "status.py", *timer_arguments(config.alerts is not None, metrics_file)
                                 ).split(" ", 1)[1]
    what = "; ".join(filter(None, ["alert when an env turns not OK, or OK again" if config.alerts else "",
                                   f"write metrics to {metrics_file}" if metrics_file else ""]))
    service = (f"[Unit]\nDescription=safe-deploy: {what}\n\n"
               f"[Service]\nType=oneshot\nExecStart={sys.executable} {command}\nSuccessExitStatus=1\n")
    timer = ("[Unit]\nDescription=safe-deploy status every 5 minutes\n\n"
             "[Timer]\nOnBootSec=1min\nOnUnitActiveSec=5min\n\n[Install]\nWantedBy=timers.target\n")
    folder = units.install_unit_files({f"{TIMER_NAME}.service": service, f"{TIMER_NAME}.timer": timer})
    units.systemctl("enable", "--now", f"{TIMER_NAME}.timer")
    cli.say(f"installed {folder}/{TIMER_NAME}.timer (every 5 minutes) running: {sys.executable} {command}")
    cli.say(f"see it with: systemctl --user list-timers {TIMER_NAME}.timer; "
            f"remove it with: systemctl --user disable --now {TIMER_NAME}.timer")
    return 0


# -- the text -------------------------------------------------------------------------------------
def show(reports, as_json):
    if as_json:
        cli.say(json.dumps({"envs": reports}, indent=2))
        return
    for name, r in reports.items():
        unit, h = r["unit"], r["health"]
        cli.say(cli.paint(f"== {name} ", "bold") + (cli.paint("OK", "green") if r["ok"] else cli.paint("PROBLEM", "red")))
        since = f" since {unit['since']}" if unit.get("since") else ""
        loop = " RESTART-LOOPING" if unit.get("looping") else ""
        cli.say(f"  unit      {unit.get('name', '?')}: {unit['state']} ({unit.get('sub', '?')}){since}{loop}")
        if r["commit"]:
            moved = f" (work tree at {r['head'][:12]}!)" if r.get("head") and r["head"] != r["commit"] else ""
            cli.say(f"  commit    {r['commit'][:12]} {r['subject']} [{r['branch']}]{moved}")
        health_text = f"HTTP {h['status']} in {h['ms']:.0f} ms" if h["status"] else h.get("error", "no answer")
        cli.say(f"  health    {h.get('url', '')}: {health_text}")
        d = r["last_deploy"]
        cli.say(f"  deploy    {d['time']} {d['result']}: {str(d['from'])[:12]} -> {str(d['to'])[:12]} by {d['user']}"
                + (f", failed at {d['failed_step']}" if d["result"] != "ok" else "")
                + (f", watched {d['watch']:g}s" if d.get("watch") else "") if d else "  deploy    none recorded")
        if d and d.get("probe"):
            cli.say(f"  probe     {probe.describe(d['probe'])}")
        rh = r.get("last_rehearsal")
        if rh:
            cli.say(f"  rehearsed {rh['time']} {str(rh['commit'])[:12]}: {rh['result']}"
                    + (f", failed at {rh['failed']}" if rh["result"] != "ok" else ""))
        rb = r.get("last_rollback")
        if rb:
            cli.say(f"  rolled    back {rb['time']} to {rb['point']}: {rb['result']}")
        b = r["last_backup"]
        cli.say(f"  backup    {b['path']} ({b['reason']}, {human_age(b['age_seconds'])})" if b else "  backup    none here")
        rp = r.get("replica")
        if rp:
            lag = f", {rp['lag_s']:g}s behind" if rp["lag_s"] else ""
            cli.say(f"  replica   newest {rp['newest'] or 'none yet'}{lag} (oldest {rp['oldest'] or '-'}; {rp['unit']})")
        if r.get("offsite_problem"):
            cli.say(cli.paint(f"  off-site  not listed: {r['offsite_problem']}", "yellow"))
        if r.get("clock") and r["clock"] not in r["problems"]:
            cli.say(cli.paint(f"  clock     {r['clock']}", "yellow"))
        if r.get("warning"):
            cli.say(cli.paint(f"  warning   {r['warning']}", "yellow"))
        if r["lock"]:
            cli.say(f"  lock      {r['lock']}")
        if r["interrupted"]:
            cli.say(cli.paint(f"  INTERRUPTED {recovery.describe(r['interrupted'])}", "red"))
        op = r.get("last_operation")
        if op and op["result"] in ("failed", "interrupted"):
            cli.say(cli.paint(f"  output    the last operation ({op['op']}{', ' + op['time'] if op['time'] else ''}) "
                              f"{op['result']}; its full output: {op['log']}", "yellow"))
        for problem in r["problems"]:
            cli.say(cli.paint(f"  problem   {problem}", "red"))
        for i, step in enumerate(r["advice"], 1):
            cli.say(f"  do {i}.     {step['why']}:")
            cli.say(f"            {step['command']}")
        cli.say(f"  rollback  {r['rollback'] or NO_SAFE_POINT}")
        if r.get("undo_rollback"):
            cli.say("  undo      the last rollback (puts back the release it left, and its database"
                    + (f"; {r['undo_warning']}" if r.get("undo_warning") else "") + f"): {r['undo_rollback']}")


if __name__ == "__main__":
    cli.run(main)

#!/usr/bin/env python3
"""status.py [ENV]: every env at a glance, what is wrong with it, and the commands that fix it.

For each env, safedeploy.report gathers the facts (the unit and its socket, HTTP health, what serves and
from which release, an operation running or interrupted, the database and its rows, the backups and
off-site copies, the last deploy, rollback and rehearsal), then safedeploy.diagnosis: the problems, and the
advice, the commands to run in order from the state as it is now to a healthy env with every row; this
script prints them. The envs are looked at in parallel, with short timeouts. Exit 0 when every env shown
is OK, 1 otherwise (monitoring can call it), 2 on a config error. --alert sends one alert when an env turns not OK and one when it is OK again;
--install-timer runs that every 5 minutes from a user timer (safedeploy.status_alerts decides what is sent).
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from safedeploy import alertlock, cli, journals, metrics, probe, report, status_alerts, units
from safedeploy.errors import EXIT_FAILED, usage_error
from safedeploy.state import human_age

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
        reports = dict(zip((e.name for e in envs), pool.map(lambda e: report.look_at(config, e).to_json(), envs)))
    if args.alert:
        with alertlock.one_at_a_time(config) as alone:        # one --alert at a time: no alert sent twice
            if alone:
                for problem in status_alerts.send_changes(config, envs, reports):
                    cli.err(f"warning: {problem}")
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


# -- monitoring ---------------------------------------------------------------------------------------
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
        cli.say(cli.paint(f"== {name} ", "bold") + (cli.paint("OK", "green") if r["ok"] else cli.paint("PROBLEM", "red")))
        for line in [*what_runs(r), *history(r), *copies(r), *attention(r)]:
            cli.say(line)
        for i, step in enumerate(r["advice"], 1):
            cli.say(f"  do {i}.     {step['why']}:")
            cli.say(f"            {step['command']}")
        cli.say(f"  rollback  {r['rollback'] or NO_SAFE_POINT}")
        if r.get("undo_rollback"):
            cli.say("  undo      the last rollback (puts back the release it left, and its database"
                    + (f"; {r['undo_warning']}" if r.get("undo_warning") else "") + f"): {r['undo_rollback']}")


def what_runs(r):
    unit, h = r["unit"], r["health"]
    since = f" since {unit['since']}" if unit.get("since") else ""
    loop = " RESTART-LOOPING" if unit.get("looping") else ""
    yield f"  unit      {unit.get('name', '?')}: {unit['state']} ({unit.get('sub', '?')}){since}{loop}"
    if r["commit"]:
        moved = f" (work tree at {r['head'][:12]}!)" if r.get("head") and r["head"] != r["commit"] else ""
        yield f"  commit    {r['commit'][:12]} {r['subject']} [{r['branch']}]{moved}"
    health_text = f"HTTP {h['status']} in {h['ms']:.0f} ms" if h["status"] else h.get("error", "no answer")
    yield f"  health    {h.get('url', '')}: {health_text}"


def history(r):
    d = r["last_deploy"]
    yield (f"  deploy    {d['time']} {d['result']}: {str(d['from'])[:12]} -> {str(d['to'])[:12]} by {d['user']}"
           + (f", failed at {d['failed_step']}" if d["result"] != "ok" else "")
           + (f", watched {d['watch']:g}s" if d.get("watch") else "") if d else "  deploy    none recorded")
    if d and d.get("probe"):
        yield f"  probe     {probe.describe(d['probe'])}"
    rh = r.get("last_rehearsal")
    if rh:
        yield (f"  rehearsed {rh['time']} {str(rh['commit'])[:12]}: {rh['result']}"
               + (f", failed at {rh['failed']}" if rh["result"] != "ok" else ""))
    rb = r.get("last_rollback")
    if rb:
        yield f"  rolled    back {rb['time']} to {rb['point']}: {rb['result']}"


def copies(r):
    b = r["last_backup"]
    yield f"  backup    {b['path']} ({b['reason']}, {human_age(b['age_seconds'])})" if b else "  backup    none here"
    rp = r.get("replica")
    if rp:
        lag = f", {rp['lag_s']:g}s behind" if rp["lag_s"] else ""
        yield f"  replica   newest {rp['newest'] or 'none yet'}{lag} (oldest {rp['oldest'] or '-'}; {rp['unit']})"
    if r.get("offsite_problem"):
        yield cli.paint(f"  off-site  not listed: {r['offsite_problem']}", "yellow")
    if r.get("clock") and r["clock"] not in r["problems"]:
        yield cli.paint(f"  clock     {r['clock']}", "yellow")


def attention(r):
    if r.get("warning"):
        yield cli.paint(f"  warning   {r['warning']}", "yellow")
    if r["lock"]:
        yield f"  lock      {r['lock']}"
    if r["interrupted"]:
        yield cli.paint(f"  INTERRUPTED {journals.Interrupted.from_json(r['interrupted']).describe()}", "red")
    op = r.get("last_operation")
    if op and op["result"] in ("failed", "interrupted"):
        yield cli.paint(f"  output    the last operation ({op['op']}{', ' + op['time'] if op['time'] else ''}) "
                        f"{op['result']}; its full output: {op['log']}", "yellow")
    for problem in r["problems"]:
        yield cli.paint(f"  problem   {problem}", "red")


if __name__ == "__main__":
    cli.run(main)

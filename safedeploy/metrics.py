"""status.py --metrics FILE: each env's state in the node_exporter textfile format, through Prometheus' own
client library (a CollectorRegistry, then write_to_textfile: a temp file beside FILE renamed over it, so
node_exporter never reads half a file).

From status's per-env report (the same facts as status --json), one sample per env (label `env`) of:

  safe_deploy_up                            1 when the unit (or its handover slot) is active
  safe_deploy_healthy                       1 when the health URL answered 2xx/3xx
  safe_deploy_ok                            1 when status finds no problem
  safe_deploy_problems                      the number of problems status lists
  safe_deploy_commit_info                   1, with labels commit (full sha) and branch
  safe_deploy_last_deploy_timestamp_seconds when the last deploy ended (Unix time)
  safe_deploy_last_deploy_success           1 when it went live, 0 when it failed or rolled back
  safe_deploy_last_backup_age_seconds       the newest local backup's age
  safe_deploy_last_backup_rows              the users' rows it holds
  safe_deploy_replica_lag_seconds           how far the continuous copy is behind (with [replica] only)
  safe_deploy_last_drill_timestamp_seconds  when the last rollback drill ran
  safe_deploy_last_drill_success            1 when it passed
  safe_deploy_last_operation_failed         1 when the env's last operation failed (status's "log" names its output)

A fact that is not known (no deploy yet, no backup) has no sample for that env: absent, never a made-up 0.
"""

from __future__ import annotations

from .state import parse_time


def timestamp(text) -> float | None:
    value = parse_time(text) if text else None
    return value.timestamp() if value else None


def samples(reports: dict) -> dict[str, list[tuple[dict, float]]]:
    """{metric name: [(labels, value)]} from status's reports {env: report} (pure: the tests check it)."""
    out: dict[str, list[tuple[dict, float]]] = {}

    def add(name, env, value, **labels):
        if value is not None:
            out.setdefault(name, []).append(({"env": env, **labels}, float(value)))

    for env, r in reports.items():
        add("up", env, bool(r["unit"].get("active")))
        add("healthy", env, bool(r["health"].get("ok")))
        add("ok", env, bool(r.get("ok")))
        add("problems", env, len(r.get("problems") or []))
        if r.get("commit"):
            add("commit", env, 1, commit=r["commit"], branch=r.get("branch") or "")
        d = r.get("last_deploy")
        if d:
            add("last_deploy_timestamp_seconds", env, timestamp(d.get("time")))
            add("last_deploy_success", env, d.get("result") == "ok")
        b = r.get("last_backup")
        if b:
            add("last_backup_age_seconds", env, b.get("age_seconds"))
            add("last_backup_rows", env, b.get("rows"))
        rp = r.get("replica")
        if rp:
            add("replica_lag_seconds", env, rp.get("lag_s"))
        dr = r.get("last_drill")
        if dr:
            add("last_drill_timestamp_seconds", env, timestamp(dr.get("time")))
            add("last_drill_success", env, dr.get("result") == "ok")
        op = r.get("last_operation")
        add("last_operation_failed", env, bool(op and op.get("result") in ("failed", "interrupted")))
    return out


HELP = {
    "up": "1 when the env's unit (or its handover slot) is active",
    "healthy": "1 when the env's health URL answered 2xx/3xx",
    "ok": "1 when status.py finds no problem in the env",
    "problems": "the number of problems status.py lists for the env",
    "commit": "the commit the env runs (labels commit, branch); always 1",
    "last_deploy_timestamp_seconds": "when the env's last deploy ended, Unix time",
    "last_deploy_success": "1 when the env's last deploy went live, 0 when it failed or was rolled back",
    "last_backup_age_seconds": "the age of the env's newest local backup",
    "last_backup_rows": "the users' rows the env's newest local backup holds",
    "replica_lag_seconds": "how far the env's continuous copy ([replica]) is behind",
    "last_drill_timestamp_seconds": "when the env's last rollback drill ran, Unix time",
    "last_drill_success": "1 when the env's last rollback drill passed",
    "last_operation_failed": "1 when the env's last operation failed (status.py --json \"log\" names its output)",
}


def registry(reports: dict):
    from prometheus_client import CollectorRegistry, Gauge, Info     # here: only --metrics needs it

    reg = CollectorRegistry()
    for name, values in samples(reports).items():
        if name == "commit":
            info = Info("safe_deploy_commit", HELP[name], ["env"], registry=reg)
            for labels, _ in values:
                info.labels(env=labels["env"]).info({"commit": labels["commit"], "branch": labels["branch"]})
            continue
        gauge = Gauge(f"safe_deploy_{name}", HELP[name], ["env"], registry=reg)
        for labels, value in values:
            gauge.labels(**labels).set(value)
    return reg


def write(path, reports: dict) -> None:
    """FILE, atomically (prometheus_client.write_to_textfile: a temp file beside it, renamed over it)."""
    from prometheus_client import write_to_textfile

    from .errors import DeployError
    try:
        write_to_textfile(str(path), registry(reports))
    except OSError as exc:
        raise DeployError(f"cannot write the metrics file {path}: {exc.strerror or exc}") from None

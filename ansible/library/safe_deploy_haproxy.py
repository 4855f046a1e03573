#!/usr/bin/python
"""An Ansible module: one server of an haproxy backend taken out of service or put back, through
haproxy's runtime API on its admin socket (`stats socket ... level admin`), with the wait that
makes it safe. It runs on the balancer (the playbooks delegate_to `haproxy_host`) and needs only
Python's standard library there: no socat, no collection.

- state=maint: `set server B/S state drain` (no new connections, those open finish), then wait until
  the server has no current session (`scur` 0 in `show stat`) for at most `wait` seconds, then
  `set server B/S state maint`. When it does not empty in time, the state it had is set again and
  the module fails: the server keeps serving.
- state=drain: the same without the final maint.
- state=ready: `set server B/S state ready`, then wait (at most `wait` seconds) until haproxy reports
  it UP (or "no check" when the server has no health check); fails, naming the status and the last
  check, when it does not come up.
- state=show: only reads.

Returns `status` and `scur` (after), `before` (the status found), and `changed`. Each command is one
connection to the socket (haproxy's non-interactive mode), bounded by `timeout` seconds; a socket that
refuses or is missing (haproxy reloading) is tried again within that bound, never a command sent twice.
"""

from __future__ import annotations      # the balancer's python may be older than the tool's

import csv
import errno
import io
import socket
import time
from typing import Callable

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: safe_deploy_haproxy
short_description: drain, disable or enable one haproxy server through the runtime API, and wait
options:
  socket: {description: haproxy's admin socket (stats socket ... level admin), required: true, type: path}
  backend: {description: the backend's name, required: true, type: str}
  server: {description: the server's name in the backend, required: true, type: str}
  state: {description: "maint (drain, wait until empty, maint), drain, ready (and wait until UP), or show",
          choices: [maint, drain, ready, show], default: show, type: str}
  wait: {description: seconds to wait for the server to empty (maint, drain) or to come UP (ready), default: 60,
         type: float}
  timeout: {description: seconds for each command on the socket, default: 5, type: float}
"""

POLL = 0.2
CONNECT_RETRY = 0.05
NOT_LISTENING = (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
RESTORE = {"DRAIN": "drain", "MAINT": "maint"}     # a status haproxy reports -> the state that sets it again


class HaproxyError(Exception):
    pass


def command(path: str, line: str, timeout: float) -> str:
    """Send one command to the runtime API; return haproxy's answer (the socket closes after it). A socket that
    refuses the connection or is not there (haproxy starting, or reloading: its new process binds the socket a
    moment before it listens) is tried again until `timeout`; the command itself is sent once."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(path)
            except OSError as exc:
                if exc.errno in NOT_LISTENING and time.monotonic() < deadline:
                    time.sleep(CONNECT_RETRY)
                    continue
                raise HaproxyError(f"haproxy's admin socket {path}: {exc}") from None
            try:
                s.sendall(line.encode() + b"\n")
                chunks = []
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            except OSError as exc:
                raise HaproxyError(f"haproxy's admin socket {path}: {exc}") from None
        return b"".join(chunks).decode("utf-8", "replace")


def server_row(stat_csv: str, backend: str, server: str) -> dict | None:
    """The `show stat` row of backend/server as a dict, or None."""
    text = stat_csv.lstrip()
    if not text.startswith("# "):
        raise HaproxyError(f"unexpected answer to show stat: {text[:200]!r}")
    for row in csv.DictReader(io.StringIO(text[2:])):
        if row.get("pxname") == backend and row.get("svname") == server:
            return row
    return None


def is_up(status: str) -> bool:
    return status.startswith("UP") or status == "no check"


class Server:
    def __init__(self, path: str, backend: str, server: str, timeout: float) -> None:
        self.path, self.backend, self.server, self.timeout = path, backend, server, timeout

    def row(self) -> dict:
        found = server_row(command(self.path, "show stat", self.timeout), self.backend, self.server)
        if found is None:
            raise HaproxyError(f"haproxy has no server {self.server!r} in backend {self.backend!r} "
                               f"(set haproxy_backend, and haproxy_server when its name is not the host's)")
        return found

    def set(self, state: str) -> None:
        answer = command(self.path, f"set server {self.backend}/{self.server} state {state}", self.timeout).strip()
        if answer:
            raise HaproxyError(f"set server {self.backend}/{self.server} state {state}: {answer}")

    def wait_for(self, done: Callable[[dict], bool], seconds: float) -> tuple[dict | None, dict]:
        """The row once done(row) holds, or (None, the last row) after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            row = self.row()
            if done(row):
                return row, row
            if time.monotonic() >= deadline:
                return None, row
            time.sleep(POLL)


def take_out(srv: Server, final: str, wait: float) -> dict:
    """drain, wait until no session, then `final` (maint or drain); on timeout, the state found again."""
    before = srv.row()
    srv.set("drain")
    row, last = srv.wait_for(lambda r: int(r.get("scur") or 0) == 0, wait)
    if row is None:
        srv.set(RESTORE.get(before["status"].split(" ")[0], "ready"))
        raise HaproxyError(f"{srv.backend}/{srv.server} still had {last.get('scur')} connection(s) after {wait:g}s "
                           f"of draining; put back as it was ({before['status']})")
    if final != "drain":
        srv.set(final)
    return before


def put_in(srv: Server, wait: float) -> dict:
    before = srv.row()
    srv.set("ready")
    row, last = srv.wait_for(lambda r: is_up(r.get("status", "")), wait)
    if row is None:
        raise HaproxyError(f"{srv.backend}/{srv.server} is enabled but not UP after {wait:g}s: status "
                           f"{last.get('status')}, last check {last.get('check_status') or '-'} "
                           f"{last.get('check_desc') or ''}".rstrip())
    return before


def run(params: dict) -> dict:
    srv = Server(params["socket"], params["backend"], params["server"], params["timeout"])
    state = params["state"]
    if state in ("maint", "drain"):
        before = take_out(srv, state, params["wait"])
    elif state == "ready":
        before = put_in(srv, params["wait"])
    else:
        before = srv.row()
    after = srv.row()
    return {"changed": after["status"] != before["status"], "before": before["status"], "status": after["status"],
            "scur": int(after.get("scur") or 0)}


def main() -> None:
    module = AnsibleModule(argument_spec={
        "socket": {"type": "path", "required": True}, "backend": {"type": "str", "required": True},
        "server": {"type": "str", "required": True},
        "state": {"type": "str", "default": "show", "choices": ["maint", "drain", "ready", "show"]},
        "wait": {"type": "float", "default": 60.0}, "timeout": {"type": "float", "default": 5.0}},
        supports_check_mode=False)
    try:
        result = run(module.params)
    except HaproxyError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()

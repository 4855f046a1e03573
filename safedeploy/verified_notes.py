"""Verifications shared through git, so that the promotion gate holds across hosts.

A tree verified in an env (a passing verify.py, a healthy deploy) is recorded on its host in
state/ENV.verified.jsonl (state.verified_log). When the env has a remote, the same verification is
also a line of a git note on the verified commit, in the notes ref refs/notes/safe-deploy-verified,
pushed to the remote: one JSON object a line, {"env", "host", "commit", "tree", "time", "by"}. A
prod host that never saw dev fetches that ref and its promotion gate accepts a line that names its
promote_from env and the target's tree (`git notes --ref=safe-deploy-verified show COMMIT` shows them).

- Hosts never lose each other's lines: the remote's notes are fetched into
  refs/notes/safe-deploy-verified-remote and merged with git's cat_sort_uniq strategy (the lines of
  both, sorted, each once), and a push the remote refuses because another host pushed first is
  fetched, merged and tried again (PUSH_ATTEMPTS times).
- A note is added locally before the push: one whose push failed is pushed with the next one.
- Reading: a line that is not a JSON object with those fields as strings is skipped.
- The host a line names: $SAFE_DEPLOY_HOST (the playbooks set it to the inventory's name), else
  this machine's name.

Every git call goes through gitrepo (argv lists, timeouts, no prompt, under the repository's shared
lock). Failures raise DeployError; callers turn them into warnings (sharing) or into the gate's
hint (reading): the local record stands either way, and a tree found nowhere is refused as before.
"""

import json
import os
import re
import socket
from dataclasses import dataclass

from .errors import DeployError
from .gitrepo import NETWORK_TIMEOUT, Repo, printable
from .state import now_iso, parse_time

NOTES_REF = "refs/notes/safe-deploy-verified"
FETCHED_REF = "refs/notes/safe-deploy-verified-remote"
HOST_VARIABLE = "SAFE_DEPLOY_HOST"
PUSH_ATTEMPTS = 4
FIELDS = ("env", "host", "commit", "tree", "time", "by")
OBJECT_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")      # a full sha-1 or sha-256 object name
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Verification:
    """A note that a commit was verified in an env: by verify.py or a healthy deploy."""
    env: str
    host: str
    commit: str
    tree: str
    time: str
    by: str             # "verify" (a passing verify.py) or "deploy" (a healthy deploy)

    def line(self) -> str:
        return json.dumps({k: getattr(self, k) for k in FIELDS}, sort_keys=True)

    def describe(self) -> str:
        return f"{self.commit[:12]} verified in {self.env} on {self.host} at {self.time} (by {self.by})"


def host_name() -> str:
    return os.environ.get(HOST_VARIABLE, "").strip() or socket.gethostname()


def verification(env_name: str, commit: str, tree: str, by: str) -> Verification:
    """A verification made here, now."""
    return Verification(env=env_name, host=host_name(), commit=commit, tree=tree, time=now_iso(), by=by)


def parse(text: str) -> list[Verification]:
    """The verifications of a note's text (or of any lines of note text); other lines are skipped."""
    found = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in FIELDS)):
            continue
        if OBJECT_RE.match(data["commit"]) and OBJECT_RE.match(data["tree"]) and NAME_RE.match(data["env"]):
            # the host and time only ever shown: never a control character from the remote on a terminal
            found.append(Verification(**{**{k: data[k] for k in FIELDS}, "host": printable(data["host"])[:100],
                                         "time": printable(data["time"])[:40]}))
    return found


# -- the remote ------------------------------------------------------------------------------------
def _sync(repo: Repo, remote: str) -> None:
    """Fetch the remote's notes and merge them into ours (cat_sort_uniq: never a conflict). A remote
    that has none yet is not an error. Call under repo.shared_lock()."""
    status, _, err = repo.run("fetch", "--quiet", "--no-tags", remote, f"+{NOTES_REF}:{FETCHED_REF}",
                              timeout=NETWORK_TIMEOUT, check=False)
    if status != 0:
        if "couldn't find remote ref" in (err or ""):
            return
        raise DeployError(f"could not fetch {NOTES_REF} from {remote}: {_last_line(err, status)}")
    repo.run(*repo.identity(), "notes", f"--ref={NOTES_REF}", "merge", "--quiet", "--strategy=cat_sort_uniq",
             FETCHED_REF)


def fetch(repo: Repo, remote: str) -> None:
    """Bring the remote's verifications into the local notes ref (raises DeployError when unreachable)."""
    with repo.shared_lock():
        _sync(repo, remote)


def share(repo: Repo, remote: str, v: Verification) -> None:
    """Add v to the commit's note here, then push the notes to the remote (merging what other hosts
    pushed meanwhile). Raises DeployError when the remote cannot be reached or keeps refusing."""
    with repo.shared_lock():
        try:
            _sync(repo, remote)
        except DeployError:
            pass                # the push below says whether the remote can be reached
        status, note, _ = repo.run("notes", f"--ref={NOTES_REF}", "show", v.commit, check=False)
        if v.line() not in (note.splitlines() if status == 0 else []):
            repo.run(*repo.identity(), "notes", f"--ref={NOTES_REF}", "append", "--message", v.line(), v.commit)
        err, status = "", 0
        for _ in range(PUSH_ATTEMPTS):
            status, _, err = repo.run("push", "--quiet", remote, f"{NOTES_REF}:{NOTES_REF}",
                                      timeout=NETWORK_TIMEOUT, check=False)
            if status == 0:
                return
            if not _refused_as_behind(err):
                break
            _sync(repo, remote)         # another host pushed first: take its lines, try again
        raise DeployError(f"could not push {NOTES_REF} to {remote}: {_last_line(err, status)}")


def share_line(repo: Repo, remote: str, v: Verification) -> str:
    """share(), said in one line: what was shared, or a "warning:" line (the local record stands)."""
    if not remote:
        return ""
    try:
        share(repo, remote, v)
    except DeployError as exc:
        return (f"warning: {v.env}'s verification of {v.commit[:12]} is recorded on this host but not shared through "
                f"{remote} ({exc}): hosts that promote from {v.env} elsewhere refuse this tree until it is shared "
                f"(the next healthy deploy or passing verify in {v.env} here pushes it too)")
    return f"verification of {v.commit[:12]} in {v.env} shared through {remote} ({NOTES_REF})"


def _refused_as_behind(err: str) -> bool:
    return any(word in (err or "") for word in ("fetch first", "non-fast-forward", "[rejected]"))


def _last_line(err: str, status: int | None) -> str:
    lines = [line for line in (err or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {status}"


# -- reading -------------------------------------------------------------------------------------------
def recorded(repo: Repo, env_name: str) -> list[Verification]:
    """Every verification of env_name the local notes ref holds, oldest first by time."""
    if not repo.resolve(NOTES_REF):
        return []
    status, out, err = repo.run("grep", "-h", "-F", "-e", json.dumps({"env": env_name})[1:-1], NOTES_REF, check=False)
    if status not in (0, 1):            # 1: no line matched
        raise DeployError(f"cannot read {NOTES_REF} in {repo.path}: {_last_line(err, status)}")
    return sorted((v for v in parse(out) if v.env == env_name), key=_instant)


def _instant(v: Verification) -> float:
    """Its time as seconds since the epoch (0 when it cannot be read): times in other offsets sort right."""
    when = parse_time(v.time)
    return when.timestamp() if when else 0.0


def lookup(repo: Repo, remote: str, env_name: str, fetch_first: bool) -> tuple[list[Verification], str]:
    """(every verification of env_name shared through the remote, a problem met fetching them or "").
    fetch_first=False (a dry run) reads what was fetched before."""
    problem = ""
    if fetch_first and remote:
        try:
            fetch(repo, remote)
        except DeployError as exc:
            problem = str(exc)
    return recorded(repo, env_name), problem

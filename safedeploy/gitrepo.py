"""git, through GitPython's command layer: every call an argv list with a timeout,
never a prompt for a password. GitPython is imported by the first Repo, not with this module: its import
(~0.15 s of CPU, and a `git version` it runs) is not paid by a script run that never opens a repository
(--help, a refused config or argument, backup.py, --list)."""

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import DeployError
from .files import flock_by

GIT_TIMEOUT = 60          # local operations
NETWORK_TIMEOUT = 120     # fetch and push
NO_PROMPT = {"GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=20"}


class Repo:
    def __init__(self, path):
        import git         # here, not at the top: see above
        self.path = path
        try:
            self.repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise DeployError(f"{path} is not a git work tree") from None

    def run(self, *args, timeout=GIT_TIMEOUT, check=True):
        """Run `git ARGS` in the work tree; return stdout, or raise DeployError with git's words."""
        # reads never rewrite the index; the repository's hooks never run (post-merge, pre-push,
        # post-checkout would run the app's code from a tool that says what it ran: `build` is for that)
        import git         # imported by __init__ already
        argv = ["git", "--no-optional-locks", "-c", "core.hooksPath=/dev/null", *args]
        try:
            status, out, err = self.repo.git.execute(
                argv, with_extended_output=True, with_exceptions=False,
                kill_after_timeout=timeout, env={**os.environ, **NO_PROMPT},
                strip_newline_in_stdout=True)
        except git.GitCommandNotFound:
            raise DeployError("git is not installed (no `git` on PATH)") from None
        if status != 0 and check:
            detail = (err or out or f"exit {status}").strip().splitlines()
            if status == -9 or (status is None):
                detail = [f"timed out after {timeout}s"]
            raise DeployError(f"git {' '.join(args)} in {self.path} failed: {detail[-1] if detail else status}")
        return out if check else (status, out, err)

    # -- reading ---------------------------------------------------------
    def head(self):
        return self.run("rev-parse", "--verify", "HEAD")

    def current_branch(self):
        status, out, _ = self.run("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        return out.strip() if status == 0 else None

    def dirty_files(self):
        """Tracked files with uncommitted changes (untracked files do not count)."""
        return self.run("status", "--porcelain", "--untracked-files=no").splitlines()

    def resolve(self, ref):
        """The full commit sha REF names, or None."""
        if not ref or ref.startswith("-") or any(c in ref for c in "\0\n"):
            return None
        status, out, _ = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return out.strip() if status == 0 and out.strip() else None

    def tree_of(self, commit):
        return self.run("rev-parse", "--verify", f"{commit}^{{tree}}")

    def subject(self, commit):
        """The commit's subject, with control characters (ESC, OSC from a remote) shown as \\xNN."""
        status, out, _ = self.run("log", "-1", "--format=%s", commit, "--", check=False)
        return printable(out) if status == 0 else ""

    def tracked(self, commit, paths):
        """Which of paths (relative to the work tree) the commit tracks."""
        out = self.run("ls-tree", "-r", "--name-only", "-z", commit, "--", *paths)
        return [p for p in out.split("\0") if p]

    def changed_files(self, a, b):
        """Paths that differ between commits a and b (added, changed, removed, renamed)."""
        if a == b:
            return []
        out = self.run("diff", "--name-only", "--no-renames", "-z", a, b, "--")
        return [p for p in out.split("\0") if p]

    def is_ancestor(self, older, newer):
        status, _, _ = self.run("merge-base", "--is-ancestor", older, newer, check=False)
        return status == 0

    def tags(self, pattern):
        """Tags matching a glob, newest name first: [(name, commit, creation time ISO 8601)]."""
        out = self.run("for-each-ref", "--format=%(refname:short) %(creatordate:iso-strict) "
                       "%(*objectname)%(objectname)", f"refs/tags/{pattern}")
        result = []
        for line in out.splitlines():
            name, when, shas = (line.split(" ") + ["", ""])[:3]
            result.append((name, shas[:40], when))     # an annotated tag's target comes first
        return sorted(result, key=lambda t: t[0], reverse=True)

    def stash(self, message):
        """Stash uncommitted changes to tracked files; return the stash's sha, or None."""
        self.run(*self.identity(), "stash", "push", "--message", message)
        status, out, _ = self.run("rev-parse", "--verify", "--quiet", "refs/stash", check=False)
        return out.strip() if status == 0 else None

    def git_dir(self):
        return Path(os.path.normpath(os.path.join(self.path, self.run("rev-parse", "--git-dir"))))

    def common_dir(self):
        out = self.run("rev-parse", "--git-common-dir")
        return os.path.normpath(os.path.join(self.path, out))

    # -- changing ---------------------------------------------------------
    @contextlib.contextmanager
    def shared_lock(self, timeout=NETWORK_TIMEOUT + 30):
        """One lock per repository: envs that are work trees of the same repository share its refs,
        and two fetches at once would fail to update origin/* ("unable to update local ref")."""
        path = os.path.join(self.common_dir(), "safe-deploy.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not flock_by(fd, fcntl.LOCK_EX, time.monotonic() + timeout):
                raise DeployError(f"another operation kept {path} locked for {timeout}s")
            yield
        finally:
            os.close(fd)

    def fetch(self, remote):
        with self.shared_lock():
            self.run("fetch", "--prune", "--no-tags", remote, timeout=NETWORK_TIMEOUT)

    def create_tag(self, name, commit, message):
        """Create an annotated tag; NAME-2, NAME-3, ... when NAME is taken. Returns the name used."""
        base, n = name, 1
        with self.shared_lock():
            while self.resolve(f"refs/tags/{name}"):
                n += 1
                name = f"{base}-{n}"
            self.run(*self.identity(), "tag", "--annotate", "--message", message, name, commit)
        return name

    def identity(self):
        """-c options naming the tagger when git has no user configured (a service account)."""
        status, out, _ = self.run("config", "user.email", check=False)
        if status == 0 and out.strip():
            return []
        user = os.environ.get("USER") or "operator"
        return ["-c", f"user.name=safe-deploy ({user})", "-c", f"user.email={user}@{socket.gethostname()}"]

    def push_tag(self, remote, name):
        self.run("push", "--quiet", remote, f"refs/tags/{name}", timeout=NETWORK_TIMEOUT)

    def push_branch(self, remote, commit, branch):
        """Move the remote's branch to commit, fast-forward only (git refuses anything else without --force)."""
        self.run("push", "--quiet", remote, f"{commit}:refs/heads/{branch}", timeout=NETWORK_TIMEOUT)

    def fast_forward(self, commit):
        self.run("merge", "--ff-only", "--quiet", commit)

    def reset_hard(self, commit):
        self.run("reset", "--hard", "--quiet", commit)

    def exclude(self, pattern):
        """Keep an untracked file out of `git status` via the repo's info/exclude."""
        path = os.path.join(self.common_dir(), "info", "exclude")
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            lines = []
        if pattern not in lines:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as fh:
                fh.write(f"{pattern}\n")


def printable(text):
    """Text safe for a terminal: control characters escaped, never passed through."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)

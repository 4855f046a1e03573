"""An off-site copy as data, whichever engine holds it: what a snapshot of a backup is (Copy, from its labels),
the file name a copy may have, which of a snapshot's paths are its database, manifest and unit file, and whether
the manifest read back is the one its labels name. Pure: no engine is run here (safedeploy/offsite_engines
fetches, and refuses what these say is wrong)."""

import os
import re
from dataclasses import dataclass

from . import backups
from .errors import DeployError

FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.sqlite3$")    # a copy's file name: no '/', no dot file


@dataclass
class Copy:
    """One off-site snapshot of one backup."""
    id: str
    env: str
    file: str
    time: str
    reason: str
    commit: str
    sha256: str
    paths: list
    host: str = ""            # restic's host of the snapshot
    config: str = ""          # its config= tag ("" for a copy pushed before the tag existed)
    rows: int | None = None   # the rows the copy holds, from its rows= tag (None: pushed before it existed)

    @property
    def rows_total(self):
        return self.rows

    @property
    def name(self):
        return self.file.removesuffix(".sqlite3")

    @property
    def path(self):
        """What retention keys by: the file name (the same for a local copy and its off-site twin)."""
        return self.file


def sources_in(copy: Copy) -> dict[str, object]:
    """{"db" | "manifest" | "unit": the snapshot's path of it} for a copy: the snapshot's own paths, read from,
    never written to by their names. A DeployError when the database or the manifest is not among them."""
    stem = copy.file.removesuffix(".sqlite3")
    wanted = {copy.file: "db", copy.file + ".json": "manifest", stem + ".unit": "unit"}
    sources = {}
    for source in copy.paths:
        kind = wanted.get(os.path.basename(str(source)))
        if kind and kind not in sources:
            sources[kind] = source
    if "db" not in sources or "manifest" not in sources:
        raise DeployError(f"the off-site copy {copy.file} (snapshot {copy.id[:8]}) lacks its database or its "
                          "manifest: refused")
    return sources


def fetched_manifest_problem(manifest: dict, copy: Copy, env_name: str) -> str:
    """'' when a fetched copy's manifest is sound, of env_name, with the sha256 its tag names; else what is wrong."""
    problem = backups.manifest_problem(manifest)
    if not problem and manifest.get("env") != env_name:
        problem = f"its manifest is env {manifest.get('env')!r}'s, not {env_name!r}'s"
    if not problem and manifest.get("sha256") != copy.sha256:
        problem = "its manifest's sha256 is not the tagged one"
    return problem

"""The restore's copy of a backup beside the live database (safedeploy.restore.copy_checked, prepare_restore):
made by the kernel, checked by hashing the copy read back against the sha256 the backup's manifest records.
A good copy is the backup byte for byte; a backup with one byte changed, or cut short, is refused with the
partial copy removed and the live database untouched. Real SQLite files, every copy method."""

import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from safedeploy import backups, restore
from safedeploy.dbfiles import sha256_file
from safedeploy.errors import DeployError

METHODS = ["copy_file_range", "sendfile", "read"]


def make_live(path: Path, rows: int = 3000) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute(f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows}) "
                 "INSERT INTO notes (body) SELECT hex(randomblob(300)) FROM s")
    conn.close()
    return path


@pytest.fixture
def point(tmp_path):
    """(the live database, a verified backup of it, the live file's bytes), then a row written live after it."""
    live = make_live(tmp_path / "app.db")
    backup = backups.backup_database(live, tmp_path / "backups", "dev", "pre-deploy")
    conn = sqlite3.connect(live, isolation_level=None)
    conn.execute("INSERT INTO notes (body) VALUES ('after the point')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return live, backup, live.read_bytes()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".restore-" in p.name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [restore.COPY_CHUNK, 12_345])
def test_a_good_copy_is_the_backup_byte_for_byte(tmp_path, point, method, chunk):
    _, backup, _ = point
    out = tmp_path / "copy.db"
    restore.copy_checked(backup.path, out, backup.sha256, chunk=chunk, method=method)
    assert out.read_bytes() == Path(backup.path).read_bytes()
    assert os.stat(out).st_mode & 0o777 == 0o600
    conn = sqlite3.connect(out)
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 3000
    conn.close()


def test_prepare_restore_puts_the_checked_copy_beside_the_live_file(tmp_path, point):
    live, backup, before = point
    tmp = restore.prepare_restore(backup, live)
    assert tmp.parent == live.parent and tmp.read_bytes() == Path(backup.path).read_bytes()
    assert live.read_bytes() == before


def corrupt_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 + 17            # inside a page of rows: integrity_check alone might not see it
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - size // 3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damage", [corrupt_one_byte, truncate])
def test_a_damaged_backup_is_refused_by_the_copy(tmp_path, point, method, damage):
    _, backup, _ = point
    damage(Path(backup.path))
    with pytest.raises(DeployError, match="does not match its sha256"):
        restore.copy_checked(backup.path, tmp_path / "copy.db", backup.sha256, chunk=65_536, method=method)


@pytest.mark.parametrize("damage", [corrupt_one_byte, truncate])
def test_a_damaged_backup_leaves_no_copy_and_the_live_database_untouched(tmp_path, point, damage):
    live, backup, before = point
    damage(Path(backup.path))
    with pytest.raises(DeployError, match="live database was not touched"):
        restore.prepare_restore(backup, live)
    assert leftovers(live.parent) == []
    assert live.read_bytes() == before


def test_the_hash_is_of_the_copy_not_of_the_source(tmp_path, point, monkeypatch):
    """A copy whose bytes differ from the source's (a fault between the two) is refused: the hash reads the copy."""
    _, backup, _ = point
    real = restore.copy_chunk

    def faulty(src, dst, offset, n, method):
        done, method = real(src, dst, offset, n, method)
        if offset == 0:
            os.pwrite(dst, b"\xff", 100)        # one byte of the copy changed after the kernel wrote it
        return done, method

    monkeypatch.setattr(restore, "copy_chunk", faulty)
    with pytest.raises(DeployError, match="does not match its sha256"):
        restore.copy_checked(backup.path, tmp_path / "copy.db", backup.sha256, chunk=65_536)


def test_a_source_that_shrinks_while_copied_is_a_short_copy(tmp_path, point, monkeypatch):
    _, backup, _ = point
    real = restore.copy_chunk
    calls = []

    def shrinking(src, dst, offset, n, method):
        calls.append(offset)
        if len(calls) == 2:
            with open(backup.path, "r+b") as fh:
                fh.truncate(offset + 10)
        return real(src, dst, offset, n, method)

    monkeypatch.setattr(restore, "copy_chunk", shrinking)
    with pytest.raises(DeployError, match="not .*bytes|could not be read whole"):
        restore.copy_checked(backup.path, tmp_path / "copy.db", backup.sha256, chunk=65_536)


def test_finish_copy_counts_rows_checks_and_hashes_at_once(tmp_path, point):
    """The seal's and a backup's checks (dbfiles.finish_copy): the rows counted on their own connection while
    integrity_check and the sha256 run; a file whose pages are damaged is refused by integrity_check."""
    from safedeploy import dbfiles
    live, backup, _ = point
    assert backup.rows == {"notes": 3000}
    copy = tmp_path / "aside.db"
    copy.write_bytes(live.read_bytes())
    seen = []
    info = dbfiles.finish_copy(live, copy, alongside=lambda: seen.append(dbfiles.rows_of(copy)))
    assert info["rows"] == {"notes": 3001} and seen == [{"notes": 3001}]
    assert info["sha256"] == dbfiles.sha256_file(copy)
    broken = tmp_path / "broken.db"
    data = bytearray(live.read_bytes())
    page = info["page_size"]
    data[3 * page:4 * page] = bytes(range(256)) * (page // 256)      # a page of rows overwritten
    broken.write_bytes(bytes(data))
    with pytest.raises((DeployError, sqlite3.DatabaseError), match="fails integrity_check|malformed"):
        dbfiles.finish_copy(broken, broken)     # the callers (backup_database, seal) take either as the refusal


def test_an_early_seal_seals_the_set_aside_file_at_the_lowest_priority(tmp_path):
    """backups.EarlySeal (a rollback's seal started while the app restarts): the same sealed backup as seal()
    in place (self-contained, its manifest's sha256 the file's), made by a thread at nice 19; an error is the
    one seal() raises, and wait() returns after it."""
    folder = tmp_path / "backups"
    folder.mkdir(mode=0o700)
    aside = make_live(folder / "dev-20260101-000000-pre-rollback.sqlite3")
    conn = sqlite3.connect(aside)           # a WAL with frames in it beside the set-aside file, as a stop leaves
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("INSERT INTO notes (body) VALUES ('after the plan')")
    conn.commit()
    held = sqlite3.connect(aside)           # holds the WAL open past the writer's close
    conn.close()
    held.close()
    unit = tmp_path / "dev.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    early = backups.EarlySeal(aside, folder, "dev", "c0ffee", str(unit), rows={"notes": 3001}, checked="ok",
                              unit_text=b"[Service]\nExecStart=/bin/false\n")
    sealed = early.result()
    assert sealed.sha256 == sha256_file(aside) and not Path(f"{aside}-wal").exists()
    assert sealed.rows == {"notes": 3001} and os.stat(aside).st_mode & 0o777 == 0o600
    assert Path(sealed.unit_backup).read_bytes() == b"[Service]\nExecStart=/bin/false\n"   # as read by the caller
    assert Path(f"{aside}.json").is_file()

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(max_workers=1) as pool:     # in a thread of its own, as EarlySeal runs it
        niceness = pool.submit(backups.EarlySeal.lowly,
                               lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert niceness == 19 and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine   # that thread only
    bad = tmp_path / "backups" / "dev-20260101-000001-pre-rollback.sqlite3"
    bad.write_bytes(b"not a database" * 100)
    failing = backups.EarlySeal(bad, folder, "dev", "c0ffee", None, rows={}, checked="ok")
    with pytest.raises(DeployError, match="not a readable SQLite database"):
        failing.result()
    failing.wait()


# -- the deploy's spare ---------------------------------------------------------------------
def test_a_spare_is_a_checked_copy_beside_the_live_file_and_the_only_one(tmp_path, point):
    live, backup, before = point
    old = restore.spare_name(live, "0" * 64)
    old.write_bytes(b"an earlier deploy's spare")
    spare = restore.make_spare(backup, live)
    assert spare == restore.spare_name(live, backup.sha256) and restore.spares(live) == [spare]
    assert spare.read_bytes() == Path(backup.path).read_bytes() and os.stat(spare).st_mode & 0o777 == 0o600
    assert live.read_bytes() == before and leftovers(tmp_path) == []


def test_a_folder_in_an_old_spare_s_place_is_a_one_line_error_and_no_spare(tmp_path, point):
    live, backup, before = point
    restore.spare_name(live, "0" * 64).mkdir()
    with pytest.raises(DeployError, match="cannot remove .*spare-0000000000000000"):
        restore.make_spare(backup, live)        # the deploy says it as a warning and goes on (leave_spare)
    assert not restore.spare_name(live, backup.sha256).exists() and live.read_bytes() == before


def test_no_spare_where_the_disk_would_keep_no_room_for_another_copy(tmp_path, point, monkeypatch):
    live, backup, _ = point
    monkeypatch.setattr(restore, "free_bytes", lambda folder: 2 * backup.bytes + restore.SPARE_ROOM - 1)
    assert restore.make_spare(backup, live) is None and restore.spares(live) == []


def test_prepare_restore_takes_the_spare_by_a_rename(tmp_path, point):
    live, backup, before = point
    spare = restore.make_spare(backup, live)
    inode = spare.stat().st_ino
    tmp, taken = restore.prepare_restore_taking(backup, live)
    assert taken and tmp.stat().st_ino == inode and not spare.exists()
    assert tmp.read_bytes() == Path(backup.path).read_bytes() and live.read_bytes() == before


@pytest.mark.parametrize("bad", ["one byte", "short", "fifo", "symlink"])
def test_a_bad_spare_is_removed_and_the_backup_copied(tmp_path, point, bad):
    live, backup, before = point
    spare = restore.spare_name(live, backup.sha256)
    if bad == "one byte":
        restore.make_spare(backup, live)
        corrupt_one_byte(spare)
    elif bad == "short":
        restore.make_spare(backup, live)
        truncate(spare)
    elif bad == "fifo":
        os.mkfifo(spare)
    else:
        spare.symlink_to(backup.path)
    tmp, taken = restore.prepare_restore_taking(backup, live)
    assert not taken and tmp.read_bytes() == Path(backup.path).read_bytes()
    assert not os.path.lexists(spare) and live.read_bytes() == before


def test_a_plan_not_confirmed_gives_the_spare_back(tmp_path, point):
    live, backup, _ = point
    spare = restore.make_spare(backup, live)
    inode = spare.stat().st_ino
    early = restore.EarlyPrepare(backup, live)
    assert early.result().stat().st_ino == inode
    early.discard()
    assert restore.spares(live) == [spare] and spare.stat().st_ino == inode and leftovers(tmp_path) == []
    spare.unlink()
    early = restore.EarlyPrepare(backup, live)      # no spare: a copy, removed when discarded
    early.result()
    early.discard()
    assert leftovers(tmp_path) == [] and restore.spares(live) == []

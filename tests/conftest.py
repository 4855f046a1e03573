"""Fixtures on real components: a private systemd --user manager for the session,
and a fresh sandbox (bare origin, prod clone, dev worktree, sample app units) per test.

Tests that need the user manager fail, never skip, when it cannot start."""

import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.sandbox import Sandbox, UserManager  # noqa: E402

_count = itertools.count(1)


@pytest.fixture(scope="session")
def user_manager(tmp_path_factory):
    manager = UserManager(tmp_path_factory.mktemp("systemd-user"))
    manager.start()         # raises: a test that needs it fails, never skips
    os.environ.update(manager.env)
    yield manager
    manager.stop()


def make_sandbox(user_manager, tmp_path, converted):
    sb = Sandbox(tmp_path / "host", user_manager, health_timeout=5, name=f"t{next(_count)}")
    sb.root.mkdir()
    sb.build()
    if converted:
        sb.convert()
    return sb


@pytest.fixture
def sandbox(user_manager, tmp_path):
    """The layout users have: both envs converted to releases and socket units (as adopt.py leaves them)."""
    sb = make_sandbox(user_manager, tmp_path, converted=True)
    yield sb
    sb.stop_units()


@pytest.fixture
def in_place(user_manager, tmp_path):
    """Both envs still run from their work trees (a host before conversion): for the tests about that."""
    sb = make_sandbox(user_manager, tmp_path, converted=False)
    yield sb
    sb.stop_units()

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


@pytest.fixture
def sandbox(user_manager, tmp_path):
    sb = Sandbox(tmp_path / "host", user_manager, health_timeout=5, name=f"t{next(_count)}")
    sb.root.mkdir()
    sb.build()
    yield sb
    sb.stop_units()

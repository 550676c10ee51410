"""Databases, logs and run state are created owner-only whatever the umask (cms.runtime.files).

Each test runs under umask 000, where every default (SQLite's 0644, open()'s 0666,
mkdir's 0777) would leave the file readable, most of them writable, by anyone.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from access_server.store import Store
from cms.runtime.files import private_file, tighten_tree, write_private
from cms.runtime.logs import setup_logging
from key_mgmt.store import KeyStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_new_registry_database_and_its_wal_and_shm_files_are_0600(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)  # noqa: S103  (an operator's directory, not ours to change)
    database = tmp_path / "new" / "data" / "access.db"
    with Store.from_url(f"sqlite:///{database}") as store:
        store.register_psds(["00112233445566778899"], "tester")
        files = {p.name: _mode(p) for p in database.parent.iterdir()}
        assert {"access.db", "access.db-wal", "access.db-shm"} <= set(files)
        assert set(files.values()) == {0o600}, files
    assert _mode(database.parent) == _mode(database.parent.parent) == 0o700
    assert _mode(tmp_path) == 0o755                 # a directory it did not create is left


def test_a_new_key_management_database_is_0600(tmp_path: Path) -> None:
    database = tmp_path / "data" / "key-mgmt.db"
    store = KeyStore(f"sqlite:///{database}")
    try:
        assert _mode(database) == 0o600 and _mode(database.parent) == 0o700
    finally:
        store.close()


def test_a_log_file_is_created_0600_and_an_existing_one_tightened(tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    old = tmp_path / "old.log"
    old.write_text("")
    os.chmod(old, 0o644)
    try:
        for path in (tmp_path / "logs" / "service.log", old):
            setup_logging("test", "info", path)
            logging.getLogger("test").info("hello")
            assert _mode(path) == 0o600 and "hello" in path.read_text()
            root.handlers[0].close()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert _mode(tmp_path / "logs") == 0o700


def test_private_writes_and_tightening_leave_symbolic_links_alone(tmp_path: Path) -> None:
    write_private(tmp_path / "run" / "ports.json", "{}")
    assert _mode(tmp_path / "run" / "ports.json") == 0o600
    assert _mode(tmp_path / "run") == 0o700
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o644)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "wide.db").write_text("")
    (tree / "link").symlink_to(outside)
    os.chmod(tree / "sub", 0o777)  # noqa: S103  (widened on purpose)
    tighten_tree(tree)
    assert (_mode(tree), _mode(tree / "sub"), _mode(tree / "sub" / "wide.db")) == (
        0o700, 0o700, 0o600)
    assert _mode(outside) == 0o644
    assert private_file(tmp_path / "run" / "ports.json").read_text() == "{}"  # kept, 0600

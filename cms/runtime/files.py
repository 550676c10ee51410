"""Files and directories only their owner may use: databases, logs, audit, run state.

What the services and the launcher keep on disk names secrets-adjacent facts
(cryptograms, PSD ids, identities, addresses, database URLs, key file
paths), so files are 0600 and their directories 0700 whatever the process
umask. A mode given to ``open`` or ``mkdir`` is only ever narrowed by the
umask, never widened, and the umask may also have been set to narrow less;
so each mode is set again with ``fchmod``/``chmod`` right after creation,
before anything is written.

Where a library creates the file (SQLite, ``logging.FileHandler``), the file
is created here first, empty and 0600, and the library opens it: SQLite
treats an empty file as an empty database and creates its ``-wal``,
``-shm`` and ``-journal`` files with the database file's own mode (it sets
that mode on them itself, past the umask), and a FileHandler appends to the
file it finds. That covers every process that opens the file, started by
the launcher or not; changing the process umask would instead have changed
it for everything else the process creates too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
PRIVATE_UMASK = 0o077
"""For child processes whose own files (ready files, temporary files) must be private too."""


def make_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents, each one created 0700.

    Directories that already exist keep their mode: they may be the
    operator's (``/var/log``, a home directory).
    """
    missing = []
    current = Path(path)
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue                      # made meanwhile by another process: theirs
        os.chmod(directory, PRIVATE_DIR)


def private_dir(path: Path) -> Path:
    """``path`` as a directory of ours: created 0700 if missing, else tightened to 0700."""
    make_dirs(path)
    os.chmod(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> Path:
    """``path`` as an owner-only file: created empty (missing parents 0700) or tightened."""
    path = Path(path)
    open_private_append(path).close()
    return path


def open_private_append(path: Path) -> BinaryIO:
    """``path`` opened for appending bytes, created or tightened to 0600 first."""
    path = Path(path)
    make_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, data: str | bytes) -> None:
    """Replace ``path`` atomically with ``data``, owner-only from its first byte."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), PRIVATE_FILE)
        out.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def tighten_tree(directory: Path) -> None:
    """``directory`` and everything under it: directories 0700, files 0600.

    Symbolic links are neither followed nor changed. For trees made before
    their files were created owner-only (the launcher calls it on each run).
    """
    if not directory.is_dir() or directory.is_symlink():
        return
    os.chmod(directory, PRIVATE_DIR)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            _tighten(Path(root, name), PRIVATE_DIR)
        for name in files:
            _tighten(Path(root, name), PRIVATE_FILE)


def _tighten(path: Path, mode: int) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return                            # removed meanwhile (a -wal file at close)
    if stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) == mode:
        return
    try:
        os.chmod(path, mode)
    except FileNotFoundError:
        return


def sqlite_file(database: str) -> None:
    """Create the file of a SQLite database 0600 before SQLite first opens it.

    ``database`` is the path of a ``sqlite:///PATH`` URL. An in-memory
    database, a ``file:`` URI and an existing file are left alone.
    """
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    if path.exists():
        return
    make_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    except FileExistsError:
        return                            # another process made it first
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)

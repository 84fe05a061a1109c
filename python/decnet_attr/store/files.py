"""File modes of the SQLite store: the database holds argon2 hashes, token
revocations and attacker data, so it and its companions are private to the
service's user (0600) whatever the umask. SQLite gives its ``-wal``,
``-shm`` and ``-journal`` files the mode of the database file, so creating
that one private is enough for new stores; existing files are tightened."""

from __future__ import annotations

import logging
import os
import stat

__all__ = ["DB_FILE_MODE", "private_db_files"]

log = logging.getLogger(__name__)

DB_FILE_MODE = 0o600
#: Files SQLite keeps beside the database.
COMPANIONS = ("-wal", "-shm", "-journal")


def private_db_files(path: str) -> None:
    """Create ``path`` empty with mode 0600 when missing (SQLite takes an empty
    file for a new database) and take group/other access off it and its
    companions. A file that cannot be fixed is logged, not fatal."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), DB_FILE_MODE)
    os.close(fd)
    for name in (path, *(path + suffix for suffix in COMPANIONS)):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
            continue
        try:
            os.chmod(name, DB_FILE_MODE)
        except OSError as exc:
            log.warning("%s is readable by group/others and cannot be fixed: %s", name, exc)

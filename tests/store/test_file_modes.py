"""Security review item 8: the SQLite database, WAL and SHM files are private
(0600) whatever the umask, and existing open ones are tightened at open."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from decnet_attr.store import open_store


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_new_store_files_are_0600(tmp_path: Path, open_umask: None) -> None:
    db = tmp_path / "attr.db"
    store = open_store(f"sqlite://{db}")
    await store.open()
    try:
        await store.count_users()  # touches the WAL
        files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        assert all(p.exists() for p in files)
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        await store.close()


async def test_existing_readable_files_are_tightened(tmp_path: Path, open_umask: None) -> None:
    db = tmp_path / "attr.db"
    store = open_store(f"sqlite://{db}")
    await store.open()
    await store.close()
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if p.exists():
            p.chmod(0o644)
    store = open_store(f"sqlite://{db}")
    await store.open()
    try:
        await store.count_users()
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert _mode(p) == 0o600, p
    finally:
        await store.close()

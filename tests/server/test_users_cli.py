"""``decnet-attr users …`` against the same data directory ``serve`` uses."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.cli import build_parser, main
from decnet_attr.config import ConfigError, Settings
from decnet_attr.server.users_cli import users_command
from decnet_attr.store import UserRow, open_store
from tests.server.conftest import HarnessFactory, bearer

GOOD = "A long enough passw0rd"


class FakeStdin(io.StringIO):
    def isatty(self) -> bool:
        return False


def run(
    data_dir: Path, argv: list[str], stdin: str = "", monkeypatch: Any = None
) -> tuple[int, str, str]:
    # the common flags belong to ``users`` (before its sub-command)
    args = build_parser().parse_args(["users", "--data-dir", str(data_dir), *argv])
    settings = Settings(data_dir=data_dir)
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", FakeStdin(stdin))
    out, err = io.StringIO(), io.StringIO()
    code = users_command(args, settings, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def users_in(data_dir: Path) -> dict[str, UserRow]:
    async def go() -> list[UserRow]:
        store = open_store(f"sqlite://{data_dir / 'attr.db'}")
        await store.open()
        try:
            return await store.list_users()
        finally:
            await store.close()

    return {u.username: u for u in asyncio.run(go())}


def test_add_list_passwd_disable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "data"
    code, out, err = run(d, ["add", "alice", "--role", "viewer"], GOOD + "\n", monkeypatch)
    assert (code, out, err) == (0, "added user alice (viewer)\n", "")
    assert d.stat().st_mode & 0o777 == 0o700
    code, out, _ = run(d, ["add", "probe-1", "--role", "sensor"], GOOD + "\r\n", monkeypatch)
    assert code == 0
    users = users_in(d)
    assert users["alice"].role == "viewer"
    assert users["alice"].must_change_password is False
    assert users["alice"].password_hash.startswith("$argon2id$")
    assert users["probe-1"].role == "sensor"

    code, out, err = run(d, ["list"])
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["USERNAME", "ROLE", "DISABLED", "MUST_CHANGE_PASSWORD", "CREATED"]
    assert [ln.split()[:4] for ln in lines[1:]] == [
        ["alice", "viewer", "no", "no"],
        ["probe-1", "sensor", "no", "no"],
    ]
    assert lines[1].split()[4].startswith(time.strftime("%Y-", time.gmtime()))

    before = users_in(d)["alice"]
    code, out, _ = run(d, ["passwd", "alice"], "Another g00d password\n", monkeypatch)
    assert code == 0
    assert out == (
        "password of alice changed (to be changed at the next login); "
        "their existing tokens are revoked\n"
    )
    after = users_in(d)["alice"]
    assert after.password_hash != before.password_hash
    assert after.tokens_valid_from is not None and abs(after.tokens_valid_from - time.time()) < 10
    # an operator-set password is temporary (security review item 9) ...
    assert after.must_change_password is True
    # ... unless the operator says otherwise
    code, out, _ = run(
        d, ["passwd", "alice", "--no-must-change"], "Yet another g00d one\n", monkeypatch
    )
    assert code == 0
    assert out == "password of alice changed; their existing tokens are revoked\n"
    assert users_in(d)["alice"].must_change_password is False

    code, out, _ = run(d, ["disable", "probe-1"])
    assert code == 0
    assert out == "user probe-1 disabled; their existing tokens are revoked\n"
    probe = users_in(d)["probe-1"]
    assert probe.disabled is True and probe.tokens_valid_from is not None
    code, out, _ = run(d, ["list"])
    assert out.splitlines()[2].split()[:3] == ["probe-1", "sensor", "yes"]


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["add", "bob"], "short\n", "password must be at least 12 characters"),
        (["add", "bob"], "x" * 73 + "\n", "password must be at most 72 bytes (UTF-8)"),
        (["add", "bob"], "", "no password on stdin"),
        (["add", "bad name"], GOOD + "\n", "the username must be 1-64 characters"),
        (["passwd", "nobody"], GOOD + "\n", "no such user: nobody"),
        (["disable", "nobody"], "", "no such user: nobody"),
    ],
)
def test_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: str, message: str
) -> None:
    code, out, err = run(tmp_path, argv, stdin, monkeypatch)
    assert code == 1
    assert out == ""
    assert err.startswith("decnet-attr users: ")
    assert message in err


def test_duplicate_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(tmp_path, ["add", "alice"], GOOD + "\n", monkeypatch)[0] == 0
    code, _out, err = run(tmp_path, ["add", "alice"], GOOD + "\n", monkeypatch)
    assert code == 1
    assert err == "decnet-attr users: user alice already exists\n"


def test_tty_prompts_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter([GOOD, "something else entirely"])
    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, _out, err = run(tmp_path, ["add", "alice"])
    assert code == 1 and "the passwords do not match" in err
    answers = iter([GOOD, GOOD])
    code, _out, _err = run(tmp_path, ["add", "alice"])
    assert code == 0


def test_through_the_cli_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k in list(__import__("os").environ):
        if k.startswith("DECNET_ATTR_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr("sys.stdin", FakeStdin(GOOD + "\n"))
    assert main(["users", "--data-dir", str(tmp_path), "add", "carol", "--role", "admin"]) == 0
    assert main(["users", "--data-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "added user carol (admin)" in out
    assert "carol" in out.splitlines()[-1]


async def test_cli_users_can_log_in_and_disable_cuts_them_off(
    tmp_path: Path, make_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "data"
    loop = asyncio.get_running_loop()
    code, _o, _e = await loop.run_in_executor(
        None, lambda: run(d, ["add", "alice", "--role", "viewer"], GOOD + "\n", monkeypatch)
    )
    assert code == 0
    h = await make_harness(data_dir=d)
    token = await h.login("alice", GOOD)
    assert (await h.client.get("/api/v1/attackers", headers=bearer(token))).status == 200
    code, _o, _e = await loop.run_in_executor(None, lambda: run(d, ["disable", "alice"]))
    assert code == 0
    resp = await h.client.get("/api/v1/attackers", headers=bearer(token))
    assert resp.status == 401
    resp = await h.client.post("/api/v1/auth/login", json={"username": "alice", "password": GOOD})
    assert resp.status == 401


def test_an_open_data_directory_is_refused(tmp_path: Path) -> None:
    """Security review item 8: a data directory others can read is not used."""
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        run(d, ["list"])
    assert not (d / "attr.db").exists()

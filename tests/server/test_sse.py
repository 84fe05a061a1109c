"""SSE relay: the wire contract (exact bytes), errors before headers, routing."""

from __future__ import annotations

from pathlib import Path

import pytest

from decnet_attr import topics
from tests.server.sse_helpers import (
    KEEPALIVE,
    RETRY,
    AiohttpClient,
    RawClient,
    Reader,
    SseEnv,
    live_frame,
    make_env,
    parse,
    seed_attacker,
    snapshot_frame,
)

A = "0b5e7a52-0000-4000-8000-00000000000a"
B = "0b5e7a52-0000-4000-8000-00000000000b"
C = "0b5e7a52-0000-4000-8000-00000000000c"


@pytest.fixture
async def env(aiohttp_client: AiohttpClient, tmp_path: Path) -> SseEnv:
    return await make_env(aiohttp_client, tmp_path)


async def test_first_frames_exact_bytes(env: SseEnv) -> None:
    ident = await seed_attacker(
        env.store,
        A,
        observations=[
            ("motor.typing.cadence", "fast", 1.7e9 + 10),
            ("toolchain.shell", "bash", 1.7e9 + 5),
            ("toolchain.shell", "zsh", 1.7e9 + 20),
        ],
        states=[("toolchain.shell", "zsh", "drifting"), ("a.first", {"k": [1, 2]}, "stable")],
    )
    resp = await env.open(A)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    reader = Reader(resp)
    frames = await reader.frames(3)
    assert frames[0] == KEEPALIVE
    assert frames[1] == RETRY
    row = {
        "confidence": 0.75,
        "observation_count": 4,
        "last_change_ts": 1.7e9 + 1,
        "last_observation_ts": 1.7e9 + 2,
    }
    expected = {
        "attacker_uuid": A,
        "observations": [
            {
                "primitive": "motor.typing.cadence",
                "value": "fast",
                "confidence": 0.9,
                "ts": 1.7e9 + 10,
                "source": "sensor-1",
            },
            {
                "primitive": "toolchain.shell",
                "value": "zsh",
                "confidence": 0.9,
                "ts": 1.7e9 + 20,
                "source": "sensor-1",
            },
        ],
        "identity_uuid": ident,
        "attribution": [
            {"primitive": "a.first", "current_value": {"k": [1, 2]}, "state": "stable", **row},
            {"primitive": "toolchain.shell", "current_value": "zsh", "state": "drifting", **row},
        ],
    }
    # attribution rows: exactly the attribution endpoint's keys, in its order
    keys = [
        "primitive",
        "current_value",
        "state",
        "confidence",
        "observation_count",
        "last_change_ts",
        "last_observation_ts",
    ]
    assert [list(r) for r in expected["attribution"]] == [keys, keys]  # type: ignore[union-attr]
    assert frames[2] == snapshot_frame(env.eid(0), expected)
    resp.close()


async def test_snapshot_without_identity(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    resp = await env.open(A)
    frames = await Reader(resp).frames(3)
    assert frames[2] == (
        b"event: snapshot\nid: "
        + env.eid(0).encode()
        + b'\ndata: {"attacker_uuid":"'
        + A.encode()
        + b'","observations":[],"identity_uuid":null,"attribution":[]}\n\n'
    )
    resp.close()


async def test_raw_http_bytes_chunked_and_http10(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    port = env.client.port
    assert port is not None
    path = f"/api/v1/attackers/{A}/events"
    raw = await RawClient.connect(port, path, {"X-Test-User": "alice"})
    head = await raw.read_head()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    lines = head.split(b"\r\n")
    assert b"Content-Type: text/event-stream" in lines
    assert b"Cache-Control: no-cache" in lines
    assert b"X-Accel-Buffering: no" in lines
    assert b"Transfer-Encoding: chunked" in lines
    snap = snapshot_frame(
        env.eid(0),
        {"attacker_uuid": A, "observations": [], "identity_uuid": None, "attribution": []},
    )
    first = KEEPALIVE + RETRY + snap
    # the first write is one HTTP chunk
    while len(raw.buf) < len(first) + 8:
        await raw._recv(5.0)
    assert raw.buf.startswith(b"%x\r\n%b\r\n" % (len(first), first))
    assert [await raw.frame() for _ in range(3)] == [KEEPALIVE, RETRY, snap]
    # a live event written straight to the transport is a well-formed chunk too
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "score": 3})
    ev = live_frame(
        "attacker.scored",
        env.eid(1),
        "attacker.scored",
        "",
        1.7e9,
        {"attacker_uuid": A, "score": 3},
    )
    await raw._recv(5.0)
    assert raw.buf == b"%x\r\n%b\r\n" % (len(ev), ev)
    assert await raw.event() == ev
    raw.close()

    # HTTP/1.0: no chunking, same SSE bytes
    raw10 = await RawClient.connect(port, path, {"X-Test-User": "bob"}, version="1.0")
    head = await raw10.read_head()
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert not raw10.chunked
    snap = snapshot_frame(
        env.eid(1),
        {"attacker_uuid": A, "observations": [], "identity_uuid": None, "attribution": []},
    )
    assert [await raw10.frame() for _ in range(3)] == [KEEPALIVE, RETRY, snap]
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "score": 4})
    ev = live_frame(
        "attacker.scored",
        env.eid(2),
        "attacker.scored",
        "",
        1.7e9,
        {"attacker_uuid": A, "score": 4},
    )
    assert await raw10.event() == ev
    raw10.close()


async def test_keepalive_every_interval(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    resp = await env.open(A)
    reader = Reader(resp)
    await reader.frames(3)
    # sse_keepalive=0.2: silence is broken by comments
    assert await reader.frame(timeout=1.0) == KEEPALIVE
    assert await reader.frame(timeout=1.0) == KEEPALIVE
    resp.close()


# ---- errors before headers ---------------------------------------------------------------
async def test_auth_errors_before_headers(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    resp = await env.open(A, user="")
    assert resp.status == 401
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == {"detail": "Not authenticated"}
    resp = await env.open(A, headers={"X-Test-Role": "sensor"})
    assert resp.status == 403
    assert await resp.json() == {"detail": "Insufficient permissions"}
    # ?ticket= works the same way
    resp = await env.client.get(f"/api/v1/attackers/{A}/events", params={"ticket": "carol"})
    assert resp.status == 200
    resp.close()


async def test_404_before_headers(env: SseEnv) -> None:
    resp = await env.open("no-such-attacker")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == {"detail": "Attacker not found"}
    resp = await env.open("x" * 500)
    assert resp.status == 404
    assert await resp.json() == {"detail": "Attacker not found"}
    stats = env.hub.stats()
    assert stats["streams_open"] == 0 and stats["users"] == 0 and stats["channels"] == 0


async def test_expired_token_rejected(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    resp = await env.open(A, headers={"X-Test-Exp": "1000"})
    assert resp.status == 401
    assert await resp.json() == {"detail": "Token expired"}


async def test_per_user_cap_429_and_slot_freed(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_max_per_user=2)
    await seed_attacker(env.store, A)
    await seed_attacker(env.store, B)
    # 404s do not keep slots
    for _ in range(3):
        assert (await env.open("missing")).status == 404
    r1 = await env.open(A)
    r2 = await env.open(B)
    assert r1.status == r2.status == 200
    r3 = await env.open(A)
    assert r3.status == 429
    assert r3.headers["Retry-After"] == "3"
    assert r3.headers["Content-Type"].startswith("application/json")
    assert await r3.json() == {"detail": "SSE connection limit (2) reached"}
    assert env.hub.stats()["rejected_cap"] == 1
    # another user is not affected
    other = await env.open(A, user="bob")
    assert other.status == 200
    other.close()
    # closing a stream frees its slot
    await Reader(r1).frames(3)
    r1.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 1)
    r4 = await env.open(A)
    assert r4.status == 200
    r2.close()
    r4.close()


# ---- routing -----------------------------------------------------------------------------
async def test_live_events_routed_to_the_right_streams(env: SseEnv) -> None:
    ia = await seed_attacker(env.store, A, identity=True)
    ib = await seed_attacker(env.store, B, identity=True)
    a1, a2, b1 = Reader(await env.open(A)), Reader(await env.open(A)), Reader(await env.open(B))
    for r in (a1, a2, b1):
        await r.frames(3)
    calls = 0
    orig = env.hub._frame

    def counting(event):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return orig(event)

    env.hub._frame = counting  # type: ignore[method-assign]

    obs = {
        "primitive": "toolchain.shell",
        "value": "bash",
        "confidence": 0.9,
        "window": {"start_ts": 1.0, "end_ts": 2.0},
        "source": "s",
        "evidence_ref": "e",
        "identity_ref": None,
        "id": "x1",
        "ts": 2.0,
        "v": 1,
        "attacker_uuid": A,
    }
    await env.publish("attacker.observation.toolchain.shell", obs, "toolchain.shell", ts=5.5)
    e1 = live_frame(
        "observation",
        env.eid(1),
        "attacker.observation.toolchain.shell",
        "toolchain.shell",
        5.5,
        obs,
    )
    assert await a1.event() == e1
    assert await a2.event() == e1
    assert calls == 1  # serialised once for both streams

    changed = {
        "identity_uuid": ia,
        "primitive": "toolchain.shell",
        "old_state": None,
        "new_state": "stable",
        "current_value": "bash",
        "confidence": 0.5,
        "observation_count": 3,
        "ts": 2.0,
    }
    await env.publish(topics.ATTRIBUTION_PROFILE_STATE_CHANGED, changed, "profile.state_changed")
    multi = {
        "identity_uuid": ia,
        "primitives": ["a", "b"],
        "evidence_summary": "2 primitives flagged multi_actor",
        "confidence": 0.6,
        "ts": 3.0,
    }
    await env.publish(
        topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED, multi, "profile.multi_actor_suspected"
    )
    updated = dict(changed, old_state="stable", current_value="zsh", attacker_uuids=[A])
    await env.publish(topics.ATTRIBUTION_PROFILE_UPDATED, updated, "profile.updated")
    rot = {"attacker_uuid": B, "probe_type": "jarm", "old_hash": "a", "new_hash": "b"}
    await env.publish(topics.ATTACKER_FINGERPRINT_ROTATED, rot, "attacker.fingerprint_rotated")
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": B, "score": 9})
    # B's identity: routed to B only
    await env.publish(
        topics.ATTRIBUTION_PROFILE_STATE_CHANGED,
        dict(changed, identity_uuid=ib),
        "profile.state_changed",
    )

    want_a = [
        live_frame(
            "attribution.state_changed",
            env.eid(2),
            "attribution.profile.state_changed",
            "profile.state_changed",
            1.7e9,
            changed,
        ),
        live_frame(
            "attribution.multi_actor_suspected",
            env.eid(3),
            "attribution.profile.multi_actor_suspected",
            "profile.multi_actor_suspected",
            1.7e9,
            multi,
        ),
        live_frame(
            "attribution.updated",
            env.eid(4),
            "attribution.profile.updated",
            "profile.updated",
            1.7e9,
            updated,
        ),
    ]
    want_b = [
        live_frame(
            "fingerprint.rotated",
            env.eid(5),
            "attacker.fingerprint_rotated",
            "attacker.fingerprint_rotated",
            1.7e9,
            rot,
        ),
        live_frame(
            "attacker.scored",
            env.eid(6),
            "attacker.scored",
            "",
            1.7e9,
            {"attacker_uuid": B, "score": 9},
        ),
        live_frame(
            "attribution.state_changed",
            env.eid(7),
            "attribution.profile.state_changed",
            "profile.state_changed",
            1.7e9,
            dict(changed, identity_uuid=ib),
        ),
    ]
    for r in (a1, a2):
        assert [await r.event() for _ in range(3)] == want_a
    assert [await b1.event() for _ in range(3)] == want_b
    # nothing else reached A's streams: the next frame is the next A event
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "score": 1})
    nxt = parse(await a1.event())
    assert nxt["id"] == env.eid(8)
    assert nxt["data"]["payload"] == {"attacker_uuid": A, "score": 1}
    # unrelated attacker: no frame built at all
    before = env.hub.stats()
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": C, "score": 1})
    await env.publish(topics.ATTACKER_SCORED, {"no": "attacker"})
    await env.wait(lambda: env.hub.stats()["events_in"] == before["events_in"] + 2)
    assert env.hub.stats()["events_routed"] == before["events_routed"]
    stats = env.hub.stats()
    assert stats["frames_sent"] >= 3 * 2 + 3 + 2
    assert stats["streams_open"] == 3


async def test_identity_formed_after_connect(env: SseEnv) -> None:
    await seed_attacker(env.store, A)  # no identity yet
    r = Reader(await env.open(A))
    frames = await r.frames(3)
    assert parse(frames[2])["data"]["identity_uuid"] is None
    ident = "f" * 32
    changed = {"identity_uuid": ident, "primitive": "p", "new_state": "stable", "ts": 1.0}
    # not known yet: dropped
    await env.publish(topics.ATTRIBUTION_PROFILE_STATE_CHANGED, changed, "profile.state_changed")
    await env.publish(
        topics.IDENTITY_FORMED, {"identity_uuid": ident, "attacker_uuid": A, "ts": 1.0}
    )
    await env.publish(topics.ATTRIBUTION_PROFILE_STATE_CHANGED, changed, "profile.state_changed")
    got = parse(await r.event())
    assert got["event"] == "attribution.state_changed"
    assert got["data"]["payload"] == changed
    # the first one was never framed (seq 1 went to identity.formed, framed for the
    # identity stream)
    assert got["id"] == env.eid(2)

    # a merge re-points the attacker to the surviving identity
    survivor = "e" * 32
    await env.publish(
        topics.IDENTITY_MERGED, {"identity_uuid": ident, "merged_into_uuid": survivor}
    )
    await env.publish(
        topics.ATTRIBUTION_PROFILE_STATE_CHANGED,
        dict(changed, identity_uuid=survivor),
        "profile.state_changed",
    )
    got = parse(await r.event())
    assert got["data"]["payload"]["identity_uuid"] == survivor
    assert env.hub.stats()["identities"] == 1


async def test_identity_from_attacker_uuids(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    r = Reader(await env.open(A))
    await r.frames(3)
    ident = "d" * 32
    updated = {"identity_uuid": ident, "attacker_uuids": [A, B], "primitive": "p", "ts": 1.0}
    await env.publish(topics.ATTRIBUTION_PROFILE_UPDATED, updated, "profile.updated")
    assert parse(await r.event())["event"] == "attribution.updated"
    # ...and from now on the identity alone routes to A
    multi = {"identity_uuid": ident, "primitives": ["a", "b"], "ts": 2.0}
    await env.publish(
        topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED, multi, "profile.multi_actor_suspected"
    )
    got = parse(await r.event())
    assert got["event"] == "attribution.multi_actor_suspected"
    assert got["data"] == {
        "topic": "attribution.profile.multi_actor_suspected",
        "type": "profile.multi_actor_suspected",
        "ts": 1.7e9,
        "payload": multi,
    }


async def test_snapshot_identity_from_the_store_routes_attribution(env: SseEnv) -> None:
    ident = await seed_attacker(env.store, A, identity=True)
    r = Reader(await env.open(A))
    await r.frames(3)
    payload = {"identity_uuid": ident, "primitive": "p", "new_state": "stable", "ts": 1.0}
    await env.publish(topics.ATTRIBUTION_PROFILE_STATE_CHANGED, payload, "profile.state_changed")
    assert parse(await r.event())["data"]["payload"]["identity_uuid"] == ident


async def test_store_failure_is_503_before_headers(
    env: SseEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from decnet_attr.store import StoreError

    async def broken(uuid: str) -> None:
        raise StoreError("database is locked")

    monkeypatch.setattr(env.store, "get_attacker", broken)
    resp = await env.open(A)
    assert resp.status == 503
    assert await resp.json() == {"detail": "Store unavailable"}
    stats = env.hub.stats()
    assert stats["streams_open"] == 0 and stats["users"] == 0 and stats["handlers"] == 0


async def test_head_answers_headers_only(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    resp = await env.client.head(f"/api/v1/attackers/{A}/events", headers={"X-Test-User": "a"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert await resp.read() == b""
    assert env.hub.stats()["streams_open"] == 0


async def test_closed_stream_frees_its_slot_at_once(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A page reload: the client closes a stream and opens the next one at once.
    The closing connection must not count against the cap (the housekeeping
    tick that notices closed transports runs only every second here)."""
    env = await make_env(aiohttp_client, tmp_path, sse_max_per_user=3, sse_keepalive=15.0)
    await seed_attacker(env.store, A)
    streams = [await env.open(A) for _ in range(3)]
    assert [r.status for r in streams] == [200, 200, 200]
    for r in streams:
        await Reader(r).frames(1)
    assert (await env.open(A)).status == 429
    for round_ in range(3):  # reload after reload
        streams[0].close()
        again = await env.open(A)
        assert again.status == 200, (round_, await again.text())
        streams = [*streams[1:], again]
        await Reader(again).frames(1)
    assert env.hub.stats()["streams_open"] == 3
    for r in streams:
        r.close()

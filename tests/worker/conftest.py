"""Fixtures and helpers for the worker tests against real servers:
``nats-server`` (JetStream) and PostgreSQL, in-process workers and
``decnet-attr worker`` subprocesses.

Everything listens on 127.0.0.1; servers and subprocesses are always killed
at teardown. Tests that need a server are skipped (with a message) only when
its binary is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.bus import Bus, BusUnavailable, Event, get_bus
from decnet_attr.bus.nats import NatsBus
from decnet_attr.config import Settings
from decnet_attr.registry import value_kind_for
from decnet_attr.store import Store, open_store
from decnet_attr.topics import OBSERVATION_PATTERN, attacker_observation
from decnet_attr.worker import AttributionWorker
from tests.natsserver import NatsServer, nats_server_path
from tests.pgserver import PgServer, pg_bin_dir, pg_server  # noqa: F401  (session fixture)
from tests.worker.helpers import mk_obs, own_hash, query

STREAM = "DECNET_OBSERVATIONS"
DURABLE = "attribution"

P_ALT1 = "motor.input_modality"  # categorical, alternates -> multi_actor
P_ALT2 = "environmental.shell_type"  # categorical, alternates -> multi_actor
P_DRIFT = "motor.keystroke_cadence"  # categorical, x...x y...y (never multi_actor)
P_HASH = "motor.digraph_simhash"  # hash
P_NUM = "toolchain.c2.beacon_interval_ms"  # numeric

assert value_kind_for(P_HASH) == "hash" and value_kind_for(P_NUM) == "numeric"


def need_nats() -> None:
    if nats_server_path() is None:
        pytest.skip("nats-server not installed (Debian package nats-server)")


def need_postgres() -> None:
    if pg_bin_dir() is None:
        pytest.skip("postgresql not installed (Debian package postgresql)")


# ---- servers -------------------------------------------------------------------------------


@pytest.fixture
def nats_srv() -> Iterator[NatsServer]:
    """A fresh nats-server -js on 127.0.0.1 (private store dir) per test."""
    need_nats()
    with NatsServer() as srv:
        yield srv


@pytest.fixture
def nats_srv_big(tmp_path: Path) -> Iterator[NatsServer]:
    """nats-server with max_payload raised to 16 MiB (default: 1 MiB)."""
    need_nats()
    conf = tmp_path / "nats-big.conf"
    conf.write_text("max_payload: 16777216\n")
    with NatsServer(extra_args=("-c", str(conf))) as srv:
        yield srv


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh database on the session-wide PostgreSQL server."""
    need_postgres()
    srv: PgServer = request.getfixturevalue("pg_server")
    dsn = await srv.create_database()
    try:
        yield dsn
    finally:
        with contextlib.suppress(Exception):
            await srv.drop_database(dsn)


# ---- clients -------------------------------------------------------------------------------

NatsBusFactory = Callable[..., Awaitable[NatsBus]]
StoreFactory = Callable[[str], Awaitable[Store]]


@pytest.fixture
async def make_nats_bus() -> AsyncIterator[NatsBusFactory]:
    """Connected NatsBus instances with fast reconnects; all closed at teardown."""
    buses: list[NatsBus] = []

    async def make(url: str, **kw: Any) -> NatsBus:
        options: dict[str, Any] = {
            "reconnect_time_wait": 0.1,
            "connect_timeout": 5.0,
            "request_timeout": 2.0,
        }
        options.update(kw)
        bus = NatsBus(url, **options)
        buses.append(bus)
        await bus.connect()
        return bus

    try:
        yield make
    finally:
        for bus in reversed(buses):
            with contextlib.suppress(Exception):
                await bus.close()


@pytest.fixture
async def make_store() -> AsyncIterator[StoreFactory]:
    """Opened stores (own pools / connections); all closed at teardown."""
    stores: list[Store] = []

    async def make(url: str) -> Store:
        st = open_store(url)
        await st.open()
        stores.append(st)
        return st

    try:
        yield make
    finally:
        for st in reversed(stores):
            with contextlib.suppress(Exception):
                await st.close()


@pytest.fixture
async def workers() -> AsyncIterator[list[AttributionWorker]]:
    """Append started in-process workers here: they are stopped at teardown."""
    started: list[AttributionWorker] = []
    try:
        yield started
    finally:
        for w in started:
            with contextlib.suppress(Exception):
                await w.stop(timeout=5.0)


def worker_settings(tmp_path: Path, bus_url: str, db_url: str = "", **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "bus_url": bus_url,
        "db_url": db_url,
        "heartbeat_interval": 0.5,
        "multi_actor_tick": 3600.0,  # only the batch path fires multi-actor alerts
        "batch_delay": 0.005,
    }
    base.update(kw)
    return Settings(**base)


# ---- decnet-attr worker subprocesses --------------------------------------------------------


def decnet_attr_command() -> list[str]:
    script = Path(sys.executable).with_name("decnet-attr")
    if script.is_file():
        return [str(script)]
    found = shutil.which("decnet-attr")
    if found:
        return [found]
    return [sys.executable, "-m", "decnet_attr.cli"]


class WorkerProcess:
    """``decnet-attr worker`` as a real subprocess (own process group)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [*decnet_attr_command(), "worker"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker pid {self.proc.pid} still running after {timeout}s\n{self.log()}"
                )
            await asyncio.sleep(0.02)
        return int(self.proc.returncode)

    async def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait(10.0)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn_worker(bus_url=..., db_url=..., data_dir=...)`` starts a
    ``decnet-attr worker`` with a clean ``DECNET_ATTR_*`` environment."""
    procs: list[WorkerProcess] = []

    def spawn(
        *, bus_url: str, db_url: str = "", data_dir: Path | None = None, **extra: str
    ) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DECNET_ATTR_")}
        env.update(
            {
                "DECNET_ATTR_BUS_URL": bus_url,
                "DECNET_ATTR_DATA_DIR": str(data_dir or tmp_path / "data"),
                "DECNET_ATTR_MULTI_ACTOR_TICK": "3600",
                "DECNET_ATTR_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if db_url:
            env["DECNET_ATTR_DB_URL"] = db_url
        env.update(extra)
        wp = WorkerProcess(env, tmp_path / f"worker-{len(procs)}.log")
        procs.append(wp)
        return wp.start()

    try:
        yield spawn
    finally:
        for wp in procs:
            wp.cleanup()


# ---- JetStream introspection ---------------------------------------------------------------


async def consumer_info(bus: NatsBus, durable: str = DURABLE) -> Any:
    js = bus._js
    assert js is not None
    return await js.consumer_info(STREAM, durable)


async def consumer_drained(bus: NatsBus, durable: str = DURABLE) -> bool:
    """Nothing left to deliver and nothing delivered-but-unacked."""
    try:
        info = await consumer_info(bus, durable)
    except Exception:
        return False
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def set_ack_wait(
    bus: NatsBus, seconds: float, *, expect_current: float | None = None, timeout: float = 15.0
) -> None:
    """Shorten the durable's ack_wait from outside.

    ``decnet-attr worker`` has no setting for it and (re)creates the durable
    with NatsBus' default (30 s) when it binds, so a SIGKILLed worker's
    in-flight messages would only come back after 30 s. With
    ``expect_current`` this first waits until the (re)started worker has
    bound (the durable shows that value), so it cannot overwrite ours.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await consumer_info(bus)
            if expect_current is None or abs(info.config.ack_wait - expect_current) < 1e-6:
                break
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the worker never bound its durable consumer")
        await asyncio.sleep(0.05)
    cfg = info.config
    cfg.ack_wait = seconds
    js = bus._js
    assert js is not None
    await js.add_consumer(STREAM, config=cfg)


# ---- events --------------------------------------------------------------------------------


class Collector:
    """Collects fan-out events matching *pattern* in a background task."""

    def __init__(self, bus: Bus, pattern: str) -> None:
        self.bus = bus
        self.pattern = pattern
        self.events: list[Event] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        sub = self.bus.subscribe(self.pattern)
        await sub.__aenter__()
        wait_ready = getattr(sub, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready(5.0)

        async def run() -> None:
            try:
                async for ev in sub:
                    self.events.append(ev)
            finally:
                with contextlib.suppress(Exception):
                    await sub.__aexit__(None, None, None)

        self._task = asyncio.create_task(run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def of(self, topic_suffix: str) -> list[Event]:
        return [e for e in self.events if e.topic.endswith(topic_suffix)]


# ---- workload ------------------------------------------------------------------------------


class Workload:
    """A mixed stream of observations over several attackers.

    Per attacker: two alternating categorical primitives of exactly five
    observations each (every ts-sorted subset that is ``multi_actor`` only
    grows into the full, still ``multi_actor`` series, so the number of
    multi-actor primitives of an identity is monotone 0 -> 1 -> 2 under any
    interleaving: exactly one alert per identity is right), a categorical
    drift series (x…x y…y: never alternating), a hash series and a numeric
    series. All ts inside one series are distinct, so the oracle order is
    well defined whatever the delivery order. ``late`` holds observations
    with older ts than everything in ``main``; ``dup_same_id`` exact
    duplicates (same payload id; half with the same event id, which
    JetStream drops, half with another event id, which the store drops);
    ``dup_evidence`` other ids reusing an (evidence_ref, primitive) already
    stored (published after ``main`` is stored: the store drops them).
    """

    def __init__(
        self,
        n_attackers: int = 6,
        *,
        tag: str = "w",
        both_alternations: int | None = None,
        drift_len: int = 24,
        hash_len: int = 14,
        num_len: int = 20,
    ) -> None:
        self.attackers = [f"{tag}-attacker-{i:02d}" for i in range(n_attackers)]
        both = n_attackers - 1 if both_alternations is None else both_alternations
        self.multi = set(self.attackers[:both])
        self.main: list[dict[str, Any]] = []
        self.late: list[dict[str, Any]] = []
        for i, a in enumerate(self.attackers):
            base = 1_000_000.0 + 10_000.0 * i
            alt = [P_ALT1, P_ALT2] if a in self.multi else [P_ALT1]
            for p, (x, y) in zip(alt, [("typed", "pasted"), ("bash", "zsh")]):
                self.main += [
                    mk_obs(a, p, x if k % 2 == 0 else y, base + 10.0 * k + 0.25) for k in range(5)
                ]
            half = drift_len // 2
            self.main += [
                mk_obs(a, P_DRIFT, "steady" if k < half else "bursty", base + 100.0 + 3.0 * k + 0.5)
                for k in range(drift_len)
            ]
            self.late += [mk_obs(a, P_DRIFT, "steady", base + 100.0 - 1.0 - k) for k in range(3)]
            self.main += [
                mk_obs(a, P_HASH, own_hash(a, (k * 7 + i) % 5), base + 40_000.0 * k + 0.75)
                for k in range(hash_len)
            ]
            self.main += [
                mk_obs(
                    a,
                    P_NUM,
                    1000 + (k % 3) * 10 + (500 if k >= num_len // 2 else 0),
                    base + 200.0 + 2.0 * k,
                )
                for k in range(num_len)
            ]
            self.late += [mk_obs(a, P_NUM, 990 + k, base + 150.0 + k) for k in range(3)]
        self.dup_same_id = [dict(o) for o in self.main[::17]]
        self.dup_evidence = []
        for o in self.main[5::23]:
            copy = mk_obs(o["attacker_uuid"], o["primitive"], o["value"], o["ts"] + 0.001)
            copy["evidence_ref"] = o["evidence_ref"]
            self.dup_evidence.append(copy)

    @property
    def distinct(self) -> list[dict[str, Any]]:
        """The observations that must be stored (and merged) exactly once."""
        return self.main + self.late

    @property
    def ids(self) -> set[str]:
        return {o["id"] for o in self.distinct}


async def publish_durable(
    bus: Bus,
    items: list[dict[str, Any]],
    *,
    concurrency: int = 64,
    event_id: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """JetStream-acked publishes (each returns once the stream stored it)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(o: dict[str, Any]) -> None:
        async with sem:
            eid = event_id(o) if event_id else o["id"]
            await bus.publish_durable(
                attacker_observation(o["primitive"]), o, event_id=eid, timeout=10.0
            )

    await asyncio.gather(*(one(o) for o in items))


async def publish_with_retry(bus: Bus, o: dict[str, Any], *, deadline: float) -> None:
    """A sensor's publish: retry on BusUnavailable with the same event id."""
    while True:
        try:
            await bus.publish_durable(
                attacker_observation(o["primitive"]), o, event_id=o["id"], timeout=2.0
            )
            return
        except BusUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# ---- store assertions ----------------------------------------------------------------------


async def stored_id_counts(store: Store) -> dict[str, int]:
    return {
        r[0]: int(r[1])
        for r in await query(store, "SELECT id, count(*) FROM observations GROUP BY id")
    }


async def stored_count(store: Store) -> int:
    return int((await query(store, "SELECT count(*) FROM observations"))[0][0])


async def wait_until(
    cond: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    diag: Callable[[], Awaitable[str]] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            extra = await diag() if diag else ""
            raise AssertionError(f"{what}: not reached within {timeout}s {extra}")
        await asyncio.sleep(0.05)


async def assert_stored_exactly_once(
    store: Store, wl_ids: set[str], not_stored: frozenset[str] | set[str] = frozenset()
) -> None:
    counts = await stored_id_counts(store)
    missing = wl_ids - set(counts)
    assert not missing, f"{len(missing)} observations lost, e.g. {sorted(missing)[:5]}"
    extra = set(counts) - wl_ids
    assert not extra, f"unexpected stored ids {sorted(extra)[:5]}"
    assert all(n == 1 for n in counts.values())
    assert not (set(counts) & set(not_stored))
    # the (evidence_ref, primitive) guard too
    dup_ev = await query(
        store,
        "SELECT evidence_ref, primitive, count(*) FROM observations "
        "GROUP BY evidence_ref, primitive HAVING count(*) > 1",
    )
    assert dup_ev == []


async def assert_states_equal_oracle(
    store: Store, observations: list[dict[str, Any]], attackers: list[str]
) -> None:
    from tests import oracle
    from tests.worker.helpers import oracle_states, stored_states

    want = oracle_states(observations)
    got = await stored_states(store, attackers)
    assert set(got) == set(want), (
        sorted(set(want) - set(got))[:5],
        sorted(set(got) - set(want))[:5],
    )
    bad = [
        (
            key,
            (got[key].state, got[key].observation_count, got[key].current_value),
            (st.state, st.observation_count, st.current_value),
        )
        for key, st in sorted(want.items())
        if not oracle.same(got[key], st)
    ]
    assert not bad, f"{len(bad)} states differ from the oracle: {bad[:5]}"


async def assert_one_identity_per_attacker(store: Store, attackers: list[str]) -> dict[str, str]:
    rows = await query(store, "SELECT uuid, identity_id FROM attackers ORDER BY uuid")
    ident = {r[0]: r[1] for r in rows}
    assert sorted(ident) == sorted(attackers)
    assert all(ident[a] for a in attackers)
    assert len(set(ident.values())) == len(attackers)
    n_identities = (await query(store, "SELECT count(*) FROM attacker_identities"))[0][0]
    assert n_identities == len(attackers), "losing stub identities are deleted"
    return ident


__all__ = [
    "DURABLE",
    "OBSERVATION_PATTERN",
    "STREAM",
    "Collector",
    "WorkerProcess",
    "Workload",
    "assert_one_identity_per_attacker",
    "assert_states_equal_oracle",
    "assert_stored_exactly_once",
    "consumer_drained",
    "consumer_info",
    "publish_durable",
    "publish_with_retry",
    "set_ack_wait",
    "stored_count",
    "stored_id_counts",
    "wait_until",
    "worker_settings",
]


# ---- the in-process worker (each test module gives its own ``settings``) ---------------


@pytest.fixture
async def store(settings: Settings) -> Any:
    st = open_store(settings.store_url)
    await st.open()
    yield st
    await st.close()


@pytest.fixture
async def bus() -> Any:
    b = get_bus("memory://")
    await b.connect()
    yield b
    await b.close()


@pytest.fixture
async def worker(settings: Settings, bus: Bus, store: Store) -> Any:
    w = AttributionWorker(settings, bus, store)
    await w.start()
    yield w
    await w.stop()

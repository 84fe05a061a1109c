"""Every series ``/metrics`` exposes, by name and type.

Dashboards and alerts are written against these names, so the list below is
the contract: recorded from the app as it was before its metrics moved into
the components that own them, and kept green since. A series added on
purpose is added here; one renamed or gone is a breaking change.

Four views: a running app with the attribution worker (in-process bus), one
without it, and apps (not started) on the NATS and Unix-socket transports,
whose buses count more things, with a connection guard installed as
``make_runner`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from decnet_attr.server.app import BUS, create_app
from decnet_attr.server.connections import CONNECTIONS, ConnectionGuard
from decnet_attr.server.ops import OPS
from tests.server.conftest import Harness, fast_passwords, make_settings
from tests.server.test_ops import make_worker_harness, scrape, wh  # noqa: F401  (fixtures)

#: name -> type of every family, whatever the app runs
COMMON = {
    "decnet_attr_info": "gauge",
    "decnet_attr_api_auth_failures": "counter",
    "decnet_attr_api_http_5xx": "counter",
    "decnet_attr_api_ingest_unavailable": "counter",
    "decnet_attr_api_login_failures": "counter",
    "decnet_attr_api_logins": "counter",
    "decnet_attr_api_observations_accepted": "counter",
    "decnet_attr_api_observations_duplicate_by_sensor": "counter",
    "decnet_attr_api_observations_rejected": "counter",
    "decnet_attr_api_rate_limited": "counter",
    "decnet_attr_api_tickets_minted": "counter",
    "decnet_attr_api_tickets_redeemed": "counter",
    "decnet_attr_http_requests": "counter",
    "decnet_attr_bus_connected": "gauge",
    "decnet_attr_bus_delivered": "counter",
    "decnet_attr_bus_dropped": "counter",
    "decnet_attr_bus_durable_acked": "counter",
    "decnet_attr_bus_durable_consumers": "gauge",
    "decnet_attr_bus_durable_delivered": "counter",
    "decnet_attr_bus_durable_pending": "gauge",
    "decnet_attr_bus_durable_published": "counter",
    "decnet_attr_bus_published": "counter",
    "decnet_attr_bus_reconnects": "counter",
    "decnet_attr_bus_subscriptions": "gauge",
    "decnet_attr_sse_bad_events": "counter",
    "decnet_attr_sse_bus_connected": "gauge",
    "decnet_attr_sse_bus_resubscribes": "counter",
    "decnet_attr_sse_channels": "gauge",
    "decnet_attr_sse_events_dropped": "counter",
    "decnet_attr_sse_events_in": "counter",
    "decnet_attr_sse_events_routed": "counter",
    "decnet_attr_sse_events_sent": "counter",
    "decnet_attr_sse_gaps": "counter",
    "decnet_attr_sse_handlers": "gauge",
    "decnet_attr_sse_identities": "gauge",
    "decnet_attr_sse_overview_frames": "counter",
    "decnet_attr_sse_rejected_cap": "counter",
    "decnet_attr_sse_resumes": "counter",
    "decnet_attr_sse_resyncs": "counter",
    "decnet_attr_sse_snapshots": "counter",
    "decnet_attr_sse_stale": "counter",
    "decnet_attr_sse_streams_closed": "counter",
    "decnet_attr_sse_streams": "counter",
    "decnet_attr_sse_streams_open": "gauge",
    "decnet_attr_sse_users": "gauge",
    "process_cpu_seconds": "counter",
    "process_max_fds": "gauge",
    "process_open_fds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_virtual_memory_bytes": "gauge",
}
#: API counters that show once something counted them
COUNTED_LATER = {
    "decnet_attr_api_ingest_backpressure": "counter",
    "decnet_attr_api_ingest_inflight": "gauge",
    "decnet_attr_api_observations_duplicate": "counter",
}
#: the in-process bus's own. The ingest journal's backlog came after the
#: list was recorded: a level, so a gauge (the old mapping would have made
#: every unknown key a counter, ``decnet_attr_bus_journal_backlog_total``).
MEMORY_BUS = {
    "decnet_attr_bus_durable_dropped": "counter",
    "decnet_attr_bus_durable_redelivered": "counter",
    "decnet_attr_bus_journal_backlog": "gauge",
}
#: the attribution worker's, when it runs in the process
WORKER = {
    "decnet_attr_engine_keys": "gauge",
    "decnet_attr_worker_attackers_observed": "counter",
    "decnet_attr_worker_batch_failures": "counter",
    "decnet_attr_worker_batch_size": "histogram",
    "decnet_attr_worker_batches": "counter",
    "decnet_attr_worker_events_published": "counter",
    "decnet_attr_worker_heartbeat_age_seconds": "gauge",
    "decnet_attr_worker_identities_formed": "counter",
    "decnet_attr_worker_identities_merged": "counter",
    "decnet_attr_worker_identities_unmerged": "counter",
    "decnet_attr_worker_lag_seconds": "gauge",
    "decnet_attr_worker_last_batch_timestamp_seconds": "gauge",
    "decnet_attr_worker_merge_seconds": "histogram",
    "decnet_attr_worker_multi_actor_suspected": "counter",
    "decnet_attr_worker_observations_dead_lettered": "counter",
    "decnet_attr_worker_observations_duplicate": "counter",
    "decnet_attr_worker_observations_merged": "counter",
    "decnet_attr_worker_observations_pending_merged": "counter",
    "decnet_attr_worker_observations_received": "counter",
    "decnet_attr_worker_observations_redelivered": "counter",
    "decnet_attr_worker_observations_rejected": "counter",
    "decnet_attr_worker_running": "gauge",
    "decnet_attr_worker_state_changes": "counter",
}
#: a worker that has not merged a batch yet has no last-batch time
BEFORE_FIRST_BATCH = {"decnet_attr_worker_last_batch_timestamp_seconds"}
#: nor a heartbeat before it started
BEFORE_START = {*BEFORE_FIRST_BATCH, "decnet_attr_worker_heartbeat_age_seconds"}
STORE = {"decnet_attr_store_dead_letters": "gauge"}
NATS_BUS = {
    "decnet_attr_bus_disconnects": "counter",
    "decnet_attr_bus_durable_duplicates": "counter",
    "decnet_attr_bus_invalid": "counter",
}
UNIX_BUS = {
    "decnet_attr_bus_disconnects": "counter",
    "decnet_attr_bus_durable_dropped": "counter",
    "decnet_attr_bus_durable_redelivered": "counter",
    "decnet_attr_bus_malformed": "counter",
    "decnet_attr_bus_oversized": "counter",
    "decnet_attr_bus_outbox_dropped": "counter",
    "decnet_attr_bus_outbox_pending": "gauge",
    "decnet_attr_bus_received": "counter",
}
CONNECTION_GUARD = {
    "decnet_attr_http_connections_open": "gauge",
    "decnet_attr_http_connections_max": "gauge",
    "decnet_attr_http_connections_refused": "counter",
    "decnet_attr_http_connections_header_timeouts": "counter",
}

#: sample-name suffixes per family type (the text format's series names)
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
}
#: labelled families: no series until a first label value is counted
LABELLED = {"decnet_attr_http_requests", "decnet_attr_api_observations_duplicate_by_sensor"}
#: the process collector's series that exist only on some platforms
OPTIONAL = {"process_max_fds", "process_open_fds"}


def series_names(families: dict[str, str]) -> set[str]:
    return {f"{name}{suffix}" for name, typ in families.items() for suffix in SUFFIXES[typ]}


def parse(text: str) -> tuple[dict[str, str], set[str]]:
    """(family name -> type, every sample name) of a scrape."""
    types: dict[str, str] = {}
    samples: set[str] = set()
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        samples.update(s.name for s in family.samples)
    return types, samples


def check(text: str, expected: dict[str, str], *, unlabelled: set[str] = LABELLED) -> None:
    """The scrape has exactly the *expected* families and their series;
    the *unlabelled* families have no series yet."""
    types, samples = parse(text)
    for name in OPTIONAL:
        if name not in types:
            expected = {k: v for k, v in expected.items() if k != name}
    missing = sorted(set(expected) - set(types))
    extra = sorted(set(types) - set(expected))
    assert (missing, extra) == ([], [])
    assert types == expected
    assert samples == series_names({k: v for k, v in expected.items() if k not in unlabelled})


async def test_a_running_app_with_its_worker(wh: Harness) -> None:  # noqa: F811
    s = await scrape(wh.client)
    expected = {**COMMON, **MEMORY_BUS, **WORKER, **STORE}
    check(s.text, {k: v for k, v in expected.items() if k not in BEFORE_FIRST_BATCH})
    token = await wh.token("names-sensor", "sensor")
    item = {"attacker_uuid": "att-names", "primitive": "environmental.shell_type"}
    for _ in range(2):  # the second time, a duplicate
        resp = await wh.client.post(
            "/api/v1/observations",
            json=[{**item, "value": "bash", "ts": 1_700_000_000.0, "id": "names-1"}],
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status == 202
    # a 503 for back-pressure adds its key the first time (as the ingest route does)
    wh.counters["ingest_backpressure_total"] = wh.counters.get("ingest_backpressure_total", 0) + 1
    check((await scrape(wh.client)).text, {**expected, **COUNTED_LATER}, unlabelled=set())


async def test_a_running_app_without_a_worker(harness: Harness) -> None:
    s = await scrape(harness.client)
    check(s.text, {**COMMON, **MEMORY_BUS, **STORE})


def unstarted(tmp_path: Path, bus_url: str) -> Any:
    settings = make_settings(tmp_path / "data", worker=True, bus_url=bus_url)
    app = create_app(settings, worker=True, passwords=fast_passwords())
    app[CONNECTIONS] = ConnectionGuard.from_settings(settings, 4096)
    return app


def test_an_app_on_nats(tmp_path: Path) -> None:
    app = unstarted(tmp_path, "nats://127.0.0.1:1")
    text = generate_latest(app[OPS].registry).decode()
    expected = {**COMMON, **NATS_BUS, **WORKER, **CONNECTION_GUARD}
    check(text, {k: v for k, v in expected.items() if k not in BEFORE_START})


def test_an_app_on_decnets_unix_bus(tmp_path: Path) -> None:
    app = unstarted(tmp_path, f"unix://{tmp_path}/bus.sock")
    text = generate_latest(app[OPS].registry).decode()
    expected = {**COMMON, **UNIX_BUS, **WORKER, **CONNECTION_GUARD}
    check(text, {k: v for k, v in expected.items() if k not in BEFORE_START})


def test_every_statistic_is_declared_where_it_is_counted(tmp_path: Path) -> None:
    """A component's ``stats()`` keys all have a declaration (kind and help)
    in the component's metrics module, so none falls back to a guess."""
    from decnet_attr.bus import metrics as bus_metrics
    from decnet_attr.server import api_metrics, sse_metrics
    from decnet_attr.server.app import COUNTER_NAMES, SSE_HUB

    for url in ("memory://", "nats://127.0.0.1:1", f"unix://{tmp_path}/bus.sock"):
        app = unstarted(tmp_path, url)
        assert set(app[BUS].stats()) <= set(bus_metrics.STATS), url
    hub = app[SSE_HUB]
    assert isinstance(hub, sse_metrics.HasStats)
    keys = {k for k in hub.stats() if not k.startswith(sse_metrics.CLOSED_PREFIX)}
    assert keys <= set(sse_metrics.STATS)
    assert set(COUNTER_NAMES) <= set(api_metrics.API_STATS)
    guard = app[CONNECTIONS]
    assert set(guard.stats()) <= set(api_metrics.CONNECTION_STATS)

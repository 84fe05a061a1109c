"""``decnet-attr bench``: the sizing rule, and a bounded run end to end."""

from __future__ import annotations

import json

import pytest

from decnet_attr.benchkit import HEADROOM, Sample, recommend
from decnet_attr.cli import main


def s(what: str, batch: int, rate: float) -> Sample:
    return Sample(what, batch, 1, rate, 1.0, 2.0, 10)


def test_recommend_fewest_workers_then_smallest_batch() -> None:
    samples = [
        s("engine", 100, 1e6),  # the engine alone is an upper bound, not a deployment
        s("embedded", 100, 10_000),
        s("embedded", 1000, 20_000),
        s("embedded", 5000, 21_000),
    ]
    rec = recommend(samples, 10_000, cores=2)
    # 1000: 20k * 0.6 = 12k >= 10k with one worker; 5000 is no better
    assert (rec["batch_max"], rec["workers"], rec["deployment"]) == (1000, 1, "embedded")
    rec = recommend(samples, 30_000, cores=2)
    assert rec["workers"] == -(-30_000 // int(21_000 * HEADROOM)) == 3
    # 1000 and 5000 both need three: the smaller batch (lower latency) wins
    assert rec["batch_max"] == 1000 and not rec["fits_this_machine"]


def test_bench_bounded_run(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--seconds", "0.2", "--events", "600", "--batch-sizes", "50,300"]
    assert main([*argv, "--keys", "2000", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kinds = {(x["what"], x["batch"], x["workers"]) for x in out["samples"]}
    assert {
        ("engine", 50, 1),
        ("engine", 300, 1),
        ("embedded", 50, 1),
        ("embedded", 300, 1),
    } <= kinds
    assert all(x["obs_per_s"] > 0 and x["calls"] > 0 for x in out["samples"])
    assert out["external"] != "measured"  # no NATS/PostgreSQL configured here
    assert out["recommendation"]["batch_max"] in (50, 300)
    assert main(["bench", "--batch-sizes", "0"]) == 2


async def test_pipeline_on_nats_and_postgres() -> None:
    from decnet_attr.benchkit import measure_pipeline
    from tests.natsserver import NatsServer, nats_server_path
    from tests.pgserver import PgServer, pg_bin_dir

    if nats_server_path() is None or pg_bin_dir() is None:
        pytest.skip("nats-server or postgresql not installed")
    with NatsServer() as nats, PgServer() as pg:
        dsn = await pg.create_database()
        sample = await measure_pipeline(200, 400, bus_url=nats.url, db_url=dsn)
    assert sample.what == "NATS+PostgreSQL" and sample.obs_per_s > 0 and sample.calls == 2

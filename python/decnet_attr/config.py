"""Configuration: one frozen settings object, built once at start-up from
``DECNET_ATTR_*`` environment variables and command-line flags (flags win).
Nothing reads ``os.environ`` after that.

Every field has an environment variable: ``DECNET_ATTR_<FIELD>`` upper-cased
(``bus_url`` → ``DECNET_ATTR_BUS_URL``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "DECNET_ATTR_"
#: A browser origin: scheme, host and optional port, nothing else.
_ORIGIN_RE = re.compile(r"^https?://(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


class ConfigError(ValueError):
    """A setting has an invalid value."""


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in {"1", "true", "yes", "on"}:
        return True
    if s in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _json_object(name: str, text: str) -> dict[str, Any]:
    """A setting holding a JSON object (empty: ``{}``); :class:`ConfigError`
    otherwise."""
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object")
    return value


#: The smallest per-subscriber queue of a bus built from the settings.
SUBSCRIBER_QUEUE_MIN = 1024


@dataclass(frozen=True)
class Settings:
    # --- where ------------------------------------------------------------
    data_dir: Path = field(
        default=Path(".decnet-attr"), metadata={"help": "data directory (SQLite file, JWT secret)"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP listen address"})
    port: int = field(default=8080, metadata={"help": "HTTP port"})
    bus_url: str = field(
        default="memory://",
        metadata={
            "help": "memory://, nats://host:port or unix:///run/decnet/bus.sock (DECNET's bus)"
        },
    )
    db_url: str = field(
        default="", metadata={"help": "postgresql://… (default: SQLite file in the data directory)"}
    )
    # --- connections ------------------------------------------------------
    max_connections: int = field(
        default=4096,
        metadata={"help": "open HTTP connections at most (kept below the file limit)"},
    )
    max_connections_per_ip: int = field(
        default=64, metadata={"help": "open HTTP connections at most from one address"}
    )
    http_header_timeout: float = field(
        default=10.0, metadata={"help": "seconds a new connection has to send a request head"}
    )
    http_keepalive_timeout: float = field(
        default=30.0, metadata={"help": "seconds an idle keep-alive connection stays open"}
    )
    dead_peer_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds before a vanished peer's connection is dropped (TCP)"},
    )
    # --- auth -------------------------------------------------------------
    jwt_secret: str = field(
        default="",
        metadata={
            "help": "HS256 secret, >= 32 chars (default: generated into the data directory)",
            "secret": True,
        },
    )
    jwt_exp_minutes: int = field(default=240, metadata={"help": "access token lifetime"})
    jwt_issuer: str = "decnet"
    jwt_audience: str = "decnet-dashboard"
    login_rate: int = field(
        default=10,
        metadata={
            "help": "failed logins per login_window per address, and per username "
            "(the latter only for addresses that failed too)"
        },
    )
    login_window: float = 300.0
    login_backoff_base: float = field(
        default=1.0,
        metadata={"help": "first back-off (s) of an address x username after 3 failures; doubles"},
    )
    login_backoff_max: float = field(
        default=900.0, metadata={"help": "longest back-off (s) of an address x username"}
    )
    ticket_rate: int = field(default=30, metadata={"help": "SSE tickets per minute per user"})
    ticket_ttl: float = 60.0
    max_tickets_per_user: int = 10
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "comma-separated origins allowed to call the API from a browser "
            "(CORS; default: none), e.g. http://localhost:5173"
        },
    )
    trust_forwarded_for: bool = field(
        default=False, metadata={"help": "use X-Forwarded-For for rate limits (behind a proxy)"}
    )
    # --- SSE --------------------------------------------------------------
    sse_max_per_user: int = field(default=5, metadata={"help": "concurrent streams per user"})
    sse_keepalive: float = 15.0
    sse_queue_size: int = 256
    sse_resume_buffer: int = field(
        default=512, metadata={"help": "events kept per attacker for Last-Event-ID resume"}
    )
    sse_retry_ms: int = 3000
    sse_write_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds a stream may wait for its client to read before it closes"},
    )
    # --- ingest -----------------------------------------------------------
    max_body_bytes: int = field(
        default=8 * 1024 * 1024, metadata={"help": "largest POST /observations body"}
    )
    max_batch_items: int = 10_000
    max_value_bytes: int = 8192
    ts_min: float = field(
        default=0.0, metadata={"help": "oldest accepted observation ts (epoch seconds)"}
    )
    ts_max_ahead: float = field(
        default=86_400.0,
        metadata={"help": "how far (s) an observation ts may lie in the future; 0: no limit"},
    )
    dedupe_window: int = field(
        default=2_000_000,
        metadata={
            "help": "SQLite: newest observations remembered for exactly-once admission "
            "(about 170 bytes each)"
        },
    )
    ingest_queue_max: int = field(
        default=50_000,
        metadata={"help": "observations accepted but not yet committed before ingest answers 503"},
    )
    ingest_journal: bool = field(
        default=True,
        metadata={
            "help": "in-process bus: keep an ingest journal in the data dir and answer 202 "
            "once a body is written there, before the worker merges it; off: 202 after the "
            "worker's commit"
        },
    )
    journal_fsync: bool = field(
        default=False,
        metadata={"help": "fsync the ingest journal before each 202 (survives power loss)"},
    )
    partitions: int = field(
        default=1,
        metadata={
            "help": "ingest partitions: the API splits bodies by attacker over this many "
            "subjects (attacker.ingest.<k>), one owner worker each; 1: no split"
        },
    )
    # --- worker -----------------------------------------------------------
    worker_partitions: str = field(
        default="all",
        metadata={"help": "ingest partitions this worker consumes: all, or e.g. 0,2"},
    )
    worker: bool = field(default=True, metadata={"help": "run the attribution worker inside serve"})
    worker_name: str = "attribution"
    durable_name: str = "attribution"
    worker_lanes: int = field(
        default=2,
        metadata={
            "help": "shared store (PostgreSQL): transactions a large batch is cut into by "
            "identity, run side by side; 1: one"
        },
    )
    batch_max: int = field(default=8000, metadata={"help": "largest worker micro-batch"})
    batch_delay: float = field(
        default=0.0,
        metadata={
            "help": "extra wait to fill a micro-batch (s); batches also fill while the "
            "previous one commits"
        },
    )
    ack_wait: float = field(
        default=30.0, metadata={"help": "seconds before an unacked observation is redelivered"}
    )
    window_checkpoint: float = field(
        default=5.0,
        metadata={
            "help": "embedded store: seconds a changed key's retained window may wait before "
            "it is written (observations since are replayed on load)"
        },
    )
    retention: float = field(
        default=0.0,
        metadata={
            "help": "seconds raw observations are kept (0: forever); states and windows stay"
        },
    )
    retention_interval: float = field(
        default=60.0, metadata={"help": "seconds between retention marks and prune passes"}
    )
    heartbeat_interval: float = 10.0
    multi_actor_tick: float = field(
        default=60.0, metadata={"help": "safety-net multi-actor scan period (s)"}
    )
    thresholds: str = field(
        default="", metadata={"help": 'JSON object of threshold overrides, e.g. {"window_n": 6}'}
    )
    clustering: bool = field(
        default=True,
        metadata={"help": "link attackers that share fingerprints into one identity"},
    )
    cluster: str = field(
        default="",
        metadata={
            "help": "JSON object of clusterer overrides: threshold, max_share, hamming_max, "
            'weights (e.g. {"weights": {"toolchain.tls.ja3_client": 0.5}})'
        },
    )
    # --- logging ----------------------------------------------------------
    log_format: str = field(default="text", metadata={"help": "text or json"})
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port}")
        if self.log_format not in {"text", "json"}:
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if not (self.bus_url.startswith(("memory://", "nats://", "tls://", "unix://"))):
            raise ConfigError(
                f"bus_url must be memory://, nats://… or unix://…, got {self.bus_url!r}"
            )
        if self.db_url and not self.db_url.startswith(
            ("postgresql://", "postgres://", "sqlite://")
        ):
            raise ConfigError(
                f"db_url must be postgresql://… or sqlite:///path, got {self.db_url!r}"
            )
        for name in (
            "batch_max",
            "worker_lanes",
            "sse_max_per_user",
            "sse_queue_size",
            "max_batch_items",
            "login_rate",
            "dedupe_window",
            "partitions",
            "max_connections",
            "max_connections_per_ip",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in (
            "http_header_timeout",
            "http_keepalive_timeout",
            "dead_peer_timeout",
            "sse_write_timeout",
            "login_window",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.thresholds:
            self.threshold_overrides()  # validates
        self.owned_partitions()  # validates
        if self.cluster:
            self.cluster_config()  # validates
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                raise ConfigError(
                    f"cors_origins: {origin!r} is not an origin (scheme://host[:port], "
                    "no path, or *)"
                )

    def owned_partitions(self) -> list[int]:
        """The ingest partitions this worker consumes (none without partitions)."""
        if self.partitions <= 1:
            return []
        text = self.worker_partitions.strip().lower()
        if text in ("", "all"):
            return list(range(self.partitions))
        try:
            owned = sorted({int(part) for part in text.split(",") if part.strip()})
        except ValueError:
            raise ConfigError(
                f"worker_partitions must be all or a list like 0,2; got {self.worker_partitions!r}"
            ) from None
        if not owned or owned[0] < 0 or owned[-1] >= self.partitions:
            raise ConfigError(
                f"worker_partitions must name partitions 0..{self.partitions - 1}; "
                f"got {self.worker_partitions!r}"
            )
        return owned

    # --- derived ------------------------------------------------------------
    @property
    def store_url(self) -> str:
        return self.db_url or f"sqlite://{(self.data_dir / 'attr.db').resolve()}"

    @property
    def shared_store(self) -> bool:
        """True when several processes may write the store (PostgreSQL):
        the worker then reads, under row locks, the rows of the keys it does
        not hold, and writes each row it holds only over the version it
        built on (a row changed meanwhile runs the batch again)."""
        return self.store_url.startswith(("postgresql://", "postgres://"))

    def bus_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`decnet_attr.bus.get_bus`."""
        # a worker batch publishes one event per touched key at once (up to
        # batch_max), before any subscriber gets to run: a subscriber's queue
        # (the SSE relay's) takes two batches' worth without dropping
        options: dict[str, Any] = {
            "ack_wait": self.ack_wait,
            "queue_size": max(SUBSCRIBER_QUEUE_MIN, 2 * self.batch_max),
        }
        if self.ingest_journal and self.in_process_bus:
            options["journal"] = Path(self.data_dir) / "journal"
            options["journal_fsync"] = self.journal_fsync
        return options

    @property
    def in_process_bus(self) -> bool:
        return self.bus_url.strip().lower().startswith("memory:")

    @property
    def ingest_waits_for_merge(self) -> bool:
        """Whether a 202 waits for the worker's commit: the in-process bus
        without its journal (otherwise the journal or NATS takes the body)."""
        return self.in_process_bus and not self.ingest_journal

    def threshold_overrides(self) -> dict[str, Any]:
        return _json_object("thresholds", self.thresholds)

    def cluster_overrides(self) -> dict[str, Any]:
        return _json_object("cluster", self.cluster)

    def cluster_config(self) -> Any:
        """The clusterer's :class:`~decnet_attr.clustering.ClusterConfig`."""
        from decnet_attr.clustering import cluster_config

        try:
            return cluster_config(self.cluster_overrides())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cluster: {exc}") from None

    def make_thresholds(self) -> Any:
        from decnet_attr import DecnetAttrError, Thresholds

        try:
            return Thresholds(**self.threshold_overrides())
        except DecnetAttrError as exc:
            raise ConfigError(f"thresholds: {exc}") from None

    def redacted(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("secret") and v:
                v = "***"
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out

    # --- construction -------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults ← environment ← overrides (CLI flags; None = not given)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = _convert(f, env[key])
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in {f.name for f in fields(cls)}:
                raise ConfigError(f"unknown setting {k!r}")
            values[k] = v
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
        if typ == "bool":
            return _bool(raw)
        if typ == "Path":
            return Path(raw)
        if typ.startswith("tuple"):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        return raw
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from None


def setting_help() -> list[tuple[str, str, str]]:
    """(env var, default, help) for every setting (README / --help)."""
    out = []
    for f in fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else ""
        out.append((ENV_PREFIX + f.name.upper(), str(default), str(f.metadata.get("help", ""))))
    return out

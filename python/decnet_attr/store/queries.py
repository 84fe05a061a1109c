"""The attacker list's query (filters, sorts, one page with its counts) and
the other read queries whose text both backends share. Placeholders are the
dialect's (a ``param(i)`` function) or ``?`` (translated by the dialect)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from decnet_attr.store.models import (
    MULTI_ACTOR_FLAG_MIN,
    STATES,
    USER_UPDATE_FIELDS,
    AttackerFilter,
)
from decnet_attr.store.rows import IDENTITY_FIELDS, OBS_SELECT_COLS

_LIST_SORTS = {"last_seen": "last_seen", "first_seen": "first_seen", "ip": "ip"}
#: The observation count of attacker ``p`` (the list's ``observation_count``).
_EVENT_COUNT = (
    "(SELECT coalesce(sum(o.n), 0) FROM observation_runs o WHERE o.attacker_uuid = {a}.uuid)"
)
#: The list sorts: the attackers-table columns plus ``events`` (most observations first).
LIST_SORTS: tuple[str, ...] = (*_LIST_SORTS, "events")

#: Evidence references of sensor shards: ``shard:<decky>/<service>/<file>#<session>``.
SHARD_REF_PREFIX = "shard:"


def like_pattern(text: str) -> str:
    """``text`` with the LIKE wildcards escaped (use with ``ESCAPE '\\'``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_order(sort: str, descending: bool, alias: str) -> str:
    """``ORDER BY`` of :meth:`Store.list_attackers` (NULL ips last, uuid tie-break;
    ``events``: most observations first, then the latest seen)."""
    d = "DESC" if descending else "ASC"
    if sort == "events":
        return f"{_EVENT_COUNT.format(a=alias)} {d}, {alias}.last_seen {d}, {alias}.uuid {d}"
    if sort not in _LIST_SORTS:
        raise ValueError(f"unknown sort {sort!r}; expected one of {sorted(LIST_SORTS)}")
    col = f"{alias}.{_LIST_SORTS[sort]}"
    nulls_last = f"({col} IS NULL) ASC, " if sort == "ip" else ""
    return f"{nulls_last}{col} {d}, {alias}.uuid {d}"


def _multi_actor_count(a: str) -> str:
    return (
        "(SELECT count(*) FROM attribution_state s "
        f"WHERE s.identity_uuid = {a}.identity_id AND UNINDEXED s.state = 'multi_actor')"
    )


def list_filters(
    param: Callable[[int], str],
    *,
    uuid: str | None = None,
    search: str | None = None,
    service: str | None = None,
    filters: AttackerFilter | None = None,
    in_network: Callable[[Callable[[Any], str], tuple[str, str, str]], str] | None = None,
) -> tuple[str, list[Any]]:
    """``WHERE`` clause (or "") and its parameters for :meth:`Store.list_attackers`:
    an exact attacker uuid; ``search``, a case-insensitive substring of the ip or
    the uuid; ``service``, attackers with an observation from a shard of that
    service; ``filters`` (:class:`AttackerFilter`). Parameters are numbered from 1.
    ``in_network(add, (cidr, first_key, last_key))`` is the dialect's test
    that ``a.ip`` lies in a network (``add(value)`` binds a parameter)."""
    conds: list[str] = []
    params: list[Any] = []

    def add(value: Any) -> str:
        params.append(value)
        return param(len(params))

    def any_of(values: Sequence[Any]) -> str:
        return ", ".join(add(v) for v in values)

    if uuid is not None:
        conds.append(f"a.uuid = {add(uuid)}")
    if search:
        n = add(f"%{like_pattern(search.lower())}%")
        conds.append(f"(lower(a.ip) LIKE {n} ESCAPE '\\' OR lower(a.uuid) LIKE {n} ESCAPE '\\')")
    if service:
        n = add(f"{SHARD_REF_PREFIX}%/{like_pattern(service)}/%")
        conds.append(
            "EXISTS (SELECT 1 FROM observations_by_run o WHERE o.run_attacker = a.uuid "
            f"AND o.evidence_ref LIKE {n} ESCAPE '\\')"
        )
    f = filters or AttackerFilter()
    ip_conds: list[str] = []
    if f.ips:
        ip_conds.append(f"a.ip IN ({any_of(f.ips)})")
    by_length: dict[int, list[str]] = {}
    for prefix in f.ip_prefixes:
        by_length.setdefault(len(prefix), []).append(prefix)
    for length, prefixes in sorted(by_length.items()):
        # the length is an int computed here, never text from the request
        ip_conds.append(f"substr(a.ip, 1, {int(length)}) IN ({any_of(prefixes)})")
    for cidr, lo, hi in f.networks:
        if in_network is None:
            raise ValueError("this store cannot filter by network")
        ip_conds.append(in_network(add, (cidr, lo, hi)))
    if ip_conds:
        conds.append(f"({' OR '.join(ip_conds)})")
    if f.attacker_prefix:
        n = add(f"{like_pattern(f.attacker_prefix.lower())}%")
        conds.append(f"lower(a.uuid) LIKE {n} ESCAPE '\\'")
    if f.identity_prefix:
        n = add(f"{like_pattern(f.identity_prefix.lower())}%")
        conds.append(f"lower(a.identity_id) LIKE {n} ESCAPE '\\'")
    if f.states:
        conds.append(
            "EXISTS (SELECT 1 FROM attribution_state s WHERE s.identity_uuid = a.identity_id "
            f"AND UNINDEXED s.state IN ({any_of(f.states)}))"
        )
    if f.multi_actor is not None:
        op = ">=" if f.multi_actor else "<"
        conds.append(f"{_multi_actor_count('a')} {op} {int(MULTI_ACTOR_FLAG_MIN)}")
    if f.seen_since is not None:
        conds.append(f"a.last_seen >= {add(float(f.seen_since))}")
    return (f"WHERE {' AND '.join(conds)}" if conds else ""), params


def list_attackers_sql(
    sort: str, descending: bool, where: str, limit_param: str, offset_param: str
) -> str:
    """The page, each attacker's observation count and its identity's per-state
    counts, in one query (lookups on the runs' attacker index and the state
    table's primary key, for the page's rows only). ``where``
    comes from :func:`list_filters`. The total is a second, plain ``count(*)``
    with the same ``where``."""
    counts = ",\n".join(
        "    (SELECT count(*) FROM attribution_state s WHERE s.identity_uuid = p.identity_id "
        f"AND UNINDEXED s.state = '{st}') AS c_{st}"
        for st in STATES
    )
    return f"""
WITH page AS (
    SELECT a.uuid, a.ip, a.identity_id, a.first_seen, a.last_seen, a.rotation_count,
           a.last_rotation_at
    FROM attackers a
    {where}
    ORDER BY {list_order(sort, descending, "a")}
    LIMIT {limit_param} OFFSET {offset_param}
)
SELECT p.uuid, p.ip, p.identity_id, p.first_seen, p.last_seen, p.rotation_count,
       p.last_rotation_at,
    {_EVENT_COUNT.format(a="p")} AS n_obs,
{counts}
FROM page p
ORDER BY {list_order(sort, descending, "p")}
"""


#: The fleet's totals for the overview stream: attackers, live (unmerged)
#: identities, then one row per attribution state with its primitive count.
OVERVIEW_TOTALS_SQL = (
    "SELECT (SELECT count(*) FROM attackers), "
    "(SELECT count(*) FROM attacker_identities WHERE merged_into_uuid IS NULL)"
)
OVERVIEW_STATES_SQL = "SELECT state, count(*) FROM attribution_state GROUP BY state"


#: Distinct shard references of some attackers' observations (``{ids}``: placeholders).
EVIDENCE_SQL = (
    "SELECT DISTINCT run_attacker, evidence_ref FROM observations_by_run "
    "WHERE run_attacker IN ({ids}) AND evidence_ref LIKE '" + SHARD_REF_PREFIX + "%' "
    "ORDER BY run_attacker, evidence_ref"
)


def recent_identities_sql(limit_param: str) -> str:
    return (
        f"SELECT {', '.join(IDENTITY_FIELDS)} FROM attacker_identities "
        f"ORDER BY updated_at DESC, uuid DESC LIMIT {limit_param}"
    )


def user_update_sets(fields: dict[str, Any], flag: Callable[[Any], Any]) -> tuple[str, list[Any]]:
    """``SET`` clause (``?`` placeholders) and parameters for
    :meth:`Store.update_user` (names whitelisted; ``flag`` stores a boolean)."""
    unknown = set(fields) - USER_UPDATE_FIELDS - {"updated_at"}
    if unknown:
        raise ValueError(f"cannot update user field(s): {', '.join(sorted(unknown))}")
    values = dict(fields)
    if values.get("updated_at") is None:
        values["updated_at"] = time.time()
    sets: list[str] = []
    params: list[Any] = []
    for name, value in sorted(values.items()):
        sets.append(f"{name} = ?")
        params.append(flag(value) if name in ("must_change_password", "disabled") else value)
    return ", ".join(sets), params


#: The latest observation per primitive of one attacker (ties on ts go to the
#: higher seq): the attacker's rows, found through its runs, numbered by a
#: window function.
LATEST_OBSERVATIONS_SQL = (
    "SELECT primitive, value, confidence, ts, source FROM ("
    "  SELECT primitive, value, confidence, ts, source, row_number() OVER ("
    "    PARTITION BY primitive ORDER BY ts DESC, seq DESC) AS rn "
    "  FROM observations_by_run WHERE run_attacker = ?) AS numbered "
    "WHERE rn = 1 ORDER BY primitive BYTE_ORDER"
)


#: Every observation with an identity, in series order (``recompute``'s scan,
#: read in batches through a cursor).
ALL_OBSERVATIONS_SQL = (
    f"SELECT {OBS_SELECT_COLS}, a.identity_id FROM observations o "
    "JOIN attackers a ON a.uuid = o.attacker_uuid "
    "WHERE a.identity_id IS NOT NULL ORDER BY o.ts, o.seq"
)

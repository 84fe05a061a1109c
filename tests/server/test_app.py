"""The application factory: the route table, the app keys, the middlewares."""

from __future__ import annotations

import ast
from pathlib import Path

from decnet_attr.server import errors
from decnet_attr.server.app import create_app
from tests.server.conftest import make_settings

SERVER_DIR = Path(errors.__file__).parent

#: (method, path, name) of every route, in the order they are matched. The
#: event streams come before ``/api/v1/identities/{uuid}``, which would
#: otherwise answer ``/api/v1/identities/events``.
ROUTES = [
    ("HEAD", "/api/v1/attackers/{uuid}/events", "attacker_events"),
    ("GET", "/api/v1/attackers/{uuid}/events", "attacker_events"),
    ("HEAD", "/api/v1/identities/events", "identity_events"),
    ("GET", "/api/v1/identities/events", "identity_events"),
    ("HEAD", "/api/v1/overview/events", "overview_events"),
    ("GET", "/api/v1/overview/events", "overview_events"),
    ("POST", "/api/v1/auth/login", "auth_login"),
    ("POST", "/api/v1/auth/logout", "auth_logout"),
    ("POST", "/api/v1/auth/change-password", "auth_change_password"),
    ("HEAD", "/api/v1/auth/me", "auth_me"),
    ("GET", "/api/v1/auth/me", "auth_me"),
    ("POST", "/api/v1/auth/sse-ticket", "auth_sse_ticket"),
    ("HEAD", "/api/v1/attackers/{uuid}/attribution", "attacker_attribution"),
    ("GET", "/api/v1/attackers/{uuid}/attribution", "attacker_attribution"),
    ("HEAD", "/api/v1/attackers", "attackers_list"),
    ("GET", "/api/v1/attackers", "attackers_list"),
    ("HEAD", "/api/v1/attackers/{uuid}", "attacker_detail"),
    ("GET", "/api/v1/attackers/{uuid}", "attacker_detail"),
    ("POST", "/api/v1/attackers", "attackers_register"),
    ("HEAD", "/api/v1/identities", "identities_list"),
    ("GET", "/api/v1/identities", "identities_list"),
    ("HEAD", "/api/v1/identities/{uuid}", "identity_detail"),
    ("GET", "/api/v1/identities/{uuid}", "identity_detail"),
    ("HEAD", "/api/v1/identities/{uuid}/observations", "identity_observations"),
    ("GET", "/api/v1/identities/{uuid}/observations", "identity_observations"),
    ("POST", "/api/v1/observations", "ingest_observations"),
    (
        "HEAD",
        "/api/v1/attackers/{uuid}/attribution/{primitive}/explain",
        "attribution_explain",
    ),
    ("GET", "/api/v1/attackers/{uuid}/attribution/{primitive}/explain", "attribution_explain"),
    ("HEAD", "/", "dashboard"),
    ("GET", "/", "dashboard"),
    ("HEAD", "/static/{name}", "dashboard_static"),
    ("GET", "/static/{name}", "dashboard_static"),
    ("HEAD", "/api/v1/dashboard/config", "dashboard_config"),
    ("GET", "/api/v1/dashboard/config", "dashboard_config"),
    ("HEAD", "/healthz", "healthz"),
    ("GET", "/healthz", "healthz"),
    ("HEAD", "/readyz", "readyz"),
    ("GET", "/readyz", "readyz"),
    ("HEAD", "/metrics", "metrics"),
    ("GET", "/metrics", "metrics"),
]


def test_the_route_table(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    got = [
        (r.method, r.resource.canonical if r.resource is not None else None, r.name)
        for r in app.router.routes()
    ]
    assert got == ROUTES


def _app_keys(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, source) of every ``AppKey`` declaration of a module."""
    found = []
    for node in ast.walk(tree):
        value = getattr(node, "value", None)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(value, ast.Call):
            if ast.unparse(value.func).endswith("AppKey"):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_app_keys_are_typed() -> None:
    """No ``AppKey[Any]`` and no ``AppKey(..., object)``: what a key holds
    is its type, for mypy and for the reader."""
    untyped = []
    count = 0
    for path in sorted(SERVER_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for line, source in _app_keys(tree):
            count += 1
            head = source.replace(" ", "")
            if "AppKey[Any]" in head or ",object)" in head or "[object]" in head:
                untyped.append(f"{path.name}:{line}: {source}")
            elif "AppKey[" not in head and head.count(",") == 0:
                untyped.append(f"{path.name}:{line}: {source} (no type)")
    assert count >= 8
    assert untyped == []


def test_errors_has_no_mutable_module_state() -> None:
    """The middlewares take their configuration when they are built; nothing
    in :mod:`errors` is a table other modules fill in at import time."""
    mutable = {
        name: type(value).__name__
        for name, value in vars(errors).items()
        if not name.startswith("__") and isinstance(value, (dict, list, set))
    }
    assert mutable == {}


def test_every_route_module_is_registered() -> None:
    """A module of ``server/routes/`` with a route table is in ``TABLES``
    (else its routes would silently not exist)."""
    import importlib
    import pkgutil

    from decnet_attr.server import routes

    tables = []
    for info in pkgutil.iter_modules(routes.__path__):
        module = importlib.import_module(f"{routes.__name__}.{info.name}")
        table = getattr(module, "routes", None)
        if table is not None:
            tables.append((info.name, table))
    assert len(tables) >= 6
    assert [name for name, table in tables if table not in routes.TABLES] == []
    assert len(routes.TABLES) == len(tables)

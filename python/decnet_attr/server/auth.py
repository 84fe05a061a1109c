"""Authentication and authorisation (docs/decnet.md#auth-tokens to
docs/decnet.md#sse-connection-cap, with docs/decnet.md#sse-ticket-hardening).

- HS256 access tokens (PyJWT) carrying ``uuid, jti, iat, exp, iss, aud,
  typ="access"``; decoding pins ``iss``/``aud``/``typ`` and requires every one
  of them.
- Token resolution, in order: decode (which also refuses a token living
  longer than ``jwt_exp_minutes``, whoever signed it) → the user exists and is
  not disabled → the token has a ``jti`` → ``iat >= tokens_valid_from`` (to
  the microsecond: ``iat`` is issued with sub-second precision, so a token
  issued in the same second as a password change, but before it, is cut off)
  → the ``jti`` is not on the revocation denylist. Any failure: 401
  ``{"detail": "Could not validate credentials"}`` + ``WWW-Authenticate: Bearer``.
- Roles ``admin``, ``viewer``, ``sensor``; a user with
  ``must_change_password`` gets 403 everywhere except change-password,
  logout and me.
- SSE tickets are opaque, single-use, short-lived, stored *hashed* in the
  shared store (so any API process can redeem them), bound to the user, the
  role and the access token that minted them; redemption re-validates all of
  it.
- Passwords are argon2id hashes; hashing and verification run in threads
  (bounded by a semaphore, each one costs ~64 MiB) off the event loop.

User and revocation look-ups are cached for ``cache_ttl`` seconds (default 1 s,
DECNET caches 10 s); a logout or password change in *any* process is
broadcast on the bus (``system.auth.revoked``) and drops the cached entries
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import secrets
import time
import uuid as uuid_mod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from decnet_attr.audit import audit
from decnet_attr.bus import Bus, publish_safely
from decnet_attr.config import ConfigError, Settings
from decnet_attr.server.errors import (
    BAD_LOGIN_DETAIL,
    FORBIDDEN_DETAIL,
    MUST_CHANGE_DETAIL,
    Handler,
    bad_request,
    forbidden,
    too_many_requests,
    unauthorized,
)
from decnet_attr.server.keys import AUTH
from decnet_attr.server.password_policy import password_problem
from decnet_attr.server.ratelimit import LoginThrottle, SlidingWindowLimiter, client_ip
from decnet_attr.store import Store, StoreError, TicketRow, UserRow
from decnet_attr.topics import SYSTEM_AUTH_REVOKED

log = logging.getLogger(__name__)

__all__ = [
    "AUTH_REVOKED_TOPIC",
    "INGEST_ROLES",
    "READ_ROLES",
    "REGISTER_ROLES",
    "ROLES",
    "ROLE_ADMIN",
    "ROLE_SENSOR",
    "ROLE_VIEWER",
    "STREAM_ROLES",
    "Authenticator",
    "Passwords",
    "Principal",
    "authenticate_stream",
    "bearer_token",
    "check_jwt_secret",
    "load_jwt_secret",
    "make_password_hasher",
    "password_problem",
    "principal_still_valid",
    "require",
]

# ---- roles ---------------------------------------------------------------------------------
ROLE_ADMIN = "admin"
ROLE_VIEWER = "viewer"
ROLE_SENSOR = "sensor"
ROLES: tuple[str, ...] = (ROLE_ADMIN, ROLE_VIEWER, ROLE_SENSOR)
#: Dashboard reads (require_viewer in DECNET).
READ_ROLES: tuple[str, ...] = (ROLE_VIEWER, ROLE_ADMIN)
#: The SSE gate (require_stream_role("viewer", "admin")).
STREAM_ROLES: tuple[str, ...] = READ_ROLES
#: POST /observations.
INGEST_ROLES: tuple[str, ...] = (ROLE_SENSOR, ROLE_ADMIN)
#: POST /attackers.
REGISTER_ROLES: tuple[str, ...] = (ROLE_ADMIN, ROLE_SENSOR)

# ---- constants -----------------------------------------------------------------------------
#: Published on logout (``{"user_uuid", "jti"}``: that token) and on a password
#: change (``jti`` null: every older token of the user). Every API process
#: drops its cached entries; the SSE relay closes the streams concerned.
AUTH_REVOKED_TOPIC = SYSTEM_AUTH_REVOKED  # the name this module has always exported

TOKEN_TYPE = "access"
JWT_ALGORITHM = "HS256"
MIN_SECRET_LENGTH = 32
#: DECNET's known-bad secrets (compared case-insensitively).
WEAK_SECRETS: frozenset[str] = frozenset(
    {"fallback-secret-key-change-me", "admin", "secret", "password", "changeme"}
)
SECRET_FILE = "jwt.secret"

#: Longest password accepted at login (characters, as DECNET); new passwords
#: follow password_policy (at most 72 bytes).
PASSWORD_MAX_LENGTH = 72
USERNAME_MAX_LENGTH = 64
MAX_TOKEN_LENGTH = 4096
_TICKET_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "uuid", "jti", "typ"]

#: Failed logins per address × username before the back-off starts.
LOGIN_FREE_FAILURES = 3
#: Change-password attempts per user per minute (DECNET: 5/minute).
CHANGE_PASSWORD_RATE = 5
CHANGE_PASSWORD_WINDOW = 60.0
#: SSE ticket minting window (settings.ticket_rate per this many seconds).
TICKET_WINDOW = 60.0
#: How often expired revoked-token and ticket rows are purged.
PURGE_INTERVAL = 600.0
_CACHE_MAX = 10_000
#: Seconds a token's ``exp - iat`` may exceed ``jwt_exp_minutes`` (rounding).
LIFETIME_LEEWAY = 1.0
#: Seconds of clock leeway when checking ``iat``/``exp`` (sub-second ``iat``,
#: clocks of several API processes).
CLOCK_LEEWAY = 1.0
#: Verified tokens remembered by :meth:`Authenticator.decode`.
DECODED_CACHE_SIZE = 4096


# ---- the JWT secret ------------------------------------------------------------------------
def check_jwt_secret(secret: str, *, source: str = "jwt_secret") -> None:
    """:class:`ConfigError` for a known-bad or short secret (docs/decnet.md#auth-tokens)."""
    if secret.strip().lower() in WEAK_SECRETS:
        raise ConfigError(f"{source}: the JWT secret is a known default value; set a random one")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{source}: the JWT secret must be at least {MIN_SECRET_LENGTH} characters "
            f"(got {len(secret)})"
        )


def load_jwt_secret(settings: Settings) -> str:
    """The HS256 secret: ``settings.jwt_secret``, else ``<data_dir>/jwt.secret``
    (created with 48 random bytes, mode 0600, on first use). A secret file that
    group or others can access, or a weak secret, is refused (ConfigError)."""
    if settings.jwt_secret:
        check_jwt_secret(settings.jwt_secret, source="DECNET_ATTR_JWT_SECRET")
        return settings.jwt_secret
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():
        _create_secret_file(path)
    return _read_secret_file(path)


def _read_secret_file(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the JWT secret file {path}: {exc}") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"the JWT secret file {path} is accessible by group/others "
            f"(mode {st.st_mode & 0o777:o}); run: chmod 600 {path}"
        )
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read the JWT secret file {path}: {exc}") from None
    check_jwt_secret(secret, source=str(path))
    return secret


def _create_secret_file(path: Path) -> None:
    """Write a fresh secret atomically: a private temporary file hard-linked into
    place, so a concurrent reader sees no file or the complete one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            log.info("generated a new JWT secret in %s", path)
        except FileExistsError:
            pass  # another process won the race: use its secret
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ---- passwords -----------------------------------------------------------------------------
def make_password_hasher() -> PasswordHasher:
    """argon2id with argon2-cffi's defaults (RFC 9106 low-memory profile)."""
    return PasswordHasher()


class Passwords:
    """argon2 hashing off the event loop, at most ``concurrency`` at a time."""

    def __init__(self, hasher: PasswordHasher | None = None, *, concurrency: int = 0) -> None:
        self.hasher = hasher or make_password_hasher()
        n = concurrency or max(2, min(8, os.cpu_count() or 2))
        self._sem = asyncio.Semaphore(n)
        self._dummy: str | None = None

    async def _run(self, fn: Callable[[], Any]) -> Any:
        async with self._sem:
            return await asyncio.get_running_loop().run_in_executor(None, fn)

    async def hash(self, password: str) -> str:
        result: str = await self._run(functools.partial(self.hasher.hash, password))
        return result

    async def verify(self, password_hash: str, password: str) -> bool:
        return bool(await self._run(functools.partial(self._verify, password_hash, password)))

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(password_hash)
        except (InvalidHashError, ValueError):
            return False

    async def burn(self, password: str) -> None:
        """Verify against a dummy hash: a login for an unknown user costs the
        same time as one for a known user."""
        if self._dummy is None:
            self._dummy = await self.hash(secrets.token_urlsafe(16))
        await self.verify(self._dummy, password)


# ---- the principal -------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who made a request, and with which credential.

    ``jti``/``exp``/``iat`` are the access token's (for a ticket: the token
    that minted it). ``via_ticket`` is True when an SSE ticket authenticated
    the request.
    """

    user_uuid: str
    username: str
    role: str
    jti: str | None
    exp: float | None
    via_ticket: bool = False
    iat: float | None = None


# ---- the authenticator ---------------------------------------------------------------------
class _TTLCache:
    """A tiny TTL cache (monotonic clock), cleared wholesale when full."""

    def __init__(self, maxsize: int = _CACHE_MAX) -> None:
        self._data: dict[str, tuple[float, Any]] = {}
        self._maxsize = maxsize

    def get(self, key: str, now: float) -> tuple[bool, Any]:
        hit = self._data.get(key)
        if hit is None:
            return False, None
        if hit[0] <= now:
            del self._data[key]
            return False, None
        return True, hit[1]

    def put(self, key: str, value: Any, until: float) -> None:
        if len(self._data) >= self._maxsize and key not in self._data:
            self._data.clear()
        self._data[key] = (until, value)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


class Authenticator:
    """Tokens, users, tickets and rate limits of one API process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        secret: str,
        *,
        bus: Bus | None = None,
        passwords: Passwords | None = None,
        counters: dict[str, int] | None = None,
        cache_ttl: float = 1.0,
    ) -> None:
        check_jwt_secret(secret)
        self.settings = settings
        self.store = store
        self.bus = bus
        self._secret = secret
        self.passwords = passwords or Passwords()
        self.counters: dict[str, int] = counters if counters is not None else {}
        self.cache_ttl = max(0.0, float(cache_ttl))
        self._users = _TTLCache()
        self._revoked = _TTLCache()
        self._decoded: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.login_throttle = LoginThrottle(
            settings.login_rate,
            settings.login_window,
            base=settings.login_backoff_base,
            cap=settings.login_backoff_max,
            free=LOGIN_FREE_FAILURES,
        )
        self.ticket_limiter = SlidingWindowLimiter(max(1, settings.ticket_rate), TICKET_WINDOW)
        self.password_limiter = SlidingWindowLimiter(CHANGE_PASSWORD_RATE, CHANGE_PASSWORD_WINDOW)
        self._tasks: list[asyncio.Task[None]] = []

    # -- counters ----------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _fail(self, detail: str | None = None) -> web.HTTPException:
        self.count("auth_failures_total")
        return unauthorized() if detail is None else unauthorized(detail)

    def rate_limited(self, detail: str, retry_after: float) -> web.HTTPException:
        self.count("rate_limited_total")
        return too_many_requests(detail, retry_after)

    # -- background tasks --------------------------------------------------------------------
    async def start(self) -> None:
        """Listen for revocations from other processes; purge expired rows."""
        if self.bus is not None:
            sub = self.bus.subscribe(AUTH_REVOKED_TOPIC)
            self._tasks.append(asyncio.create_task(self._listen(sub), name="auth-revocations"))
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="auth-purge"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _listen(self, sub: Any) -> None:
        async with sub:
            async for event in sub:
                payload = event.payload
                user_uuid = payload.get("user_uuid")
                jti = payload.get("jti")
                if isinstance(user_uuid, str):
                    self._users.pop(user_uuid)
                if isinstance(jti, str) and jti:
                    self._revoked.pop(jti)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            try:
                await self.store.purge_expired(time.time())
            except StoreError as exc:
                log.warning("purging expired tokens and tickets failed: %s", exc)

    # -- tokens ------------------------------------------------------------------------------
    def issue_token(self, user: UserRow, *, now: float | None = None) -> tuple[str, dict[str, Any]]:
        """A fresh access token for ``user`` and its claims."""
        t = float(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "uuid": user.uuid,
            "jti": uuid_mod.uuid4().hex,
            "iat": t,
            "exp": t + self.max_token_lifetime,
            "iss": self.settings.jwt_issuer,
            "aud": self.settings.jwt_audience,
            "typ": TOKEN_TYPE,
        }
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM), claims

    def decode(self, token: str) -> dict[str, Any]:
        """Verified claims, or 401.

        Verified tokens are remembered (bounded LRU) until they expire: a
        dashboard sends the same token with every request, and PyJWT's
        parsing is the most expensive part of authenticating one.
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise self._fail()
        hit = self._decoded.get(token)
        if hit is not None:
            if hit["exp"] > time.time():
                self._decoded.move_to_end(token)
                return hit
            del self._decoded[token]
            raise self._fail()
        claims = self._decode(token)
        if len(self._decoded) >= DECODED_CACHE_SIZE:
            self._decoded.popitem(last=False)
        self._decoded[token] = claims
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                options={"require": list(_REQUIRED_CLAIMS)},
                # sub-second iat: older PyJWT compares it with whole seconds
                leeway=CLOCK_LEEWAY,
            )
        except jwt.PyJWTError as exc:
            log.debug("token rejected: %s", exc)
            raise self._fail() from None
        if claims.get("typ") != TOKEN_TYPE:
            raise self._fail()
        if not isinstance(claims.get("uuid"), str) or not claims["uuid"]:
            raise self._fail()
        iat = _finite(claims.get("iat"))
        exp = _finite(claims.get("exp"))
        if iat is None or exp is None:
            raise self._fail()
        # Written so that NaN fails too; a longer-lived token is refused even
        # when signed with the real secret.
        if not exp - iat <= self.max_token_lifetime + LIFETIME_LEEWAY:
            log.debug("token rejected: lifetime %.0f s above the maximum", exp - iat)
            raise self._fail()
        return claims

    # -- cached look-ups ---------------------------------------------------------------------
    async def get_user(self, user_uuid: str, *, fresh: bool = False) -> UserRow | None:
        now = time.monotonic()
        if not fresh and self.cache_ttl > 0:
            found, user = self._users.get(user_uuid, now)
            if found:
                return user  # type: ignore[no-any-return]
        user = await self.store.get_user(user_uuid)
        if self.cache_ttl > 0:
            self._users.put(user_uuid, user, now + self.cache_ttl)
        return user

    async def is_revoked(self, jti: str, *, fresh: bool = False) -> bool:
        now = time.monotonic()
        if not fresh and self.cache_ttl > 0:
            found, revoked = self._revoked.get(jti, now)
            if found:
                return bool(revoked)
        revoked = await self.store.is_token_revoked(jti)
        if self.cache_ttl > 0:
            # A revocation never goes away (until the token expires anyway).
            ttl = 24 * 3600.0 if revoked else self.cache_ttl
            self._revoked.put(jti, revoked, now + ttl)
        return revoked

    def forget_user(self, user_uuid: str) -> None:
        self._users.pop(user_uuid)

    def note_revoked(self, jti: str) -> None:
        self._revoked.put(jti, True, time.monotonic() + 24 * 3600.0)

    # -- resolution --------------------------------------------------------------------------
    @property
    def max_token_lifetime(self) -> float:
        """Seconds from ``iat`` to ``exp`` of every token issued, and the most
        any token presented may have."""
        return float(self.settings.jwt_exp_minutes) * 60.0

    @staticmethod
    def _stale(iat: float | None, user: UserRow) -> bool:
        """``iat`` before the user's ``tokens_valid_from``. Tokens carry a
        sub-second ``iat``, so no same-second token survives a change; a
        whole-second ``iat`` from the same second counts as before it."""
        if user.tokens_valid_from is None:
            return False
        return iat is None or not iat >= user.tokens_valid_from

    async def resolve_token(self, token: str) -> tuple[Principal, UserRow]:
        """Token resolution (docs/decnet.md#auth-tokens); 401 on any failure."""
        claims = self.decode(token)
        user = await self.get_user(claims["uuid"])
        if user is None or user.disabled:
            raise self._fail()
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 128:
            raise self._fail()
        iat = float(claims["iat"])
        if self._stale(iat, user):
            raise self._fail()
        if await self.is_revoked(jti):
            raise self._fail()
        exp = claims.get("exp")
        principal = Principal(
            user_uuid=user.uuid,
            username=user.username,
            role=user.role,
            jti=jti,
            exp=float(exp) if isinstance(exp, (int, float)) else None,
            via_ticket=False,
            iat=iat,
        )
        return principal, user

    async def authenticate(
        self,
        request: web.Request,
        roles: Sequence[str] | None,
        *,
        allow_must_change: bool = False,
    ) -> Principal:
        """Header JWT → principal, then the must-change (403) and role (403) gates."""
        token = bearer_token(request)
        if token is None:
            raise self._fail()
        principal, user = await self.resolve_token(token)
        if user.must_change_password and not allow_must_change:
            raise forbidden(MUST_CHANGE_DETAIL)
        if roles is not None and user.role not in roles:
            raise forbidden(FORBIDDEN_DETAIL)
        return principal

    async def still_valid(self, principal: Principal, now: float) -> bool:
        """For open streams: the credential behind ``principal`` still holds."""
        if principal.exp is not None and now >= principal.exp:
            return False
        try:
            user = await self.get_user(principal.user_uuid)
            if user is None or user.disabled or user.role != principal.role:
                return False
            if self._stale(principal.iat, user):
                return False
            if principal.jti is not None and await self.is_revoked(principal.jti):
                return False
        except StoreError as exc:
            log.warning(
                "re-validating %s failed (%s): treating as invalid", principal.username, exc
            )
            return False
        return True

    # -- login -------------------------------------------------------------------------------
    async def login(
        self, username: str, password: str, *, address: str = "unknown"
    ) -> tuple[str, UserRow]:
        """Verify credentials; the token and the user, or 401 (never saying
        whether the user exists), or 429 from the failed-login throttle
        (:class:`~decnet_attr.server.ratelimit.LoginThrottle`), checked before
        the password. Every outcome is audited."""
        user_key = username.strip().lower()[: USERNAME_MAX_LENGTH * 2]
        throttle = self.login_throttle
        wait = throttle.retry_after(address, user_key)
        if wait > 0:
            audit("login", "throttled", user=username, address=address, retry_after=round(wait))
            raise self.rate_limited("Too many login attempts; try again later", wait)
        throttle.begin(address)
        ok: bool | None = None
        try:
            token, user = await self._check_login(username, password)
            ok = True
        except web.HTTPUnauthorized:
            ok = False
            audit("login", "failed", user=username, address=address)
            raise
        finally:
            throttle.end(address, user_key, ok=ok)
        audit("login", "ok", user=user.username, address=address, role=user.role)
        return token, user

    async def _check_login(self, username: str, password: str) -> tuple[str, UserRow]:
        user = await self.store.get_user_by_name(username)
        if user is None:
            await self.passwords.burn(password)
            self.count("login_failures_total")
            raise self._fail(BAD_LOGIN_DETAIL)
        ok = await self.passwords.verify(user.password_hash, password)
        if not ok or user.disabled:
            self.count("login_failures_total")
            raise self._fail(BAD_LOGIN_DETAIL)
        if self.passwords.needs_rehash(user.password_hash):
            try:
                new_hash = await self.passwords.hash(password)
                await self.store.update_user(user.uuid, password_hash=new_hash)
            except StoreError as exc:  # pragma: no cover - best effort
                log.warning("could not upgrade the password hash of %s: %s", user.username, exc)
        token, _claims = self.issue_token(user)
        self.count("logins_total")
        return token, user

    # -- revocation --------------------------------------------------------------------------
    async def revoke(self, principal: Principal) -> None:
        """Denylist the principal's token until it expires and tell every process."""
        if principal.jti is None:
            return
        exp = principal.exp if principal.exp is not None else time.time() + 86400.0
        await self.store.revoke_token(principal.jti, exp)
        self.note_revoked(principal.jti)
        await publish_safely(
            self.bus, AUTH_REVOKED_TOPIC, {"user_uuid": principal.user_uuid, "jti": principal.jti}
        )

    async def change_password(
        self, principal: Principal, old_password: str, new_password: str
    ) -> tuple[str, UserRow]:
        """Verify the old password, store the new one, cut off every older token
        (``tokens_valid_from = now``, the current token revoked) and return a
        fresh token."""
        user = await self.get_user(principal.user_uuid, fresh=True)
        if user is None or user.disabled:
            raise self._fail()
        if not await self.passwords.verify(user.password_hash, old_password):
            self.count("login_failures_total")
            raise _bad_old_password()
        new_hash = await self.passwords.hash(new_password)
        now = time.time()
        await self.store.update_user(
            user.uuid, password_hash=new_hash, must_change_password=False, tokens_valid_from=now
        )
        self.forget_user(user.uuid)
        if principal.jti is not None:
            exp = principal.exp if principal.exp is not None else now + 86400.0
            await self.store.revoke_token(principal.jti, exp)
            self.note_revoked(principal.jti)
        # jti None: every older token of the user is cut off (tokens_valid_from),
        # so every stream of the user closes.
        await publish_safely(self.bus, AUTH_REVOKED_TOPIC, {"user_uuid": user.uuid, "jti": None})
        fresh = await self.get_user(user.uuid, fresh=True)
        if fresh is None:  # pragma: no cover - deleted concurrently
            raise self._fail()
        token, _claims = self.issue_token(fresh, now=now)
        return token, fresh

    # -- SSE tickets -------------------------------------------------------------------------
    async def mint_ticket(self, principal: Principal) -> tuple[str, int]:
        """A new single-use ticket for ``principal`` and its lifetime (seconds)."""
        wait = self.ticket_limiter.hit(principal.user_uuid)
        if wait > 0:
            raise self.rate_limited("Too many SSE tickets requested; try again later", wait)
        ticket = secrets.token_urlsafe(32)
        now = time.time()
        ttl = float(self.settings.ticket_ttl)
        row = TicketRow(
            ticket_hash=ticket_hash(ticket),
            user_uuid=principal.user_uuid,
            role=principal.role,
            expires_at=now + ttl,
            created_at=now,
            token_jti=principal.jti,
            token_iat=principal.iat,
            token_exp=principal.exp,
        )
        ok = await self.store.add_ticket(
            row, max_outstanding=max(1, self.settings.max_tickets_per_user), now=now
        )
        if not ok:
            raise self.rate_limited("Too many outstanding SSE tickets; try again later", ttl)
        self.count("tickets_minted_total")
        return ticket, max(1, round(ttl))

    async def redeem_ticket(self, ticket: str, roles: Sequence[str]) -> Principal:
        """Consume a ticket (single use, even when it then fails a check) and
        re-validate everything it is bound to; 401, or 403 for the role."""
        if not _TICKET_RE.match(ticket):
            raise self._fail()  # e.g. a raw JWT: never a credential here
        now = time.time()
        row = await self.store.redeem_ticket(ticket_hash(ticket), now)
        if row is None:
            raise self._fail()
        user = await self.get_user(row.user_uuid, fresh=True)
        if user is None or user.disabled or user.role != row.role:
            raise self._fail()
        if row.token_exp is not None and row.token_exp <= now:
            raise self._fail()
        if self._stale(row.token_iat, user):
            raise self._fail()
        if row.token_jti is not None and await self.is_revoked(row.token_jti, fresh=True):
            raise self._fail()
        if user.must_change_password:
            raise forbidden(MUST_CHANGE_DETAIL)
        if row.role not in roles:
            raise forbidden(FORBIDDEN_DETAIL)
        self.count("tickets_redeemed_total")
        return Principal(
            user_uuid=user.uuid,
            username=user.username,
            role=row.role,
            jti=row.token_jti,
            exp=row.token_exp,
            via_ticket=True,
            iat=row.token_iat,
        )


def _finite(value: object) -> float | None:
    """A JSON number claim as a finite float, else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(value) else None


def _bad_old_password() -> web.HTTPException:
    return bad_request("Old password is incorrect")


def ticket_hash(ticket: str) -> str:
    """How a ticket is stored: its SHA-256, hex."""
    return hashlib.sha256(ticket.encode("utf-8")).hexdigest()


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


# ---- route helpers -------------------------------------------------------------------------
AuthedHandler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


def _auth(app: web.Application) -> Authenticator:
    return app[AUTH]


def require(*roles: str, allow_must_change: bool = False) -> Callable[[AuthedHandler], Handler]:
    """Decorate ``handler(request, principal)``: header-JWT authentication,
    then the must-change and role gates. No ``roles``: any authenticated user."""
    wanted: tuple[str, ...] | None = roles or None

    def deco(fn: AuthedHandler) -> Handler:
        @functools.wraps(fn)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            principal = await _auth(request.app).authenticate(
                request, wanted, allow_must_change=allow_must_change
            )
            return await fn(request, principal)

        return wrapper

    return deco


async def authenticate_stream(request: web.Request) -> Principal:
    """``require_stream_role("viewer", "admin")`` (docs/decnet.md#sse-tickets): a Bearer
    header (full resolution, must-change 403, role 403), else ``?ticket=``
    (redeemed and re-validated), else 401."""
    auth = _auth(request.app)
    if bearer_token(request) is not None:
        return await auth.authenticate(request, STREAM_ROLES)
    ticket = request.query.get("ticket")
    if ticket:
        try:
            return await auth.redeem_ticket(ticket, STREAM_ROLES)
        except web.HTTPException as exc:
            address = client_ip(request, trust_forwarded_for=auth.settings.trust_forwarded_for)
            audit("ticket_refused", "refused", user=None, address=address, status=exc.status)
            raise
    raise auth._fail()


async def principal_still_valid(app: web.Application, principal: Principal, now: float) -> bool:
    """True while the user exists, is enabled, keeps its role, and the token
    behind ``principal`` is not revoked, not expired and not older than the
    user's ``tokens_valid_from``. Store errors count as invalid."""
    return await _auth(app).still_valid(principal, now)

"""The password policy for every new password (API change-password and the
``users add|passwd`` command).

A new password must

- be at least :data:`PASSWORD_MIN_LENGTH` characters and at most
  :data:`PASSWORD_MAX_BYTES` bytes of UTF-8 (bytes, not characters: the limit
  DECNET's client enforces, bcrypt's input limit there);
- mix at least :data:`MIN_CLASSES` of the four character classes: lower-case,
  upper-case, digits, anything else (DECNET's client rule);
- not be guessable: zxcvbn (the maintained port of Dropbox's estimator, with
  its lists of common and breached passwords, words, names, keyboard walks,
  dates and repeats) must score it at least :data:`MIN_SCORE` of 4, given the
  username and the product's name as words an attacker would try first.

So ``aaaaaaaaaaaa`` (one class) and ``Password123!`` (a common password with
decorations) are refused.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MIN_CLASSES",
    "MIN_SCORE",
    "PASSWORD_MAX_BYTES",
    "PASSWORD_MIN_LENGTH",
    "password_problem",
]

PASSWORD_MIN_LENGTH: Final = 12
PASSWORD_MAX_BYTES: Final = 72
MIN_CLASSES: Final = 3
#: zxcvbn score 3: "safely unguessable", about 10^8 guesses or more.
MIN_SCORE: Final = 3
#: Words an attacker tries first, besides the username.
CONTEXT_WORDS: Final = ("decnet", "decnet-attr", "attribution", "honeypot", "admin")


def character_classes(password: str) -> int:
    """How many of lower-case, upper-case, digits and other characters occur."""
    lower = any(c.islower() for c in password)
    upper = any(c.isupper() for c in password)
    digit = any(c.isdigit() for c in password)
    other = any(not (c.islower() or c.isupper() or c.isdigit()) for c in password)
    return lower + upper + digit + other


def password_problem(password: object, *, username: str | None = None) -> str | None:
    """Why ``password`` is not acceptable as a new password, or None."""
    if not isinstance(password, str):
        return "password must be a string"
    if len(password) < PASSWORD_MIN_LENGTH:
        return f"password must be at least {PASSWORD_MIN_LENGTH} characters"
    if len(password.encode("utf-8")) > PASSWORD_MAX_BYTES:
        return f"password must be at most {PASSWORD_MAX_BYTES} bytes (UTF-8)"
    if character_classes(password) < MIN_CLASSES:
        return (
            f"password must mix at least {MIN_CLASSES} of: lower-case letters, "
            "upper-case letters, digits, other characters"
        )
    from zxcvbn import zxcvbn  # ~25 ms to import: only when a password is set

    inputs = [*CONTEXT_WORDS, *([username] if username else [])]
    result = zxcvbn(password, user_inputs=inputs)
    if int(result["score"]) < MIN_SCORE:
        warning = str(result.get("feedback", {}).get("warning") or "").strip()
        hint = f" ({warning.rstrip('.')})" if warning else ""
        return f"password is too easy to guess{hint}; use a longer, less common one"
    return None

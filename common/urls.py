"""Connection URLs: masking for display and stripping passwords before they are stored or sent.

A password given to the producer never leaves its process: the ledger and task messages carry the
URL without it, and each worker adds the password back from its own configuration (`with_password`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]*)@")


def mask(text: str) -> str:
    """Replace the password of every URL inside `text` with ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def strip_password(url: str) -> str:
    """The same URL without its password, safe to store in the ledger or pass to a task."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_password(public_url: str, known_urls: Iterable[str | None]) -> str:
    """Give `public_url` the password of a configured URL for the same user, host and port.

    Workers know secrets through their own settings; the run only says where to connect.
    """
    target = urlsplit(public_url)
    if target.password is not None:
        return public_url
    for candidate in known_urls:
        if not candidate:
            continue
        known = urlsplit(candidate)
        same_place = (known.username, known.hostname, known.port or 0) == (
            target.username, target.hostname, target.port or 0)
        if same_place and known.password is not None:
            netloc = f"{known.username}:{known.password}@{target.netloc.split('@', 1)[-1]}"
            return urlunsplit((target.scheme, netloc, target.path, target.query, target.fragment))
    return public_url


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy needs the driver named; users write plain postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def libpq_url(url: str) -> str:
    """psycopg wants the plain scheme; accept SQLAlchemy-style URLs too."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)

"""Connection URLs: one form inside Shuttle, masking for display, passwords kept out of storage.

Users write a password several ways: in the user info (`postgresql://app:pw@db/x`), in the query
(`postgresql://app@db/x?password=pw`, libpq's), or in libpq's keyword form (`host=db user=app
password=pw dbname=x`). `normalize` turns each, where it comes in (settings and flags), into the one
form the rest of Shuttle handles: a URL with the password percent-encoded in its user info. What it
cannot read the way the drivers read it (an unencoded `@`, `/`, `?` or `#` in a user name or password,
a `%` not followed by two hex digits) it refuses, naming the setting and never the text, since that
text holds the password.

From there a password given to the producer never leaves its process: the ledger and task messages
carry the URL without it (`strip_password`), and each worker adds the password back from its own
configuration (`with_password`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

from common.errors import ConfigError

MASK = "***"
# Greedy up to the last `@` of the token: an unencoded `@` in a password is masked whole, never cut.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s\"']*):(?P<password>[^\s\"]*)@")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<key>[?&]password=)[^&#\s\"']*")
_KEYWORD_PASSWORD = re.compile(r"(?i)(?<![\w?&.])(?P<key>password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s'\"]+)")
# What may stand in a user info unencoded here: no `@ / ? #` (they end it, for one parser or another),
# no brackets and no whitespace.
_USERINFO_TEXT = re.compile(r"[^\s@/?#\[\]]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_POSTGRES_SCHEME = re.compile(r"^postgres(ql)?(\+\w+)?$")
_SIMPLE_HOST = re.compile(r"[A-Za-z0-9._\-]+|[0-9A-Fa-f:.]+")
# Hints must not look like a password themselves, or `mask` would hide them.
_URL_HINT = "postgresql://user@host:port/database?option=value, the password after the user name and a ':'"
_ENCODE_HINT = "percent-encode '@', '/', '?', '#', '%' and spaces in a user name or password ('@' as %40, '%' as %25)"


def mask(text: str) -> str:
    """Replace every password inside `text` with ***: in a URL's user info or query, or after `password=`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _QUERY_PASSWORD.sub(lambda m: f"{m['key']}{MASK}", text)
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m['key']}{MASK}", text)


class UrlRefused(ValueError):
    """A URL Shuttle will not guess at; the message says why and how to write it, without its text."""


def normalize(url: str, what: str) -> str:
    """`url` in the one form Shuttle handles, or ConfigError naming `what` (a flag or a setting).

    Accepted: any `scheme://…` URL whose user info is percent-encoded; for PostgreSQL also a password
    (and user) in the query, moved into the user info, and libpq's keyword form, rewritten as a URL.
    """
    try:
        return normalized(url)
    except UrlRefused as exc:
        raise ConfigError(f"{what}: {exc}") from None


def normalized(url: str) -> str:
    """`normalize` without the name: raises UrlRefused (a ValueError, for settings validators)."""
    _require_utf8(url)
    if "://" not in url:
        if "=" in url:
            return _from_keywords(url)
        raise UrlRefused(f"it is neither a URL ({_URL_HINT}) nor libpq's keyword form (host=… user=… dbname=…)")
    if _BAD_PERCENT.search(url):
        where = "the user name or password" if _BAD_PERCENT.search(_userinfo(url) or "") else "the URL"
        raise UrlRefused(f"{where} has a '%' not followed by two hex digits; write a literal '%' as %25")
    _check_userinfo(url)
    scheme = url.split("://", 1)[0].lower()
    if _POSTGRES_SCHEME.match(scheme):
        return _password_out_of_query(url)
    if "password" in _query_keys(url):
        raise UrlRefused(f"a {scheme}:// URL takes its password in its user info, not in the query "
                         "(after the user name and a ':', percent-encoded)")
    return url


def _require_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UrlRefused(f"it is not valid UTF-8 (an undecodable byte at position {exc.start})") from None


def _userinfo(url: str) -> str | None:
    """The user info as libpq finds it: the text before the first `@` that comes before any `/`."""
    found = re.match(r"[^@/]*@", url.split("://", 1)[1])
    return found.group()[:-1] if found else None


def _check_userinfo(url: str) -> None:
    """Refuse a URL whose user info the drivers and urllib would read differently."""
    rest = url.split("://", 1)[1]
    userinfo = _userinfo(url)
    if userinfo is not None:
        if not _USERINFO_TEXT.fullmatch(userinfo):
            raise UrlRefused(f"the user name or password holds a character that must be encoded; {_ENCODE_HINT}")
        rest = rest[len(userinfo) + 1:]
    if "@" in re.split(r"[?#]", rest, maxsplit=1)[0]:
        raise UrlRefused(f"the URL has an '@' that does not end its user info; {_ENCODE_HINT}")


def _query(url: str) -> str:
    rest = url.split("://", 1)[1]
    userinfo = _userinfo(url)
    if userinfo is not None:
        rest = rest[len(userinfo) + 1:]
    return rest.split("#", 1)[0].partition("?")[2]


def _query_keys(url: str) -> set[str]:
    return {unquote(part.partition("=")[0]).lower() for part in _query(url).split("&") if part}


def _libpq_params(text: str) -> dict[str, str]:
    """libpq's own reading of a URL or keyword string; its errors quote the text, so they are not shown."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return {k: str(v) for k, v in conninfo_to_dict(libpq_url(text)).items()}
    except Exception:  # noqa: BLE001 - psycopg.ProgrammingError, whose message holds the password
        raise UrlRefused(f"libpq cannot read it; write {_URL_HINT}; {_ENCODE_HINT}") from None


def _password_out_of_query(url: str) -> str:
    """A PostgreSQL URL with `password=` (and `user=`) moved from its query into its user info."""
    params = _libpq_params(url)
    keys = _query_keys(url)
    if "password" not in keys:
        return url
    userinfo = _userinfo(url)
    if userinfo is not None and ":" in userinfo:
        raise UrlRefused("the password is given twice, in the user info and in the query; keep one")
    return _checked_same(params, _postgres_url(params, url.split("://", 1)[0]))


def _from_keywords(dsn: str) -> str:
    """libpq's keyword form (`host=… password=…`) as a URL that libpq reads the same way."""
    params = _libpq_params(dsn)
    return _checked_same(params, _postgres_url(params, "postgresql"))


def _postgres_url(params: dict[str, str], scheme: str) -> str:
    """A URL from libpq parameters: user and password in the user info, a plain host in the authority,
    everything else (a socket directory, several hosts, sslmode, …) in the query."""
    rest = dict(params)
    user, password = rest.pop("user", None), rest.pop("password", None)
    host, port, dbname = rest.pop("host", None), rest.pop("port", None), rest.pop("dbname", None)
    userinfo = quote(user or "", safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    authority = ""
    if host and _SIMPLE_HOST.fullmatch(host) and (not port or port.isdigit()):
        authority = f"[{host}]" if ":" in host else host
        authority += f":{port}" if port else ""
    else:
        rest.update({k: v for k, v in (("host", host), ("port", port)) if v})
    netloc = f"{userinfo}@{authority}" if userinfo else authority
    path = f"/{quote(dbname, safe='')}" if dbname else ""
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in rest.items())
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def _checked_same(params: dict[str, str], url: str) -> str:
    """The rewritten URL, proven to mean to libpq exactly what the text it replaces meant."""
    if _libpq_params(url) != params:
        raise UrlRefused(f"it cannot be written as a URL that means the same; write the URL yourself: {_URL_HINT}")
    return url


def strip_password(url: str) -> str:
    """The same URL without its password, safe to store in the ledger or pass to a task."""
    if "://" not in url:  # not normalized: a keyword string keeps everything but its password
        return _KEYWORD_PASSWORD.sub("", url).strip()
    scheme, rest = url.split("://", 1)
    userinfo = _userinfo(url)
    if userinfo is not None:
        user = userinfo.split(":", 1)[0]
        rest = (f"{user}@" if user else "") + rest[len(userinfo) + 1:]
    head, sep, query = rest.partition("?")
    if sep:
        kept = [p for p in query.split("&") if unquote(p.partition("=")[0]).lower() != "password"]
        rest = head + (f"?{'&'.join(kept)}" if kept else "")
    return f"{scheme}://{rest}"


def with_password(public_url: str, known_urls: Iterable[str | None]) -> str:
    """Give `public_url` the password of a configured URL for the same user, host and port.

    Workers know secrets through their own settings; the run only says where to connect.
    """
    if "://" not in public_url or ":" in (_userinfo(public_url) or ""):
        return public_url
    place = _place(public_url)
    for candidate in known_urls:
        if not candidate or "://" not in candidate:
            continue
        userinfo = _userinfo(candidate)
        if userinfo and ":" in userinfo and _place(candidate) == place:
            user, password = userinfo.split(":", 1)
            scheme, rest = public_url.split("://", 1)
            if _userinfo(public_url) is not None:
                rest = rest.split("@", 1)[1]
            return f"{scheme}://{user}:{password}@{rest}"
    return public_url


def _place(url: str) -> tuple[str, ...]:
    """Who connects where: (scheme family, user, host, port), the same whichever form wrote them."""
    scheme = url.split("://", 1)[0].lower()
    if _POSTGRES_SCHEME.match(scheme):
        try:
            params = _libpq_params(url)
        except UrlRefused:
            return (url,)
        return ("postgresql", params.get("user", ""), params.get("host", ""), params.get("port", ""))
    parts = urlsplit(url)
    return (scheme, unquote(parts.username or ""), parts.netloc.rpartition("@")[2].lower())


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy needs the driver named; users write plain postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def libpq_url(url: str) -> str:
    """psycopg wants the plain scheme; accept SQLAlchemy-style URLs too."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)

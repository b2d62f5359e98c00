"""Source and Sink kinds, resolved from a URL's scheme; drivers are imported only when used."""

from __future__ import annotations

from importlib import import_module
from urllib.parse import urlsplit

from common.connectors.base import Sink, Source
from common.errors import ConfigError

_KINDS = {
    "postgresql": "common.connectors.postgres",
    "postgres": "common.connectors.postgres",
    "postgresql+psycopg": "common.connectors.postgres",
    "mongodb": "common.connectors.mongo",
    "mongodb+srv": "common.connectors.mongo",
}


def _module_for(url: str):
    scheme = urlsplit(url).scheme
    if scheme not in _KINDS:
        raise ConfigError(f"unsupported URL scheme '{scheme}://'; use one of: "
                          + ", ".join(sorted(f"{s}://" for s in _KINDS)))
    return import_module(_KINDS[scheme])


def open_source(url: str) -> Source:
    """A Source for `url`, e.g. postgresql://user@host/db."""
    return _module_for(url).Source(url)


def open_sink(url: str) -> Sink:
    """A Sink for `url`."""
    return _module_for(url).Sink(url)


__all__ = ["Sink", "Source", "open_sink", "open_source"]

"""What every PostgreSQL session of Shuttle asks of the server and of the client's TCP stack, so that a
host cut off mid-transaction never holds its locks for long.

PostgreSQL keeps the session of a client it cannot hear until TCP gives up on it: with the kernel's
defaults, about two hours. A worker host whose link goes down inside a transaction would keep, that long,
the rows its chunk was writing (or a ledger row) locked, and the chunk sent again to another host would
wait on them: the run would not heal by itself. These settings make the server drop a silent client's
session, rolling its transaction back, within about 30 s, and make the worker notice a silent server as
soon. They are ordinary per-session settings (PostgreSQL 12 and later), sent as libpq `options`; an
operator's own `-c` values (in the URL's `options` or in `PGOPTIONS`) come after ours and win.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg

SERVER_KEEPALIVES = ("-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 "
                     "-c tcp_user_timeout=30000")
CLIENT_KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                                     "keepalives_count": 3, "tcp_user_timeout": 30000}


def session_params(dsn: str, application_name: str, connect_timeout: int = 10) -> dict[str, Any]:
    """Keyword arguments for `psycopg.connect(dsn, **…)` (or SQLAlchemy's `connect_args`)."""
    given = psycopg.conninfo.conninfo_to_dict(dsn).get("options") or os.environ.get("PGOPTIONS", "")
    return {"connect_timeout": connect_timeout, "application_name": application_name, **CLIENT_KEEPALIVES,
            "options": f"{SERVER_KEEPALIVES} {given}".strip()}

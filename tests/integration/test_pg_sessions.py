"""Every PostgreSQL session Shuttle opens tells the server to drop it within about 30 s once its client
falls silent, so a worker host cut off mid-transaction never holds locks for hours (README, "Add a worker
on another host"); an operator's own `-c` values still win."""

from __future__ import annotations

import sqlalchemy as sa

from common.connectors.postgres import Sink, Source
from common.ledger import Ledger


def server_setting(conn_query, name: str) -> str:
    return conn_query(f"SHOW {name}")[0][0]


def test_source_target_and_ledger_sessions_ask_the_server_to_drop_a_silent_client(fresh_db):
    source, sink = Source(fresh_db), Sink(fresh_db)
    ledger = Ledger(fresh_db)
    try:
        for connector in (source, sink):
            assert server_setting(connector.query, "tcp_keepalives_idle") == "10"
            assert server_setting(connector.query, "tcp_user_timeout") == "30000"
        with ledger.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW tcp_keepalives_count")).scalar() == "3"
    finally:
        source.close()
        sink.close()
        ledger.dispose()


def test_an_operators_own_session_options_win(fresh_db, monkeypatch):
    monkeypatch.setenv("PGOPTIONS", "-c tcp_keepalives_idle=42")
    source = Source(fresh_db)
    try:
        assert server_setting(source.query, "tcp_keepalives_idle") == "42"
        assert server_setting(source.query, "tcp_keepalives_interval") == "5", "ours still apply where not given"
    finally:
        source.close()

"""MongoDB targets for integration tests: nx-27017 in a subprocess, or the real server of SHUTTLE_TEST_MONGO_URI."""

from __future__ import annotations

import os

import pymongo
import pytest

from common.ledger import Ledger
from tests.mongo_server import REAL_MONGO_URI, NxServer


@pytest.fixture(scope="session")
def mongo_uri():
    """A MongoDB server URI (no database): the real one when SHUTTLE_TEST_MONGO_URI is set."""
    if REAL_MONGO_URI:
        yield REAL_MONGO_URI.rstrip("/")
        return
    server = NxServer().start()
    yield server.uri
    server.cleanup()


@pytest.fixture
def mongo_db_name(mongo_uri, request):
    """A database name of this test's own, dropped before and after."""
    name = f"shuttle_m2m_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
    with pymongo.MongoClient(mongo_uri) as client:
        client.drop_database(name)
    yield name
    with pymongo.MongoClient(mongo_uri) as client:
        client.drop_database(name)


@pytest.fixture
def ledger(fresh_db):
    """A ledger with its schema in a database of this test's own."""
    ledger = Ledger(fresh_db)
    ledger.ensure_schema()
    yield ledger
    ledger.dispose()

"""MongoDB servers for the tests (DESIGN §5): a real one when SHUTTLE_TEST_MONGO_URI is set, otherwise the
`nx-27017` wire-protocol server as a subprocess on a free port (it can be killed and restarted on the same
port and data directory), and mongomock in-process for single-process contract tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pymongo

REAL_MONGO_URI = os.environ.get("SHUTTLE_TEST_MONGO_URI")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _nx_command() -> list[str]:
    """nx-27017 through `tests/nx_launcher.py`, which works around its gap on indexes of a field named `id`."""
    return [sys.executable, "-m", "tests.nx_launcher"]


class NxServer:
    """One nx-27017 process; `restart()` keeps its port and data, as a restarted mongod would.

    What it cannot do that a MongoDB server does is declared here, with how the tests deal with it; production
    code never asks which server it talks to (DESIGN §5)."""

    # gap → how the tests handle it
    GAPS: dict[str, str] = {
        "an index on a field named `id` (its name collides with the hidden `_id` index's)":
            "worked around: tests/nx_launcher.py gives it a name of its own",
        "an `_id` range (`$gt`/`$gte`/`$lt`/`$lte`) decodes every document of the collection in Python":
            "worked around for ObjectId bounds: tests/nx_launcher.py asks SQLite's `_id` index, type-checked",
        "`{'a.0': {'$exists': true}}` finds nothing (`a.0` read as a key, never as an array position)":
            "worked around: tests/nx_launcher.py asks for both, as MongoDB does",
    }

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"shuttle_m2m_{os.getpid()}_nx_"))
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self) -> NxServer:
        log = open(self.dir / "server.log", "ab")
        self.process = subprocess.Popen(
            [*_nx_command(), "--data-dir", str(self.dir / "data"), "--host", "127.0.0.1", "-p", str(self.port),
             "--log-file", str(self.dir / "nx.log"), "--pid-file", str(self.dir / "nx.pid")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=PROJECT_ROOT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nx-27017 exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=300) as client:
                    client.admin.command("ping")
                return self
            except pymongo.errors.PyMongoError:
                time.sleep(0.1)
        raise RuntimeError("nx-27017 did not answer within 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def mongomock_client():
    """A mongomock client that accepts the newest pymongo's bulk operations.

    pymongo 4.9+ passes `sort=` to `add_replace`/`add_update`; mongomock 4.3 does not know it. Dropping
    it is exact for us: the sink never sorts inside a write.
    """
    import mongomock
    from mongomock.collection import BulkOperationBuilder

    if not getattr(BulkOperationBuilder, "_shuttle_shim", False):
        add_replace, add_update = BulkOperationBuilder.add_replace, BulkOperationBuilder.add_update

        def replace(self, selector, doc, upsert, collation=None, hint=None, sort=None):
            return add_replace(self, selector, doc, upsert, collation=collation, hint=hint)

        def update(self, selector, doc, multi=False, upsert=False, collation=None, array_filters=None,
                   hint=None, sort=None):
            return add_update(self, selector, doc, multi=multi, upsert=upsert, collation=collation,
                              array_filters=array_filters, hint=hint)

        BulkOperationBuilder.add_replace, BulkOperationBuilder.add_update = replace, update
        BulkOperationBuilder._shuttle_shim = True
    return mongomock.MongoClient()


def collection_checksums(db) -> dict[str, str]:
    """An order-independent checksum of every collection's documents (key order inside a document ignored)."""
    import hashlib
    import json

    sums = {}
    for name in sorted(db.list_collection_names()):
        digest = hashlib.md5()
        for text in sorted(json.dumps(doc, sort_keys=True, default=repr) for doc in db[name].find()):
            digest.update(text.encode())
        sums[name] = digest.hexdigest()
    return sums

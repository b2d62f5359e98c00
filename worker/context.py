"""Per-process state of a worker: the ledger and one open migration per recent run."""

from __future__ import annotations

import os
import socket
from collections import OrderedDict

from common.ledger import Ledger, RunRecord
from common.declarative.catalogue import migration_of_options
from common.migrations import Migration
from common.settings import Settings
from common.urls import with_password
from common.source_load import measure
from worker.throttle import Bucket, RedisBucket, RunThrottle, bucket_url

KEEP_RUNS_OPEN = 4


class WorkerContext:
    """Built once per worker from its settings; everything inside is opened on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ledger: Ledger | None = None
        self._pid: int | None = None
        self._migrations: OrderedDict[str, Migration] = OrderedDict()
        self._bucket: Bucket | None = None
        self._bucket_pid: int | None = None
        # The Celery node name (`name@host`), set when the worker starts: the ledger names a chunk's
        # worker as Flower and the logs do.
        self.node: str | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None or self._pid != os.getpid():
            # A forked child must not share its parent's pooled connections.
            self._ledger, self._pid = Ledger(self.settings.ledger_url), os.getpid()
            self._migrations.clear()
        return self._ledger

    def throttle_for(self, run: RunRecord) -> RunThrottle:
        """A throttle for one chunk of the run, drawing from the run's bucket shared by every worker, and
        probing the run's source for its load when the run sets a bound."""
        if self._bucket_pid != os.getpid():
            # Like the ledger: a forked child opens its own connection.
            url = bucket_url(self.settings)
            self._bucket, self._bucket_pid = (RedisBucket(url) if url else None), os.getpid()
        source = with_password(run.source_url or "", self.settings.known_urls())
        return RunThrottle(self.ledger, self._bucket, run.run_id, probe=lambda load: measure(source, load))

    @property
    def name(self) -> str:
        """`name@host:pid`: the node name Flower and the logs show, and the pool process the sweeper and
        `holder_gone` need to tell a dead holder from a live one."""
        return f"{self.node or socket.gethostname()}:{os.getpid()}"

    def migration_for(self, run: RunRecord) -> Migration:
        """The run's migration with connections kept open across its chunks."""
        if run.run_id in self._migrations:
            self._migrations.move_to_end(run.run_id)
            return self._migrations[run.run_id]
        known = self.settings.known_urls()
        migration = migration_of_options(run.migration, run.options)(
            with_password(run.source_url or "", known), with_password(run.target_url or "", known), run.options)
        self._migrations[run.run_id] = migration
        while len(self._migrations) > KEEP_RUNS_OPEN:
            _, oldest = self._migrations.popitem(last=False)
            oldest.close()
        return migration

    def forget(self, run_id: str) -> None:
        migration = self._migrations.pop(run_id, None)
        if migration is not None:
            migration.close()

    def close(self) -> None:
        for migration in self._migrations.values():
            migration.close()
        self._migrations.clear()
        if self._ledger is not None:
            self._ledger.dispose()
        if isinstance(self._bucket, RedisBucket):
            self._bucket.close()

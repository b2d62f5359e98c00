"""The migrations the fault matrix runs against: one `Case` per migration of the catalogue.

A case knows how to point a run at a fresh target (a PostgreSQL schema, or a MongoDB database), how to
checksum and count that target, what the report of any run over its source must say (computed from
the source, never written down), and how to *hold* the target's writes. Holding is what makes every
fault land mid-chunk whatever the chunk's speed: while the hold lasts, a chunk that reached its write
cannot finish, so the test can kill, cut or cancel it without racing it. PostgreSQL targets are held
with a table lock (SHARE blocks the upsert, not reads); nx-27017 is held by stopping its process
(SIGSTOP), a real mongod by `fsyncLock`.
"""

from __future__ import annotations

import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import psycopg
import pymongo

from common.migrations.model_files_fixtures import build_tree
from common.migrations.modmon import Modmon
from producer.local_workers import LocalWorkers
from tests.harness import Env
from tests.mongo_server import NxServer, collection_checksums

# After a hold starts, a chunk whose write committed just before it records itself done in the ledger
# within milliseconds; waiting this long means every chunk still `running` is blocked in its write.
HOLD_SETTLE_S = 0.3


@dataclass(frozen=True)
class Expected:
    """What the report of a complete run must say, taken from the source (or from the baseline)."""

    source_rows: int
    rejected_keys: tuple[str, ...]
    target_rows: dict[str, int]  # report target entity → rows in the target


class Case(ABC):
    """One migration under fault: its source (built once per session) and fresh targets per test."""

    migration: str
    chunk_rows: int  # enough chunks that each fault lands while most of the run is still queued
    small_chunk_rows: int  # for cancel/resume: many short chunks
    pg_databases: tuple[str, ...]  # where the workers' PostgreSQL connections live (cut by fault 4)
    target_database: str | None = None  # the PostgreSQL target database (refused by fault 5), if any
    server: NxServer | None = None  # the MongoDB server process this case owns, if any
    not_applicable: dict[str, str] = {}  # fault test name → why it does not apply to this migration

    def __init__(self, env: Env) -> None:
        self.env = env

    def __repr__(self) -> str:
        return self.migration

    # -- what each case defines ------------------------------------------------------------------

    @abstractmethod
    def target_args(self, name: str) -> tuple[str, ...]:
        """`shuttle run` arguments that select source and the fresh target `name`."""

    def prepare_target(self, name: str) -> None:
        """Create what the migration expects to find in a fresh target (nothing, unless overridden)."""

    @abstractmethod
    def checksum(self, name: str) -> Any:
        """An order-independent fingerprint of everything the migration wrote into target `name`."""

    @abstractmethod
    def target_rows(self, name: str) -> dict[str, int]:
        """Rows per target entity, counted in the target itself (a duplicate would show here)."""

    @abstractmethod
    def hold_writes(self, name: str) -> Any:
        """A context manager during which no chunk can finish its write into target `name`."""

    @abstractmethod
    def refusing_connections(self) -> Any:
        """A context manager during which the target refuses every connection."""

    @abstractmethod
    def expected(self) -> Expected:
        """The exact report counts of a complete run."""

    # -- running ---------------------------------------------------------------------------------

    def workers(self, count: int, name: str, **settings: Any) -> LocalWorkers:
        return self.env.workers(count, name, **settings)

    def run_args(self, name: str, chunk_rows: int | None = None) -> list[str]:
        return [self.migration, *self.target_args(name), "--chunk-rows", str(chunk_rows or self.chunk_rows)]

    def start(self, name: str, chunk_rows: int | None = None, **extra_env: str) -> str:
        """`shuttle run` into a fresh target, not waiting; returns the run id."""
        self.prepare_target(name)
        return self.env.start(*self.run_args(name, chunk_rows), **extra_env)

    # Whether `shuttle run` can start while the target's writes are held. False where starting a run needs
    # what the hold blocks (a MongoDB server stopped; a target table whose preparation takes a lock); those
    # migrations' chunks are slow enough for a hold taken just after the start to land mid-run.
    hold_before_start = True

    @contextmanager
    def started_held(self, name: str, chunk_rows: int | None = None, **extra_env: str) -> Iterator[str]:
        """`shuttle run` into a fresh target whose writes are held from before its first chunk; yields the
        run id, and the hold ends with the block. However fast the migration's chunks are and however
        loaded the machine, the fault injected inside then lands while chunks are running and queued."""
        if not self.hold_before_start:
            run_id = self.start(name, chunk_rows, **extra_env)
            with self.hold_writes(name):
                yield run_id
            return
        self.prepare_target(name)
        with self.hold_writes(name):
            yield self.env.start(*self.run_args(name, chunk_rows), **extra_env)

    @cached_property
    def baseline(self) -> Any:
        """The checksum of an uninterrupted run: what every faulted run must end with."""
        self.prepare_target("base")
        with self.workers(2, "base"):
            code, report = self.env.run_json("run", *self.run_args("base"))
        assert code == 0, report["verdict_reason"]
        return self.checksum("base")

    def cleanup(self) -> None:
        """Drop what the tests created besides the session's databases."""


# -- PostgreSQL targets -----------------------------------------------------------------------------


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


class PostgresTargetCase(Case):
    """A target schema of its own per test, in the source's database."""

    target_tables: tuple[str, ...]

    def target_args(self, name: str) -> tuple[str, ...]:
        return ("--source-url", self.env.source_url, "--target-url", self.env.source_url, "--target-schema", name)

    def checksum(self, name: str) -> tuple[str, ...]:
        return tuple(self.env.sql(
            f"SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {name}.{table} t")[0][0]
            for table in self.target_tables)

    def target_rows(self, name: str) -> dict[str, int]:
        return {table: self.env.sql(f"SELECT count(*) FROM {name}.{table}")[0][0] for table in self.target_tables}

    @contextmanager
    def hold_writes(self, name: str) -> Iterator[None]:
        """SHARE locks on the target tables: every upsert waits, reads go on; released by rolling back."""
        conn = psycopg.connect(self.env.source_url, application_name="shuttle-test-hold")
        try:
            conn.execute(f"LOCK TABLE {', '.join(f'{name}.{t}' for t in self.target_tables)} IN SHARE MODE")
            time.sleep(HOLD_SETTLE_S)
            yield
        finally:
            try:
                conn.rollback()
            except psycopg.OperationalError:
                pass  # the fault itself cut this connection (target refusing connections): the lock is gone
            conn.close()


    @contextmanager
    def refusing_connections(self) -> Iterator[None]:
        """New connections to the target database are refused and existing ones cut, until the block ends."""
        admin_url = self.env.source_url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{self.target_database}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                         (self.target_database,))
            try:
                yield
            finally:
                conn.execute(f'ALTER DATABASE "{self.target_database}" WITH ALLOW_CONNECTIONS true')


class ModmonCase(PostgresTargetCase):
    migration = "modmon"
    chunk_rows = 4000
    small_chunk_rows = 1000
    target_tables = ("prediction_stats_hourly", "feature_drift_hourly")

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.target_database = database_of(env.source_url)
        self.pg_databases = (self.target_database,)

    def prepare_target(self, name: str) -> None:
        """The migration's own tables in schema `name`, so they can be held before the run starts."""
        migration = Modmon(self.env.source_url, self.env.source_url, Modmon.plan_options(target_schema=name))
        try:
            migration.prepare_target()
        finally:
            migration.close()

    def expected(self) -> Expected:
        # The buckets are not derivable from the source without redoing the aggregation: the uninterrupted
        # run's bucket counts are the reference (its checksum is checked separately).
        _ = self.baseline
        return Expected(self.env.data.total_rows, tuple(sorted(str(i) for i in self.env.data.malformed_ids)),
                        self.target_rows("base"))


class LatestMetricsCase(PostgresTargetCase):
    """The session's MLflow database as source; each target is a schema with MLflow's `latest_metrics`
    and `runs` (copied with LIKE … INCLUDING ALL: same columns, same primary key)."""

    migration = "mlflow-latest-metrics"
    chunk_rows = 1000
    small_chunk_rows = 300
    target_tables = ("latest_metrics",)

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.target_database = database_of(env.source_url)
        self.pg_databases = (self.target_database,)
        self.schemas: list[str] = []

    def prepare_target(self, name: str) -> None:
        with psycopg.connect(self.env.source_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
            conn.execute(f"CREATE SCHEMA {name}")
            for table in ("latest_metrics", "runs"):
                conn.execute(f"CREATE TABLE {name}.{table} (LIKE public.{table} INCLUDING ALL)")
            conn.execute(f"INSERT INTO {name}.runs SELECT * FROM public.runs")
        self.schemas.append(name)

    @cached_property
    def _expected(self) -> Expected:
        metric_rows, pairs = self.env.sql(
            "SELECT count(*), count(DISTINCT (m.run_uuid, m.key)) FROM metrics m JOIN runs r USING (run_uuid)")[0]
        return Expected(metric_rows, (), {"latest_metrics": pairs})

    def expected(self) -> Expected:
        return self._expected

    def cleanup(self) -> None:
        with psycopg.connect(self.env.source_url, autocommit=True) as conn:
            for name in self.schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


class ModelFilesCase(PostgresTargetCase):
    """A generated tree of joblib files (two of them bad on purpose) as source; each target is a schema
    with its own `models` table. Chunks pack whole model names; `--chunk-rows` changes nothing here, the
    pack size is `--option files_per_chunk`."""

    migration = "model-files"
    hold_before_start = False  # preparing the `models` table takes a lock the hold would block
    chunk_rows = 1000
    small_chunk_rows = 1000
    target_tables = ("models",)
    BAD = {"zz_bad__e__corrupt.joblib": b"<html>not a model</html>", "zz_bad__e__empty.pkl": b""}
    FILES_PER_CHUNK = 4

    def __init__(self, env: Env, root: Path) -> None:
        super().__init__(env)
        self.target_database = database_of(env.source_url)
        self.pg_databases = (self.target_database,)
        # 150 names of 2 files, packed 2 names a chunk (FILES_PER_CHUNK) → 76 chunks: enough that a cancel
        # lands while most of the run is still queued, each chunk writing several names in one transaction.
        self.tree = build_tree(root, names=150, events=("signup",), model_types=("classifier_binary", "regression"))
        for name, data in self.BAD.items():
            (root / name).write_bytes(data)
        self.schemas: list[str] = []

    def target_args(self, name: str) -> tuple[str, ...]:
        self.schemas.append(name)
        return ("--source-url", f"file://{self.tree.root}", "--target-url", self.env.source_url,
                "--target-schema", name, "--option", f"files_per_chunk={self.FILES_PER_CHUNK}")

    def checksum(self, name: str) -> str:
        """Everything but the id and created_at, which a database assigns on every insert."""
        return self.env.sql(
            "SELECT coalesce(md5(string_agg(concat_ws('|', name, version, event, model_type, is_active, content_hash,"
            f" source_path, md5(model_binary)), ',' ORDER BY name, version)), '') FROM {name}.models")[0][0]

    def expected(self) -> Expected:
        files = self.tree.files
        return Expected(files + len(self.BAD), tuple(sorted(str(self.tree.root / n) for n in self.BAD)),
                        {"models": files})

    def cleanup(self) -> None:
        with psycopg.connect(self.env.source_url, autocommit=True) as conn:
            for name in set(self.schemas):
                conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


# -- MongoDB target ---------------------------------------------------------------------------------


class MongoCase(Case):
    """The session's MLflow database as source; each target is a MongoDB database of its own."""

    migration = "mlflow-to-mongo"
    hold_before_start = False  # `shuttle run` needs the server to answer
    chunk_rows = 1200
    small_chunk_rows = 500

    def __init__(self, env: Env, mongo_uri: str, server: NxServer | None) -> None:
        super().__init__(env)
        self.mongo_uri, self.server = mongo_uri, server
        self.pg_databases = (database_of(env.source_url),)
        self.prefix = f"shuttle_faults_{os.getpid()}_"

    def target_args(self, name: str) -> tuple[str, ...]:
        return ("--postgres-uri", self.env.source_url, "--mongodb-uri", f"{self.mongo_uri}/{self.prefix}{name}")

    def db(self, name: str):
        return pymongo.MongoClient(self.mongo_uri)[f"{self.prefix}{name}"]

    def checksum(self, name: str) -> dict[str, str]:
        return collection_checksums(self.db(name))

    def target_rows(self, name: str) -> dict[str, int]:
        db = self.db(name)
        return {collection: db[collection].count_documents({}) for collection in db.list_collection_names()}

    @cached_property
    def _expected(self) -> Expected:
        tables = [t for (t,) in self.env.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        counts = {t: self.env.sql(f'SELECT count(*) FROM public."{t}"')[0][0] for t in tables}
        return Expected(sum(counts.values()), (), {t: n for t, n in counts.items() if n})

    def expected(self) -> Expected:
        return self._expected

    @contextmanager
    def hold_writes(self, name: str) -> Iterator[None]:
        """nx-27017 stopped (SIGSTOP): every request waits; a real server is fsync-locked instead."""
        if self.server is None:
            client = pymongo.MongoClient(self.mongo_uri)
            client.admin.command("fsync", lock=True)
            try:
                time.sleep(HOLD_SETTLE_S)
                yield
            finally:
                client.admin.command("fsyncUnlock")
                client.close()
            return
        pid = self.server.process.pid
        os.killpg(pid, signal.SIGSTOP)
        try:
            time.sleep(HOLD_SETTLE_S)
            yield
        finally:
            try:
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the fault killed the stopped server (and a new one may run): nothing left to continue

    @contextmanager
    def refusing_connections(self) -> Iterator[None]:
        """The server process killed, and started again on the same port and data when the block ends."""
        self.server.stop()
        try:
            yield
        finally:
            self.server.start()

    def cleanup(self) -> None:
        with pymongo.MongoClient(self.mongo_uri) as client:
            for name in client.list_database_names():
                if name.startswith(self.prefix):
                    client.drop_database(name)


# -- MongoDB → MongoDB --------------------------------------------------------------------------------


class UserdataCase(MongoCase):
    """`userdata-split`: a `user_data` collection built once per session (skewed users, bad documents) on the
    case's MongoDB server; each target is a database of its own holding the two new collections."""

    migration = "userdata-split"
    chunk_rows = 150
    small_chunk_rows = 60
    docs = 1_200  # on nx-27017 (~200 documents/s here) that is still several seconds of chunks to fault
    # Fault 4 cuts the workers' PostgreSQL source and target connections: this migration has none.
    not_applicable = {"test_worker_database_connections_terminated_mid_chunk":
                      "no PostgreSQL source or target: MongoDB to MongoDB"}

    def __init__(self, env: Env, mongo_uri: str, server: NxServer | None) -> None:
        super().__init__(env, mongo_uri, server)
        self.pg_databases = ()
        self.prefix = f"shuttle_faults_ud_{os.getpid()}_"

    @cached_property
    def data(self):
        from common.migrations.userdata_fixtures import build_source

        return build_source(self.db("source"), self.docs, users=10, bad=True)

    def source_url(self) -> str:
        _ = self.data
        return f"{self.mongo_uri}/{self.prefix}source"

    def target_args(self, name: str) -> tuple[str, ...]:
        return ("--source-url", self.source_url(), "--target-url", f"{self.mongo_uri}/{self.prefix}{name}")

    @cached_property
    def _expected(self) -> Expected:
        good = self.data.total - len(self.data.rejected)
        return Expected(self.data.total, tuple(sorted(self.data.rejected)),
                        {"dataset_metadata": good, "transformation_configs": good})


class UserdataRollbackCase(UserdataCase):
    """`userdata-rollback` (what `shuttle rollback RUN` starts): its source is a split of the same `user_data`,
    made once per session in this process; each target is a database where `user_data` is rebuilt."""

    migration = "userdata-rollback"

    def __init__(self, env: Env, mongo_uri: str, server: NxServer | None) -> None:
        super().__init__(env, mongo_uri, server)
        self.prefix = f"shuttle_faults_udr_{os.getpid()}_"

    @cached_property
    def split_url(self) -> str:
        from common.migrations.base import Selection
        from common.migrations.userdata_split import UserdataSplit

        url = f"{self.mongo_uri}/{self.prefix}split"
        split = UserdataSplit(self.source_url(), url, UserdataSplit.plan_options())
        try:
            split.count_partitions(Selection())
            split.prepare_target()
            for spec in split.plan_chunks(Selection(), 10_000):
                split.run_chunk(spec, lambda rows: None)
        finally:
            split.close()
        return url

    def target_args(self, name: str) -> tuple[str, ...]:
        return ("--source-url", self.split_url, "--target-url", f"{self.mongo_uri}/{self.prefix}{name}",
                "--option", "verify=true")

    @cached_property
    def _expected(self) -> Expected:
        good = self.data.total - len(self.data.rejected)
        return Expected(good, (), {"user_data": good})


# -- a declared migration (a TOML file) -----------------------------------------------------------------


class DeclaredCase(PostgresTargetCase):
    """A migration file copying the session's `archived_predictions` into `<target>.predictions` (PostgreSQL →
    PostgreSQL): renames, a JSON path, a transform, deletes owned per chunk. A row whose `features` is not
    JSON breaks the mapping (a reject). Each target gets a file of its own naming its table."""

    migration = "declared-copy"
    chunk_rows = 4000
    small_chunk_rows = 1000
    target_tables = ("predictions",)
    TEXT = """
[migration]
name = "declared-copy"
summary = "archived predictions, copied by a migration file"

[source]
table = "archived_predictions"
key = ["id"]
partition = "deployment_id"

[target]
table = "{schema}.predictions"

[columns]
prediction_id = {{ from = "id" }}
age = {{ from = "features", path = "$.age", optional = true }}
model = {{ from = "model_id", transform = "upper" }}
"""

    def __init__(self, env: Env, folder: Path) -> None:
        super().__init__(env)
        self.target_database = database_of(env.source_url)
        self.pg_databases = (self.target_database,)
        self.folder = folder
        self.schemas: list[str] = []

    def file(self, name: str) -> Path:
        path = self.folder / f"{name}.toml"
        path.write_text(self.TEXT.format(schema=name))
        return path

    def run_args(self, name: str, chunk_rows: int | None = None) -> list[str]:
        return [str(self.file(name)), *self.target_args(name), "--chunk-rows", str(chunk_rows or self.chunk_rows)]

    def target_args(self, name: str) -> tuple[str, ...]:
        self.schemas.append(name)
        return ("--source-url", self.env.source_url, "--target-url", self.env.source_url)

    def prepare_target(self, name: str) -> None:
        """The table, created as a run creates it, so it can be held before the run starts."""
        from common.declarative.catalogue import migration_for

        cls = migration_for(str(self.file(name)), None)
        migration = cls(self.env.source_url, self.env.source_url, cls.plan_options())
        try:
            migration.prepare_target()
        finally:
            migration.close()
        self.schemas.append(name)

    @cached_property
    def _expected(self) -> Expected:
        import json

        rejected = []
        for row_id, features in self.env.sql("SELECT id, features FROM archived_predictions WHERE features IS NOT NULL"):
            try:
                json.loads(features)
            except ValueError:
                rejected.append(json.dumps([str(row_id)]))
        total = self.env.data.total_rows
        return Expected(total, tuple(sorted(rejected)), {"predictions": total - len(rejected)})

    def expected(self) -> Expected:
        return self._expected

    def cleanup(self) -> None:
        with psycopg.connect(self.env.source_url, autocommit=True) as conn:
            for name in set(self.schemas):
                conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

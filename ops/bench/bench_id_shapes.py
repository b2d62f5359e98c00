#!/usr/bin/env python
"""How the shape of `_id` changes the MongoDB server's insert rate as a collection grows (information for
`mlflow-to-mongo`'s choice of `_id`, not a target of its own).

    .venv/bin/python ops/bench/bench_id_shapes.py --rows 1000000

The metrics documents of a generated MLflow database (bench_mlflow_to_mongo's source, Shuttle's own
documents) are inserted by one client, `insert_many` of 1,000, into a fresh database per shape, in
source key order as a run writes them; the rate is printed per block of `--block` documents. Shapes:
  digest   Shuttle's `_id` for a composite key: 22 characters of BLAKE2b (mlflow_mapping.key_digest);
  text     the key's JSON text (~90 characters for metrics), Shuttle's `_id` before 2026-12-01;
  objectid a client-generated ObjectId, what the reference tool's unkeyed inserts get.
Every other field is the same in all three. MongoDB: nx-27017 started here, or SHUTTLE_TEST_MONGO_URI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import bson
import pymongo
from bson import ObjectId
from bson.raw_bson import RawBSONDocument

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mlflow_to_mongo import PG, build_source, prebuild, with_database  # noqa: E402
from benchlib import db, log  # noqa: E402

from common.migrations.mlflow_mapping import id_text  # noqa: E402
from tests.mongo_server import REAL_MONGO_URI, NxServer  # noqa: E402

METRICS_KEY = ("key", "timestamp", "step", "run_uuid", "value", "is_nan")
SHAPES = {
    "digest": lambda doc: doc["_id"],
    "text": lambda doc: id_text(tuple(doc[k] for k in METRICS_KEY)),
    "objectid": lambda doc: ObjectId(),
}


def reshaped(batches: list[list[RawBSONDocument]], shape: str) -> list[list[RawBSONDocument]]:
    """The same documents with the `_id` of `shape`, encoded before the clock starts."""
    make_id = SHAPES[shape]
    out = []
    for batch in batches:
        docs = [bson.decode(raw.raw) for raw in batch]
        out.append([RawBSONDocument(bson.encode({**doc, "_id": make_id(doc)})) for doc in docs])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="source rows over all tables")
    parser.add_argument("--block", type=int, default=200_000, help="documents per printed rate")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    source_url = f"{PG}/shuttle_idshapes_{os.getpid()}_src"
    server = None if REAL_MONGO_URI else NxServer().start()
    mongo_uri = REAL_MONGO_URI.rstrip("/") if REAL_MONGO_URI else server.uri
    client = pymongo.MongoClient(mongo_uri)
    try:
        log(f"building {source_url}: ~{args.rows:,} rows …")
        build_source(source_url, args.rows)
        metrics = [batch for name, batch in prebuild(source_url, with_database(mongo_uri, "idshapes_x"))
                   if name == "metrics"]
        log(f"{sum(map(len, metrics)):,} metrics documents")
        for shape in args.shapes.split(","):
            batches = reshaped(metrics, shape)
            database = f"idshapes_{os.getpid()}_{shape}"
            rates, done, started = [], 0, time.monotonic()
            for batch in batches:
                client[database].metrics.insert_many(batch, ordered=False)
                done += len(batch)
                if done % args.block == 0:
                    rates.append(args.block / (time.monotonic() - started))
                    started = time.monotonic()
            client.drop_database(database)
            size = len(batches[0][0].raw)
            print(f"{shape:9s} {size} bytes/doc; documents/s per {args.block:,}: "
                  + ", ".join(f"{r:,.0f}" for r in rates), flush=True)
    finally:
        client.close()
        with db(f"{PG}/postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{source_url.rsplit("/", 1)[1]}" WITH (FORCE)')
        if server:
            server.cleanup()


if __name__ == "__main__":
    main()

"""Flower as Shuttle ships it: `celery -A worker flower --conf=ops/flower/flowerconfig.py`.

Flower executes this file at start. Every value can still be overridden by a flag or a FLOWER_*
variable (FLOWER_BASIC_AUTH=user:password turns basic auth on; compose and the deploy recipes set it).

- The task list shows what a chunk is and how far it got: `args` is the chunk's label (entity,
  partition, key range, estimated rows; never rows or credentials), `result` is a running chunk's
  progress (`{'rows': …, 'est_rows': …}`) and a finished one's counts, or its error.
- History survives a restart: the state is saved to FLOWER_DB (default /tmp/shuttle-flower.db; point
  it at a volume) at shutdown and every 60 s.
- `/metrics` (Flower's Prometheus endpoint) is behind the same basic auth as the pages and the API;
  Prometheus scrapes it with `basic_auth` (ops/prometheus/prometheus.yml). `/healthcheck` stays open,
  for container and Kubernetes probes: it answers "OK" and nothing else.
"""

import os

import tornado.web
from flower.views import monitor

tasks_columns = "name,state,args,result,runtime,worker,retries,received,uuid"  # uuid (the chunk id) links the task page
persistent = True
db = os.environ.get("FLOWER_DB", "/tmp/shuttle-flower.db")
state_save_interval = 60_000  # ms
max_tasks = 100_000
natural_time = False

# /metrics behind the configured authentication (Flower serves it openly otherwise).
if not getattr(monitor.Metrics.get, "__wrapped__", None):
    monitor.Metrics.get = tornado.web.authenticated(monitor.Metrics.get)

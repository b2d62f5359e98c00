"""`shuttle rollback RUN`: start a `userdata-rollback` run that undoes a `userdata-split` run.

The rollback reads what the split wrote and writes where the split read: its source is the split's target
and its target the split's source, with the split's databases and selection. Passwords come from this
process's settings, as for every run (the ledger keeps URLs without them).
"""

from __future__ import annotations

from common.errors import ConfigError
from common.ledger import RunRecord
from common.migrations.base import Selection
from common.settings import Settings
from common.urls import with_password
from producer import commands

SPLIT = "userdata-split"
ROLLBACK = "userdata-rollback"


def start_rollback(settings: Settings, split_run_id: str, into: str | None, verify: bool, chunk_rows: int,
                   max_rejects: int | None = None, batch_size: int | None = None) -> RunRecord:
    """Plan, record and enqueue the rollback of `split_run_id`; returns the new run."""
    with commands.open_ledger(settings) as ledger:
        split = commands.require_run(ledger, split_run_id)
    if split.migration != SPLIT:
        raise ConfigError(f"run {split_run_id} is a '{split.migration}' run; `shuttle rollback` undoes "
                          f"'{SPLIT}' runs only")
    known = settings.known_urls()
    options = split.options
    return commands.start_run(
        settings, ROLLBACK, Selection.from_dict(split.selection), chunk_rows, max_rejects,
        source_url=with_password(split.target_url or "", known), target_url=with_password(split.source_url or "", known),
        source_database=options.get("target_database"), target_database=options.get("source_database"),
        original=options.get("source_collection") or "user_data", into=into, verify=verify, batch_size=batch_size,
        split_run=split_run_id)

"""The catalogue: migration name → class, imported only when asked for."""

from __future__ import annotations

from importlib import import_module

from common.errors import ConfigError
from common.migrations.base import Migration, Selection

CATALOGUE: dict[str, str] = {
    "modmon": "common.migrations.modmon:Modmon",
    "mlflow-latest-metrics": "common.migrations.mlflow_latest_metrics:LatestMetrics",
    "mlflow-to-mongo": "common.migrations.mlflow_to_mongo:MlflowToMongo",
    "model-files": "common.migrations.model_files:ModelFiles",
    "userdata-split": "common.migrations.userdata_split:UserdataSplit",
    "userdata-rollback": "common.migrations.userdata_rollback:UserdataRollback",
}


def migration_class(name: str) -> type[Migration]:
    """The class of migration `name`, or a ConfigError listing the catalogue."""
    try:
        module_name, _, class_name = CATALOGUE[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown migration '{name}'; available: {', '.join(sorted(CATALOGUE))} "
                          "(see `shuttle migrations`)") from None
    return getattr(import_module(module_name), class_name)


def all_migrations() -> list[type[Migration]]:
    return [migration_class(name) for name in sorted(CATALOGUE)]


__all__ = ["CATALOGUE", "Migration", "Selection", "all_migrations", "migration_class"]

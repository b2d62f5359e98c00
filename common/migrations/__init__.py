"""The catalogue: migration name → class, imported only when asked for.

Built-ins are listed here; other installed packages add theirs through the `shuttle.migrations`
entry point group (see `common.migrations.plugins`). A built-in's name always wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from common.errors import ConfigError
from common.migrations import plugins
from common.migrations.base import Migration, Selection

CATALOGUE: dict[str, str] = {
    "modmon": "common.migrations.modmon:Modmon",
    "mlflow-latest-metrics": "common.migrations.mlflow_latest_metrics:LatestMetrics",
    "mlflow-to-mongo": "common.migrations.mlflow_to_mongo:MlflowToMongo",
    "model-files": "common.migrations.model_files:ModelFiles",
    "userdata-split": "common.migrations.userdata_split:UserdataSplit",
    "userdata-rollback": "common.migrations.userdata_rollback:UserdataRollback",
}
BUILTIN_PACKAGE = "built-in"


@dataclass(frozen=True)
class CatalogueEntry:
    """One line of `shuttle migrations`: the class, or why a plugin's cannot be used."""

    name: str
    package: str
    cls: type[Migration] | None
    problem: str | None = None


def installed_plugins() -> dict[str, plugins.Plugin]:
    return plugins.discover(frozenset(CATALOGUE))


def migration_class(name: str) -> type[Migration]:
    """The class of migration `name`, or a ConfigError listing the catalogue."""
    if name in CATALOGUE:
        module_name, _, class_name = CATALOGUE[name].partition(":")
        return getattr(import_module(module_name), class_name)
    found = installed_plugins()
    if name in found:
        return plugins.load(found[name])
    available = sorted({*CATALOGUE, *(n for n, p in found.items() if p.problem is None)})
    raise ConfigError(f"unknown migration '{name}'; available: {', '.join(available)} (see `shuttle migrations`; "
                      f"a plugin's package must be installed wherever `shuttle` and the workers run)")


def catalogue() -> list[CatalogueEntry]:
    """Built-ins, then plugins; a plugin that cannot be loaded is listed with its problem."""
    entries = [CatalogueEntry(name, BUILTIN_PACKAGE, migration_class(name)) for name in sorted(CATALOGUE)]
    for name, plugin in sorted(installed_plugins().items()):
        try:
            entries.append(CatalogueEntry(name, plugin.package, plugins.load(plugin)))
        except ConfigError as exc:
            entries.append(CatalogueEntry(name, plugin.package, None, str(exc)))
    return entries


def all_migrations() -> list[type[Migration]]:
    """Every migration that can be used: the built-ins and the plugins that load."""
    return [entry.cls for entry in catalogue() if entry.cls is not None]


__all__ = ["BUILTIN_PACKAGE", "CATALOGUE", "CatalogueEntry", "Migration", "Selection", "all_migrations", "catalogue", "installed_plugins",
           "migration_class"]

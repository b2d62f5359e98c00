"""Migrations from other installed packages: the `shuttle.migrations` entry point group.

A package adds a migration to the catalogue by declaring, in its pyproject.toml,

    [project.entry-points."shuttle.migrations"]
    orders-compact = "shuttle_orders.migration:OrdersCompact"

where the entry point's name is the migration's name and its value a `Migration` subclass. Finding
the entry points reads installed packages' metadata only (no import); a plugin's code is imported the
first time its migration is asked for, so a broken plugin costs nothing until then and never breaks
the built-ins. Workers look migrations up the same way, so the package must be installed on every
worker host as well as where `shuttle` runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from common.errors import ConfigError
from common.migrations.base import Migration

ENTRY_POINT_GROUP = "shuttle.migrations"
REQUIRED_ATTRIBUTES = ("name", "summary", "source_kind", "target_kind", "partition_label", "status")


@dataclass(frozen=True)
class Plugin:
    """One entry point of the group, found but not imported; `problem` says why it cannot be used."""

    name: str
    target: str  # "module:Class", as the entry point declares it
    package: str  # "distribution version", the package that declared it
    problem: str | None = None

    @property
    def origin(self) -> str:
        return f"entry point '{self.name} = {self.target}' of package {self.package} (group {ENTRY_POINT_GROUP})"


def _package_of(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    if dist is None:
        return "unknown package"
    return f"{dist.metadata['Name'] or dist.name} {dist.version}"


@functools.cache
def discover(builtin_names: frozenset[str]) -> dict[str, Plugin]:
    """The group's entry points by name, each with its problem if it clashes with a built-in or with
    another plugin. Cached: the installed packages do not change under a running process."""
    by_name: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(point.name, []).append(point)
    found: dict[str, Plugin] = {}
    for name, points in by_name.items():
        packages = ", ".join(_package_of(p) for p in points)
        problem = None
        if name in builtin_names:
            problem = (f"its name clashes with the built-in migration '{name}'; the built-in is used and the "
                       "plugin is ignored (rename the entry point)")
        elif len(points) > 1:
            problem = f"the name '{name}' is declared by more than one package ({packages}); uninstall all but one"
        found[name] = Plugin(name, points[0].value, packages, problem)
    return found


def load(plugin: Plugin) -> type[Migration]:
    """Import the plugin's class and check it is a usable Migration; a ConfigError naming the
    package and the entry point otherwise."""
    if plugin.problem:
        raise ConfigError(f"plugin migration '{plugin.name}' cannot be used: {plugin.problem} [{plugin.origin}]")
    point = EntryPoint(name=plugin.name, value=plugin.target, group=ENTRY_POINT_GROUP)
    try:
        cls = point.load()
    except Exception as exc:  # noqa: BLE001 - any failure inside third-party code at import is the plugin's
        raise ConfigError(f"plugin migration '{plugin.name}' could not be imported: {type(exc).__name__}: {exc} "
                          f"[{plugin.origin}]") from None
    if not (isinstance(cls, type) and issubclass(cls, Migration)):
        raise ConfigError(f"plugin migration '{plugin.name}' is not a subclass of "
                          f"common.migrations.base.Migration (got {cls!r}) [{plugin.origin}]")
    missing = [attr for attr in REQUIRED_ATTRIBUTES if not isinstance(getattr(cls, attr, None), str)]
    if missing:
        raise ConfigError(f"plugin migration '{plugin.name}' lacks the class attributes {', '.join(missing)} "
                          f"[{plugin.origin}]")
    if cls.name != plugin.name:
        raise ConfigError(f"plugin migration '{plugin.name}': its class says name = '{cls.name}'; the entry point's "
                          f"name and the class's `name` must be the same [{plugin.origin}]")
    if getattr(cls, "__abstractmethods__", None):
        raise ConfigError(f"plugin migration '{plugin.name}' does not implement "
                          f"{', '.join(sorted(cls.__abstractmethods__))} [{plugin.origin}]")
    return cls

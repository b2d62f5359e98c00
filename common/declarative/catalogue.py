"""Declared migrations beside the built-ins: a name or a path → the class the engine runs.

    shuttle run path/to/file.toml     the file itself
    shuttle run predictions-compact   a built-in of that name, else the file in SHUTTLE_MIGRATIONS_DIR
                                      whose [migration] name it is
    a run's chunks, report, verify …  rebuilt from the spec stored in the run's options (`declared`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.declarative.loader import load_spec
from common.declarative.migration import DeclaredMigration, declared_class
from common.declarative.spec import MigrationSpec
from common.errors import ConfigError
from common.migrations import CATALOGUE, Migration, installed_plugins, migration_class


@dataclass(frozen=True)
class DeclaredFile:
    """A file of the migrations folder: its spec, or what is wrong with it."""

    path: Path
    spec: MigrationSpec | None
    error: str | None


def looks_like_file(name: str) -> bool:
    return name.endswith(".toml") or "/" in name


def scan(directory: Path | None) -> list[DeclaredFile]:
    """Every `*.toml` of the folder, sorted; a bad file, a name taken twice or a built-in's name is an error."""
    if directory is None or not directory.is_dir():
        return []
    found: list[DeclaredFile] = []
    for path in sorted(directory.glob("*.toml")):
        try:
            found.append(DeclaredFile(path, load_spec(path), None))
        except ConfigError as exc:
            found.append(DeclaredFile(path, None, str(exc)))
    seen: dict[str, Path] = {}
    checked = []
    for item in found:
        if item.spec is not None:
            name = item.spec.name
            if name in CATALOGUE:
                item = DeclaredFile(item.path, None, f"{item.path}: name {name!r} is a built-in migration's; "
                                    "choose another [migration] name")
            elif name in seen:
                item = DeclaredFile(item.path, None, f"{item.path}: name {name!r} is also declared in {seen[name]}")
            else:
                seen[name] = item.path
        checked.append(item)
    return checked


def migration_for(name: str, directory: Path | None) -> type[Migration]:
    """The class to plan a run of `name`: a file path, a built-in, or a file of the migrations folder."""
    if looks_like_file(name):
        spec = load_spec(name)
        if spec.name in CATALOGUE:
            raise ConfigError(f"{name}: name {spec.name!r} is a built-in migration's; choose another [migration] name")
        return declared_class(spec)
    if name in CATALOGUE or name in installed_plugins():
        return migration_class(name)  # a plugin's problem (import error, clash) is raised from here
    for item in scan(directory):
        if item.spec is not None and item.spec.name == name:
            return declared_class(item.spec)
    declared = [i.spec.name for i in scan(directory) if i.spec is not None]
    plugged = [n for n, p in installed_plugins().items() if p.problem is None]
    raise ConfigError(f"unknown migration '{name}'; available: {', '.join(sorted([*CATALOGUE, *plugged, *declared]))} "
                      "(see `shuttle migrations`), or give the path of a migration file (.toml)")


def migration_of_options(name: str, options: dict[str, Any]) -> type[Migration]:
    """The class of a recorded run: declared when its options carry a spec, else the built-in `name`."""
    if "declared" in options:
        return declared_class(MigrationSpec.from_dict(options["declared"]))
    return migration_class(name)


def declared_urls(cls: type[Migration]) -> tuple[str | None, str | None]:
    """The source and target URLs a declared migration's file gives (`${ENV_VAR}` expanded), else None."""
    if not issubclass(cls, DeclaredMigration):
        return None, None
    from common.declarative.loader import expand_env

    return (expand_env(cls.spec.source.url, f"{cls.spec.name}: [source] url"),
            expand_env(cls.spec.target.url, f"{cls.spec.name}: [target] url"))

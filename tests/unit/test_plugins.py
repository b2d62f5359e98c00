"""Plugins found through the `shuttle.migrations` entry point group: good ones join the catalogue, broken
ones are named with their package and entry point, and never break the built-ins.

Each test lays out installed-package metadata (a dist-info folder, as pip writes it) in a folder of its own
and puts it on sys.path, so nothing is installed anywhere."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.migrations import CATALOGUE, catalogue, migration_class, plugins
from tests.harness import PROJECT_ROOT

FINE_MODULE = '''
from common.migrations.base import Migration


class Fine(Migration):
    name = "fine-one"
    summary = "a plugin that loads"
    source_kind = "postgres"
    target_kind = "postgres"
    partition_label = "thing"
    status = "available"

    def check_services(self): pass
    def count_partitions(self, selection): return []
    def plan_chunks(self, selection, chunk_rows): return iter(())
    def prepare_target(self): pass
    def run_chunk(self, spec, progress): raise NotImplementedError
    def target_counts(self, partitions): return {}
    def verify(self, selection, partitions, rejected): return []
    def close(self): pass


def helper():
    return 1
'''


def install_fake(site: Path, package: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """What `pip install` leaves behind: the modules, and a dist-info folder with the entry points."""
    dist = site / f"{package.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (dist / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for fake installed packages; the discovery cache is emptied around each test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.discover.cache_clear()
    yield tmp_path
    plugins.discover.cache_clear()
    for name in ("fine_plugin", "broken_plugin"):
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def test_a_plugin_joins_the_catalogue_with_its_package(site):
    install_fake(site, "fine-plugin", {"fine-one": "fine_plugin:Fine"}, {"fine_plugin": FINE_MODULE})
    entries = {e.name: e for e in catalogue()}
    assert entries["fine-one"].package == "fine-plugin 1.0" and entries["fine-one"].problem is None
    assert migration_class("fine-one").summary == "a plugin that loads"
    assert set(CATALOGUE) <= set(entries) and all(entries[n].package == "built-in" for n in CATALOGUE)


def test_discovery_imports_no_plugin_code(site):
    install_fake(site, "fine-plugin", {"fine-one": "fine_plugin:Fine"}, {"fine_plugin": FINE_MODULE})
    found = plugins.discover(frozenset(CATALOGUE))
    assert "fine-one" in found and "fine_plugin" not in sys.modules
    migration_class("modmon")  # a built-in is looked up without touching plugins at all
    assert "fine_plugin" not in sys.modules


def test_an_import_error_names_package_and_entry_point_and_spares_the_builtins(site):
    install_fake(site, "broken-plugin", {"broken-one": "broken_plugin:Broken"},
                 {"broken_plugin": "import shuttle_no_such_dependency\n"})
    with pytest.raises(ConfigError) as raised:
        migration_class("broken-one")
    message = str(raised.value)
    assert "plugin migration 'broken-one' could not be imported: ModuleNotFoundError" in message
    assert "shuttle_no_such_dependency" in message
    assert "entry point 'broken-one = broken_plugin:Broken' of package broken-plugin 1.0" in message
    entries = {e.name: e for e in catalogue()}
    assert entries["broken-one"].cls is None and "ModuleNotFoundError" in entries["broken-one"].problem
    assert all(entries[name].cls is not None for name in CATALOGUE)


def test_a_name_clash_with_a_builtin_keeps_the_builtin(site):
    install_fake(site, "clash-plugin", {"modmon": "fine_plugin:Fine"}, {"fine_plugin": FINE_MODULE})
    assert migration_class("modmon").__module__ == "common.migrations.modmon"
    clash = [e for e in catalogue() if e.package == "clash-plugin 1.0"]
    assert len(clash) == 1 and "clashes with the built-in migration 'modmon'" in clash[0].problem
    assert "fine_plugin" not in sys.modules


def test_two_packages_with_one_name_are_both_named(site):
    install_fake(site, "fine-plugin", {"fine-one": "fine_plugin:Fine"}, {"fine_plugin": FINE_MODULE})
    install_fake(site, "other-plugin", {"fine-one": "fine_plugin:Fine"}, {})
    with pytest.raises(ConfigError, match="declared by more than one package"):
        migration_class("fine-one")


def test_not_a_migration_class_is_refused(site):
    install_fake(site, "odd-plugin", {"odd-one": "fine_plugin:helper"}, {"fine_plugin": FINE_MODULE})
    with pytest.raises(ConfigError, match="is not a subclass of common.migrations.base.Migration.*odd-plugin 1.0"):
        migration_class("odd-one")


def test_entry_point_name_must_match_the_class_name(site):
    install_fake(site, "renamed-plugin", {"other-name": "fine_plugin:Fine"}, {"fine_plugin": FINE_MODULE})
    with pytest.raises(ConfigError, match="its class says name = 'fine-one'"):
        migration_class("other-name")


def test_cli_lists_a_broken_plugin_and_refuses_to_run_it(tmp_path):
    install_fake(tmp_path, "broken-plugin", {"broken-one": "broken_plugin:Broken"},
                 {"broken_plugin": "raise RuntimeError('plugin bug at import')\n"})
    env = {"PYTHONPATH": f"{tmp_path}:{PROJECT_ROOT}", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-m", "producer", "migrations", "--json"], env=env, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {m["name"]: m for m in json.loads(listed.stdout)}
    assert rows["broken-one"]["status"] == "broken" and "plugin bug at import" in rows["broken-one"]["problem"]
    assert set(CATALOGUE) <= set(rows)
    table = subprocess.run([sys.executable, "-m", "producer", "migrations"], env=env, cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "broken-plugin 1.0" in table.stdout and "modmon" in table.stdout
    started = subprocess.run([sys.executable, "-m", "producer", "run", "broken-one"], env=env, cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 2
    assert "plugin migration 'broken-one' could not be imported: RuntimeError: plugin bug at import" in started.stderr
    assert "package broken-plugin 1.0" in started.stderr

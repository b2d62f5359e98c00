"""Typed settings, built once per entry point (CLI command, worker process) and passed down.

Precedence, lowest to highest: defaults, environment (`SHUTTLE_*`), the config file (TOML or JSON),
command-line flags. Unknown keys and wrong types are configuration errors that name the key.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import ConfigError
from common.urls import UrlRefused, mask, normalized


def _one_url_form(value: str | None) -> str | None:
    """Every URL setting in the one form Shuttle handles (`common.urls.normalize`), or refused.

    Done here, where URLs come in, so a worker's own settings (whatever form its environment uses)
    match the password-less URLs of the ledger, and nothing downstream meets a form it cannot mask.
    An empty value is left as unset.
    """
    if not value:
        return value
    try:
        return normalized(value)
    except UrlRefused as exc:
        raise PydanticCustomError("url", str(exc)) from None


class MigrationSettings(BaseModel):
    """Per-migration overrides, from a `[migrations.NAME]` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    source_url: str | None = None
    target_url: str | None = None

    check_urls = field_validator("source_url", "target_url")(_one_url_form)


class Settings(BaseSettings):
    """Everything Shuttle can be told; each field is also `SHUTTLE_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SHUTTLE_", extra="forbid", validate_default=True)

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = Field(
        default=None, description="Celery result backend; defaults to the broker when it is Redis.")
    ledger_url: str = "postgresql://postgres@127.0.0.1:5432/shuttle"
    source_url: str | None = None
    target_url: str | None = None
    flower_url: str = "http://127.0.0.1:5555"
    queue: str = "shuttle"
    chunk_rows: int = Field(default=50_000, gt=0)
    max_rejects: int | None = Field(default=None, ge=0)
    batch_size: int | None = Field(default=None, gt=0, description="Rows per write batch inside a chunk.")
    sample: int | None = Field(default=None, ge=0, description="Rows per table compared field by field.")
    dry_run: bool = Field(default=False, description="`shuttle run` only shows the plan.")
    visibility_timeout: int = Field(default=6 * 3600, gt=0, description="Seconds; above the longest chunk.")
    task_max_retries: int = Field(default=8, ge=0, description="Retries of a transient error: about 3 minutes.")
    retry_backoff_max: int = Field(default=60, gt=0)
    heartbeat_interval: float = Field(default=5.0, gt=0, description="Seconds between a running chunk's heartbeats.")
    stale_after: float = Field(default=30.0, gt=0, description="Seconds of silence after which a running "
                               "chunk's worker is taken for gone and the chunk is sent again.")
    sweep_interval: float = Field(default=10.0, gt=0, description="Seconds between two sweeps (workers, `watch`).")
    lost_after: float = Field(default=30.0, gt=0, description="Seconds a queued chunk may be missing from the "
                              "broker before it is sent again.")
    finalize_stale_after: float = Field(default=300.0, gt=0, description="Seconds after which a coordinator "
                                        "that has not closed its run is started again.")
    sweeper: bool = Field(default=True, description="Workers sweep stale and lost chunks (one at a time).")
    migrations: dict[str, MigrationSettings] = Field(default_factory=dict)
    migrations_dir: Path | None = Field(default=None, description="Folder of declared migration files (*.toml), "
                                        "listed by `shuttle migrations` and run by their [migration] name.")

    check_urls = field_validator("ledger_url", "source_url", "target_url")(_one_url_form)

    @field_validator("broker_url", "result_backend")
    @classmethod
    def check_broker_urls(cls, value: str | None) -> str | None:
        """Like the other URLs, each of a `;`-separated failover list (kombu's form) on its own."""
        return ";".join(_one_url_form(part) or "" for part in value.split(";")) if value else value

    @field_validator("queue", "flower_url")
    @classmethod
    def check_utf8(cls, value: str) -> str:
        """A name from an environment holding undecodable bytes is refused here, not deep in a driver."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError("utf8", f"not valid UTF-8 (an undecodable byte at position {exc.start})") from None
        return value

    def urls_for(self, migration: str) -> tuple[str | None, str | None]:
        """Source and target URL for a migration: its own section first, then the global ones."""
        own = self.migrations.get(migration, MigrationSettings())
        return own.source_url or self.source_url, own.target_url or self.target_url

    def known_urls(self) -> list[str]:
        """Every URL this process was configured with; workers take passwords from these."""
        urls = [self.ledger_url, self.source_url, self.target_url]
        for own in self.migrations.values():
            urls += [own.source_url, own.target_url]
        return [u for u in urls if u]

    @property
    def effective_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return "redis://127.0.0.1:6379/1"


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or JSON config file into plain data (validation happens in `load_settings`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror}); check the path") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table of settings")
    return from_reference_layout(data, path)


# The layout of the config files the reference MLflow → MongoDB tool reads (seeds/): sections `source`,
# `destination` and `settings` (or `migration_settings`), mapped onto ours so those files work as they are.
_SOURCE_KEYS = ("connection_uri", "uri", "url")
_DESTINATION_KEYS = ("connection_uri", "uri", "url", "recommended")
_SETTING_KEYS = {"batch_size": "batch_size", "dry_run": "dry_run", "sample": "sample", "chunk_rows": "chunk_rows",
                 "max_rejects": "max_rejects", "validate_data": None}


def from_reference_layout(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Our settings from a file with `source` / `destination` / `settings` sections; other files unchanged."""
    sections = ("source", "destination", "settings", "migration_settings")
    if not any(isinstance(data.get(name), dict) for name in sections):
        return data
    out = {k: v for k, v in data.items() if k not in sections}
    for section, keys, setting in (("source", _SOURCE_KEYS, "source_url"),
                                   ("destination", _DESTINATION_KEYS, "target_url")):
        values = data.get(section) or {}
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)} in [{section}]; "
                              f"use one of: {', '.join(keys)}")
        url = next((values[k] for k in keys if values.get(k)), None)
        if url:
            out[setting] = url
    for section in ("settings", "migration_settings"):
        for key, value in (data.get(section) or {}).items():
            if key not in _SETTING_KEYS:
                raise ConfigError(f"config file {path}: unknown key '{key}' in [{section}]; "
                                  f"use one of: {', '.join(sorted(_SETTING_KEYS))}")
            if key == "validate_data":
                if value is not True:
                    raise ConfigError(f"config file {path}: validate_data = {value!r}: Shuttle always verifies a "
                                      "run; remove the key or set it to true")
                continue
            out[_SETTING_KEYS[key]] = value
    return out


CONFIG_ENV = "SHUTTLE_CONFIG"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once: environment, then the config file, then non-None flag overrides.

    Without an explicit file, `SHUTTLE_CONFIG` may name one: that is how workers, which take no flags,
    learn the per-migration URLs (and their passwords) of `[migrations.NAME]` sections.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        where = f"config file {config_file}" if config_file else "settings"
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(mask(f"{where}: {problems}")) from None


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}' (see the configuration table in the README)"
    return f"'{key}': {err['msg']}"

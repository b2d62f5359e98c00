import json
import pickle

import pytest

from common.errors import ConfigError, DataError, TransientError
from common.settings import load_settings
from common.urls import mask, strip_password, with_password


def test_mask_hides_every_password_in_text():
    text = "failed: postgresql://app:s3cr%40t@db:5432/x and redis://:hunter2@cache:6379/0"
    masked = mask(text)
    assert "s3cr" not in masked and "hunter2" not in masked
    assert "postgresql://app:***@db:5432/x" in masked and "redis://:***@cache:6379/0" in masked


def test_strip_and_restore_password():
    url = "postgresql://app:pw@db.internal:5433/mlflow?sslmode=require"
    public = strip_password(url)
    assert public == "postgresql://app@db.internal:5433/mlflow?sslmode=require"
    assert with_password(public, ["postgresql://other:x@db.internal:5433/a", url]) == url
    assert with_password(public, ["postgresql://app:pw@elsewhere:5433/mlflow"]) == public


def test_precedence_env_then_file_then_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("SHUTTLE_CHUNK_ROWS", "111")
    monkeypatch.setenv("SHUTTLE_QUEUE", "from-env")
    assert load_settings().chunk_rows == 111
    config = tmp_path / "shuttle.toml"
    config.write_text('chunk_rows = 222\n[migrations.modmon]\nsource_url = "postgresql://u@h/src"\n')
    settings = load_settings(config)
    assert (settings.chunk_rows, settings.queue) == (222, "from-env")
    assert settings.urls_for("modmon")[0] == "postgresql://u@h/src"
    assert load_settings(config, chunk_rows=333).chunk_rows == 333


def test_shuttle_config_names_the_file_of_a_process_without_flags(tmp_path, monkeypatch):
    """Workers take no --config: SHUTTLE_CONFIG gives them the per-migration URLs and passwords."""
    config = tmp_path / "workers.toml"
    config.write_text('[migrations.mlflow-to-mongo]\ntarget_url = "mongodb://u:pw@mongo:27017/mlflow"\n')
    monkeypatch.setenv("SHUTTLE_CONFIG", str(config))
    settings = load_settings()
    assert settings.urls_for("mlflow-to-mongo")[1] == "mongodb://u:pw@mongo:27017/mlflow"
    assert "mongodb://u:pw@mongo:27017/mlflow" in settings.known_urls()
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("chunk_rows = 7\n")
    assert load_settings(explicit).migrations == {}, "an explicit --config wins over SHUTTLE_CONFIG"
    monkeypatch.setenv("SHUTTLE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="missing.toml: cannot be read"):
        load_settings()


def test_config_file_unknown_key_and_wrong_type_are_named(tmp_path):
    config = tmp_path / "shuttle.json"
    config.write_text(json.dumps({"chunk_rowz": 5}))
    with pytest.raises(ConfigError, match="unknown key 'chunk_rowz'"):
        load_settings(config)
    config.write_text(json.dumps({"chunk_rows": "many"}))
    with pytest.raises(ConfigError, match="'chunk_rows'"):
        load_settings(config)


def test_config_errors_mask_passwords(tmp_path):
    config = tmp_path / "shuttle.toml"
    config.write_text('ledger_url = "postgresql://u:topsecret@h/db"\nchunk_rows = -1\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert "topsecret" not in str(err.value)


@pytest.mark.parametrize("cls", [ConfigError, DataError, TransientError])
def test_errors_pickle_across_processes(cls):
    again = pickle.loads(pickle.dumps(cls("what and how to fix it")))
    assert type(again) is cls and str(again) == "what and how to fix it"

import json
import pickle
from urllib.parse import quote

import pytest
from psycopg.conninfo import conninfo_to_dict

from common.errors import ConfigError, DataError, TransientError
from common.settings import load_settings
from common.urls import libpq_url, mask, normalize, strip_password, with_password


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


# -- every form of a password: one URL form inside, masked outside, refused when ambiguous ---------------

SECRET = "Pw0rd-Zq7 s@f%e"  # a space, an '@' and a '%': each must be encoded to stand in a URL
ENCODED = quote(SECRET, safe="")


def _leaks(text: str) -> bool:
    return "Pw0rd" in text


@pytest.mark.parametrize("given", [
    f"postgresql://app:{ENCODED}@db.internal:5433/mlflow?sslmode=require",
    f"postgresql://app@db.internal:5433/mlflow?sslmode=require&password={ENCODED}",
    f"postgresql://db.internal:5433/mlflow?user=app&password={ENCODED}&sslmode=require",
    f"host=db.internal port=5433 user=app password='{SECRET}' dbname=mlflow sslmode=require",
    f"postgres://app@[::1]:5433/mlflow?password={ENCODED}",
    f"host=/var/run/postgresql user=app password='{SECRET}' dbname=mlflow",
    f"postgresql://app@h1:5432,h2:5433/mlflow?password={ENCODED}",
])
def test_every_postgres_form_of_a_password_becomes_one_url_that_libpq_reads_the_same(given):
    url = normalize(given, "--source-url")
    assert url.startswith(("postgresql://app:", "postgres://app:")) and "password" not in url
    assert conninfo_to_dict(libpq_url(url)) == conninfo_to_dict(given.replace("postgres://", "postgresql://"))
    assert normalize(url, "--source-url") == url, "normalizing twice changes nothing"
    public = strip_password(url)
    assert not _leaks(public) and not _leaks(mask(url)) and not _leaks(mask(given))
    assert "password" not in conninfo_to_dict(libpq_url(public))
    assert with_password(public, ["postgresql://other:x@db.internal:5433/a", url]) == url


def test_a_worker_configured_in_another_form_gets_the_password_back(monkeypatch):
    """The producer was given the query form, the worker the keyword form: the same place, so the same secret."""
    producer = normalize(f"postgresql://app@db.internal:5433/mlflow?password={ENCODED}", "--source-url")
    monkeypatch.setenv("SHUTTLE_SOURCE_URL", f"host=db.internal port=5433 user=app password='{SECRET}' dbname=mlflow")
    worker = load_settings()
    stored = strip_password(producer)
    assert not _leaks(stored)
    restored = with_password(stored, worker.known_urls())
    assert conninfo_to_dict(restored)["password"] == SECRET
    assert with_password(stored, [f"postgresql://app:{ENCODED}@elsewhere:5433/mlflow"]) == stored


def test_mongodb_urls_keep_their_form_and_lose_only_the_password():
    url = normalize(f"mongodb://app:{ENCODED}@m1:27017,m2:27017/mlflow?authSource=admin&replicaSet=rs0", "--target-url")
    public = strip_password(url)
    assert public == "mongodb://app@m1:27017,m2:27017/mlflow?authSource=admin&replicaSet=rs0"
    assert with_password(public, [url]) == url
    assert mask(url) == "mongodb://app:***@m1:27017,m2:27017/mlflow?authSource=admin&replicaSet=rs0"


@pytest.mark.parametrize("given, problem", [
    ("postgresql://app:Pw0rd%zz@db/x", "'%' not followed by two hex digits"),
    ("postgresql://app:Pw0rd@x@db/x", "an '@' that does not end its user info"),
    ("postgresql://app:Pw0rd/x@db/x", "an '@' that does not end its user info"),
    ("postgresql://app:Pw0rd?x@db/x", "must be encoded"),
    ("postgresql://app:Pw0rd#x@db/x", "must be encoded"),
    ("postgresql://app:Pw0rd s@db/x", "must be encoded"),
    ("postgresql://app:Pw0rd@db/x?password=Pw0rd2", "given twice"),
    ("mongodb://app:Pw0rd@x@mongo/mlflow?authSource=admin", "an '@' that does not end its user info"),
    ("mongodb://app@mongo/mlflow?password=Pw0rd", "not in the query"),
    ("redis://:Pw0rd%g@cache:6379/0", "'%' not followed by two hex digits"),
    ("host=db password='Pw0rd", "libpq cannot read it"),
    ("Pw0rd", "neither a URL"),
    ("postgresql://app:Pw0rd\udcff@db/x", "not valid UTF-8"),
])
def test_urls_read_differently_by_drivers_are_refused_without_being_shown(given, problem):
    with pytest.raises(ConfigError) as err:
        normalize(given, "--source-url")
    assert str(err.value).startswith("--source-url: ") and problem in str(err.value)
    assert mask(str(err.value)) == str(err.value), "the message is shown as it is"
    assert not _leaks(str(err.value))


@pytest.mark.parametrize("text", [
    "connecting to postgresql://app:Pw0rd@Pw0rd%e@db/x failed",  # an unencoded '@' masked whole, not cut
    "connecting to postgresql://app@db/x?sslmode=require&password=Pw0rd&x=1 failed",
    "connecting to 'host=db user=app password=Pw0rd dbname=x' failed",
    f"connecting to host=db user=app password='{SECRET}' dbname=x failed",
    '{"source": "mongodb://app:Pw0rd@mongo/mlflow?authSource=admin"}',
])
def test_mask_hides_the_password_of_every_form(text):
    masked = mask(text)
    assert not _leaks(masked) and "***" in masked


def test_strip_password_of_forms_that_were_not_normalized():
    assert strip_password("postgresql://app@db/x?sslmode=require&password=Pw0rd") == "postgresql://app@db/x?sslmode=require"
    assert not _leaks(strip_password("host=db user=app password='Pw0rd x' dbname=x"))


def test_settings_normalize_every_url_and_refuse_naming_the_setting(monkeypatch):
    monkeypatch.setenv("SHUTTLE_LEDGER_URL", f"host=127.0.0.1 user=app password='{SECRET}' dbname=shuttle")
    assert load_settings().ledger_url == f"postgresql://app:{ENCODED}@127.0.0.1/shuttle"
    monkeypatch.setenv("SHUTTLE_LEDGER_URL", "postgresql://app:Pw0rd%@127.0.0.1/shuttle")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "'ledger_url'" in str(err.value) and "'%'" in str(err.value) and not _leaks(str(err.value))
    monkeypatch.delenv("SHUTTLE_LEDGER_URL")
    monkeypatch.setenv("SHUTTLE_BROKER_URL", "redis://:Pw0rd@x@cache:6379/0")
    with pytest.raises(ConfigError, match="'broker_url'") as err:
        load_settings()
    assert not _leaks(str(err.value))


@pytest.mark.parametrize("debug", [False, True])
def test_an_error_not_translated_yet_prints_no_password(monkeypatch, capsys, debug):
    from producer import cli, commands

    def plan(*args, **kwargs):
        raise RuntimeError("driver said: cannot use postgresql://app:Pw0rd@db/x?sslmode=require (password=Pw0rd)")

    monkeypatch.setattr(commands, "plan", plan)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*(["--debug"] if debug else []), "plan", "modmon", "--source-url", "postgresql://app@db/x",
                  "--target-url", "postgresql://app@db/x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and not _leaks(err) and "postgresql://app:***@db/x" in err
    assert ("Traceback" in err) == debug
    if not debug:
        assert err.startswith("FAILED: RuntimeError: driver said") and len(err.strip().splitlines()) == 1

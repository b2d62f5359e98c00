"""Error lines name the connection that failed, the setting to fix, and say when a password was refused."""

from __future__ import annotations

from common.errors import ServiceUnavailable
from common.service_errors import on_worker, reword_database_failure, service_unavailable


def test_ledger_and_broker_failures_name_the_setting_and_tell_authentication_apart():
    down = str(service_unavailable("ledger", "postgresql://u:***@db:1/shuttle", "Connection refused"))
    assert down.startswith("ledger postgresql://u:***@db:1/shuttle is unreachable") and "SHUTTLE_LEDGER_URL" in down
    refused = str(service_unavailable("ledger", "postgresql://u:***@db/shuttle",
                                      'FATAL:  password authentication failed for user "u"'))
    assert "authentication failed" in refused and "unreachable" not in refused and "PGPASSFILE" in refused
    wrongpass = str(service_unavailable("broker", "redis://:***@cache:6379/0", "WRONGPASS invalid username-password"))
    assert "authentication failed" in wrongpass and "SHUTTLE_BROKER_URL" in wrongpass


def test_source_and_target_failures_are_reworded_with_their_settings():
    exc = ServiceUnavailable("target database postgresql://u:***@db:1/x is unreachable: connection failed: "
                             "Connection refused; check the target URL and that the server is running")
    text = str(reword_database_failure(exc, "modmon"))
    assert text.startswith("target database postgresql://u:***@db:1/x is unreachable (connection failed")
    assert "--target-url, SHUTTLE_TARGET_URL or target_url in [migrations.modmon]" in text
    auth = ServiceUnavailable('source database postgresql://u:***@db/x is unreachable: FATAL:  password '
                              'authentication failed for user "u"; check the source URL and that the server is running')
    assert "source database postgresql://u:***@db/x: authentication failed" in str(reword_database_failure(auth, "m"))
    other = ServiceUnavailable("something else entirely")
    assert reword_database_failure(other, "m") is other


def test_a_workers_connection_failure_names_what_to_fix_on_that_worker():
    down = on_worker("source database postgresql://u:***@db:1/x is unreachable: connection failed: refused", "modmon")
    assert down.startswith("source database postgresql://u:***@db:1/x is unreachable from this worker")
    assert down.endswith("check that the server is running and that this worker's host can reach it")
    refused = on_worker('source database postgresql://u:***@db/x is unreachable: FATAL:  password authentication '
                        'failed for user "u"', "modmon")
    assert refused.startswith("source database postgresql://u:***@db/x: authentication failed on this worker")
    assert "SHUTTLE_SOURCE_URL, source_url in [migrations.modmon] of the worker's config file" in refused
    assert on_worker("deadlock detected", "modmon") == "deadlock detected"

"""Error lines name the connection that failed, the setting to fix, and say when a password was refused."""

from __future__ import annotations

from common.errors import ServiceUnavailable
from common.service_errors import reword_database_failure, service_unavailable


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

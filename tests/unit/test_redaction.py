"""A URL's credentials never leave nimflow in an error message or a run log line."""

from __future__ import annotations

import logging
import pickle

import pytest

from nimflow import log_filter
from nimflow.errors import ConfigError, PermanentError, Problem, ServiceUnavailable, translated_errors
from nimflow.redaction import redact_credentials, redact_url


@pytest.mark.parametrize(("text", "shown"), [
    ("http://user:pw@host:1/x", "http://***@host:1/x"),
    ("at https://tok@h and s3://a:b@c/d.", "at https://***@h and s3://***@c/d."),
    ("http://u:p@ss@host/", "http://***@host/"),          # a password with an unescaped '@'
    ("http://host/path@not-userinfo", "http://host/path@not-userinfo"),
    ("user:pw@host without a scheme", "user:pw@host without a scheme"),
])
def test_redact_credentials(text: str, shown: str) -> None:
    assert redact_credentials(text) == shown


def test_redact_url_keeps_a_default() -> None:
    assert redact_url(None, "huggingface.co") == "huggingface.co"
    assert redact_url("http://u:p@h") == "http://***@h"


def test_every_nimflow_error_redacts_its_message_and_keeps_it_through_pickling() -> None:
    error = ServiceUnavailable("Prefect API at http://admin:s3cret@prefect:4200/api is unreachable")
    assert "s3cret" not in str(error) and "s3cret" not in repr(error)
    assert "s3cret" not in str(pickle.loads(pickle.dumps(error)))
    assert "s3cret" not in str(ConfigError("spec", [Problem("cache.endpoint_url", "http://k:s3cret@minio:9000 is down")]))


def test_a_library_error_quoting_the_url_is_redacted_at_translation() -> None:
    with pytest.raises(PermanentError) as info, translated_errors("resolving org/x"):
        raise ValueError("Invalid URL 'http://hf:s3cret@hub.local/api/models'")
    assert "s3cret" not in str(info.value) and "http://***@hub.local/api/models" in str(info.value)


def test_run_log_lines_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    log_filter.install()
    logger = logging.getLogger("prefect.flow_runs")
    with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
        logger.info("retrying %s", "http://hf:s3cret@hub.local/x")
    assert "s3cret" not in caplog.text and "http://***@hub.local/x" in caplog.text

"""Settings read and check the environment in one place; task retries follow the environment of the run."""

from __future__ import annotations

import pytest
from prefect import task

from nimflow.errors import ConfigError
from nimflow.retries import retry_on_transient, transient_retries, with_current_retries
from nimflow.settings import NUMERIC_ENV_VARS, SECRET_ENV_VARS, Settings, get_settings


def test_defaults_when_unset_or_empty() -> None:
    """Unset and empty variables take their documented defaults."""
    for env in ({}, {name: "" for name in NUMERIC_ENV_VARS}, {name: "  " for name in NUMERIC_ENV_VARS}):
        settings = Settings.from_env(env)
        assert settings.max_retries == 3 and settings.retry_delay_seconds == 2.0
        assert settings.s3_read_timeout_seconds == 120.0


def test_values_in_range_are_taken() -> None:
    """Whole numbers and decimals within range are read as given (the range ends included)."""
    settings = Settings.from_env(
        {"NIMFLOW_MAX_RETRIES": " 10 ", "NIMFLOW_RETRY_DELAY_SECONDS": "0.2", "NIMFLOW_S3_READ_TIMEOUT_SECONDS": "1"}
    )
    assert settings.max_retries == 10 and isinstance(settings.max_retries, int)
    assert settings.retry_delay_seconds == 0.2
    assert settings.s3_read_timeout_seconds == 1.0
    assert Settings.from_env({"NIMFLOW_MAX_RETRIES": "0", "NIMFLOW_RETRY_DELAY_SECONDS": "0"}).max_retries == 0


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("NIMFLOW_MAX_RETRIES", "abc", "'abc' is not a whole number"),
        ("NIMFLOW_MAX_RETRIES", "2.5", "'2.5' is not a whole number"),
        ("NIMFLOW_MAX_RETRIES", "-1", "'-1' is out of range"),
        ("NIMFLOW_MAX_RETRIES", "11", "'11' is out of range"),
        ("NIMFLOW_MAX_RETRIES", "\u0663", "is not a whole number"),  # ARABIC-INDIC DIGIT THREE: int() would take it
        ("NIMFLOW_RETRY_DELAY_SECONDS", "fast", "'fast' is not a number"),
        ("NIMFLOW_RETRY_DELAY_SECONDS", "nan", "'nan' is not a number"),
        ("NIMFLOW_RETRY_DELAY_SECONDS", "inf", "'inf' is not a number"),
        ("NIMFLOW_RETRY_DELAY_SECONDS", "-0.5", "'-0.5' is out of range"),
        ("NIMFLOW_RETRY_DELAY_SECONDS", "601", "'601' is out of range"),
        ("NIMFLOW_S3_READ_TIMEOUT_SECONDS", "0", "'0' is out of range"),
        ("NIMFLOW_S3_READ_TIMEOUT_SECONDS", "2m", "'2m' is not a number"),
    ],
)
def test_a_bad_number_names_the_variable_its_value_and_the_range(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    """A bad value is one ConfigError line: the variable, the value as written, and what is allowed."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        get_settings()
    rule = NUMERIC_ENV_VARS[name]
    assert info.value.source == "environment"
    [problem] = info.value.problems
    assert problem.location == name and fragment in problem.message
    assert f"set {name} to {rule.allowed()}" in problem.message
    assert str(info.value) == f"environment: {name}: {problem.message}"


def test_every_bad_variable_is_listed_at_once() -> None:
    """Several bad variables are reported together, in one error."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"NIMFLOW_MAX_RETRIES": "abc", "NIMFLOW_RETRY_DELAY_SECONDS": "-1"})
    assert [p.location for p in info.value.problems] == ["NIMFLOW_MAX_RETRIES", "NIMFLOW_RETRY_DELAY_SECONDS"]


def test_allowed_range_reads_well() -> None:
    """The range text of a whole-number and of a seconds variable."""
    assert NUMERIC_ENV_VARS["NIMFLOW_MAX_RETRIES"].allowed() == "a whole number from 0 to 10 (default 3)"
    assert NUMERIC_ENV_VARS["NIMFLOW_RETRY_DELAY_SECONDS"].allowed() == "a number of seconds from 0 to 600 (default 2)"


def test_the_hub_token_under_either_name_is_a_secret() -> None:
    """HUGGING_FACE_HUB_TOKEN is read as the HF token, and is on the one list of secrets (never echoed)."""
    settings = Settings.from_env({"HUGGING_FACE_HUB_TOKEN": "hf_from_the_old_name"})
    assert settings.hf_token is not None and settings.hf_token.get_secret_value() == "hf_from_the_old_name"
    assert "hf_from_the_old_name" not in repr(settings)
    assert {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "NGC_API_KEY", "NGC_CLI_API_KEY", "AWS_SECRET_ACCESS_KEY"} <= set(SECRET_ENV_VARS)


# --- retry options, read when the flow calls a task -------------------------------------------------


@task(name="nimflow-test-retried", **transient_retries())
def _retried() -> int:
    return 1


def test_retry_options_follow_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """with_current_retries gives the task the retries and backoff of the environment now, not of its import."""
    made = (_retried.retries, _retried.retry_delay_seconds)
    retries = 5 if made[0] != 5 else 4
    monkeypatch.setenv("NIMFLOW_MAX_RETRIES", str(retries))
    monkeypatch.setenv("NIMFLOW_RETRY_DELAY_SECONDS", "1.5")
    now = with_current_retries(_retried)
    assert now.retries == retries
    assert now.retry_delay_seconds == [1.5 * 2**i for i in range(retries)]  # exponential backoff from the delay
    assert now.retry_condition_fn is retry_on_transient and now.name == _retried.name

    monkeypatch.setenv("NIMFLOW_MAX_RETRIES", "1")
    assert with_current_retries(_retried).retries == 1
    assert (_retried.retries, _retried.retry_delay_seconds) == made  # the task itself is left as it was made


def test_a_bad_retry_setting_fails_the_call_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """NIMFLOW_MAX_RETRIES=abc is a ConfigError naming the variable, not a bare int() ValueError."""
    monkeypatch.setenv("NIMFLOW_MAX_RETRIES", "abc")
    with pytest.raises(ConfigError, match="NIMFLOW_MAX_RETRIES: 'abc' is not a whole number"):
        with_current_retries(_retried)

"""The S3 client's region: the spec's cache.region, else boto3's own chain, us-east-1 only for endpoints."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from nimflow.engine_store import EngineStore
from nimflow.s3 import s3_client
from nimflow.spec import CacheSpec

ENDPOINT = "http://127.0.0.1:9"  # never contacted: creating a client sends no request


@pytest.fixture(autouse=True)
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No region from this machine's environment or ~/.aws; keys set so no Secret block is looked up."""
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return config


def test_the_specs_region_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    store = EngineStore(CacheSpec(uri="s3://bucket/engines", region="ap-northeast-1"))
    assert store.client.meta.region_name == "ap-northeast-1"


def test_aws_default_region_is_honoured_without_a_spec_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert EngineStore(CacheSpec(uri="s3://bucket/engines")).client.meta.region_name == "eu-central-1"
    # also with an S3-compatible endpoint: the environment's region is still the one used
    assert s3_client(endpoint_url=ENDPOINT).meta.region_name == "eu-central-1"


def test_the_profiles_region_is_honoured(monkeypatch: pytest.MonkeyPatch, clean_aws_env: Path) -> None:
    clean_aws_env.write_text("[profile store]\nregion = sa-east-1\n")
    monkeypatch.setenv("AWS_PROFILE", "store")
    assert s3_client().meta.region_name == "sa-east-1"
    assert s3_client(endpoint_url=ENDPOINT).meta.region_name == "sa-east-1"


def test_an_endpoint_without_any_region_signs_for_us_east_1(monkeypatch: pytest.MonkeyPatch) -> None:
    assert s3_client(endpoint_url=ENDPOINT).meta.region_name == "us-east-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)  # the endpoint from the environment counts too
    assert s3_client().meta.region_name == "us-east-1"


def test_aws_without_any_region_keeps_boto3s_own_default() -> None:
    assert s3_client().meta.region_name == boto3.session.Session().client("s3").meta.region_name

"""S3 access shared by the engine store and fine-tuned weight imports.

Transfers stream from and to disk with multipart and bounded concurrency; objects are written
to their final key only when complete (S3 semantics), and callers publish manifests last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from nimflow.errors import ConfigError, Problem
from nimflow.settings import get_settings

MIB = 1024 * 1024


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``.

    Raises:
        ConfigError: the URI is not an s3:// URI.
    """
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise ConfigError(uri, [Problem("uri", "expected s3://bucket/prefix")])
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.strip("/")


def s3_client(*, endpoint_url: str | None = None, region: str | None = None, max_pool: int = 16) -> Any:
    """A boto3 S3 client; ``endpoint_url`` falls back to ``AWS_ENDPOINT_URL(_S3)``.

    botocore's own per-request retries (standard mode) absorb single 5xx/throttling answers
    without restarting a multi-GB transfer; what still fails surfaces as a transient error
    that the task retries.
    """
    config = Config(
        max_pool_connections=max_pool,
        retries={"max_attempts": 3, "mode": "standard"},
        # Over plain http botocore would hash every byte for the signature; integrity is
        # checked end to end with the manifest's sha256 instead.
        s3={"payload_signing_enabled": False},
        connect_timeout=10,
        read_timeout=120,
    )
    return boto3.session.Session(**get_settings().aws_credentials()).client(
        "s3",
        endpoint_url=endpoint_url or get_settings().s3_endpoint_url,
        region_name=region or "us-east-1",
        config=config,
    )


def transfer_config(*, chunk_mib: int = 64, max_concurrency: int = 8) -> TransferConfig:
    """Multipart settings: large parts (fewer requests), bounded parallelism, streamed from disk."""
    return TransferConfig(
        multipart_threshold=chunk_mib * MIB,
        multipart_chunksize=chunk_mib * MIB,
        max_concurrency=max_concurrency,
        use_threads=True,
    )


def list_keys(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every object under ``prefix``, following pagination."""
    found: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.extend((item["Key"], item["Size"]) for item in page.get("Contents", []))
    return found


def download_prefix(client: Any, uri: str, dest: Path, config: TransferConfig) -> list[Path]:
    """Download every object under an s3:// prefix into ``dest``, keeping relative paths."""
    bucket, prefix = split_s3_uri(uri)
    base = f"{prefix}/" if prefix else ""
    paths = []
    for key, _size in list_keys(client, bucket, base):
        rel = key[len(base) :]
        if not rel or rel.endswith("/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target), Config=config)
        paths.append(target)
    return paths

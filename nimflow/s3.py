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
from botocore.exceptions import ClientError

from nimflow.errors import ConfigError, EngineStoreError, Problem
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


def s3_client(
    *, endpoint_url: str | None = None, region: str | None = None, max_pool: int = 16,
    read_timeout: float | None = None, connect_timeout: float = 10, max_retries: int = 3,
) -> Any:
    """A boto3 S3 client; ``endpoint_url`` falls back to ``AWS_ENDPOINT_URL(_S3)``.

    The region is ``region`` (the spec's ``cache.region``) when given, else boto3's own chain
    (``AWS_DEFAULT_REGION``, the profile's ``region``). Only where that chain has none and an
    S3-compatible endpoint is used does it fall back to ``us-east-1`` (such servers need some
    region to sign with); against AWS without any region, boto3's own default applies.

    botocore's own per-request retries (standard mode) absorb single 5xx/throttling answers
    without restarting a multi-GB transfer; what still fails surfaces as a transient error
    that the task retries.

    Args:
        read_timeout, connect_timeout, max_retries: per request, ``max_retries`` counting the tries
            after the first; the read timeout defaults to ``NIMFLOW_S3_READ_TIMEOUT_SECONDS``. A caller
            on a deadline (a build lease's renewal) passes smaller ones, so that all attempts together
            end well before it.
    """
    settings = get_settings()
    config = Config(
        max_pool_connections=max_pool,
        retries={"max_attempts": max_retries, "mode": "standard"},  # botocore's max_attempts counts retries
        # Over plain http botocore would hash every byte for the signature; integrity is
        # checked end to end with the manifest's sha256 instead.
        s3={"payload_signing_enabled": False},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout or settings.s3_read_timeout_seconds,  # a hung request is retried after this
    )
    session = boto3.session.Session(**settings.aws_credentials())
    endpoint = endpoint_url or settings.s3_endpoint_url
    region_name = region or session.region_name or ("us-east-1" if endpoint else None)
    return session.client("s3", endpoint_url=endpoint, region_name=region_name, config=config)


def is_missing(client: Any, bucket: str, key: str, exc: ClientError) -> bool:
    """Whether a GetObject/HeadObject error says ``key`` does not exist; raise if S3 refused to say.

    S3 answers a missing key with 404 only to credentials that may list the bucket; without
    ``s3:ListBucket`` it answers 403, exactly as it does to credentials that may not read the
    object. nimflow does not guess "absent" from a 403: that would hide a real denial and rebuild
    engines the store already holds. It lists the key once to find which permission is missing.

    Returns:
        True for 404 / NoSuchKey; False for any other error (the caller re-raises it).

    Raises:
        EngineStoreError: S3 answered 403; the message names the permission to grant.
    """
    meta, code = exc.response.get("ResponseMetadata", {}), str(exc.response.get("Error", {}).get("Code", ""))
    status = meta.get("HTTPStatusCode")
    if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
        return True
    if status != 403 and code not in ("AccessDenied", "403"):
        return False
    where = f"s3://{bucket}/{key}"
    see = "see README.md, 'IAM policy'"
    try:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", [])
    except ClientError as probe:
        if probe.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403 or str(
            probe.response.get("Error", {}).get("Code", "")
        ) == "AccessDenied":
            raise EngineStoreError(
                f"{where}: S3 answered 403 Access Denied and the credentials may not list the bucket. Without "
                f"s3:ListBucket S3 answers 403 instead of 404 for objects that do not exist (yet), so nimflow cannot "
                f"tell a missing engine from a refused one: grant s3:ListBucket on arn:aws:s3:::{bucket} "
                f"(and s3:GetObject on arn:aws:s3:::{bucket}/{key}); {see}"
            ) from exc
        raise EngineStoreError(f"{where}: S3 answered 403 Access Denied ({exc}); {see}") from exc
    if any(item.get("Key") == key for item in listed):
        raise EngineStoreError(
            f"{where}: the object exists but the credentials may not read it: grant s3:GetObject on "
            f"arn:aws:s3:::{bucket}/{key}; {see}"
        ) from exc
    raise EngineStoreError(
        f"{where}: S3 answered 403 Access Denied for an object that is not there although the bucket can be "
        f"listed: a bucket policy or KMS key denies s3:GetObject on arn:aws:s3:::{bucket}/{key}; {see}"
    ) from exc


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

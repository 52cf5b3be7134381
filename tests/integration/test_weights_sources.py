"""Fine-tunes and adapters from s3:// (moto) and hf:// (the local hub): fetched once, then only looked at.

The S3 requests are observed through a recording proxy in front of moto, the hub's through its own
request log; hashing is observed by counting calls of the real ``sha256_file``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

import nimflow.checkpoint as checkpoint
from nimflow.checkpoint import local_checkpoint
from nimflow.errors import InvalidWeights
from nimflow.finetune import stage_finetune
from nimflow.lora import stage_adapters
from nimflow.records import Checkpoint
from nimflow.spec import FinetuneSpec, LoraAdapterSpec, LoraSpec
from nimflow.testbed.fault_proxy import FaultProxy
from nimflow.testbed.hub_server import publish
from nimflow.testbed.services import S3_TEST_CREDENTIALS, Service
from nimflow.testbed.tiny_model import write_lora_adapter, write_tiny_llama
from tests.conftest import ENGINE_BUCKET

pytestmark = pytest.mark.testbed


@pytest.fixture
def s3_proxy(s3_server: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """moto behind a recording proxy; nimflow is pointed at the proxy as at any S3 endpoint."""
    for key, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with FaultProxy(s3_server.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def hub_env(hub: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Files hashed from now on (the real hashing still runs)."""
    calls: list[Path] = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: calls.append(path) or real(path))
    return calls


@pytest.fixture
def base(tmp_path: Path) -> Checkpoint:
    return local_checkpoint(write_tiny_llama(tmp_path / "base"))


def _upload(s3_server: Service, directory: Path, prefix: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for path in sorted(directory.iterdir()):
        client.upload_file(str(path), ENGINE_BUCKET, f"{prefix}/{path.name}")


def _object_reads(proxy: FaultProxy, prefix: str) -> list[tuple]:
    """GET/HEAD requests for objects under the prefix (not the listing, which is GET /bucket?list-type=2)."""
    return [r for r in proxy.requests if r[0] in ("GET", "HEAD") and r[1].split("?")[0].startswith(f"/{ENGINE_BUCKET}/{prefix}/")]


def test_s3_finetune_is_fetched_once(tmp_path: Path, s3_server: Service, s3_proxy: FaultProxy, base: Checkpoint,
                                     hashed: list[Path], unique: str) -> None:
    prefix = f"finetunes/{unique}"
    finetuned = write_tiny_llama(tmp_path / "ft", seed=7)
    (finetuned / "tokenizer.json").unlink()  # taken from the base
    _upload(s3_server, finetuned, prefix)
    spec = FinetuneSpec(path=f"s3://{ENGINE_BUCKET}/{prefix}")
    cache = tmp_path / "cache"

    first = stage_finetune(spec, base, cache)
    staged = Path(first.path)
    assert first.staged_files == 6 and (staged / "tokenizer.json").is_file()
    assert (staged / "model.safetensors").read_bytes() == (finetuned / "model.safetensors").read_bytes()
    assert len({r[1] for r in _object_reads(s3_proxy, prefix) if r[0] == "GET"}) == 5  # every object downloaded

    s3_proxy.clear_requests()
    hashed.clear()
    second = stage_finetune(spec, base, cache)
    assert (second.path, second.digest, second.staged_files) == (first.path, first.digest, 0)
    assert _object_reads(s3_proxy, prefix) == []  # only the listing was read
    assert [r for r in s3_proxy.requests if "list-type=2" in r[1]]
    assert hashed == []

    (finetuned / "generation_config.json").write_text('{"max_new_tokens": 32}\n')
    _upload(s3_server, finetuned, prefix)  # one object changes: its ETag does
    s3_proxy.clear_requests()
    third = stage_finetune(spec, base, cache)
    assert third.staged_files > 0 and third.digest != first.digest
    assert _object_reads(s3_proxy, prefix)
    assert (Path(third.path) / "generation_config.json").read_text() == '{"max_new_tokens": 32}\n'


def test_s3_refusal_names_the_s3_location(tmp_path: Path, s3_server: Service, s3_proxy: FaultProxy, base: Checkpoint,
                                          unique: str) -> None:
    """Checks run on a private copy, but the message names the s3:// object the user uploaded."""
    prefix = f"finetunes/pickled-{unique}"
    _upload(s3_server, write_tiny_llama(tmp_path / "ft", seed=7, weight_format="pickle"), prefix)
    with pytest.raises(InvalidWeights) as info:
        stage_finetune(FinetuneSpec(path=f"s3://{ENGINE_BUCKET}/{prefix}"), base, tmp_path / "cache")
    message = str(info.value)
    assert f"s3://{ENGINE_BUCKET}/{prefix}: found pytorch_model.bin (PyTorch pickle)" in message
    assert ".tmp-" not in message and "finetune.allow_pickle: true" in message


def test_s3_pickle_finetune_with_consent(tmp_path: Path, s3_server: Service, s3_proxy: FaultProxy, base: Checkpoint,
                                         unique: str) -> None:
    prefix = f"finetunes/pickled-ok-{unique}"
    _upload(s3_server, write_tiny_llama(tmp_path / "ft", seed=7, weight_format="pickle"), prefix)
    weights = stage_finetune(FinetuneSpec(path=f"s3://{ENGINE_BUCKET}/{prefix}", allow_pickle=True), base, tmp_path / "cache")
    reference = write_tiny_llama(tmp_path / "ref", seed=7)
    assert weights.weight_format == "binary"
    assert (Path(weights.path) / "model.safetensors").is_file() and not (Path(weights.path) / "pytorch_model.bin").exists()
    assert checkpoint.read_config(Path(weights.path)) == checkpoint.read_config(reference)


def test_hf_finetune_is_fetched_once(tmp_path: Path, hub_env: Any, base: Checkpoint, hashed: list[Path], unique: str) -> None:
    hub = hub_env
    repo = f"org/ft-{unique}"
    publish(hub.root, repo, write_tiny_llama(tmp_path / "ft", seed=7))
    spec = FinetuneSpec(path=f"hf://{repo}@main")
    cache = tmp_path / "cache"

    first = stage_finetune(spec, base, cache)
    assert first.staged_files > 0
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]

    hub.clear_requests()
    hashed.clear()
    second = stage_finetune(spec, base, cache)
    assert (second.path, second.digest, second.staged_files) == (first.path, first.digest, 0)
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []  # nothing downloaded
    assert len(hub.requests) == 1 and "/revision/main" in hub.requests[0][1]  # only `main` resolved
    assert hashed == []

    sha = publish(hub.root, repo, write_tiny_llama(tmp_path / "ft2", seed=9))  # main moves to new weights
    hub.clear_requests()
    third = stage_finetune(spec, base, cache)
    assert third.staged_files > 0 and third.digest != first.digest
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]

    hub.clear_requests()
    pinned = stage_finetune(FinetuneSpec(path=f"hf://{repo}@{sha}"), base, cache)
    assert pinned.digest == third.digest
    assert hub.requests == []  # a pinned sha whose snapshot is complete needs no network at all


def test_adapters_from_s3_and_hf(tmp_path: Path, s3_server: Service, s3_proxy: FaultProxy, hub_env: Any,
                                 base: Checkpoint, hashed: list[Path], unique: str) -> None:
    hub = hub_env
    prefix = f"adapters/{unique}"
    _upload(s3_server, write_lora_adapter(tmp_path / "a", Path(base.path), rank=4), prefix)
    repo = f"org/adapter-{unique}"
    publish(hub.root, repo, write_lora_adapter(tmp_path / "b", Path(base.path), rank=8, seed=2))
    spec = LoraSpec(adapters=[
        LoraAdapterSpec(name="from-s3", path=f"s3://{ENGINE_BUCKET}/{prefix}"),
        LoraAdapterSpec(name="from-hub", path=f"hf://{repo}"),
    ])
    first, _ = stage_adapters(spec, base, tmp_path / "cache")
    root = Path(first.path)
    assert first.staged_files == 4
    assert (root / "from-hub" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert (root / "from-s3" / "adapter_config.json").read_bytes() == (tmp_path / "a" / "adapter_config.json").read_bytes()

    s3_proxy.clear_requests()
    hub.clear_requests()
    hashed.clear()
    second, _ = stage_adapters(spec, base, tmp_path / "cache")
    assert (second.path, second.staged_files) == (first.path, 0)
    assert _object_reads(s3_proxy, prefix) == [] and [r for r in hub.requests if "/resolve/" in r[1]] == []
    assert hashed == []

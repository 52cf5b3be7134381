"""Names from outside become paths only inside their destination (issue 13).

Each attack is built in the test (S3 objects on the test bed's moto, links and FIFOs on disk) and
run through a public entry point: ``nimflow host`` as a subprocess (one ``nimflow:`` line, exit 1,
no traceback) or the ``host_model`` flow. Each asserts that nothing was written outside the cache
directory (the escape targets and the parent directories are checked) and that the marker string
is nowhere under the cache directory.

Checked before the fix: on the code as it was, the S3 cases wrote ``escaped-*.py`` next to the
cache directory and hosted the fine-tune (exit 0), the symlink case staged the marker as
``notes.txt`` under the cache directory, and the FIFO case blocked reading the FIFO until the
subprocess timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from nimflow.flows.host_model import host_model

from nimflow.errors import InvalidWeights
from nimflow.testbed.hub_server import publish
from nimflow.testbed.nim_image import standin_weights_digest
from nimflow.testbed.services import Service
from nimflow.testbed.tiny_model import write_lora_adapter, write_tiny_llama
from tests.conftest import ENGINE_BUCKET, write_spec
from tests.integration.test_host_model import make_spec

pytestmark = pytest.mark.testbed
#: Bound on one `nimflow host` run that fails before any container (not a measure: a hang fails the test).
HOST_TIMEOUT_S = 240


# --- helpers shared with test_engine_restore ----------------------------------------------------------


def nimflow_host(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``nimflow host CONFIG`` as a user runs it; a run that outlives the bound fails the test."""
    command = [str(Path(sys.executable).with_name("nimflow")), "host", str(config)]
    try:
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=HOST_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"nimflow host did not finish within {HOST_TIMEOUT_S}s: {str(exc.stderr)[-2000:]}")


def refusal_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``nimflow:`` line a refused run ends with (exit 1, never a signal or a traceback)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("nimflow:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def holding(root: Path, marker: bytes) -> list[Path]:
    """Regular files under ``root`` whose bytes contain ``marker``."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and marker in p.read_bytes()]


def s3_client(s3_server: Service) -> Any:
    return boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def upload_dir(s3_server: Service, directory: Path, prefix: str) -> None:
    client = s3_client(s3_server)
    for path in sorted(directory.iterdir()):
        client.upload_file(str(path), ENGINE_BUCKET, f"{prefix}/{path.name}")


def assert_nothing_escaped(tmp_path: Path, cache_dir: Path, escaped: list[Path], marker: bytes) -> None:
    """No escape target exists, nothing above the cache dir holds the marker, and the cache dir neither."""
    for path in escaped:
        assert not path.exists(), path
    for parent in (cache_dir.parent, tmp_path.parent):
        assert not [p for p in parent.iterdir() if p.name.startswith("escaped-")], parent
    assert not holding(tmp_path, marker)


# --- S3 object keys ----------------------------------------------------------------------------------


def _hostile_key(prefix: str, tmp_path: Path, unique: str, kind: str, levels: int) -> tuple[str, Path]:
    """An object key under ``prefix`` whose name leaves the download directory, and where it would land."""
    if kind == "dotdot":
        return f"{prefix}/{'../' * levels}escaped-{unique}.py", tmp_path / f"escaped-{unique}.py"
    target = tmp_path / f"escaped-abs-{unique}.py"
    return f"{prefix}/{target}", target  # ckpt//tmp/...: an absolute name after the prefix


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_s3_finetune_key_outside_the_cache_is_refused(
    kind: str, tmp_path: Path, testbed_env: dict, prefect_api: str, s3_server: Service, standin_image: str,
    unique: str, cleanup_containers: list,
) -> None:
    """A fine-tune prefix holding a valid checkpoint plus one object whose key climbs out of the cache."""
    name, prefix, marker = f"s3key-{unique}", f"hostile/{unique}/ckpt", f"MARKER-{unique}".encode()
    base = write_tiny_llama(tmp_path / "base")
    upload_dir(s3_server, write_tiny_llama(tmp_path / "ft", seed=3), prefix)
    # The download directory is <cache>/finetune/.tmp-*/source: four levels below tmp_path.
    key, target = _hostile_key(prefix, tmp_path, unique, kind, levels=4)
    s3_client(s3_server).put_object(Bucket=ENGINE_BUCKET, Key=key, Body=b"print('owned') # " + marker)
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["finetune"] = {"path": f"s3://{ENGINE_BUCKET}/{prefix}"}
    cleanup_containers.append(f"nimflow-{name}")

    line = refusal_line(nimflow_host(write_spec(tmp_path / "spec.yaml", spec), {**testbed_env, "PREFECT_API_URL": prefect_api}))

    assert "InvalidWeights" in line and f"s3://{ENGINE_BUCKET}/{prefix}" in line and repr(key) in line, line
    assert_nothing_escaped(tmp_path, Path(spec["deploy"]["cache_dir"]), [target], marker)


def test_s3_lora_adapter_key_outside_the_cache_is_refused(
    tmp_path: Path, testbed_env: dict, prefect_api: str, s3_server: Service, standin_image: str, unique: str,
    cleanup_containers: list,
) -> None:
    """A LoRA adapter prefix with a valid adapter plus an object whose key climbs out of the cache."""
    name, prefix, marker = f"s3lora-{unique}", f"hostile/{unique}/adapter", f"MARKER-{unique}".encode()
    base = write_tiny_llama(tmp_path / "base")
    upload_dir(s3_server, write_lora_adapter(tmp_path / "adapter", base, rank=4), prefix)
    # The download directory is <cache>/lora/.tmp-*/fetch/<name>/source: six levels below tmp_path.
    key, target = _hostile_key(prefix, tmp_path, unique, "dotdot", levels=6)
    s3_client(s3_server).put_object(Bucket=ENGINE_BUCKET, Key=key, Body=marker)
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["lora"] = {"adapters": [{"name": "sql", "path": f"s3://{ENGINE_BUCKET}/{prefix}"}]}
    cleanup_containers.append(f"nimflow-{name}")

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    assert state.is_failed(), "the run should have failed"
    with pytest.raises(InvalidWeights) as caught:
        state.result()
    assert f"s3://{ENGINE_BUCKET}/{prefix}" in str(caught.value) and repr(key) in str(caught.value)
    assert_nothing_escaped(tmp_path, Path(spec["deploy"]["cache_dir"]), [target], marker)


# --- local directories ---------------------------------------------------------------------------------


def test_local_finetune_symlink_to_a_host_file_is_refused(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
) -> None:
    """``notes.txt -> <a secret outside>`` in a local fine-tune: refused, the secret copied nowhere."""
    name, marker = f"link-{unique}", f"MARKER-{unique}".encode()
    secret = tmp_path / "credentials"
    secret.write_bytes(b"[default]\naws_secret_access_key = " + marker + b"\n")
    secret.chmod(0o600)
    base = write_tiny_llama(tmp_path / "base")
    finetune = write_tiny_llama(tmp_path / "ft", seed=3)
    (finetune / "notes.txt").symlink_to(secret)
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["finetune"] = {"path": str(finetune)}
    cleanup_containers.append(f"nimflow-{name}")

    line = refusal_line(nimflow_host(write_spec(tmp_path / "spec.yaml", spec), {**testbed_env, "PREFECT_API_URL": prefect_api}))

    assert "InvalidWeights" in line and "notes.txt" in line and str(finetune) in line, line
    cache_dir = Path(spec["deploy"]["cache_dir"])
    assert not holding(cache_dir, marker)
    assert holding(tmp_path, marker) == [secret]  # the one copy is the user's own file


def test_local_finetune_fifo_is_refused_without_blocking(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
) -> None:
    """A FIFO named like a weight file would block the first read forever; it is refused by its type."""
    name = f"fifo-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    finetune = write_tiny_llama(tmp_path / "ft", seed=3)
    os.mkfifo(finetune / "model-extra.safetensors")
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["finetune"] = {"path": str(finetune)}
    cleanup_containers.append(f"nimflow-{name}")

    line = refusal_line(nimflow_host(write_spec(tmp_path / "spec.yaml", spec), {**testbed_env, "PREFECT_API_URL": prefect_api}))

    assert "model-extra.safetensors" in line and "not a regular file" in line, line


# --- what must keep working ------------------------------------------------------------------------------


def test_finetune_from_a_hugging_face_cache_snapshot_still_hosts(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list,
) -> None:
    """``finetune.path`` at ``<hf cache>/models--org--name/snapshots/<sha>`` (every file a link into
    ``../../blobs/``) is staged as regular files with the blobs' bytes and served."""
    from huggingface_hub import snapshot_download

    name, repo = f"hfcache-{unique}", f"org/ft-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    finetune = write_tiny_llama(tmp_path / "ft", seed=9)
    publish(hub.root, repo, finetune)
    snapshot = Path(snapshot_download(repo, cache_dir=tmp_path / "hf-cache", endpoint=hub.url))
    assert snapshot.parent.name == "snapshots" and (snapshot / "model.safetensors").is_symlink()
    assert os.readlink(snapshot / "model.safetensors").startswith("../../blobs/")
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["finetune"] = {"path": str(snapshot)}
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    staged = Path(record["model_path"])
    for source in (finetune / "model.safetensors", finetune / "config.json"):
        copy = staged / source.name
        assert not copy.is_symlink() and copy.read_bytes() == source.read_bytes()
        assert copy.stat().st_mode & 0o777 == 0o644
    assert served_digest(record["completion"]) == standin_weights_digest(staged) != standin_weights_digest(base)


def served_digest(answer: str) -> str:
    """The weights digest in a stand-in answer: ``... (weights <digest16>) received: ...``."""
    return answer.split("(weights ", 1)[1].split(")", 1)[0]


# --- bounds on a source listing (focused) -------------------------------------------------------------------


@pytest.mark.parametrize(("bound", "value", "expected"), [("MAX_SOURCE_OBJECTS", 3, "more than 3 objects"),
                                                          ("MAX_SOURCE_BYTES", 1000, "more than 1000 bytes")])
def test_s3_source_listing_is_bounded(
    bound: str, value: int, expected: str, tmp_path: Path, testbed_env: dict, s3_server: Service, unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listing with more objects or bytes than the bounds is refused before anything is fetched
    (the bounds are lowered here so the test needs five small objects, not ten thousand)."""
    import nimflow.weights_source as weights_source

    prefix = f"bounded/{unique}"
    client = s3_client(s3_server)
    for index in range(5):
        client.put_object(Bucket=ENGINE_BUCKET, Key=f"{prefix}/part-{index}", Body=bytes(300))
    monkeypatch.setattr(weights_source, bound, value)

    with pytest.raises(InvalidWeights, match=expected) as caught:
        weights_source.source_fingerprint(weights_source.parse_location(f"s3://{ENGINE_BUCKET}/{prefix}"))
    assert f"s3://{ENGINE_BUCKET}/{prefix}" in str(caught.value)


def test_s3_keys_naming_one_file_twice_are_refused(tmp_path: Path, testbed_env: dict, s3_server: Service, unique: str) -> None:
    """``ckpt/config.json`` and ``ckpt/./config.json`` would land on one file: which one wins is up to the sender."""
    from nimflow.weights_source import parse_location, source_fingerprint

    prefix = f"twice/{unique}"
    for key in (f"{prefix}/config.json", f"{prefix}/./config.json"):
        s3_client(s3_server).put_object(Bucket=ENGINE_BUCKET, Key=key, Body=b"{}")
    with pytest.raises(InvalidWeights, match="config.json"):
        source_fingerprint(parse_location(f"s3://{ENGINE_BUCKET}/{prefix}"))

"""Pure deploy helpers: GPU requests, model mounts, container environment, spec hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nimflow.containers import device_requests, spec_hash
from nimflow.spec import NIM_CACHE_MOUNT, DeploySpec
from tasks.deploy import container_environment, model_mount


def _deploy(cache_dir: Path, **fields: Any) -> DeploySpec:
    """A valid deploy section with ``fields`` overridden."""
    return DeploySpec(**{"image": "nim:1.8", "served_model_name": "tiny", "cache_dir": cache_dir, **fields})


# --- device_requests ----------------------------------------------------------------------------


def test_no_gpus_requests_none() -> None:
    """No GPU selection means no device requests (CPU-only hosts)."""
    assert device_requests(None) == []


def test_gpu_ids_become_device_ids() -> None:
    """[4, 5] is the CLI's --gpus '"device=4,5"': string ids with the gpu capability."""
    [request] = device_requests([4, 5])
    assert request.device_ids == ["4", "5"]
    assert request.capabilities == [["gpu"]]
    assert request.count in (None, 0)


def test_all_gpus_is_count_minus_one() -> None:
    """'all' requests every GPU (count -1), not specific ids."""
    [request] = device_requests("all")
    assert request.count == -1
    assert request.capabilities == [["gpu"]]
    assert not request.device_ids


# --- model_mount --------------------------------------------------------------------------------


def test_model_inside_cache_dir_uses_cache_mount(tmp_path: Path) -> None:
    """A model under cache_dir is reached through the cache mount; no extra volume."""
    cache = tmp_path / "cache"
    model = cache / "engines" / "abc123"
    model.mkdir(parents=True)
    path, volumes = model_mount(_deploy(cache), model)
    assert path == f"{NIM_CACHE_MOUNT}/engines/abc123"
    assert path == "/opt/nim/.cache/engines/abc123"
    assert volumes == {}


def test_model_inside_cache_dir_via_relative_spelling(tmp_path: Path) -> None:
    """Paths are compared resolved: `cache/../cache/m` is still inside the cache dir."""
    cache = tmp_path / "cache"
    (cache / "m").mkdir(parents=True)
    path, volumes = model_mount(_deploy(cache), cache / ".." / "cache" / "m")
    assert path == "/opt/nim/.cache/m"
    assert volumes == {}


def test_model_outside_cache_dir_gets_read_only_volume(tmp_path: Path) -> None:
    """A model elsewhere is mounted read-only at /opt/nim/model."""
    cache = tmp_path / "cache"
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    path, volumes = model_mount(_deploy(cache), model)
    assert path == "/opt/nim/model"
    assert volumes == {str(model.resolve()): {"bind": "/opt/nim/model", "mode": "ro"}}


def test_sibling_with_cache_prefix_is_outside(tmp_path: Path) -> None:
    """`cache-old` is not inside `cache` even though its name starts the same."""
    cache = tmp_path / "cache"
    model = tmp_path / "cache-old" / "m"
    model.mkdir(parents=True)
    path, volumes = model_mount(_deploy(cache), model)
    assert path == "/opt/nim/model"
    assert list(volumes) == [str(model.resolve())]


# --- container_environment ----------------------------------------------------------------------


@pytest.fixture
def clean_secrets(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No secrets in the environment unless a test sets them."""
    for name in ("NGC_API_KEY", "NGC_CLI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_environment_sets_model_and_keeps_deploy_env(tmp_path: Path, clean_secrets: pytest.MonkeyPatch) -> None:
    """The model names and cache path come from the spec; deploy.env is kept; no secrets unless set."""
    deploy = _deploy(tmp_path, served_model_name="my-model", env={"NIM_LOG_LEVEL": "DEBUG", "FOO": "bar"})
    env = container_environment(deploy, "/opt/nim/.cache/engines/k")
    assert env == {
        "NIM_LOG_LEVEL": "DEBUG",
        "FOO": "bar",
        "NIM_MODEL_NAME": "/opt/nim/.cache/engines/k",
        "NIM_SERVED_MODEL_NAME": "my-model",
        "NIM_CACHE_PATH": "/opt/nim/.cache",
    }


def test_environment_passes_secrets_from_process(tmp_path: Path, clean_secrets: pytest.MonkeyPatch) -> None:
    """NGC_API_KEY and HF_TOKEN exported where nimflow runs reach the container."""
    clean_secrets.setenv("NGC_API_KEY", "nvapi-test-key")
    clean_secrets.setenv("HF_TOKEN", "hf_test_token")
    env = container_environment(_deploy(tmp_path, env={"A": "1"}), "/opt/nim/model")
    assert env["NGC_API_KEY"] == "nvapi-test-key"
    assert env["HF_TOKEN"] == "hf_test_token"
    assert env["A"] == "1"
    assert env["NIM_MODEL_NAME"] == "/opt/nim/model"


def test_environment_prefers_ngc_cli_api_key(tmp_path: Path, clean_secrets: pytest.MonkeyPatch) -> None:
    """NIM lets NGC_CLI_API_KEY win; nimflow passes that value as NGC_API_KEY."""
    clean_secrets.setenv("NGC_API_KEY", "old")
    clean_secrets.setenv("NGC_CLI_API_KEY", "cli")
    clean_secrets.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    env = container_environment(_deploy(tmp_path), "/opt/nim/model")
    assert env["NGC_API_KEY"] == "cli"
    assert env["HF_TOKEN"] == "hf_legacy"


# --- spec_hash ----------------------------------------------------------------------------------


def test_spec_hash_stable_and_order_independent() -> None:
    """The same settings give the same 16-hex hash whatever the key order."""
    a = {"image_id": "sha256:1", "model": "/opt/nim/model", "deploy": {"gpus": [4, 5], "host_port": 8000}}
    b = {"deploy": {"host_port": 8000, "gpus": [4, 5]}, "model": "/opt/nim/model", "image_id": "sha256:1"}
    assert spec_hash(a) == spec_hash(b)
    assert len(spec_hash(a)) == 16
    int(spec_hash(a), 16)


@pytest.mark.parametrize(
    "change",
    [{"image_id": "sha256:2"}, {"model": "/opt/nim/.cache/x"}, {"deploy": {"gpus": [4], "host_port": 8000}}],
    ids=["image", "model", "gpus"],
)
def test_spec_hash_sensitive(change: dict[str, Any]) -> None:
    """Changing any setting changes the hash."""
    base = {"image_id": "sha256:1", "model": "/opt/nim/model", "deploy": {"gpus": [4, 5], "host_port": 8000}}
    assert spec_hash({**base, **change}) != spec_hash(base)


def test_spec_hash_of_paths() -> None:
    """Non-JSON values (paths) are hashed by their text, not rejected."""
    assert spec_hash({"cache": Path("/a")}) == spec_hash({"cache": "/a"})
    assert spec_hash({"cache": Path("/a")}) != spec_hash({"cache": Path("/b")})


def test_docker_daemon_down_is_one_clear_transient_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No daemon behind DOCKER_HOST: a transient ServiceUnavailable naming the socket and how to start it."""
    from nimflow.containers import docker_client
    from nimflow.errors import ServiceUnavailable, is_transient

    socket = f"unix://{tmp_path}/no-daemon.sock"
    monkeypatch.setenv("DOCKER_HOST", socket)
    with pytest.raises(ServiceUnavailable) as caught:
        docker_client()
    assert f"the Docker daemon at {socket} does not answer" in str(caught.value)
    assert "systemctl start docker" in str(caught.value) and is_transient(caught.value)

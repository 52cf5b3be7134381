"""Pure deploy helpers: GPU requests, model mounts, the NIM environment by mode, rollout choices, spec hash."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from nimflow.containers import device_requests, spec_hash
from nimflow.errors import DeploymentError
from nimflow.front_proxy import Route, read_route, upstream_of, url, write_route
from nimflow.records import ServingImage
from nimflow.rollout import (
    Names,
    _port_in_use_outside_docker,
    candidate_gpus,
    container_environment,
    container_volumes,
    deployment_labels,
    model_mount,
    serving_config,
)
from nimflow.spec import NIM_CACHE_MOUNT, DeploySpec, RolloutSpec


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


def test_model_inside_cache_dir_keeps_its_cache_path_read_only(tmp_path: Path) -> None:
    """A model under cache_dir keeps its path under the cache mount, mounted there alone and read-only."""
    cache = tmp_path / "cache"
    model = cache / "engines" / "abc123"
    model.mkdir(parents=True)
    path, volumes = model_mount(_deploy(cache), model)
    assert path == f"{NIM_CACHE_MOUNT}/engines/abc123"
    assert path == "/opt/nim/.cache/engines/abc123"
    assert volumes == {str(model.resolve()): {"bind": path, "mode": "ro"}}


def test_model_inside_cache_dir_via_relative_spelling(tmp_path: Path) -> None:
    """Paths are compared resolved: `cache/../cache/m` is still inside the cache dir."""
    cache = tmp_path / "cache"
    (cache / "m").mkdir(parents=True)
    path, volumes = model_mount(_deploy(cache), cache / ".." / "cache" / "m")
    assert path == "/opt/nim/.cache/m"
    assert volumes == {str((cache / "m").resolve()): {"bind": path, "mode": "ro"}}


@pytest.mark.parametrize("served", ["", "nimflow-front", "nimflow-front/demo/route", "nimflow-nim/demo", "..", "../.."])
def test_served_directory_may_not_expose_nimflows_own_directories(tmp_path: Path, served: str) -> None:
    """The cache dir itself, a parent of it, or anything in the route or NIM cache directories is refused:
    route files and other deployments' caches never reach a NIM container."""
    cache = tmp_path / "a" / "cache"
    (cache / served).mkdir(parents=True, exist_ok=True)
    with pytest.raises(DeploymentError, match="nimflow's own directory") as caught:
        model_mount(_deploy(cache), cache / served)
    assert str((cache / served).resolve()) in str(caught.value)
    with pytest.raises(DeploymentError, match="the LoRA adapters to serve"):
        serving_config(_deploy(cache), _V1, str(tmp_path / "model"), str(cache / served))


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
    env = container_environment(deploy, {"NIM_MODEL_NAME": "/opt/nim/.cache/engines/k"}, source="manifest")
    assert env == {
        "NIM_LOG_LEVEL": "DEBUG",
        "FOO": "bar",
        "NIM_MODEL_NAME": "/opt/nim/.cache/engines/k",
        "NIM_SERVED_MODEL_NAME": "my-model",
        "NIM_CACHE_PATH": "/opt/nim/.cache",
    }


def test_environment_passes_secrets_only_to_a_nim_that_downloads(tmp_path: Path, clean_secrets: pytest.MonkeyPatch) -> None:
    """NGC_API_KEY and HF_TOKEN exported where nimflow runs reach a NIM that fetches its model (guide §1);
    one that serves a directory from this host gets neither."""
    clean_secrets.setenv("NGC_API_KEY", "nvapi-test-key")
    clean_secrets.setenv("HF_TOKEN", "hf_test_token")
    env = container_environment(_deploy(tmp_path, env={"A": "1"}), {"NIM_MODEL_NAME": "org/model"}, source="manifest")
    assert env["NGC_API_KEY"] == "nvapi-test-key"
    assert env["HF_TOKEN"] == "hf_test_token"
    assert env["A"] == "1"
    assert env["NIM_MODEL_NAME"] == "org/model"
    env = container_environment(_deploy(tmp_path), {"NIM_MODEL_NAME": "/opt/nim/model"}, source="directory")
    assert not {"NGC_API_KEY", "HF_TOKEN"} & set(env)


def test_environment_prefers_ngc_cli_api_key(tmp_path: Path, clean_secrets: pytest.MonkeyPatch) -> None:
    """NIM lets NGC_CLI_API_KEY win; nimflow passes that value as NGC_API_KEY."""
    clean_secrets.setenv("NGC_API_KEY", "old")
    clean_secrets.setenv("NGC_CLI_API_KEY", "cli")
    clean_secrets.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    env = container_environment(_deploy(tmp_path), {"NIM_MODEL_NAME": "org/model"}, source="manifest")
    assert env["NGC_API_KEY"] == "cli"
    assert env["HF_TOKEN"] == "hf_legacy"


# --- serving_config: the model environment by NIM generation and mode ------------------------------

_V1 = ServingImage(image="nim:1.8", nim_api="1.x", detected_by="test")
_V2 = ServingImage(image="nim:2.0", nim_api="2.x", detected_by="test")


def test_nim_1x_is_told_the_model_by_nim_model_name(tmp_path: Path) -> None:
    """NIM 1.x reads a local model (or engine) directory from NIM_MODEL_NAME."""
    (tmp_path / "engines" / "k").mkdir(parents=True)
    config = serving_config(_deploy(tmp_path), _V1, str(tmp_path / "engines" / "k"), None)
    assert config.environment == {"NIM_MODEL_NAME": "/opt/nim/.cache/engines/k"}
    assert config.model_root == "/opt/nim/.cache/engines/k" and config.source == "directory"
    assert config.volumes == {str((tmp_path / "engines" / "k").resolve()): {"bind": "/opt/nim/.cache/engines/k", "mode": "ro"}}


def test_nim_2x_is_told_the_model_by_nim_model_path(tmp_path: Path) -> None:
    """NIM 2.x reads it from NIM_MODEL_PATH; a model outside the cache dir gets its own read-only mount."""
    model = tmp_path / "elsewhere" / "m"
    model.mkdir(parents=True)
    config = serving_config(_deploy(tmp_path / "cache"), _V2, str(model), None)
    assert config.environment == {"NIM_MODEL_PATH": "/opt/nim/model"}
    assert config.volumes == {str(model.resolve()): {"bind": "/opt/nim/model", "mode": "ro"}}


def test_manifest_mode_names_the_manifest_model(tmp_path: Path) -> None:
    """Guide §1: no local model; NIM fetches the manifest's model, named by NIM_MODEL_NAME."""
    serving = _V1.model_copy(update={"model_name": "mistralai/mistral-7b-instruct-v0.3", "image": "nimflow/derived:x"})
    config = serving_config(_deploy(tmp_path), serving, None, None)
    assert config.environment == {"NIM_MODEL_NAME": "mistralai/mistral-7b-instruct-v0.3"}
    assert config.model_root == "mistralai/mistral-7b-instruct-v0.3"
    assert (config.source, config.volumes) == ("manifest", {})  # it downloads: it gets the secrets, nothing mounted


def test_nothing_to_serve_is_a_clear_error(tmp_path: Path) -> None:
    """Neither a model directory nor a manifest model: refused before any container."""
    with pytest.raises(DeploymentError, match="nothing to serve"):
        serving_config(_deploy(tmp_path), _V1, None, None)


def test_lora_adapters_add_peft_source_and_rank(tmp_path: Path) -> None:
    """Adapters in the cache dir keep their cache path; elsewhere they get /opt/nim/loras; read-only either way.
    1.x is given the rank as NIM_MAX_LORA_RANK, 2.x not (see test_nim_2x_lora_is_configured_with_vllm_options)."""
    (tmp_path / "cache" / "m").mkdir(parents=True)
    (tmp_path / "cache" / "loras" / "d").mkdir(parents=True)
    inside = serving_config(_deploy(tmp_path / "cache"), _V1, str(tmp_path / "cache" / "m"), str(tmp_path / "cache" / "loras" / "d"), 64)
    assert inside.environment == {"NIM_MODEL_NAME": "/opt/nim/.cache/m", "NIM_PEFT_SOURCE": "/opt/nim/.cache/loras/d",
                                  "NIM_MAX_LORA_RANK": "64"}
    assert {v["bind"]: v["mode"] for v in inside.volumes.values()} == {"/opt/nim/.cache/m": "ro", "/opt/nim/.cache/loras/d": "ro"}
    (tmp_path / "adapters").mkdir()
    outside = serving_config(_deploy(tmp_path / "cache"), _V2, str(tmp_path / "cache" / "m"), str(tmp_path / "adapters"))
    assert outside.environment["NIM_PEFT_SOURCE"] == "/opt/nim/loras" and "NIM_MAX_LORA_RANK" not in outside.environment
    assert outside.volumes[str((tmp_path / "adapters").resolve())] == {"bind": "/opt/nim/loras", "mode": "ro"}


def test_provenance_labels() -> None:
    """Weights always; engine key and adapters digest when there are some."""
    assert deployment_labels("hf:o/r@abc", None) == {"nimflow.weights": "hf:o/r@abc"}
    assert deployment_labels("w", "k1", "d" * 80) == {"nimflow.weights": "w", "nimflow.engine-key": "k1", "nimflow.adapters": "d" * 64}


# --- rollout choices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "standby", "old", "expected"),
    [
        ("blue-green", [2, 3], json.dumps([0, 1]), [2, 3]),  # the old one holds deploy.gpus: use the standby set
        ("blue-green", [2, 3], json.dumps([2, 3]), [0, 1]),  # the sets alternate
        ("blue-green", [2, 3], "", [2, 3]),  # a legacy container without the label holds deploy.gpus
        ("blue-green", [2, 3], None, [0, 1]),  # nothing runs: deploy.gpus
        ("blue-green", None, json.dumps([0, 1]), [0, 1]),  # no standby set: share (the user asked for blue-green)
        ("recreate", [2, 3], json.dumps([0, 1]), [0, 1]),  # the old one is stopped first
    ],
)
def test_candidate_gpus(tmp_path: Path, strategy: str, standby: list[int] | None, old: str | None, expected: list[int]) -> None:
    deploy = _deploy(tmp_path, gpus=[0, 1])
    assert candidate_gpus(deploy, RolloutSpec(standby_gpus=standby), strategy, old) == expected


def test_names_of_a_deployment() -> None:
    """Front, the two colours, and the legacy name last."""
    names = Names("demo", "nimflow-demo")
    assert names.front == "nimflow-demo-front"
    assert names.backends == ["nimflow-demo-blue", "nimflow-demo-green", "nimflow-demo"]
    assert upstream_of("nimflow-demo-blue") == "nimflow-demo-blue:8000"


@pytest.mark.parametrize(("host", "expected"), [("127.0.0.1", "http://127.0.0.1:9"), ("0.0.0.0", "http://127.0.0.1:9"),
                                                ("::", "http://[::1]:9"), ("10.0.0.5", "http://10.0.0.5:9")])
def test_endpoint_urls_reach_wildcard_binds_on_loopback(host: str, expected: str) -> None:
    assert url(host, 9) == expected


def test_route_file_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    """The route is written by rename; only route.json remains, and the proxy's state dir exists."""
    assert read_route(tmp_path) is None
    write_route(tmp_path, Route(1, "a:8000"))
    write_route(tmp_path, Route(2, "b:8000"))
    assert read_route(tmp_path) == Route(2, "b:8000")
    assert [p.name for p in (tmp_path / "route").iterdir()] == ["route.json"]
    assert (tmp_path / "state").is_dir()


def test_unreadable_route_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "route").mkdir()
    (tmp_path / "route" / "route.json").write_text("{not json")
    with pytest.raises(DeploymentError, match="route.json is unreadable .*; remove it and run nimflow again"):
        read_route(tmp_path)


def test_port_probe_sees_a_listener_outside_docker() -> None:
    """A port someone listens on is in use; a closed one is not."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert _port_in_use_outside_docker("127.0.0.1", port)
    assert not _port_in_use_outside_docker("127.0.0.1", port)


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


def test_nim_2x_lora_is_configured_with_vllm_options(tmp_path: Path) -> None:
    """NIM 2.x takes LoRA as vLLM options (NIM 2.x docs, advanced-use-cases/finetune-lora.html), given in
    NIM_PASSTHROUGH_ARGS; NIM_MAX_LORA_RANK stays 1.x's.

    On main before this change: 2.x got NIM_MAX_LORA_RANK and no NIM_PASSTHROUGH_ARGS (KeyError here).
    """
    (tmp_path / "cache" / "m").mkdir(parents=True)
    (tmp_path / "adapters").mkdir()
    config = serving_config(_deploy(tmp_path / "cache"), _V2, str(tmp_path / "cache" / "m"), str(tmp_path / "adapters"), 64,
                            adapter_count=3)
    assert config.environment["NIM_PASSTHROUGH_ARGS"] == "--enable-lora --max-lora-rank 64 --max-loras 3 --max-cpu-loras 3"
    assert "NIM_MAX_LORA_RANK" not in config.environment
    v1 = serving_config(_deploy(tmp_path / "cache"), _V1, str(tmp_path / "cache" / "m"), str(tmp_path / "adapters"), 64)
    assert v1.environment["NIM_MAX_LORA_RANK"] == "64" and "NIM_PASSTHROUGH_ARGS" not in v1.environment


def test_the_specs_passthrough_args_come_after_nimflows(tmp_path: Path) -> None:
    """deploy.env's NIM_PASSTHROUGH_ARGS is kept, after nimflow's LoRA options: NIM takes the last of a
    repeated argument (reference/advanced-configuration.html), so the spec's choice wins.

    On main before this change: nimflow set no NIM_PASSTHROUGH_ARGS (KeyError on the model env).
    """
    (tmp_path / "cache" / "m").mkdir(parents=True)
    (tmp_path / "adapters").mkdir()
    deploy = _deploy(tmp_path / "cache", env={"NIM_PASSTHROUGH_ARGS": "--max-lora-rank 128"})
    config = serving_config(deploy, _V2, str(tmp_path / "cache" / "m"), str(tmp_path / "adapters"), 64)
    env = container_environment(deploy, config.environment, source=config.source, defaults=config.defaults)
    assert env["NIM_PASSTHROUGH_ARGS"] == (
        "--enable-lora --max-lora-rank 64 --max-loras 1 --max-cpu-loras 1 --max-lora-rank 128")


@pytest.mark.parametrize(("serving", "custom", "model", "legacy"), [
    (_V1, True, "m", True),  # an engine nimflow built, or fine-tuned weights, on 1.x
    (_V1, False, "m", False),  # the base checkpoint as published
    (_V2, True, "m", False),  # 2.x has no TensorRT-LLM backend
    (_V1.model_copy(update={"model_name": "org/model"}), True, None, False),  # guide §1: NIM's own profile
])
def test_legacy_trtllm_backend_flags_only_for_custom_weights_on_1x(
    tmp_path: Path, serving: ServingImage, custom: bool, model: str | None, legacy: bool
) -> None:
    """Late NIM 1.x: "The default PyTorch TRT-LLM backend does not support fine-tuned models" (ft-support.html):
    the serving container of custom weights on 1.x gets NIM_USE_TRTLLM_LEGACY_BACKEND=1 and
    NIM_DISABLE_TRTLLM_PYTORCH_RT=1, as defaults the spec's deploy.env may override.

    On main before this change: only the JIT build container had them (serving_config took no
    ``custom_weights`` and the environment never held them).
    """
    (tmp_path / "m").mkdir()
    config = serving_config(_deploy(tmp_path), serving, str(tmp_path / model) if model else None, None, custom_weights=custom)
    env = container_environment(_deploy(tmp_path), config.environment, source=config.source, defaults=config.defaults)
    flags = {"NIM_USE_TRTLLM_LEGACY_BACKEND": "1", "NIM_DISABLE_TRTLLM_PYTORCH_RT": "1"}
    assert (flags.items() <= env.items()) is legacy
    if legacy:
        overridden = _deploy(tmp_path, env={"NIM_DISABLE_TRTLLM_PYTORCH_RT": "0"})
        env = container_environment(overridden, config.environment, source=config.source, defaults=config.defaults)
        assert env["NIM_DISABLE_TRTLLM_PYTORCH_RT"] == "0" and env["NIM_USE_TRTLLM_LEGACY_BACKEND"] == "1"


# --- the container's user ---------------------------------------------------------------------------


def test_deploy_user_defaults_to_the_operators_and_takes_only_numeric_ids(tmp_path: Path) -> None:
    """The default is the NIM Operator's uid 1000 / group 2000; `uid`, `uid:gid` and `root` are accepted,
    a name (which nimflow cannot look up inside the image) is refused.

    On main before this change: the default was None (the image's user: root for NIM and the stand-in).
    """
    assert _deploy(tmp_path).user == "1000:2000"
    for user in ("1000", "1001:1001", "root"):
        assert _deploy(tmp_path, user=user).user == user
    with pytest.raises(ValueError, match="numeric `uid` or `uid:gid`"):
        _deploy(tmp_path, user="nim")


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a directory to another uid needs root")
def test_own_cache_is_handed_to_the_container_user(tmp_path: Path) -> None:
    """nimflow running as root chowns the container's own cache (and the mount points in it) to deploy.user.

    On main before this change: the cache stayed root's 0755, which NIM as uid 1000 cannot write.
    """
    (tmp_path / "m").mkdir()
    deploy = _deploy(tmp_path)
    config = serving_config(deploy, _V1, str(tmp_path / "m"), None)
    volumes = container_volumes(deploy, "dep", config)
    own = tmp_path / "nimflow-nim" / "dep"
    assert volumes[str(own.resolve())] == {"bind": NIM_CACHE_MOUNT, "mode": "rw"}
    for path in (own, own / "m"):
        assert (path.stat().st_uid, path.stat().st_gid) == (1000, 2000)
    bare = _deploy(tmp_path, user="1001")
    container_volumes(bare, "dep", config)
    assert (own.stat().st_uid, own.stat().st_gid) == (1001, 2000)  # a bare uid leaves the group as it was


@pytest.mark.parametrize(("mode", "owner", "user", "readable"), [
    (0o644, (0, 0), "1000:2000", True),
    (0o600, (0, 0), "1000:2000", False),
    (0o600, (1000, 0), "1000:2000", True),  # its owner
    (0o640, (0, 2000), "1000:2000", True),  # its group
    (0o640, (0, 2000), "1000", False),  # a bare uid's group is the image's choice: not counted
    (0o044, (1000, 0), "1000:2000", False),  # the owner's bits decide for the owner, even when others may
    (0o600, (0, 0), "root", True),
])
@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root to make")
def test_served_files_must_be_readable_by_the_container_user(
    tmp_path: Path, mode: int, owner: tuple[int, int], user: str, readable: bool
) -> None:
    """What is mounted read-only is checked by the kernel's owner / group / other rule for deploy.user.

    On main before this change: nothing was checked (a 0600 file reached NIM, which failed loading it).
    """
    model = tmp_path / "m"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(mode)
    os.chown(weights, *owner)
    deploy = _deploy(tmp_path, user=user)
    config = serving_config(deploy, _V1, str(model), None)
    if readable:
        container_volumes(deploy, "dep", config)
    else:
        with pytest.raises(DeploymentError, match=r"model\.safetensors \(owner uid .*\), in .* is not readable for the NIM"):
            container_volumes(deploy, "dep", config)

"""Hosting modes decided before anything runs: the NIM generation of the image, and guide §1
(another model's manifest in an existing NIM image), with real images and containers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
from nimflow.tasks.prepare import prepare_serving_image as prepare_task
from prefect import flow

from nimflow.derived_image import ensure_derived_image
from nimflow.errors import ConfigError, DeploymentError, EndpointUnhealthy
from nimflow.model_manifest import MANIFEST_PATH
from nimflow.records import Deployment
from nimflow.spec import BuildSpec, DeploySpec, SourceSpec, VerifySpec
from nimflow.testbed.services import free_port
from nimflow.verification import verify_deployment

pytestmark = pytest.mark.testbed
MODEL = "mistralai/mistral-7b-instruct-v0.3"


@flow(name="test-prepare-serving-image")
def prepare_serving_image(source: SourceSpec, deploy: DeploySpec, build: BuildSpec | None, name: str) -> Any:
    """The task in a flow run of its own, as the host_model flow runs it (its logs reach the API)."""
    return prepare_task(source, deploy, build, name)


def manifest_text(unique: str) -> str:
    """A v1 manifest (NIM's custom tags included) for MODEL; ``unique`` makes its content new."""
    return f"""\
{unique * 8}:
  model: {MODEL}
  release: '1.2.0'
  tags: {{llm_engine: vllm, precision: bf16, tp: '1', feat_lora: 'false'}}
  container_url: nvcr.io/nim/mistralai/mistral-7b-instruct-v03:1.2.0
  workspace: !workspace
    components:
    - dst: ''
      src:
        repo_id: ngc://nim/mistralai/mistral-7b-instruct-v0.3:hf
        files: [!name 'config.json', !name 'tokenizer.json']
"""


def deploy_spec(image: str, tmp_path: Path, **changes: Any) -> DeploySpec:
    return DeploySpec(**{"image": image, "served_model_name": "team/mistral", "cache_dir": tmp_path / "cache", **changes})


def file_in_image(client: Any, image: str, path: str) -> bytes:
    """Read one file out of an image (the stand-in has no shell: copy it out of a created container)."""
    container = client.containers.create(image)
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.getmembers()[0]
            return tar.extractfile(member).read()  # type: ignore[union-attr]
    finally:
        container.remove(force=True)


def test_manifest_image_is_built_once_and_serves_the_configured_name(
    tmp_path: Path, prefect_api: str, docker_client: Any, standin_image: str, unique: str
) -> None:
    manifest = tmp_path / "model_manifest_mistral7b.yaml"
    manifest.write_text(manifest_text(unique))
    source = SourceSpec(manifest=manifest, model_name=MODEL)
    deploy = deploy_spec(standin_image, tmp_path)

    first = prepare_serving_image(source, deploy, None, f"manifest-{unique}")
    name = f"manifest-{unique}"
    try:
        again = prepare_serving_image(source, deploy, None, name)
        assert (first.built, again.built) == (True, False) and first.image == again.image
        assert first.image.startswith(f"nimflow/{name}:")
        assert (first.nim_api, first.model_name, first.derived_from) == ("1.x", MODEL, standin_image)
        assert file_in_image(docker_client, first.image, MANIFEST_PATH) == manifest.read_bytes()
        config = docker_client.images.get(first.image).attrs["Config"]
        assert config["Cmd"] == docker_client.images.get(standin_image).attrs["Config"]["Cmd"]  # NIM starts as before
        assert {"NIM_MODEL_NAME=" + MODEL, "NIM_SERVED_MODEL_NAME=team/mistral"} <= set(config["Env"])
        # No NIM_MANIFEST_PATH (no public source): the file is where the image keeps its own (probed).
        assert not any(entry.startswith("NIM_MANIFEST_PATH=") for entry in config["Env"])

        # Run it as the guide does: no model env on the command line, the image carries it.
        port = free_port()
        container = docker_client.containers.run(
            first.image, name=name, detach=True, environment={"NIMSTANDIN_READY_DELAY": "0.5"},
            ports={"8000/tcp": ("127.0.0.1", port)}, restart_policy={"Name": "unless-stopped"},
        )
        endpoint = f"http://127.0.0.1:{port}"
        dep = Deployment(name=name, container_id=container.id, container_name=name, endpoint=endpoint,
                         stable_endpoint=endpoint, served_model_name="team/mistral", model_root=MODEL, nim_api=first.nim_api)
        health = verify_deployment(docker_client, dep, VerifySpec(deadline_seconds=120), poll_seconds=0.2)
        assert health.checks == ["live", "ready", "model", "answer"] and health.models == ["team/mistral"]
    finally:  # the derived image is this test's own: remove it with its container
        for container in docker_client.containers.list(all=True, filters={"name": f"^/{name}$"}):
            container.remove(force=True)
        docker_client.images.remove(first.image, force=True)


def test_manifest_without_the_model_is_refused_before_any_build(
    tmp_path: Path, prefect_api: str, docker_client: Any, standin_image: str, unique: str
) -> None:
    manifest = tmp_path / "model_manifest.yaml"
    manifest.write_text(manifest_text(unique))
    source = SourceSpec(manifest=manifest, model_name="meta/llama-3.1-70b-instruct")
    with pytest.raises(ConfigError) as caught:
        prepare_serving_image(source, deploy_spec(standin_image, tmp_path), None, f"refused-{unique}")
    assert "source.model_name" in str(caught.value) and MODEL in str(caught.value)
    assert not docker_client.images.list(name=f"nimflow/refused-{unique}")


def test_build_with_a_detected_2x_image_is_refused(
    tmp_path: Path, prefect_api: str, docker_client: Any, standin_image: str
) -> None:
    image, _ = ensure_derived_image(docker_client, "nimflow/test-generation", standin_image, files={},
                                    labels={"nimflow.nim-api": "2.x"}, cmd=["nim-serve"])
    build = BuildSpec(backend="nim-optimize", image=standin_image)
    with pytest.raises(ConfigError) as caught:
        prepare_serving_image(SourceSpec(repo_id="org/tiny"), deploy_spec(image, tmp_path), build, "two-x")
    message = str(caught.value)
    assert "build:" in message and f"deploy.image {image} is NIM 2.x" in message and "remove `build`" in message


def test_plain_source_keeps_deploy_image(tmp_path: Path, prefect_api: str, standin_image: str) -> None:
    serving = prepare_serving_image(SourceSpec(repo_id="org/tiny"), deploy_spec(standin_image, tmp_path), None, "plain")
    assert (serving.image, serving.nim_api, serving.built) == (standin_image, "1.x", False)
    assert serving.detected_by == "image label nimflow.nim-api=1.x"


def test_missing_image_is_a_deployment_error(tmp_path: Path, prefect_api: str) -> None:
    with pytest.raises(DeploymentError, match="not on this Docker host"):
        prepare_serving_image(SourceSpec(repo_id="org/tiny"), deploy_spec("nimflow/absent:nope", tmp_path), None, "absent")


# --- NIM 2.x (the stand-in's nim-serve variant) ---------------------------------------------------


def run_candidate(client: Any, image: str, name: str, cleanup: list[str], env: dict[str, str], model_dir: Path,
                  nim_api: str, model_root: str) -> Deployment:
    port = free_port()
    cleanup.append(name)
    container = client.containers.run(
        image, name=name, detach=True, environment={"NIMSTANDIN_READY_DELAY": "0.5", **env},
        ports={"8000/tcp": ("127.0.0.1", port)}, volumes={str(model_dir): {"bind": "/model", "mode": "ro"}},
        restart_policy={"Name": "unless-stopped"},
    )
    endpoint = f"http://127.0.0.1:{port}"
    return Deployment(name=name, container_id=container.id, container_name=name, endpoint=endpoint,
                      stable_endpoint=endpoint, served_model_name=env["NIM_SERVED_MODEL_NAME"], model_root=model_root,
                      nim_api=nim_api, api="completions")  # the tiny model has no chat template


def test_2x_standin_is_detected_and_a_build_is_refused(tmp_path: Path, prefect_api: str, docker_client: Any,
                                                        standin_image_2x: str) -> None:
    from nimflow.nim_generation import nim_generation

    assert nim_generation(docker_client, standin_image_2x) == ("2.x", "image label nimflow.nim-api=2.x")
    build = BuildSpec(backend="nim-jit", image=standin_image_2x)
    with pytest.raises(ConfigError) as caught:
        prepare_serving_image(SourceSpec(repo_id="org/tiny"), deploy_spec(standin_image_2x, tmp_path), build, "jit-2x")
    assert "build.backend: nim-jit" in str(caught.value) and "is NIM 2.x" in str(caught.value)


def test_2x_served_from_model_path_passes_the_metadata_check(
    tmp_path: Path, docker_client: Any, standin_image_2x: str, unique: str, cleanup_containers: list
) -> None:
    from nimflow.testbed.tiny_model import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny")
    dep = run_candidate(docker_client, standin_image_2x, f"v2-ok-{unique}", cleanup_containers,
                        {"NIM_MODEL_PATH": "/model", "NIM_SERVED_MODEL_NAME": "team/tiny"}, model, "2.x", "/model")
    health = verify_deployment(docker_client, dep, VerifySpec(deadline_seconds=120), poll_seconds=0.2)
    assert health.checks == ["live", "ready", "model", "answer"]


def test_2x_image_routed_as_1x_fails_at_model_naming_deploy_nim_api(
    tmp_path: Path, docker_client: Any, standin_image_2x: str, unique: str, cleanup_containers: list
) -> None:
    from nimflow.testbed.tiny_model import write_tiny_llama

    # What a 1.x route starts: NIM_MODEL_NAME, which NIM 2.x no longer reads.
    model = write_tiny_llama(tmp_path / "tiny")
    dep = run_candidate(docker_client, standin_image_2x, f"v2-as-1x-{unique}", cleanup_containers,
                        {"NIM_MODEL_NAME": "/model", "NIM_SERVED_MODEL_NAME": "team/tiny"}, model, "1.x", "/model")
    with pytest.raises(EndpointUnhealthy) as caught:
        verify_deployment(docker_client, dep, VerifySpec(deadline_seconds=120), poll_seconds=0.2)
    message = str(caught.value)
    assert message.startswith("verification failed at model: the image is NIM 2.x")
    assert "set deploy.nim_api: 2.x" in message


def test_base_image_refuses_a_model_its_bundled_manifest_lacks(
    docker_client: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    # Why guide §1 needs the copied manifest: without it the NIM does not know the model.
    name = f"no-manifest-{unique}"
    cleanup_containers.append(name)
    container = docker_client.containers.run(standin_image, name=name, detach=True,
                                             environment={"NIM_MODEL_NAME": MODEL, "NIM_SERVED_MODEL_NAME": "team/mistral"})
    assert container.wait(timeout=60)["StatusCode"] != 0
    assert MANIFEST_PATH in container.logs().decode()

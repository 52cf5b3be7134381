"""Verification levels against real containers of the NIM stand-in (started with the docker SDK).

Each test starts its own container the way nimflow's rollout does (restart policy, published
port, read-only model mount), builds the :class:`Deployment` record the deploy task would hand
over, and checks what verification says and that it leaves the container alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from nimflow.errors import EndpointUnhealthy
from nimflow.records import Deployment
from nimflow.rollout import LEGACY_TRTLLM_ENV
from nimflow.spec import VerifySpec
from nimflow.testbed.nim_image import standin_weights_digest
from nimflow.testbed.services import free_port
from nimflow.testbed.tiny_model import write_tiny_llama
from nimflow.verification import verify_deployment

pytestmark = pytest.mark.testbed
MODEL_MOUNT = "/model"


#: Provenance labels as nimflow's rollout gives a NIM container (nimflow.rollout.deployment_labels).
PROVENANCE = {"nimflow.weights": "org/tiny@0123abcd", "nimflow.engine-key": "k" * 64}


def start_standin(client: Any, image: str, name: str, cleanup: list[str], env: dict[str, str], *,
                  model_dir: Path | None = None, restart: str | None = "unless-stopped") -> Deployment:
    """Run the stand-in like a NIM candidate and return the deployment record for it."""
    port = free_port()
    cleanup.append(name)
    volumes = {str(model_dir): {"bind": MODEL_MOUNT, "mode": "ro"}} if model_dir else {}
    container = client.containers.run(
        image, name=name, detach=True, environment={"NIMSTANDIN_READY_DELAY": "0.5", **env},
        ports={"8000/tcp": ("127.0.0.1", port)}, volumes=volumes,
        labels={"nimflow.test": "verify-levels", **PROVENANCE}, restart_policy={"Name": restart} if restart else None,
    )
    endpoint = f"http://127.0.0.1:{port}"
    served_dir = model_dir is not None and env.get("NIM_MODEL_NAME") == MODEL_MOUNT
    return Deployment(
        name=name, container_id=container.id, container_name=name, endpoint=endpoint, stable_endpoint=endpoint,
        served_model_name=env.get("NIM_SERVED_MODEL_NAME", "test/served"),
        model_root=env.get("NIM_MODEL_NAME") or env.get("NIM_FT_MODEL") or "meta/llama-3.1-8b-instruct",
        model_source=str(model_dir.resolve()) if served_dir and model_dir else None, labels=dict(PROVENANCE),
    )


def test_all_levels_pass_and_the_container_keeps_running(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list, caplog: pytest.LogCaptureFixture
) -> None:
    model = write_tiny_llama(tmp_path / "tiny")
    dep = start_standin(docker_client, standin_image, f"verify-ok-{unique}", cleanup_containers,
                        {"NIM_MODEL_NAME": MODEL_MOUNT, "NIM_SERVED_MODEL_NAME": "test/tiny",
                         "NIMSTANDIN_READY_DELAY": "2"}, model_dir=model)
    dep = dep.model_copy(update={"api": "completions"})
    spec = VerifySpec(deadline_seconds=120, progress_seconds=0.5, max_latency_seconds=60,
                      golden=[{"prompt": "Name a colour.", "expect": ["test/tiny", "Name a colour."]}])
    log = logging.getLogger("test.verify_levels")
    with caplog.at_level(logging.INFO, logger=log.name):
        health = verify_deployment(docker_client, dep, spec, log=log)

    assert health.checks == ["live", "ready", "model", "answer", "golden", "latency"]
    assert health.models == ["test/tiny"] and "received: " + spec.prompt in health.completion
    assert docker_client.containers.get(dep.container_id).status == "running"
    # While not ready, progress named the container's state and what it last printed.
    progress = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert progress and "latest log line:" in progress[0] and "restarts 0" in progress[0]


def test_container_that_exits_while_starting_fails_at_ready_at_once(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    # A JIT build that fails after the server is live: NIM exits 1 before it is ready.
    model = write_tiny_llama(tmp_path / "tiny")
    dep = start_standin(docker_client, standin_image, f"verify-exit-{unique}", cleanup_containers,
                        {"NIM_FT_MODEL": MODEL_MOUNT, "NIMSTANDIN_BUILD_FAILURE": "gpu-oom", "NIMSTANDIN_BUILD_SECONDS": "4",
                         **LEGACY_TRTLLM_ENV},
                        model_dir=model, restart=None)
    with pytest.raises(EndpointUnhealthy) as caught:
        verify_deployment(docker_client, dep, VerifySpec(deadline_seconds=300), poll_seconds=0.2)
    message = str(caught.value)
    assert message.startswith(f"verification failed at ready: container {dep.container_name} exited with exit code 1")
    assert f"{dep.container_name} ({dep.container_id[:12]})" in message
    assert "Engine building failed" in message or "out of memory" in message.lower()  # the container's own words
    assert docker_client.containers.get(dep.container_id).status == "exited"  # left for the rollout to remove


def test_container_that_restarts_while_starting_fails_at_ready_at_once(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    model = write_tiny_llama(tmp_path / "tiny")
    dep = start_standin(docker_client, standin_image, f"verify-restart-{unique}", cleanup_containers,
                        {"NIM_FT_MODEL": MODEL_MOUNT, "NIMSTANDIN_BUILD_FAILURE": "gpu-oom", "NIMSTANDIN_BUILD_SECONDS": "4",
                         **LEGACY_TRTLLM_ENV},
                        model_dir=model, restart="unless-stopped")
    with pytest.raises(EndpointUnhealthy) as caught:
        verify_deployment(docker_client, dep, VerifySpec(deadline_seconds=300), poll_seconds=0.2)
    message = str(caught.value)
    assert message.startswith(f"verification failed at ready: container {dep.container_name} restarted")
    assert docker_client.containers.get(dep.container_id).status in ("running", "restarting")  # not stopped


def test_served_model_that_is_not_the_mounted_one_fails_at_model(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    # A model-specific NIM image serves its bundled model whatever NIM_MODEL_NAME says; the
    # stand-in does the same with NIMSTANDIN_IGNORE_MODEL=1 (bundled root meta/llama-3.1-8b-instruct).
    model = write_tiny_llama(tmp_path / "tiny")
    dep = start_standin(docker_client, standin_image, f"verify-wrong-{unique}", cleanup_containers,
                        {"NIM_MODEL_NAME": MODEL_MOUNT, "NIM_SERVED_MODEL_NAME": "test/tiny", "NIMSTANDIN_IGNORE_MODEL": "1"},
                        model_dir=model)
    with pytest.raises(EndpointUnhealthy) as caught:
        verify_deployment(docker_client, dep, VerifySpec(deadline_seconds=120), poll_seconds=0.2)
    message = str(caught.value)
    assert message.startswith("verification failed at model: ")
    assert "meta/llama-3.1-8b-instruct" in message and MODEL_MOUNT in message
    assert docker_client.containers.get(dep.container_id).status == "running"


def test_standin_answering_like_real_nim_1x_passes_on_container_identity(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    """The stand-in lists ``root`` as the model's name, as real NIM 1.x does, not the mounted path.
    Identity is proven by the container (labels, NIM_MODEL_NAME, the read-only mount of the prepared
    directory) and by the golden answer naming the mounted weights. On old main (6c010bf, with this
    stand-in) this failed: ``verification failed at model: 'test/tiny' is served from 'test/tiny',
    but the container was told to serve '/model' (NIM_MODEL_NAME): it serves another model``
    (checked by running this test with old main's nimflow/verification.py)."""
    model = write_tiny_llama(tmp_path / "tiny")
    dep = start_standin(docker_client, standin_image, f"verify-real-{unique}", cleanup_containers,
                        {"NIM_MODEL_NAME": MODEL_MOUNT, "NIM_SERVED_MODEL_NAME": "test/tiny"}, model_dir=model)
    dep = dep.model_copy(update={"api": "completions"})
    digest = standin_weights_digest(model)
    spec = VerifySpec(deadline_seconds=120, golden=[{"prompt": "Which weights?", "expect": [f"(weights {digest})"]}])
    health = verify_deployment(docker_client, dep, spec, poll_seconds=0.2)

    assert health.checks == ["live", "ready", "model", "answer", "golden"]
    card = httpx.get(f"{dep.endpoint}/v1/models", timeout=30).json()["data"][0]
    assert (card["id"], card["root"]) == ("test/tiny", "test/tiny")  # a name, not the path nimflow mounted


def test_container_that_is_not_the_one_prepared_fails_at_model(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    """What real NIM cannot say over HTTP, the container does: labels for other weights, or another
    directory mounted where the model should be, fail at ``model`` though the NIM answers well (here
    even with ``root`` echoing the mount point, NIMSTANDIN_MODELS_ROOT=path, which old main trusted).
    On old main (6c010bf) verification passed: ``Failed: DID NOT RAISE EndpointUnhealthy``
    (run with old main's nimflow/verification.py)."""
    model = write_tiny_llama(tmp_path / "tiny")
    dep = start_standin(docker_client, standin_image, f"verify-other-{unique}", cleanup_containers,
                        {"NIM_MODEL_NAME": MODEL_MOUNT, "NIM_SERVED_MODEL_NAME": "test/tiny",
                         "NIMSTANDIN_MODELS_ROOT": "path"}, model_dir=model)
    dep = dep.model_copy(update={"api": "completions"})
    spec = VerifySpec(deadline_seconds=120)
    newer = dep.model_copy(update={"labels": {**PROVENANCE, "nimflow.weights": "org/tiny@feedbeef"}})
    with pytest.raises(EndpointUnhealthy) as caught:
        verify_deployment(docker_client, newer, spec, poll_seconds=0.2)
    assert str(caught.value).startswith(
        f"verification failed at model: container {dep.container_name} carries nimflow.weights='org/tiny@0123abcd', "
        "not 'org/tiny@feedbeef'")

    elsewhere = write_tiny_llama(tmp_path / "prepared", seed=1)
    with pytest.raises(EndpointUnhealthy) as caught:
        verify_deployment(docker_client, dep.model_copy(update={"model_source": str(elsewhere)}), spec, poll_seconds=0.2)
    message = str(caught.value)
    assert message.startswith(f"verification failed at model: container {dep.container_name} has {model.resolve()} (ro) "
                              f"mounted at {MODEL_MOUNT}, not the directory nimflow prepared, {elsewhere.resolve()}")
    assert docker_client.containers.get(dep.container_id).status == "running"

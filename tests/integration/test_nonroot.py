"""NIM runs as a non-root user, and each NIM mode gets the environment real NIM needs (issue 16, items 5, 6, 8).

NIM's docs run the container with ``-u $(id -u)``; the NIM Operator runs it as uid 1000 (group 2000).
nimflow's default ``deploy.user`` is the operator's ``1000:2000``: it hands the container's own cache
to that user, refuses what the user could neither write nor read before Docker is asked anything,
and the stand-in refuses at start-up what a real non-root NIM could not do. These tests run the
stand-in as that user, through nimflow's own code path where nimflow is what is being tested.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nimflow.errors import DeploymentError
from nimflow.records import ServingImage
from nimflow.rollout import nim_cache_dir, promote, start_candidate
from nimflow.spec import DeploySpec, RolloutSpec
from nimflow.testbed.services import free_port
from nimflow.testbed.tiny_model import write_lora_adapter, write_tiny_llama
from tests.integration.test_rollout import complete, make_rig, verify

pytestmark = pytest.mark.testbed
WAIT = 60.0  # bound for waits that end as soon as their condition holds
#: A host uid that is neither root nor the container's default user (1000).
OTHER_UID = 1001


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids can reach (pytest's tmp_path lies in a 0700 directory of root's)."""
    path = Path(tempfile.mkdtemp(prefix="nimflow-nonroot-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _standin_run(client: Any, image: str, cleanup: list[str], name: str, volumes: dict[str, dict[str, str]],
                 environment: dict[str, str], user: str = "1000:2000") -> tuple[int, str]:
    """Run the stand-in directly (no nimflow), as ``user``; wait for it to exit; (exit code, its log)."""
    cleanup.append(name)
    container = client.containers.run(image, name=name, detach=True, user=user, volumes=volumes,
                                      environment={"NIMSTANDIN_READY_DELAY": "0", **environment})
    code = container.wait(timeout=WAIT)["StatusCode"]
    return code, container.logs().decode()


def _as_other_uid(action: Callable[[], str]) -> str:
    """``action()``'s answer, run in a forked child that has dropped root for :data:`OTHER_UID` (no exec:
    the interpreter and the modules loaded so far need not be readable for that uid)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        answer = ""
        try:
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            answer = action()
        except BaseException as exc:  # noqa: BLE001 - everything is the answer
            answer = f"{type(exc).__name__} {exc}"
        finally:
            os.write(write_end, answer.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_rollout_refuses_a_cache_its_user_cannot_write_before_docker(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nimflow running as uid 1001 (not root: it cannot chown) with the default deploy.user 1000:2000:
    the container's own cache, made by nimflow (0755, uid 1001), is not writable for uid 1000, so
    start_candidate refuses at once, naming the directory, its owner and mode, the user and the fix.
    Docker is never asked (DOCKER_HOST points nowhere: reaching it would be a ServiceUnavailable).

    On main before this change: no user was set and nothing checked, so the run went on to Docker and
    failed with ServiceUnavailable (checked by running this test against main's nimflow/rollout.py).
    """
    cache = shared_dir / "cache"
    model = write_tiny_llama(cache / "models" / "tiny")
    subprocess.run(["chown", "-R", f"{OTHER_UID}:{OTHER_UID}", str(shared_dir)], check=True)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{shared_dir}/no-docker.sock")
    deploy = DeploySpec(image="nim:1", served_model_name="m", cache_dir=cache)
    serving = ServingImage(image="nim:1", nim_api="1.x", detected_by="test")
    answer = _as_other_uid(lambda: repr(start_candidate(deploy, RolloutSpec(), "blue-green", "nr", "nimflow-nr", serving,
                                                        str(model), None, [], "completions", {})))
    own_cache = cache / "nimflow-nim" / "nr"
    assert answer.startswith("DeploymentError "), answer
    assert f"{own_cache} (owner uid {OTHER_UID}, gid {OTHER_UID}, mode drwxr-xr-x 0755)" in answer
    assert "not writable for its user deploy.user='1000:2000'" in answer
    assert f"sudo chown -R 1000:2000 {own_cache}" in answer and f"`{OTHER_UID}:{OTHER_UID}`" in answer


def test_standin_started_directly_exits_with_nims_cache_message(
    shared_dir: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]
) -> None:
    """The stand-in run as uid 1000 on a cache only root may write (bypassing nimflow's preparation)
    exits 1 at start-up with NIM's own check and text (NVIDIA/nim-deploy issue 16:
    ``RuntimeError: Unable to write to NIM_CACHE_PATH (...)`` from ``nim-llm-check-cache-env``).

    On main before this change: the stand-in never checked its cache and served (the wait for its exit
    timed out).
    """
    cache = shared_dir / "root-cache"
    cache.mkdir(mode=0o755)
    code, logs = _standin_run(docker_client, standin_image, cleanup_containers, f"nimflow-test-cache-{unique}",
                              {str(cache): {"bind": "/opt/nim/.cache", "mode": "rw"}}, {})
    assert code == 1, logs
    assert "RuntimeError: Unable to write to NIM_CACHE_PATH (/opt/nim/.cache)" in logs
    assert "nim-llm-check-cache-env" in logs
    assert not list(cache.iterdir())  # nothing was written


def test_standin_unreadable_model_file_fails_as_python_permission_error(
    shared_dir: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]
) -> None:
    """A model file the container's user cannot read (root's, 0600) fails start-up as Python's open()
    does: ``PermissionError: [Errno 13] Permission denied: '<path>'``.

    On main before this change: the stand-in swallowed the unreadable config.json (an empty config) and
    went on serving; the wait for its exit timed out.
    """
    model = write_tiny_llama(shared_dir / "model")
    (model / "config.json").chmod(0o600)
    cache = shared_dir / "cache"
    cache.mkdir()
    os.chown(cache, 1000, 2000)
    code, logs = _standin_run(docker_client, standin_image, cleanup_containers, f"nimflow-test-perm-{unique}",
                              {str(model): {"bind": "/opt/nim/model", "mode": "ro"},
                               str(cache): {"bind": "/opt/nim/.cache", "mode": "rw"}},
                              {"NIM_MODEL_NAME": "/opt/nim/model"})
    assert code == 1, logs
    assert "PermissionError: [Errno 13] Permission denied: '/opt/nim/model/config.json'" in logs


def test_rollout_refuses_a_served_file_its_user_cannot_read(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]
) -> None:
    """nimflow (root here) checks what it mounts read-only before any container starts: a 0600 file of
    root's in the served model is refused, naming the file, owner, mode, user and fix.

    On main before this change: nothing was checked; the container started (as root, so it even served).
    """
    rig = make_rig(tmp_path, docker_client, standin_image, unique, cleanup_containers)
    model = Path(rig.model("private"))
    (model / "tokenizer.json").chmod(0o600)
    with pytest.raises(DeploymentError) as caught:
        rig.start(str(model))
    message = str(caught.value)
    assert f"{(model / 'tokenizer.json').resolve()} (owner uid 0, gid 0, mode -rw------- 0600)" in message
    assert "deploy.user='1000:2000'" in message and f"chmod -R a+rX {model.resolve()}" in message
    assert not rig.containers()  # refused before Docker started anything


def test_rollout_serves_as_uid_1000_with_its_own_cache(
    tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]
) -> None:
    """End to end on the test bed: the default deploy.user runs the stand-in as 1000:2000 (its
    processes run as uid 1000), nimflow (root) handed it its cache, and it serves and takes traffic.

    On main before this change: deploy.user was unset, the container ran as root (Config.User "").
    """
    rig = make_rig(tmp_path, docker_client, standin_image, unique, cleanup_containers)
    candidate = rig.start(rig.model("v1"))
    verify(docker_client, candidate)
    promote(candidate, RolloutSpec(drain_seconds=30))
    container = docker_client.containers.get(candidate.container_id)
    assert container.attrs["Config"]["User"] == "1000:2000"
    top = container.top(ps_args="-o uid,pid")  # numeric: the host may have a name for uid 1000
    assert {process[0] for process in top["Processes"]} == {"1000"}, top
    own_cache = nim_cache_dir(rig.cache, rig.name)
    assert (own_cache.stat().st_uid, own_cache.stat().st_gid) == (1000, 2000)
    assert "[NIM stand-in]" in complete(candidate.stable_endpoint, rig.deploy.served_model_name)


def test_2x_lora_gets_vllm_options_and_serves_a_rank_32_adapter(
    tmp_path: Path, docker_client: Any, standin_image_2x: str, unique: str, cleanup_containers: list[str]
) -> None:
    """NIM 2.x takes LoRA as vLLM options (NIM_PASSTHROUGH_ARGS ``--enable-lora --max-lora-rank 32
    --max-loras 1 --max-cpu-loras 1``), not NIM_MAX_LORA_RANK; a rank-32 adapter then answers.

    On main before this change (nimflow/rollout.py and spec.py of main against this stand-in): only
    NIM_MAX_LORA_RANK=32 was set, which 2.x does not read, so vLLM's default max rank 16 applied and the
    adapter's request failed with ``LoRA rank 32 is greater than max_lora_rank 16.``
    """
    cache = tmp_path / "cache"
    model = write_tiny_llama(cache / "models" / "base")
    adapters = cache / "loras" / "set"
    write_lora_adapter(adapters / "sql", model, rank=32)
    name = f"nr2-{unique}"
    cleanup_containers.extend([f"nimflow-{name}-blue", f"nimflow-{name}-green", f"nimflow-{name}-front"])
    deploy = DeploySpec(image=standin_image_2x, served_model_name="team/base", host_port=free_port(), cache_dir=cache,
                        env={"NIMSTANDIN_READY_DELAY": "0.3"})
    serving = ServingImage(image=standin_image_2x, nim_api="2.x", detected_by="test")
    candidate = start_candidate(deploy, RolloutSpec(), "blue-green", name, f"nimflow-{name}", serving, str(model),
                                str(adapters), ["sql"], "completions", {}, lora_max_rank=32)
    verify(docker_client, candidate)
    host, port = candidate.endpoint.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        connection.request("POST", "/v1/completions", body=json.dumps({"model": "sql", "prompt": "ping"}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200, body
    assert "+lora" in body
    env = dict(item.split("=", 1) for item in docker_client.containers.get(candidate.container_id).attrs["Config"]["Env"])
    assert env["NIM_PASSTHROUGH_ARGS"] == "--enable-lora --max-lora-rank 32 --max-loras 1 --max-cpu-loras 1"
    assert "NIM_MAX_LORA_RANK" not in env

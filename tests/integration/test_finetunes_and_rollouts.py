"""Issue 6 acceptance, through the real ``host_model`` flow on the test bed.

Fine-tunes users can trust (every refusal before any container starts; an allowed pickle converted
and served; a LoRA adapter served by name), every hosting mode (guide §1 manifest, NIM 2.x), and
rollouts that never take a working model down (blue-green under a client loop, a failing version
that never takes traffic, recreate rolling back). The stand-in's answers carry a digest of the
weights it loaded, so the tests can tell which weights each container serves.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from nimflow.flows.host_model import host_model

from nimflow.testbed.nim_image import standin_weights_digest
from nimflow.testbed.tiny_model import write_lora_adapter, write_safetensors, write_tiny_llama
from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec, publish_tiny

pytestmark = pytest.mark.testbed


def run_flow(tmp_path: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Any:
    """One host_model run; its final state (the flow's exception is in ``state.result()``)."""
    return host_model(spec=str(write_spec(tmp_path / name, spec)), return_state=True)


def failure_of(state: Any) -> BaseException:
    assert state.is_failed(), "the run should have failed"
    with pytest.raises(Exception) as caught:
        state.result()
    return caught.value


def containers_of(docker_client: Any, name: str) -> list[Any]:
    """Every container labelled as this deployment's (running or not)."""
    return docker_client.containers.list(all=True, filters={"label": f"nimflow.deployment={name}"})


def served_digest(answer: str) -> str:
    """The weights digest in a stand-in answer: ``... (weights <digest16>) received: ...``."""
    return answer.split("(weights ", 1)[1].split(")", 1)[0]


# --- refusals before any container ------------------------------------------------------------------


def _pickle_without_consent(tmp: Path, base: Path) -> tuple[Path, str]:
    return write_tiny_llama(tmp / "ft", seed=3, weight_format="pickle"), "allow_pickle"


def _shape_mismatch(tmp: Path, base: Path) -> tuple[Path, str]:
    ft = write_tiny_llama(tmp / "ft", seed=3)
    # Same config, one tensor wider than the base's: NIM would only notice when loading it.
    write_tiny_llama(tmp / "wide", seed=3, intermediate_size=192)
    wide = json.loads((tmp / "wide" / "config.json").read_text())
    assert wide["intermediate_size"] == 192
    (ft / "model.safetensors").unlink()
    (tmp / "wide" / "model.safetensors").rename(ft / "model.safetensors")
    return ft, "has shape"


def _unexpected_names(tmp: Path, base: Path) -> tuple[Path, str]:
    ft = write_tiny_llama(tmp / "ft", seed=3)
    write_safetensors(ft / "extra.safetensors", [("model.layers.0.mlp.extra_proj.weight", "F16", [4, 4], bytes(32))])
    return ft, "model.layers.0.mlp.extra_proj.weight"


def _adapter_as_finetune(tmp: Path, base: Path) -> tuple[Path, str]:
    return write_lora_adapter(tmp / "ft", base), "lora.adapters"


def _missing_tokenizer(tmp: Path, base: Path) -> tuple[Path, str]:
    ft = write_tiny_llama(tmp / "ft", seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ft / name).unlink()
        (base / name).unlink()  # the base has none either: nothing to fall back on
    return ft, "missing tokenizer"


REFUSALS = {
    "pickle without consent": _pickle_without_consent,
    "shape mismatch": _shape_mismatch,
    "unexpected tensor names": _unexpected_names,
    "adapter given as a full fine-tune": _adapter_as_finetune,
    "missing tokenizer": _missing_tokenizer,
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_finetune_is_refused_before_any_container(
    case: str, tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, docker_client: Any,
) -> None:
    name = f"refuse-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    finetune, expected = REFUSALS[case](tmp_path, base)
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["finetune"] = {"path": str(finetune)}
    started = int(time.time())

    error = failure_of(run_flow(tmp_path, spec))

    assert type(error).__name__ == "InvalidWeights"
    assert expected in str(error) and str(finetune) in str(error)
    assert not containers_of(docker_client, name)
    created = docker_client.events(since=started, until=int(time.time()) + 1, decode=True,
                                   filters={"type": "container", "event": "create", "label": f"nimflow.deployment={name}"})
    assert not list(created)


# --- what is allowed is served, and the answer shows which weights ---------------------------------


def test_allowed_pickle_is_converted_and_served(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
) -> None:
    name = f"pickle-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    finetune = write_tiny_llama(tmp_path / "ft", seed=5, weight_format="pickle")
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["finetune"] = {"path": str(finetune), "allow_pickle": True}
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    staged = Path(record["model_path"])
    assert sorted(p.name for p in staged.glob("*.safetensors")) and not list(staged.glob("*.bin"))
    # The container serves the converted fine-tune: its weights, not the base's.
    assert served_digest(record["completion"]) == standin_weights_digest(staged) != standin_weights_digest(base)
    assert record["checks"][:4] == ["live", "ready", "model", "answer"]


def test_lora_adapter_is_served_through_peft_source_and_answers_by_name(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any,
) -> None:
    name = f"lora-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    adapter = write_lora_adapter(tmp_path / "sql-adapter", base, rank=4)
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["lora"] = {"adapters": [{"name": "tiny-sql", "path": str(adapter)}]}
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    assert record["adapters"] == ["tiny-sql"]
    container = docker_client.containers.get(record["container_id"])
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert env["NIM_PEFT_SOURCE"].startswith("/opt/nim/.cache/lora/") and "NIM_FT_MODEL" not in env
    models = httpx.get(f"{record['endpoint']}/v1/models", timeout=10).json()["data"]
    assert {m["id"]: m.get("parent") for m in models}["tiny-sql"] == spec["deploy"]["served_model_name"]
    answer = httpx.post(f"{record['endpoint']}/v1/chat/completions", timeout=30, json={
        "model": "tiny-sql", "messages": [{"role": "user", "content": "count users"}]}).json()
    text = answer["choices"][0]["message"]["content"]
    assert f"+lora {standin_weights_digest(adapter)}" in text and "count users" in text


# --- hosting modes -----------------------------------------------------------------------------------


def test_manifest_mode_serves_the_configured_name_and_is_not_rebuilt(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any,
) -> None:
    from tests.integration.test_hosting_modes import MODEL, manifest_text

    name = f"manifest-{unique}"
    (tmp_path / "model_manifest.yaml").write_text(manifest_text(unique))
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"manifest": "model_manifest.yaml", "model_name": MODEL}
    spec["deploy"]["served_model_name"] = "team/mistral"
    cleanup_containers.append(f"nimflow-{name}")
    try:
        first = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))
        created = docker_client.images.get(first["image"]).attrs["Created"]
        again = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

        assert first["image"].startswith(f"nimflow/{name}:") and first["served_model_name"] == "team/mistral"
        assert first["model_path"] is None and first["checks"][:3] == ["live", "ready", "model"]
        assert again["image"] == first["image"] and docker_client.images.get(again["image"]).attrs["Created"] == created
        assert again["unchanged"] and again["container_id"] == first["container_id"]
    finally:
        for container in containers_of(docker_client, name):
            container.remove(force=True)
        for image in docker_client.images.list(name=f"nimflow/{name}"):
            # The front proxy's image was derived from it: remove that child first.
            for child in docker_client.images.list(name="nimflow/front-proxy"):
                if image.id in {layer.get("Id") for layer in child.history()}:
                    docker_client.images.remove(child.id, force=True)
            docker_client.images.remove(image.id, force=True)


def test_nim_2x_image_is_served_through_model_path(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image_2x: str, unique: str, cleanup_containers: list,
    docker_client: Any,
) -> None:
    name = f"nim2-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    spec = make_spec(tmp_path, name, "org/unused", standin_image_2x, build=None)
    spec["source"] = {"local_dir": str(base)}
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    assert record["nim_api"] == "2.x"
    env = dict(item.split("=", 1) for item in docker_client.containers.get(record["container_id"]).attrs["Config"]["Env"])
    assert env["NIM_MODEL_PATH"] == "/opt/nim/model" and "NIM_MODEL_NAME" not in env
    assert served_digest(record["completion"]) == standin_weights_digest(base)


# --- rollouts ------------------------------------------------------------------------------------------


class ClientLoop:
    """A client calling the stable endpoint in a loop on one keep-alive connection, as users do."""

    def __init__(self, endpoint: str, model: str) -> None:
        self.endpoint, self.model = endpoint, model
        self.answers: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.endpoint}/v1/chat/completions", json={
                        "model": self.model, "messages": [{"role": "user", "content": "ping"}]})
                    if response.status_code == 200:
                        self.answers.append(response.json()["choices"][0]["message"]["content"])
                    else:
                        self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for(self, count: int) -> None:
        """Until ``count`` more answers arrived (the loop is really running)."""
        target = len(self.answers) + count
        for _ in range(600):
            if len(self.answers) >= target or self.failures:
                return
            time.sleep(0.05)


def test_blue_green_rollout_drops_no_request_and_a_failing_version_never_takes_traffic(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list, docker_client: Any,
) -> None:
    name, repo = f"bg-{unique}", f"org/bg-{unique}"
    first_sha = publish_tiny(hub, repo, tmp_path, seed=0)
    spec = make_spec(tmp_path, name, repo, standin_image, build=None)
    spec["rollout"] = {"strategy": "blue-green", "drain_seconds": 10}
    cleanup_containers.append(f"nimflow-{name}")
    first = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))
    old_digest = served_digest(first["completion"])

    second_sha = publish_tiny(hub, repo, tmp_path, seed=1)
    assert second_sha != first_sha
    with ClientLoop(first["endpoint"], spec["deploy"]["served_model_name"]) as loop:
        loop.wait_for(5)
        second = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), revision=second_sha)
        loop.wait_for(5)
        new_digest = served_digest(second["completion"])

        # A version that ignores the model it is given: verification fails at `model`, it never serves.
        broken = {**spec, "deploy": {**spec["deploy"], "env": {**spec["deploy"]["env"], "NIMSTANDIN_IGNORE_MODEL": "1"}}}
        error = failure_of(run_flow(tmp_path, broken, "broken.yaml"))
        loop.wait_for(5)

    assert loop.failures == []
    digests = [served_digest(a) for a in loop.answers]
    assert digests[0] == old_digest != new_digest == digests[-1]
    assert digests == sorted(digests, key=[old_digest, new_digest].index)  # switched once, never back
    assert second["strategy"] == "blue-green" and second["replaced_container_id"] == first["container_id"]
    assert str(error).startswith("verification failed at model:") and "meta/llama-3.1-8b-instruct" in str(error)
    assert "last log lines" in str(error)
    # The failed candidate is gone; the verified one and the front proxy remain.
    assert sorted(c.name for c in containers_of(docker_client, name)) == sorted(
        [docker_client.containers.get(second["container_id"]).name, f"nimflow-{name}-front"])


def test_recreate_rolls_back_to_the_old_container(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any,
) -> None:
    name = f"recreate-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["rollout"] = {"strategy": "recreate"}
    cleanup_containers.append(f"nimflow-{name}")
    first = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    broken = {**spec, "deploy": {**spec["deploy"], "env": {**spec["deploy"]["env"], "NIMSTANDIN_IGNORE_MODEL": "1"}}}
    error = failure_of(run_flow(tmp_path, broken, "broken.yaml"))

    assert str(error).startswith("verification failed at model:")
    old = docker_client.containers.get(first["container_id"])
    assert old.status == "running"
    answer = httpx.post(f"{first['endpoint']}/v1/chat/completions", timeout=30, json={
        "model": spec["deploy"]["served_model_name"], "messages": [{"role": "user", "content": "still there?"}]})
    assert answer.status_code == 200
    assert served_digest(answer.json()["choices"][0]["message"]["content"]) == standin_weights_digest(base)
    assert [c.id for c in containers_of(docker_client, name) if c.labels.get("nimflow.role") == "serve"] == [old.id]

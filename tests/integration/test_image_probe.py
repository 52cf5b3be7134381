"""The image probe on the test bed: the stand-in's images are asked what they have, and builds follow.

Real Docker engine, the local hub, moto's S3 server and a Prefect API. Stand-in variants put the
converters where TensorRT-LLM <= 0.17 does (``examples/<dir>``), nowhere (the newest TensorRT-LLM),
or report TensorRT-LLM 0.11 (whose ``trtllm-build`` takes ``--max_output_len``, not ``--max_seq_len``).
Containers are counted from the Docker engine's events, never from timing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from nimflow.flows.host_model import host_model

from nimflow.containers import image_id
from nimflow.engine_store import read_local_manifest
from nimflow.image_probe import forget_in_process, probe_image
from nimflow.records import Deployment
from nimflow.spec import SourceSpec, VerifySpec
from nimflow.testbed.hub_server import publish
from nimflow.testbed.tiny_model import write_tiny_llama
from nimflow.verification import verify_deployment
from tests.conftest import standin_variant, write_spec
from tests.integration.test_cache_cli import nimflow
from tests.integration.test_host_model import make_spec, publish_tiny
from tests.integration.test_hosting_modes import MODEL, deploy_spec, file_in_image, manifest_text, prepare_serving_image

pytestmark = pytest.mark.testbed


def created_containers(docker_client: Any, since: float, role: str, image: str | None = None) -> list[dict[str, Any]]:
    """``create`` events of containers labelled ``nimflow.role=<role>`` since ``since`` (of ``image`` when given)."""
    events = docker_client.events(since=int(since), until=int(time.time()) + 1, decode=True,
                                  filters={"type": "container", "event": "create", "label": f"nimflow.role={role}"})
    found = list(events)
    if image is not None:
        wanted = {image, image_id(docker_client, image)}
        found = [e for e in found if e.get("from") in wanted or (e.get("Actor") or {}).get("Attributes", {}).get("image") in wanted]
    return found


def publish_family(hub: Any, tmp_path: Path, repo: str, architecture: str) -> str:
    """Publish the tiny Llama checkpoint declared as ``architecture`` (the stand-in converts by family)."""
    source = write_tiny_llama(tmp_path / f"src-{architecture}", seed=0)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    return publish(hub.root, repo, source)


def test_probe_of_the_standin_finds_its_facts_once_per_image(docker_client: Any, standin_image: str, tmp_path: Path) -> None:
    """One probe container per image: the second call reads the disk cache (a new process's view) and
    the third this process's memory; neither starts a container.

    Old main had no image probe (ImportError of nimflow.image_probe).
    """
    forget_in_process()
    since = time.time() - 1
    facts = probe_image(docker_client, standin_image, cache_dir=tmp_path)

    core = "/app/tensorrt_llm/examples/models/core"
    assert {name: c.path for name, c in facts.converters.items()} == {
        "llama": f"{core}/llama/convert_checkpoint.py", "qwen2": f"{core}/qwen/convert_checkpoint.py",
        "gemma": f"{core}/gemma/convert_checkpoint.py", "phi3": f"{core}/phi/convert_checkpoint.py"}
    gemma = facts.converters["gemma"]
    assert gemma.learnt_from == "help" and {"--model-dir", "--output-model-dir", "--ckpt-type", "--world-size"} <= set(gemma.flags)
    assert "--tp_size" not in gemma.flags and "--pp_size" not in gemma.flags
    assert "--max_seq_len" in facts.trtllm_build.flags and facts.trtllm_build.path == "/usr/local/bin/trtllm-build"
    assert {"--model_dir", "--build_config", "--output_engine_dir"} <= set(facts.nim_optimize.flags)
    assert (facts.trtllm_version, facts.model_manifest) == ("0.0.0+standin", "/etc/nim/config/model_manifest.yaml")
    assert (facts.config_user, facts.uid) == ("", 0)

    forget_in_process()
    assert probe_image(docker_client, standin_image, cache_dir=tmp_path) == facts  # from disk
    assert probe_image(docker_client, standin_image, cache_dir=tmp_path) == facts  # from memory
    assert len(created_containers(docker_client, since, "probe", standin_image)) == 1


def test_gemma_builds_end_to_end_with_gemmas_arguments(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list,
) -> None:
    """A Gemma2 checkpoint is converted by the image's Gemma converter (--model-dir, --output-model-dir,
    --ckpt-type hf, --world-size: the stand-in's parser refuses anything else, as the real one does),
    built, cached and served.

    Run on old main (this test copied in): the stand-in had one llama converter at
    examples/models/core/llama only, so the convert step failed with BuildFailed "can't open file
    '/app/tensorrt_llm/examples/models/core/gemma/convert_checkpoint.py'".
    """
    name, repo = f"gemma-{unique}", f"org/gemma-{unique}"
    publish_family(hub, tmp_path, repo, "Gemma2ForCausalLM")
    spec = make_spec(tmp_path, name, repo, standin_image, build="trtllm-build")
    spec["build"].update(max_seq_len=512, max_batch_size=2, max_num_tokens=256)
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    engine_dir = Path(record["model_path"])
    assert record["engine_origin"] == "built" and "received" in record["completion"]
    config = json.loads((engine_dir / "trtllm_engine" / "config.json").read_text())
    assert config["pretrained_config"]["architecture"] == "Gemma2ForCausalLM"
    assert config["pretrained_config"]["mapping"]["tp_size"] == 1


def test_older_examples_layout_builds_end_to_end(
    tmp_path: Path, testbed_env: dict, hub: Any, unique: str, cleanup_containers: list, docker_client: Any,
) -> None:
    """An image with TensorRT-LLM <= 0.17's layout (examples/llama/convert_checkpoint.py): the probe finds
    the converter there and the build runs it; the engine key is computed as for the newer layout
    (the image id in the key already tells the images apart).

    Run on old main (this test copied in, the 0.17-layout image built by this branch's stand-in):
    nimflow ran /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py, which that image
    lacks: BuildFailed "can't open file ...".
    """
    image = standin_variant(docker_client, examples_layout="0.17")
    name, repo = f"old-layout-{unique}", f"org/old-layout-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, image, build="trtllm-build")
    spec["build"].update(max_seq_len=512, max_batch_size=2, max_num_tokens=256)
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    assert record["engine_origin"] == "built" and "received" in record["completion"]
    manifest = read_local_manifest(Path(record["model_path"]))
    assert manifest is not None
    commands = manifest["key_inputs"]["builder"]["commands_by_architecture"]["LlamaForCausalLM"]
    assert commands[0][1] == "/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py"  # key unchanged


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ({"examples_layout": "none"}, "has no convert_checkpoint.py for "),
        ({"trtllm_version": "0.11.0"}, "trtllm-build in {image} does not accept --max_seq_len (not in its --help): "
         "trtllm-build took --max_output_len before TensorRT-LLM 0.12"),
    ],
    ids=["no-converter", "no-max-seq-len"],
)
def test_plan_and_validate_refuse_an_image_lacking_what_the_build_needs(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, unique: str, docker_client: Any,
    variant: dict[str, str], expected: str,
) -> None:
    """`nimflow plan` and `nimflow validate` exit 2 naming the image and what it lacks; no build (nor
    GPU probe) container starts, nothing is downloaded.

    Run on old main (this test copied in, the variant images built by this branch's stand-in):
    `nimflow plan` exited 0 with "compile build with trtllm-build" and `validate` printed "ok", so
    the returncode assertions failed; the run would have failed only in the build container.
    """
    image = standin_variant(docker_client, **variant)
    env = {**testbed_env, "PREFECT_API_URL": prefect_api, "COLUMNS": "200"}
    name, repo = f"lacking-{unique}", f"org/lacking-{unique}"
    publish_tiny(hub, repo, tmp_path)
    config = write_spec(tmp_path / "spec.yaml", make_spec(tmp_path, name, repo, image, build="trtllm-build"))
    since = time.time() - 1

    planned = nimflow("plan", str(config), env=env)
    validated = nimflow("validate", str(config), env=env)

    for result in (planned, validated):
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"build.image: {image}: " in result.stderr or f"in {image} does not accept" in result.stderr
        assert expected.format(image=image) in result.stderr
    if "examples_layout" in variant:  # plan knew the family from the hub's config.json
        assert "for the llama family (looked for /app/tensorrt_llm/examples/models/core/llama/" in planned.stderr
    assert created_containers(docker_client, since, "build", image) == []
    # One image probe (plan's; validate read its cache); the GPU probe, a second container, never ran.
    assert len(created_containers(docker_client, since, "probe", image)) == 1
    assert not (tmp_path / "nim-cache" / "models").exists()


def test_guide_manifest_goes_where_the_image_keeps_its_own(
    tmp_path: Path, prefect_api: str, docker_client: Any, unique: str,
) -> None:
    """Guide §1 on an image whose manifest lives at the later NIM docs' path
    (/opt/nim/etc/default/model_manifest.yaml): the derived image replaces that file, sets no
    NIM_MANIFEST_PATH, and NIM (the stand-in, which reads only its own path) serves the manifest's model.

    Run on old main (this test copied in, the variant image built by this branch's stand-in): the
    manifest went to /etc/nim/config/model_manifest.yaml with NIM_MANIFEST_PATH pointing there; the
    image's own manifest was untouched, so ``file_in_image`` returned the bundled manifest and the
    equality assertion failed (and the container exited: "has no profile in the model manifest").
    """
    later = "/opt/nim/etc/default/model_manifest.yaml"
    image = standin_variant(docker_client, manifest_path=later)
    assert probe_image(docker_client, image).model_manifest == later
    manifest = tmp_path / "model_manifest.yaml"
    manifest.write_text(manifest_text(unique))
    name = f"later-manifest-{unique}"

    prepared = prepare_serving_image(SourceSpec(manifest=manifest, model_name=MODEL), deploy_spec(image, tmp_path), None, name)
    try:
        assert file_in_image(docker_client, prepared.image, later) == manifest.read_bytes()
        env = docker_client.images.get(prepared.image).attrs["Config"]["Env"]
        assert not any(entry.startswith("NIM_MANIFEST_PATH=") for entry in env)
        container = docker_client.containers.run(
            prepared.image, name=name, detach=True, environment={"NIMSTANDIN_READY_DELAY": "0.2"},
            ports={"8000/tcp": ("127.0.0.1", None)})
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
        dep = Deployment(name=name, container_id=container.id, container_name=name, endpoint=f"http://127.0.0.1:{port}",
                         stable_endpoint=f"http://127.0.0.1:{port}", served_model_name="team/mistral", model_root=MODEL,
                         nim_api=prepared.nim_api)
        health = verify_deployment(docker_client, dep, VerifySpec(deadline_seconds=60), poll_seconds=0.2)
        assert health.models == ["team/mistral"]
    finally:
        for leftover in docker_client.containers.list(all=True, filters={"name": f"^/{name}$"}):
            leftover.remove(force=True)
        docker_client.images.remove(prepared.image, force=True)

"""The fleet-wide engine cache on the real test bed: built once, never mixed, refused where invalid.

Real Docker engine, moto's S3 server, the local hub and a Prefect API; the NIM stand-in writes
different engine bytes on every build (as real builds do) and reports a configurable fake GPU
(``NIMSTANDIN_GPU``), so a "host" here is a cache directory plus the GPU its containers see.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from nimflow.flows.host_model import host_model
from nimflow.tasks.upload import publish_engine

from nimflow.build_lease import BuildLeases, Lease, LeaseHolder
from nimflow.containers import docker_client as make_docker_client
from nimflow.engine_cache import obtain_engine, plan_engine
from nimflow.engine_check import VERIFIED_DIR
from nimflow.engine_store import EngineStore, read_local_manifest, write_manifest
from nimflow.errors import ConfigError, EngineIncompatible
from nimflow.records import Engine, ServingImage
from nimflow.rollout import start_candidate
from nimflow.spec import CacheSpec, parse_spec
from nimflow.testbed.services import free_port
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import ENGINE_BUCKET, write_spec
from tests.integration.test_host_model import make_gemma_pp2_spec, make_spec, publish_tiny, task_runs

pytestmark = pytest.mark.testbed

GPU_A = "NVIDIA A100-SXM4-80GB,8.0,0x20B210DE"
GPU_B = "NVIDIA H100 80GB HBM3,9.0,0x233010DE"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_keys(prefix: str) -> list[str]:
    client = boto3.client("s3", region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=prefix).get("Contents", [])]


def upload_prefixes(prefix: str, key: str) -> set[str]:
    """The upload ids that have objects under an engine key."""
    base = f"{prefix}/{key}/uploads/"
    return {k[len(base):].split("/", 1)[0] for k in store_keys(base)}


def leftovers(docker_client: Any, cache_dir: Path, key_label: str | None = None) -> dict[str, Any]:
    """Build containers and scratch directories a build might leave behind."""
    containers = docker_client.containers.list(all=True, filters={"label": "nimflow.role=build"})
    if key_label:
        containers = [c for c in containers if c.labels.get("nimflow.engine-key") == key_label]
    engines = cache_dir / "engines"
    # Hidden entries are scratch, except the verification records, which are kept on purpose.
    hidden = [p.name for p in engines.iterdir() if p.name.startswith(".") and p.name != VERIFIED_DIR] if engines.is_dir() else []
    scratch = sorted(hidden)
    return {"containers": [c.name for c in containers], "scratch": scratch}


# --- the store: one upload per build, one manifest, never a mix ----------------------------------


def _fake_engine(root: Path, key: str, content: bytes) -> tuple[Path, dict[str, Any]]:
    engine = root / content.decode()[:8]
    (engine / "trtllm_engine").mkdir(parents=True)
    (engine / "trtllm_engine" / "rank0.engine").write_bytes(content * 4096)
    (engine / "trtllm_engine" / "config.json").write_text('{"version": "x"}')
    (engine / "config.json").write_text('{"model_type": "llama"}')
    return engine, write_manifest(engine, key, {"weights": "w"}, {"tp_size": 1})


def test_lost_race_keeps_the_winner_whole(tmp_path: Path, testbed_env: dict, unique: str) -> None:
    """Two hosts upload different builds of one key: one manifest wins, its upload is intact, the loser's is gone."""
    key = hashlib.sha256(unique.encode()).hexdigest()
    prefix = f"race-{unique}"
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}")
    winner_dir, winner = _fake_engine(tmp_path, key, b"WINNER-A")
    loser_dir, loser = _fake_engine(tmp_path, key, b"LOSER-BB")
    assert winner["upload_id"] != loser["upload_id"]  # builds are not byte-reproducible

    store = EngineStore(cache)
    first = store.upload(winner_dir, winner)
    second = store.upload(loser_dir, loser)

    assert first.published and not second.published and second.files == 3  # it did upload, then lost
    assert upload_prefixes(prefix, key) == {winner["upload_id"]}
    published = store.manifest(key)
    assert published is not None and published["upload_id"] == winner["upload_id"]
    restored = tmp_path / "third-host"
    store.restore(published, restored, engine_key=key)
    for entry in published["files"]:
        assert sha256(restored / entry["path"]) == entry["sha256"] == sha256(winner_dir / entry["path"])


def test_interrupted_upload_resumes_file_by_file(tmp_path: Path, testbed_env: dict, unique: str) -> None:
    """A retried upload of the same local engine reuses its upload id and sends only what is missing."""
    key = hashlib.sha256(f"resume-{unique}".encode()).hexdigest()
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/resume-{unique}")
    engine_dir, manifest = _fake_engine(tmp_path, key, b"RESUMEDD")
    store = EngineStore(cache)
    # The first attempt sent one file and died before the manifest.
    store.client.upload_file(str(engine_dir / "config.json"), ENGINE_BUCKET,
                             f"resume-{unique}/{key}/uploads/{manifest['upload_id']}/config.json",
                             ExtraArgs={"Metadata": {"sha256": sha256(engine_dir / "config.json")}})
    outcome = store.upload(engine_dir, manifest)
    assert outcome.published and outcome.files == 2


# --- the build lease -----------------------------------------------------------------------------


def test_build_lease_is_exclusive_renewed_and_expires(testbed_env: dict, unique: str) -> None:
    """One holder at a time; renewal keeps it; a holder that stops renewing loses it after its TTL."""
    key = hashlib.sha256(f"lease-{unique}".encode()).hexdigest()
    # A 3 s TTL renewed every second leaves room for a loaded machine; the store's clock has 1 s steps.
    leases = BuildLeases(EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/lease-{unique}")), ttl_seconds=3)

    mine = leases.try_acquire(key)
    assert isinstance(mine, Lease)
    theirs = leases.try_acquire(key)
    assert isinstance(theirs, LeaseHolder) and "pid" in theirs.holder

    with leases.kept_alive(mine) as held:  # renewed every TTL/3: still ours after several TTLs
        time.sleep(7)
        assert isinstance(leases.try_acquire(key), LeaseHolder) and not held.lost
    assert leases.adopt(key, mine.token) is not None

    time.sleep(5)  # no renewal for longer than the TTL: the holder counts as crashed
    taker = leases.try_acquire(key)
    assert isinstance(taker, Lease) and taker.token != mine.token
    assert leases.renew(held.lease) is None  # the old holder learns it lost the lease
    assert leases.adopt(key, mine.token) is None
    leases.release(taker)
    assert leases.current(key) is None


# --- whole runs: one build per key across hosts ---------------------------------------------------


def _host_cli(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [str(Path(sys.executable).with_name("nimflow")), "host", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_hosts_at_once_build_once_and_both_serve(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list, docker_client: Any,
) -> None:
    """Two hosts (separate cache dirs and processes) host one spec at once: one build, one manifest, both serve;
    a third host restores exactly the manifest's bytes."""
    repo = f"org/twohost-{unique}"
    publish_tiny(hub, repo, tmp_path)
    configs = []
    for host in ("a", "b"):
        spec = make_spec(tmp_path, f"two-{host}-{unique}", repo, standin_image)
        spec["cache"] = {"uri": f"s3://{ENGINE_BUCKET}/two-{unique}", "build_lease_seconds": 8}
        spec["build"]["env"] = {"NIMSTANDIN_BUILD_SECONDS": "4"}  # long enough for the runs to overlap
        spec["deploy"]["cache_dir"] = str(tmp_path / f"host-{host}")
        configs.append(write_spec(tmp_path / f"{host}.yaml", spec))
        cleanup_containers.append(f"nimflow-two-{host}-{unique}")
    env = {**os.environ, **testbed_env, "PREFECT_API_URL": prefect_api}

    runs = [_host_cli(config, env) for config in configs]
    outputs = [run.communicate(timeout=300) for run in runs]

    for run, (_out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    engine_lines = [next(line for line in out.splitlines() if line.startswith("engine:")) for out, _ in outputs]
    keys = {line.split()[1].rstrip(":") for line in engine_lines}
    assert len(keys) == 1
    key = keys.pop()
    assert sorted("built by this run" in line for line in engine_lines) == [False, True], engine_lines
    assert any("found in engine-store" in line for line in engine_lines)
    assert store_keys(f"two-{unique}/{key}/manifest.json") and not store_keys(f"two-{unique}/{key}/lease.json")
    manifest = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/two-{unique}")).manifest(key)
    assert manifest is not None and upload_prefixes(f"two-{unique}", key) == {manifest["upload_id"]}

    for out, _ in outputs:  # both endpoints answer
        endpoint = next(line for line in out.splitlines() if line.startswith("endpoint:")).split()[1]
        assert httpx.get(f"{endpoint}/v1/models").status_code == 200
    third = tmp_path / "third-host"
    EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/two-{unique}")).restore(manifest, third, engine_key=key)
    for entry in manifest["files"]:
        assert sha256(third / entry["path"]) == entry["sha256"]
        for host in ("a", "b"):  # both hosts hold exactly the published bytes
            assert sha256(tmp_path / f"host-{host}" / "engines" / key / entry["path"]) == entry["sha256"]


def test_fleet_simulation_builds_each_key_once(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, docker_client: Any,
) -> None:
    """Three hosts, two models at two revisions each, runs interleaved and concurrent: one build per
    distinct key, restores (or local hits) everywhere else."""
    from nimflow.tasks.download import fetch_snapshot

    from nimflow.records import Checkpoint

    revisions = []
    for model in ("alpha", "beta"):
        repo = f"org/fleet-{model}-{unique}"
        for seed in (1, 2):
            revisions.append((repo, publish_tiny(hub, repo, tmp_path / f"{model}", seed=seed)))
    cache = {"uri": f"s3://{ENGINE_BUCKET}/fleet-{unique}", "build_lease_seconds": 8}
    runs = [(host, repo, sha) for host in ("h1", "h2", "h3") for repo, sha in revisions]
    random.Random(unique).shuffle(runs)

    def one_run(run: tuple[str, str, str]) -> tuple[str, str, str, str]:
        host, repo, sha = run
        spec = parse_spec(make_spec(tmp_path, f"fleet-{unique}", repo, standin_image) | {"cache": cache})
        assert spec.build is not None and spec.cache is not None
        cache_dir = tmp_path / host
        checkpoint: Checkpoint = fetch_snapshot(repo, sha, None, cache_dir)
        client = make_docker_client()
        plan = plan_engine(client, spec.build, Path(checkpoint.path), checkpoint.identity, None)
        engine = obtain_engine(client, plan, spec.build, spec.cache, Path(checkpoint.path), cache_dir, _quiet())
        if engine.origin == "built":
            publish_engine(engine, spec.cache)
        return host, f"{repo}@{sha[:7]}", plan.key, engine.origin

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one_run, runs))

    table = "\n".join(f"{host}  {model:<40} {key[:12]}  {origin}" for host, model, key, origin in sorted(results))
    builds = sum(origin == "built" for *_, origin in results)
    print(f"\nfleet simulation: {builds} builds, {len(results) - builds} restores/hits\n{table}")
    keys = {key for _, _, key, _ in results}
    assert len(keys) == len(revisions) == 4
    for key in keys:
        origins = [origin for _, _, k, origin in results if k == key]
        assert origins.count("built") == 1, (key, origins)
        assert set(origins) <= {"built", "engine-store", "local-cache"}
        published = EngineStore(CacheSpec(**cache)).manifest(key)
        assert published is not None and upload_prefixes(f"fleet-{unique}", key) == {published["upload_id"]}
    assert builds == 4
    assert not leftovers(docker_client, tmp_path / "h1")["containers"]


def _quiet() -> Any:
    import logging

    return logging.getLogger("nimflow.test.fleet")


# --- engines are refused where they are invalid -----------------------------------------------------


def test_engine_for_gpu_a_refused_on_gpu_b_before_any_container(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, docker_client: Any,
) -> None:
    """Building on GPU A to serve on GPU B is refused before a build or serving container starts."""
    name, repo = f"gpuab-{unique}", f"org/gpuab-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    spec["build"]["env"] = {"NIMSTANDIN_GPU": GPU_A}
    spec["deploy"]["env"]["NIMSTANDIN_GPU"] = GPU_B

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    assert state.is_failed()
    with pytest.raises(EngineIncompatible) as caught:
        state.result()
    message = str(caught.value)
    assert "NVIDIA A100-SXM4-80GB (compute 8.0" in message and "NVIDIA H100 80GB HBM3 (compute 9.0" in message
    assert "deploy.force" in message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["compile-engine"].run_count == 1 and "deploy-nim" not in runs
    assert not (Path(spec["deploy"]["cache_dir"]) / "engines").exists() or not [
        p for p in (Path(spec["deploy"]["cache_dir"]) / "engines").iterdir()]
    assert not store_keys(f"{name}/")
    assert not docker_client.containers.list(all=True, filters={"name": f"nimflow-{name}"})


def test_deploy_guard_and_forced_engine_fails_like_real_nim(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list, docker_client: Any,
) -> None:
    """An engine built on GPU A is refused by the deploy guard on GPU B (the running container is
    untouched); forced through, the NIM refuses to load it with TensorRT's own error, late."""
    name, repo = f"guard-{unique}", f"org/guard-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    spec["build"]["env"] = {"NIMSTANDIN_GPU": GPU_A}
    spec["deploy"]["env"]["NIMSTANDIN_GPU"] = GPU_A
    cleanup_containers.append(f"nimflow-{name}")
    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))
    engine = Engine(engine_key=record["engine_key"], path=record["model_path"], origin="local-cache", files=1, bytes=1)

    serving = ServingImage(image=standin_image, nim_api="1.x", detected_by="test")

    def start(deploy: Any, container_name: str) -> Any:
        return start_candidate(deploy, parse_spec(spec).rollout, "blue-green", name, container_name, serving,
                               record["model_path"], None, [], "chat", {}, engine, custom_weights=True)

    on_b = parse_spec({**spec, "deploy": {**spec["deploy"], "env": {**spec["deploy"]["env"], "NIMSTANDIN_GPU": GPU_B}}})
    with pytest.raises(EngineIncompatible, match="built on NVIDIA A100-SXM4-80GB"):
        start(on_b.deploy, f"nimflow-{name}")
    assert docker_client.containers.get(f"nimflow-{name}-blue").id == record["container_id"]  # still serving
    assert not docker_client.containers.list(all=True, filters={"name": f"^/nimflow-{name}-green$"})

    forced = parse_spec({**spec, "deploy": {**on_b.deploy.model_dump(mode="json"), "force": True,
                                            "container_name": f"nimflow-{name}-forced", "host_port": free_port(),
                                            "cache_dir": spec["deploy"]["cache_dir"]}})
    cleanup_containers.append(f"nimflow-{name}-forced")
    deployment = start(forced.deploy, f"nimflow-{name}-forced")
    assert deployment.forced_despite and "GPU" in deployment.forced_despite[0]
    container = docker_client.containers.get(deployment.container_id)
    for _ in range(100):
        container.reload()
        if container.status == "exited":
            break
        time.sleep(0.2)
    assert container.status == "exited"
    assert "engine plan file is generated on an incompatible device, expecting compute 8.0 got compute 9.0" in \
        container.logs().decode()


def test_build_config_that_does_not_fit_the_model_is_refused_before_any_container(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, docker_client: Any,
) -> None:
    """tp_size 3 on a model with 4 attention heads fails at once, naming the field, the values and the fix."""
    name, repo = f"tp3-{unique}", f"org/tp3-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    spec["build"]["tp_size"] = 3
    before = {c.id for c in docker_client.containers.list(all=True)}

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    with pytest.raises(ConfigError) as caught:
        state.result()
    assert "build.tp_size: num_attention_heads of" in str(caught.value) and "not divisible by tp_size 3" in str(caught.value)
    assert task_runs(state.state_details.flow_run_id)["compile-engine"].run_count == 1
    assert {c.id for c in docker_client.containers.list(all=True)} == before


def test_gemma_pipeline_parallelism_is_refused_before_any_container(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, docker_client: Any,
) -> None:
    """A Gemma2 checkpoint built with trtllm-build at pp_size 2 fails at once, naming the family, its
    script, the limit and the fix: Gemma's converter has no pipeline parallelism.

    Run on old main (commit 6c010bf, this test copied in): no check refused it; the run started the
    convert container on the build GPUs with llama-style flags and failed there with BuildFailed
    ("can't open file .../models/core/gemma/convert_checkpoint.py": the stand-in has no Gemma
    script; real TensorRT-LLM refuses those flags), so ``pytest.raises(ConfigError)`` failed.
    """
    name, repo = f"gemma-pp-{unique}", f"org/gemma-pp-{unique}"
    spec = make_gemma_pp2_spec(tmp_path, hub, name, repo, standin_image)
    before = {c.id for c in docker_client.containers.list(all=True)}

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    with pytest.raises(ConfigError) as caught:
        state.result()
    message = str(caught.value)
    assert "build.pp_size: pp_size 2 cannot be converted for the gemma family" in message
    assert "/gemma/convert_checkpoint.py takes --world-size" in message and "e.g. tp_size 2, pp_size 1" in message
    assert task_runs(state.state_details.flow_run_id)["compile-engine"].run_count == 1
    assert {c.id for c in docker_client.containers.list(all=True)} == before


# --- backends and build failures ---------------------------------------------------------------------


def test_trtllm_build_backend_end_to_end(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any,
) -> None:
    """convert_checkpoint.py + trtllm-build in the image, laid out for NIM, checked, cached and served."""
    name, repo = f"trt-{unique}", f"org/trt-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image, build="trtllm-build")
    spec["build"].update(max_seq_len=512, max_batch_size=2, max_num_tokens=256)
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    engine_dir = Path(record["model_path"])
    assert record["engine_origin"] == "built" and "received" in record["completion"]
    config = json.loads((engine_dir / "trtllm_engine" / "config.json").read_text())
    assert config["build_config"]["max_num_tokens"] == 256 and config["build_config"]["max_seq_len"] == 512
    assert (engine_dir / "tokenizer.json").is_file() and (engine_dir / "config.json").is_file()
    assert not list(engine_dir.rglob("*.cache")) and not list(engine_dir.rglob("*.safetensors"))
    manifest = read_local_manifest(engine_dir)
    assert manifest is not None and manifest["engine"]["max_batch_size"] == 2
    assert manifest["key_inputs"]["build"]["backend"] == "trtllm-build"
    assert leftovers(docker_client, Path(spec["deploy"]["cache_dir"])) == {"containers": [], "scratch": []}


@pytest.mark.parametrize(
    ("backend", "failure", "attempts"),
    [
        ("nim-optimize", "gpu-oom", 1),
        ("trtllm-build", "unsupported-arch", 1),
        ("nim-jit", "host-oom", 1),
        # Deterministic with a bad build config (TensorRT-LLM #1839): tried once. Old main retried it (4 runs).
        ("nim-optimize", "cuda-init", 1),
        ("nim-jit", "nccl", 4),
    ],
)
def test_failed_builds_classified_and_cleaned_up(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, docker_client: Any,
    backend: str, failure: str, attempts: int,
) -> None:
    """A permanent build failure is tried once, a transient one retried; after either, no container,
    scratch directory or build lease is left behind."""
    name, repo = f"fail-{failure}-{unique}", f"org/fail-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image, build=backend)
    spec["build"]["env"] = {"NIMSTANDIN_BUILD_FAILURE": failure}
    if backend == "nim-jit":
        spec["finetune"] = {"path": str(publish_dir(tmp_path))}

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception) as caught:
        state.result()
    assert "Engine building failed" in str(caught.value) or "Killed" in str(caught.value)
    assert task_runs(state.state_details.flow_run_id)["compile-engine"].run_count == attempts
    assert leftovers(docker_client, Path(spec["deploy"]["cache_dir"])) == {"containers": [], "scratch": []}
    assert not [k for k in store_keys(f"{name}/") if k.endswith("lease.json")]


def publish_dir(tmp_path: Path) -> Path:
    """Fine-tuned weights for a JIT build (same architecture as the tiny base)."""

    return write_tiny_llama(tmp_path / "finetuned", seed=11)


def test_container_that_cannot_start_leaves_no_husk(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, docker_client: Any,
) -> None:
    """GPUs requested on a host without the NVIDIA runtime: Docker creates the container, then cannot
    start it. The failure is permanent, names the cause, and the created container is removed."""
    name, repo = f"nogpu-{unique}", f"org/nogpu-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    spec["build"]["gpus"] = [0]
    before = {c.id for c in docker_client.containers.list(all=True)}

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception, match="could not select device driver"):
        state.result()
    assert task_runs(state.state_details.flow_run_id)["compile-engine"].run_count == 1
    assert {c.id for c in docker_client.containers.list(all=True)} == before


# --- the key covers what goes into the engine directory ----------------------------------------------


def test_an_allow_patterns_change_is_a_new_engine(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list,
) -> None:
    """Two specs of one repo revision, one downloading every file and one leaving out
    generation_config.json, get different engine keys and engines that hold what each downloaded.

    On the old main (key without allow_patterns, one snapshot directory per revision) the second run
    was a local-cache hit on the first run's engine key, so it served a generation_config.json its
    spec had excluded: the key assertion below failed (checked by running this test there).
    """
    name, repo = f"files-{unique}", f"org/files-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    cleanup_containers.append(f"nimflow-{name}")
    everything = host_model(spec=str(write_spec(tmp_path / "all.yaml", spec)))
    spec["source"]["allow_patterns"] = ["config.json", "tokenizer*", "special_tokens_map.json", "*.safetensors"]
    spec["deploy"]["host_port"] = free_port()
    some = host_model(spec=str(write_spec(tmp_path / "some.yaml", spec)))

    assert some["engine_key"] != everything["engine_key"]
    assert (Path(everything["model_path"]) / "generation_config.json").is_file()
    assert not (Path(some["model_path"]) / "generation_config.json").exists()
    assert (Path(some["model_path"]) / "tokenizer.json").is_file()
    manifest = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{name}")).manifest(some["engine_key"])
    assert manifest is not None and manifest["key_inputs"]["files"] == sorted(spec["source"]["allow_patterns"])

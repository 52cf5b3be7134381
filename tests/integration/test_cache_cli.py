"""`nimflow plan` and `nimflow cache ls | explain | gc` against the real test bed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from nimflow.flows.host_model import host_model

from nimflow.engine_store import EngineStore
from nimflow.engine_use import EngineUse
from nimflow.spec import CacheSpec
from tests.conftest import ENGINE_BUCKET, write_spec
from tests.integration.test_host_model import make_gemma_pp2_spec, make_spec, publish_tiny

pytestmark = pytest.mark.testbed


def nimflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("nimflow")), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=180)


def stage_line(output: str, stage: str) -> str:
    return next(line.strip() for line in output.splitlines() if line.strip().startswith(stage + " "))


def test_plan_then_cache_ls_explain_and_gc(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list, docker_client: Any,
) -> None:
    env = {**testbed_env, "PREFECT_API_URL": prefect_api, "COLUMNS": "200"}
    name, repo = f"cli-{unique}", f"org/cli-{unique}"
    sha = publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    config = write_spec(tmp_path / "a.yaml", spec)
    cleanup_containers.extend([f"nimflow-{name}", f"nimflow-{name}-long"])

    # Before any run: everything is to do, and the key is already known.
    before = nimflow("plan", str(config), env=env)
    assert before.returncode == 0, before.stderr
    assert stage_line(before.stdout, "download").split()[1] == "run" and sha in before.stdout
    assert stage_line(before.stdout, "compile").split()[1] == "build"
    key = before.stdout.strip().splitlines()[-1].split()[-1]

    first = host_model(spec=str(config))
    assert first["engine_key"] == key  # plan computed the key the run used

    after = nimflow("plan", str(config), env=env)
    assert [stage_line(after.stdout, s).split()[1] for s in ("download", "compile", "upload", "deploy")] == \
        ["hit", "hit", "hit", "hit"], after.stdout
    other_host = write_spec(tmp_path / "b.yaml", {**spec, "deploy": {**spec["deploy"], "cache_dir": str(tmp_path / "host-b")}})
    restore = nimflow("plan", str(other_host), env=env)
    assert stage_line(restore.stdout, "compile").split()[1] == "restore", restore.stdout

    # A second engine of the same model (another max_seq_len), served by its own container.
    longer = {**spec, "name": f"{name}-long", "build": {**spec["build"], "max_seq_len": 2048},
              "deploy": {**spec["deploy"], "host_port": spec["deploy"]["host_port"] + 1}}
    second = host_model(spec=str(write_spec(tmp_path / "long.yaml", longer)))
    key2 = second["engine_key"]

    listing = nimflow("cache", "ls", "--config", str(config), env=env)
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if line.startswith((key[:12], key2[:12]))]
    assert len(rows) == 2 and all(repo in row and sha[:12] in row and "float16" in row and "1/1" in row for row in rows)

    explained = nimflow("cache", "explain", key[:12], "--config", str(config), env=env)
    assert f"engine {key}" in explained.stdout and "build.max_seq_len: 1024" in explained.stdout
    assert "gpu.compute_capability:" in explained.stdout and "trtllm_version:" in explained.stdout
    diff = nimflow("cache", "explain", key[:12], key2[:12], "--config", str(config), env=env)
    assert "1 input(s) differ" in diff.stdout and "build.max_seq_len" in diff.stdout, diff.stdout
    unknown = nimflow("cache", "explain", "ffffffffffff", "--config", str(config), env=env)
    assert unknown.returncode == 1 and "no engine" in unknown.stderr and "Traceback" not in unknown.stderr

    # An upload a crash left behind (no manifest names it).
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.put_object(Bucket=ENGINE_BUCKET, Key=f"{name}/{key}/uploads/crashed0000/trtllm_engine/rank0.engine", Body=b"x" * 10)

    # Both engines are served here: gc removes neither while their containers run.
    kept = nimflow("cache", "gc", "--older-than", "0s", "--abandoned-after", "0s", "--config", str(config), env=env)
    assert f"kept engine {key[:12]}: in use by running container nimflow-{name}-blue" in kept.stdout, kept.stdout
    assert f"removed abandoned upload {key[:12]}/crashed0000" in kept.stdout
    assert not [k for k in _keys(s3, f"{name}/{key}/uploads/") if "/crashed0000/" in k]

    # Its deployment wrote an in-use marker (fleet-wide protection): the container going away is not
    # enough, the marker must go too (or lapse). Here the host says it stopped serving.
    cache_dir = Path(spec["deploy"]["cache_dir"])
    assert _keys(s3, f"{name}/{key}/in-use/"), "deploy_nim wrote no in-use marker"
    docker_client.containers.get(f"nimflow-{name}-blue").remove(force=True)
    still = nimflow("cache", "gc", "--older-than", "0s", "--dry-run", "--config", str(config), env=env)
    assert f"kept engine {key[:12]}: in use by {name} on " in still.stdout, still.stdout
    EngineUse(EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{name}"))).unmark(key, cache_dir, name)

    dry = nimflow("cache", "gc", "--older-than", "0s", "--dry-run", "--config", str(config), env=env)
    assert f"would remove engine {key[:12]}" in dry.stdout and "dry run: nothing was deleted" in dry.stdout
    assert _keys(s3, f"{name}/{key}/manifest.json")
    gone = nimflow("cache", "gc", "--older-than", "0s", "--config", str(config), env=env)
    assert f"removed engine {key[:12]}" in gone.stdout and f"kept engine {key2[:12]}: in use by" in gone.stdout, gone.stdout
    assert not _keys(s3, f"{name}/{key}/") and _keys(s3, f"{name}/{key2}/manifest.json")

    bad = nimflow("cache", "gc", "--older-than", "soon", "--config", str(config), env=env)
    assert bad.returncode == 2 and "--older-than: 'soon' is not a duration" in bad.stderr


def _keys(s3: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=prefix).get("Contents", [])]


def test_plan_refuses_a_tp_pp_the_familys_converter_cannot_take(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
) -> None:
    """`nimflow plan` on a Gemma2 repo not yet downloaded, trtllm-build at pp_size 2: exit 2 naming the
    family, its script, the limit and the fix, from the hub's config.json; nothing downloaded.

    Run on old main (commit 6c010bf, this test copied in, PYTHONPATH pointing the CLI at it): exit 0
    with "compile build ... with trtllm-build" (the checks that need config.json were left to the
    run), so the returncode assertion failed.
    """
    env = {**testbed_env, "PREFECT_API_URL": prefect_api, "COLUMNS": "200"}
    name, repo = f"plan-gemma-{unique}", f"org/plan-gemma-{unique}"
    spec = make_gemma_pp2_spec(tmp_path, hub, name, repo, standin_image)

    result = nimflow("plan", str(write_spec(tmp_path / "gemma.yaml", spec)), env=env)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "build.pp_size: pp_size 2 cannot be converted for the gemma family" in result.stderr
    assert "/gemma/convert_checkpoint.py takes --world-size" in result.stderr
    assert not (tmp_path / "nim-cache" / "models").exists()

"""Progress people can watch, on the real test bed: an engine upload and restore inside a Prefect flow
report their bytes as they move, and the Prefect API holds each stage's progress artifact at 100%.

moto's S3 server and a real Prefect API; the engine is small but sent both ways nimflow moves files
(one request per small file, parallel parts for the large one), so both byte callbacks are exercised.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from nimflow.tasks.upload import publish_engine
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.context import get_run_context

from nimflow.engine_cache import _restore, engine_record
from nimflow.engine_store import EngineStore, write_manifest
from nimflow.records import TransferStats
from nimflow.spec import CacheSpec
from tests.conftest import ENGINE_BUCKET

pytestmark = pytest.mark.testbed

MIB = 1 << 20


def _engine(root: Path, key: str) -> tuple[Path, dict[str, Any]]:
    """A 12 MiB rank (sent in 5 MiB parts) and two small files (one request each)."""
    engine = root / "engine"
    (engine / "trtllm_engine").mkdir(parents=True)
    with (engine / "trtllm_engine" / "rank0.engine").open("wb") as handle:
        for i in range(12):
            handle.write(bytes([i]) * MIB)
    (engine / "trtllm_engine" / "config.json").write_text('{"version": "x"}')
    (engine / "config.json").write_text('{"model_type": "llama"}')
    return engine, write_manifest(engine, key, {"weights": "w"}, {"tp_size": 1})


class Summed:
    """An ``on_bytes`` callback that adds up what it is told, from any thread."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self._lock:
            self.total += count
            self.calls += 1


def test_upload_and_restore_report_progress_to_the_prefect_api(tmp_path: Path, testbed_env: dict, unique: str) -> None:
    key = hashlib.sha256(f"progress-{unique}".encode()).hexdigest()
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/progress-{unique}", single_request_max_mib=5, multipart_chunk_mib=5)
    engine_dir, manifest = _engine(tmp_path, key)
    size = sum(f["size"] for f in manifest["files"])

    @flow(name=f"progress-{unique}")
    def move() -> dict[str, Any]:
        published = publish_engine(engine_record(key, engine_dir, "built", manifest), cache)
        restored = _restore(EngineStore(cache), manifest, tmp_path / "cache", tmp_path / "restored")
        # The store's own hooks, summed: every byte of every file is reported, once.
        summed, files_done = Summed(), []
        EngineStore(cache).restore(manifest, tmp_path / "again", engine_key=key, on_bytes=summed, on_file_done=files_done.append)
        return {"flow_run_id": get_run_context().flow_run.id, "upload": published.transfer, "restore": restored,
                "summed": summed, "files_done": files_done}

    result = move()

    assert result["summed"].total == size and result["summed"].calls > len(manifest["files"])  # streamed, not per file
    assert sorted(result["files_done"]) == sorted(f["path"] for f in manifest["files"])
    upload, restore = result["upload"], result["restore"]
    assert isinstance(upload, TransferStats) and isinstance(restore, TransferStats)
    assert (upload.stage, upload.bytes, upload.files) == ("upload", size, len(manifest["files"]))
    assert (restore.stage, restore.bytes, restore.files) == ("restore", size, len(manifest["files"]))
    assert upload.mib_per_s > 0 and restore.mib_per_s > 0

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[result["flow_run_id"]]))
        )
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert set(progress) == {"nimflow-upload", "nimflow-restore"}
    assert {k: a.data for k, a in progress.items()} == {"nimflow-upload": 100.0, "nimflow-restore": 100.0}
    # The description is the last progress line: bytes of total, files done, throughput.
    assert f"3/{len(manifest['files'])} files" in (progress["nimflow-upload"].description or "")
    assert "12.0/12.0 MiB (100%)" in (progress["nimflow-restore"].description or "")


def test_a_build_reports_its_phases_from_the_container_log(tmp_path: Path, docker_client: Any, standin_image: str) -> None:
    """convert_checkpoint.py then trtllm-build (tp 2) in the stand-in, followed line by line as they run.

    The stand-in prints TensorRT-LLM's own builder lines per rank; what the tracker made of each
    line is recorded, so the test sees the phases arrive while the containers run, not just the end.
    """
    from nimflow.build_progress import BuildProgress
    from nimflow.engine_build import build_with_trtllm
    from nimflow.spec import BuildSpec
    from nimflow.testbed.tiny_model import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny")
    build = BuildSpec(backend="trtllm-build", image=standin_image, tp_size=2, max_seq_len=512, max_batch_size=2,
                      max_num_tokens=256, env={"NIMSTANDIN_BUILD_SECONDS": "1"})
    (out := tmp_path / "out").mkdir()
    (work := tmp_path / "work").mkdir()
    seen: list[tuple[str, str, float]] = []

    class Recording(BuildProgress):
        def feed(self, line: str) -> None:
            super().feed(line)
            seen.append((line, self.phase(), self.percent()))

    progress = Recording("engine test", "trtllm-build", ranks=2)
    build_with_trtllm(docker_client, build, model, out, work, {"nimflow.test": "progress"},
                      json.loads((model / "config.json").read_text()), progress)

    assert sorted((out / "trtllm_engine").glob("rank*.engine")) == [out / "trtllm_engine" / f"rank{r}.engine" for r in (0, 1)]
    percents = [percent for _, _, percent in seen]
    assert percents == sorted(percents), "progress went backwards"
    # convert_checkpoint.py ends at its fifth; trtllm-build's ranks each add half of the rest.
    converted = next(p for line, _, p in seen if "Total time of converting checkpoints" in line)
    assert converted == pytest.approx(20.0)
    written = [p for line, _, p in seen if "Engine serialized" in line]
    assert written == [pytest.approx(60.0), pytest.approx(99.0)]
    assert [phase for _, phase, _ in seen].count("optimizing the engine (TensorRT)") == 2  # once per rank
    assert progress.percent() == 99.0 and progress.phase() == "done"  # 100 only once the engine is checked

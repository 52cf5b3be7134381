"""The probe cache's disk side (hostile files, bound on entries) and the GPU probe's host identity."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from nimflow.gpu_identity import _CACHE as GPU_CACHE
from nimflow.gpu_identity import GpuProbeAnswer, host_gpu_identity
from nimflow.probe_cache import ProbeCache
from nimflow.settings import Settings

KEY = "ab" * 32


def answer(key: str = KEY) -> GpuProbeAnswer:
    return GpuProbeAnswer(key=key, image_id="sha256:" + "cd" * 32, gpus="NVIDIA L40S, 8.9, 0x26b910de\n",
                          trtllm_version="0.16.0")


def fresh_cache(max_entries: int = 3) -> ProbeCache[GpuProbeAnswer]:
    return ProbeCache(GpuProbeAnswer, what="test probe", recorded_key=lambda a: a.key, max_bytes=4096,
                      max_entries=max_entries)


def test_put_then_get_from_memory_and_from_disk(tmp_path: Path) -> None:
    cache = fresh_cache()
    cache.put(tmp_path, KEY, answer())
    assert [p.name for p in tmp_path.iterdir()] == [f"{KEY}.json"]  # no temporary file left
    assert cache.get(tmp_path, KEY) == answer()
    cache.forget_in_process()
    assert cache.get(tmp_path, KEY) == answer()  # from disk
    assert cache.get(tmp_path, "cd" * 32) is None


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe" * 10,
        json.dumps({"key": KEY}).encode(),  # missing fields
        json.dumps({**json.loads(answer().model_dump_json()), "extra": 1}).encode(),
        json.dumps({**json.loads(answer().model_dump_json()), "key": "ef" * 32}).encode(),  # another key's answer
        b" " * 4097,  # too large: not even parsed
    ],
    ids=["not-json", "not-utf8", "missing", "extra-field", "other-key", "too-large"],
)
def test_hostile_cache_files_are_ignored(tmp_path: Path, content: bytes) -> None:
    """A file that is not a trustworthy answer for its key is a miss (the probe runs again), never an error."""
    cache = fresh_cache()
    cache.path(tmp_path, KEY).write_bytes(content)
    assert cache.get(tmp_path, KEY) is None


def test_a_key_that_is_not_hex_is_refused(tmp_path: Path) -> None:
    for bad in ("../../etc/passwd", "sha256:", "sha256:ABC/../x"):
        with pytest.raises(ValueError, match="not an image id"):
            fresh_cache().path(tmp_path, bad)


def test_entries_are_bounded_oldest_first(tmp_path: Path) -> None:
    """Keys include the boot id, so answers pile up on a host over time: at most max_entries are kept."""
    cache = fresh_cache(max_entries=3)
    keys = [f"{n:02x}" * 32 for n in range(5)]
    for age, key in enumerate(keys):
        cache.put(tmp_path, key, answer(key))
        os.utime(cache.path(tmp_path, key), (1000 + age, 1000 + age))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(f"{k}.json" for k in keys[-3:])
    assert len(cache._in_process) == 3


def test_an_unwritable_cache_directory_is_only_logged(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    cache = fresh_cache()
    cache.put(blocked / "sub", KEY, answer())  # no exception
    assert cache.get(blocked / "sub", KEY) == answer()  # this process still has it


def test_gpu_cache_files_validate_as_gpu_answers(tmp_path: Path) -> None:
    GPU_CACHE.write(GPU_CACHE.path(tmp_path, KEY), answer())
    assert GPU_CACHE.read(GPU_CACHE.path(tmp_path, KEY), KEY) == answer()


def test_host_gpu_identity_reads_the_driver_dir_and_changes_with_it(tmp_path: Path) -> None:
    """The driver's version and each GPU's information file (model, UUID, bus) make the identity."""
    driver = tmp_path / "nvidia"
    (driver / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (driver / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\n")
    (driver / "gpus" / "0000:01:00.0" / "information").write_text("Model: \t NVIDIA H100 80GB HBM3\nGPU UUID: GPU-1\n")
    first = host_gpu_identity(driver)
    assert "550.54.15" in first and "NVIDIA H100 80GB HBM3" in first and "0000:01:00.0" in first
    assert host_gpu_identity(driver) == first
    (driver / "gpus" / "0000:02:00.0").mkdir()
    (driver / "gpus" / "0000:02:00.0" / "information").write_text("Model: \t NVIDIA H100 80GB HBM3\nGPU UUID: GPU-2\n")
    second = host_gpu_identity(driver)
    assert second != first  # a GPU added
    (driver / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  560.35.03\n")
    assert host_gpu_identity(driver) not in (first, second)  # the driver updated


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has nvidia-smi")
def test_host_gpu_identity_without_a_driver(tmp_path: Path) -> None:
    assert host_gpu_identity(tmp_path / "absent") == "none"


def test_gpu_driver_dir_setting(tmp_path: Path) -> None:
    assert Settings.from_env({"NIMFLOW_GPU_DRIVER_DIR": str(tmp_path)}).gpu_driver_dir == tmp_path
    assert Settings.from_env({}).gpu_driver_dir == Path("/proc/driver/nvidia")

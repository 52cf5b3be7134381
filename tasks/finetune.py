"""Stage 2 (optional): import fine-tuned weights and check them before any GPU time is spent."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prefect import get_run_logger, task

from nimflow.checkpoint import (
    MODEL_SIDE_FILES,
    check_matches_base,
    check_weights,
    directory_digest,
    read_config,
)
from nimflow.errors import InvalidWeights, translated_errors
from nimflow.records import Checkpoint, FinetunedWeights
from nimflow.retries import transient_retries
from nimflow.s3 import download_prefix, s3_client, transfer_config
from nimflow.spec import FinetuneSpec


def finetune_root(cache_dir: Path) -> Path:
    """Where staged fine-tuned weights live inside the NIM cache mount."""
    return cache_dir / "finetune"


def _fetch_from_s3(spec: FinetuneSpec, dest: Path) -> None:
    client = s3_client(endpoint_url=spec.endpoint_url)
    with translated_errors(f"downloading fine-tuned weights from {spec.path}"):
        paths = download_prefix(client, spec.path, dest, transfer_config())
    if not paths:
        raise InvalidWeights(f"{spec.path}: no objects under this prefix; expected safetensors weights and config.json")


def _copy_tree(src: Path, dest: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # streams in chunks


def stage_finetune(spec: FinetuneSpec, base: Checkpoint, cache_dir: Path) -> FinetunedWeights:
    """Fetch, check and stage fine-tuned weights next to the files NIM needs from the base model.

    The weights are checked where they are (or in a private temporary copy for s3:// sources)
    before anything is staged; the staged directory appears under its digest only when complete.

    Raises:
        InvalidWeights: an engine directory, an unknown format, corrupt safetensors, or an
            architecture that differs from the base model.
    """
    root = finetune_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        if spec.path.startswith("s3://"):
            source = work / "source"
            _fetch_from_s3(spec, source)
        else:
            source = Path(spec.path)
        weight_format = check_weights(source)
        base_dir = Path(base.path)
        if (source / "config.json").exists():
            check_matches_base(read_config(source), read_config(base_dir), where=spec.path)

        staged = work / "staged"
        if spec.path.startswith("s3://"):
            os.rename(source, staged)  # already a private copy
        else:
            _copy_tree(source, staged)
        for name in MODEL_SIDE_FILES:  # NIM_FT_MODEL needs a complete HF directory
            if not (staged / name).exists() and (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, staged / name)
        digest = directory_digest(staged)
        final = root / digest[:32]
        if final.exists():
            return FinetunedWeights(path=str(final), digest=digest, weight_format=weight_format, staged_files=0)
        files = sum(1 for p in staged.rglob("*") if p.is_file())
        os.rename(staged, final)
        return FinetunedWeights(path=str(final), digest=digest, weight_format=weight_format, staged_files=files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@task(name="import-finetune", **transient_retries())
def import_finetune(finetune: FinetuneSpec, base: Checkpoint, cache_dir: str) -> FinetunedWeights:
    """Stage 2: fine-tuned weights checked and staged where the build expects them (NIM_FT_MODEL)."""
    weights = stage_finetune(finetune, base, Path(cache_dir))
    get_run_logger().info(
        "Fine-tuned %s weights from %s staged at %s (%s files copied)",
        weights.weight_format, finetune.path, weights.path, weights.staged_files,
    )
    return weights

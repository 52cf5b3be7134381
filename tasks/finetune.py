"""Stage 2 (optional): import fine-tuned weights and LoRA adapters, checked before any GPU time."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task

from nimflow.checkpoint import resolve_verify_api
from nimflow.finetune import finetune_root, stage_finetune
from nimflow.lora import stage_adapters
from nimflow.records import Checkpoint, FinetunedWeights, StagedAdapters
from nimflow.retries import transient_retries
from nimflow.spec import FinetuneSpec, LoraSpec, VerifySpec

__all__ = ["finetune_root", "import_finetune", "import_lora", "verify_api"]


@task(name="import-finetune", **transient_retries())
def import_finetune(finetune: FinetuneSpec, base: Checkpoint, cache_dir: str) -> FinetunedWeights:
    """Stage 2: fine-tuned weights checked and staged where the build expects them (NIM_FT_MODEL)."""
    weights = stage_finetune(finetune, base, Path(cache_dir))
    logger = get_run_logger()
    if weights.staged_files:
        logger.info("Fine-tuned %s weights from %s checked and staged at %s (%s files)",
                    weights.weight_format, finetune.path, weights.path, weights.staged_files)
    else:
        logger.info("Fine-tuned weights from %s unchanged: already staged at %s", finetune.path, weights.path)
    return weights


@task(name="import-lora", **transient_retries())
def import_lora(lora: LoraSpec, base: Checkpoint, cache_dir: str) -> StagedAdapters:
    """Stage 2b: LoRA adapters checked against the base and staged as one NIM_PEFT_SOURCE directory."""
    logger = get_run_logger()
    adapters, warnings = stage_adapters(lora, base, Path(cache_dir))
    for warning in warnings:
        logger.warning("%s", warning)
    if adapters.staged_files:
        logger.info("LoRA adapters %s checked and staged at %s (%s files)", ", ".join(adapters.names), adapters.path, adapters.staged_files)
    else:
        logger.info("LoRA adapters %s unchanged: already staged at %s", ", ".join(adapters.names), adapters.path)
    return adapters


@task(name="verify-api")
def verify_api(verify: VerifySpec, model_path: str | None) -> Literal["chat", "completions"]:
    """Which inference API verification uses, settled before any container starts.

    ``model_path`` is None when NIM fetches the model itself (guide §1 manifest): nimflow cannot see
    its tokenizer, so ``auto`` means completions, which every model answers.

    Raises:
        InvalidWeights: ``verify.api: chat`` for a model whose tokenizer has no chat template.
    """
    logger = get_run_logger()
    if model_path is None:
        api: Literal["chat", "completions"] = "completions" if verify.api == "auto" else verify.api
        logger.info("Verifying with %s (the model is fetched by NIM; its tokenizer is not visible here)", api)
        return api
    api = resolve_verify_api(verify.api, Path(model_path))
    logger.info("Verifying with /v1/%s (verify.api: %s; chat template %s)",
                "chat/completions" if api == "chat" else "completions", verify.api,
                "present" if api == "chat" else "absent" if verify.api == "auto" else "not needed")
    return api

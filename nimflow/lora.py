"""LoRA adapters for NIM: checked against the base model, staged as one NIM_PEFT_SOURCE directory.

NIM loads every sub-directory of ``NIM_PEFT_SOURCE`` as an adapter named after it, with
``adapter_config.json`` and ``adapter_model.safetensors`` inside, and refuses (at start-up or on
first use, with a GPU held) adapters whose rank exceeds ``NIM_MAX_LORA_RANK`` or whose shapes do
not fit the base model. These checks say it first, from the adapter's config and safetensors
header and the base's headers; no tensor is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nimflow.checkpoint import directory_digest, model_files
from nimflow.errors import InvalidWeights
from nimflow.pickle_weights import convert_pickle_file
from nimflow.records import Checkpoint, StagedAdapters
from nimflow.spec import LoraSpec
from nimflow.tensor_inventory import FLOAT_DTYPES, TensorInfo, safetensors_header, tensor_inventory
from nimflow.weights_source import (
    WeightsLocation,
    fetch_source,
    file_sizes,
    parse_location,
    place_file,
    record_path,
    reusable,
    save_record,
    source_fingerprint,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# PEFT saves tensors as base_model.model.<module>.lora_A.weight (the adapter name is not saved).
_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def lora_root(cache_dir: Path) -> Path:
    """Where staged adapter sets live inside the NIM cache mount."""
    return cache_dir / "lora"


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter that passed the checks: its config, its safetensors weights, and warnings to log."""

    name: str
    rank: int
    config: Path
    weights: Path
    warnings: list[str] = field(default_factory=list)


def _read_adapter_config(directory: Path, location: WeightsLocation) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        found = ", ".join(p.relative_to(directory).as_posix() for p in model_files(directory)[:6]) or "nothing"
        full = " It looks like full weights: use finetune.path for those." if (directory / "config.json").is_file() else ""
        raise InvalidWeights(
            f"{location.display()}: not a LoRA adapter: no {ADAPTER_CONFIG} (found: {found}); expected "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} as PEFT saves them (model.save_pretrained(dir)).{full}"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidWeights(f"{location.display(ADAPTER_CONFIG)}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidWeights(f"{location.display(ADAPTER_CONFIG)}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InvalidWeights(
            f"{location.display(ADAPTER_CONFIG)}: peft_type is {peft_type!r}, expected 'LORA' (NIM serves LoRA adapters only)"
        )
    return config


def _check_rank(config: dict, where: str, max_rank: int) -> int:
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise InvalidWeights(f"{where}: r is {rank!r}, expected a positive integer (the LoRA rank)")
    patterns = config.get("rank_pattern") or {}
    highest = max([rank, *(v for v in patterns.values() if type(v) is int)]) if isinstance(patterns, dict) else rank
    if highest > max_rank:
        raise InvalidWeights(
            f"{where}: rank {highest} (r{' / rank_pattern' if highest != rank else ''}) is above lora.max_rank "
            f"{max_rank} (NIM_MAX_LORA_RANK), so NIM would refuse the adapter. Set lora.max_rank: {highest} "
            f"(every adapter slot then reserves that rank's memory), or train the adapter with r <= {max_rank}"
        )
    return rank


def _module_matches(module: str, key: str) -> bool:
    return module == key or module.endswith("." + key)


def _check_target_modules(config: dict, where: str, base_modules: list[str], base_name: str) -> None:
    targets = config.get("target_modules")
    if targets in (None, "all-linear"):
        return
    short = sorted({m.rsplit(".", 1)[-1] for m in base_modules})
    if isinstance(targets, str):  # PEFT: a string is a regex over full module names
        if not any(re.fullmatch(targets, m) for m in base_modules):
            raise InvalidWeights(
                f"{where}: target_modules {targets!r} matches no module of the base model {base_name} "
                f"(its modules: {', '.join(short)}); expected a pattern over the base's module names"
            )
        return
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise InvalidWeights(f"{where}: target_modules is {targets!r}, expected a list of module names")
    unknown = [t for t in targets if not any(_module_matches(m, t) for m in base_modules)]
    if unknown:
        raise InvalidWeights(
            f"{where}: target_modules names {', '.join(repr(u) for u in unknown)}, not a module of the base model "
            f"{base_name} (its modules: {', '.join(short)}); the adapter was trained for another architecture. "
            "Train it on this base, or change `source` to the model it was trained on"
        )


def _adapter_weights(directory: Path, location: WeightsLocation, converted: Path, allow_pickle: bool) -> Path:
    if (directory / ADAPTER_WEIGHTS).is_file():
        return directory / ADAPTER_WEIGHTS
    if (directory / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise InvalidWeights(
                f"{location.display(ADAPTER_PICKLE)}: a PyTorch pickle and no {ADAPTER_WEIGHTS}. Pickles run code when "
                "loaded; convert to safetensors, or set lora.allow_pickle: true to let nimflow convert them without "
                "executing them"
            )
        converted.mkdir(parents=True, exist_ok=True)
        convert_pickle_file(directory / ADAPTER_PICKLE, converted / ADAPTER_WEIGHTS)  # in its own bounded process
        return converted / ADAPTER_WEIGHTS
    raise InvalidWeights(
        f"{location.display()}: no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}; expected the adapter weights "
        "as PEFT saves them (save_pretrained(dir, safe_serialization=True))"
    )


def _check_tensors(header: dict, where: str, base: dict[str, TensorInfo], base_dir: Path, rank: int, patterns: dict) -> None:
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        match = _LORA_TENSOR.match(name)
        if not match:
            raise InvalidWeights(
                f"{where}: unexpected tensor {name!r}; expected only <module>.lora_A.weight / lora_B.weight "
                "(NIM serves plain LoRA: no DoRA magnitudes, embedding adapters or modules_to_save)"
            )
        if info["dtype"] not in FLOAT_DTYPES:
            raise InvalidWeights(
                f"{where}: tensor {name!r} has dtype {info['dtype']}, expected a floating dtype ({', '.join(FLOAT_DTYPES)})"
            )
        module = match["module"]
        if f"{module}.weight" not in base:
            raise InvalidWeights(
                f"{where}: tensor {name!r} adapts {module!r}, which the base model ({base_dir}) does not have "
                f"(no {module}.weight); expected an adapter trained on this base"
            )
        pairs.setdefault(module, {})[match["part"]] = info["shape"]
    if not pairs:
        raise InvalidWeights(f"{where}: holds no LoRA tensors; expected <module>.lora_A.weight and lora_B.weight pairs")
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise InvalidWeights(f"{where}: {module} has {', '.join(parts)} only; expected both lora_A and lora_B (re-save the adapter)")
        base_info = base[f"{module}.weight"]
        if len(base_info.shape) != 2:
            raise InvalidWeights(f"{where}: {module} is not a linear layer in the base model (shape {list(base_info.shape)})")
        out_features, in_features = base_info.shape
        r = next((v for k, v in patterns.items() if _module_matches(module, k)), rank)
        expected = {"lora_A": [r, in_features], "lora_B": [out_features, r]}
        for part in ("lora_A", "lora_B"):
            if list(parts[part]) != expected[part]:
                raise InvalidWeights(
                    f"{where}: {module}.{part}.weight has shape {list(parts[part])}, expected {expected[part]} "
                    f"(r={r} and the base's {module}.weight [{out_features}, {in_features}] in {base_dir / base_info.file}); "
                    "the adapter was trained on another base model or with another r than adapter_config.json says"
                )


def check_adapter(
    name: str, directory: Path, location: WeightsLocation, base: Checkpoint, base_inventory: dict[str, TensorInfo],
    *, max_rank: int, allow_pickle: bool, converted: Path,
) -> CheckedAdapter:
    """Check one adapter against the base model: config, rank, target modules, tensor shapes.

    Raises:
        InvalidWeights: naming the adapter's file, what was found, what was expected and the fix.
    """
    config = _read_adapter_config(directory, location)
    where_config = location.display(ADAPTER_CONFIG)
    rank = _check_rank(config, where_config, max_rank)
    base_modules = [n.removesuffix(".weight") for n, t in base_inventory.items() if n.endswith(".weight") and len(t.shape) == 2]
    _check_target_modules(config, where_config, base_modules, base.repo_id or base.path)
    weights = _adapter_weights(directory, location, converted, allow_pickle)
    where_weights = location.display(ADAPTER_WEIGHTS if weights.parent == directory else ADAPTER_PICKLE)
    try:
        header = safetensors_header(weights)
    except InvalidWeights as exc:
        raise InvalidWeights(str(exc).replace(str(weights), where_weights)) from None
    found = config.get("rank_pattern")
    patterns = found if isinstance(found, dict) else {}
    _check_tensors(header, where_weights, base_inventory, Path(base.path), rank, patterns)
    warnings = []
    named = config.get("base_model_name_or_path")
    if named and base.repo_id and str(named).rstrip("/") != base.repo_id and not str(named).endswith("/" + base.repo_id):
        warnings.append(
            f"adapter {name!r}: {where_config} names base model {named!r}, this deployment's base is {base.repo_id!r}; "
            "its shapes fit, so it is served, but check that it was trained on this base"
        )
    return CheckedAdapter(name, rank, directory / ADAPTER_CONFIG, weights, warnings)


def _adapter_sources(lora: LoraSpec, base_identity: str, cache_dir: Path) -> tuple[list, list[dict], Path, dict]:
    """Each adapter's location and fingerprint, where the set's record lives, and what it must say to be reused."""
    locations = [(a.name, parse_location(a.path)) for a in lora.adapters]
    fingerprints = [source_fingerprint(loc, endpoint_url=lora.endpoint_url) for _, loc in locations]
    wanted = {
        "adapters": [[name, loc.uri, fp] for (name, loc), fp in zip(locations, fingerprints, strict=False)],
        "base": base_identity, "max_rank": lora.max_rank, "allow_pickle": lora.allow_pickle,
    }
    record = record_path(lora_root(cache_dir), json.dumps([[a.name, a.path] for a in lora.adapters]))
    return locations, fingerprints, record, wanted


def adapters_unchanged(lora: LoraSpec, base_identity: str, cache_dir: Path) -> StagedAdapters | None:
    """The staged adapter set when every source is unchanged since it was staged, else None (nothing fetched)."""
    _, _, record, wanted = _adapter_sources(lora, base_identity, cache_dir)
    before = reusable(record, wanted)
    if before is None:
        return None
    return StagedAdapters(path=before["path"], names=[a.name for a in lora.adapters], digest=before["digest"], staged_files=0)


def stage_adapters(lora: LoraSpec, base: Checkpoint, cache_dir: Path) -> tuple[StagedAdapters, list[str]]:
    """Fetch, check and stage every adapter as ``<cache>/lora/<digest[:32]>/<name>/`` (NIM_PEFT_SOURCE).

    Adapters whose locations are unchanged since the last staging (same fingerprints, same base,
    intact directory) are neither fetched nor hashed again.

    Returns:
        The staged set, and warnings to log (a differing base_model_name_or_path).

    Raises:
        InvalidWeights: the first adapter problem (see :func:`check_adapter`).
        CheckpointNotFound, EngineStoreError, ServiceUnavailable: a location could not be read.
    """
    root = lora_root(cache_dir)
    locations, fingerprints, record, wanted = _adapter_sources(lora, base.identity, cache_dir)
    names = [name for name, _ in locations]
    before = reusable(record, wanted)
    if before is not None:
        return StagedAdapters(path=before["path"], names=names, digest=before["digest"], staged_files=0), before.get("warnings", [])

    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        base_inventory = tensor_inventory(Path(base.path))
        staged = work / "staged"
        warnings: list[str] = []
        for (name, location), fingerprint in zip(locations, fingerprints, strict=False):
            fetched = fetch_source(location, fingerprint, cache_dir, work / "fetch" / name, endpoint_url=lora.endpoint_url)
            checked = check_adapter(name, fetched.directory, location, base, base_inventory,
                                    max_rank=lora.max_rank, allow_pickle=lora.allow_pickle, converted=work / "converted" / name)
            warnings += checked.warnings
            (staged / name).mkdir(parents=True)
            place_file(checked.config, staged / name / ADAPTER_CONFIG)
            place_file(checked.weights, staged / name / ADAPTER_WEIGHTS)
        digest = directory_digest(staged)
        final = root / digest[:32]
        files = 0
        if final.exists() and file_sizes(final) != file_sizes(staged):
            os.rename(final, work / "damaged")  # same digest, files lost since: replace it whole
        if not final.exists():
            files = len(model_files(staged))
            os.rename(staged, final)
        save_record(record, wanted, {"path": str(final), "digest": digest, "files": file_sizes(final), "warnings": warnings})
        return StagedAdapters(path=str(final), names=names, digest=digest, staged_files=files), warnings
    finally:
        shutil.rmtree(work, ignore_errors=True)

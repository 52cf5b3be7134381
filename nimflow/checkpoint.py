"""Checks on checkpoint directories that need no GPU: run them before any GPU time is spent.

NIM only finds out late (after the container has started) that it was handed a TensorRT-LLM
engine directory or an unknown format (``NotImplementedError: Only safetensors/pickle/binary
directories are supported.``). These checks say it up front, naming what was found and what is
expected. Files are streamed; no weight file is ever read into memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from nimflow.errors import InvalidWeights

WeightFormat = Literal["safetensors", "pickle", "binary"]

CHUNK = 8 * 1024 * 1024
#: Model files NIM needs next to the weights or an engine (copied from the base checkpoint when a
#: fine-tune lacks them, and next to ``trtllm_engine/`` after a trtllm-build).
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
#: config.json keys a fine-tune must share with its base model, or the build/serving breaks.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# Files under these names are bookkeeping, not model content.
_IGNORED_PARTS = (".cache", ".git")
_IGNORED_NAMES = (".nimflow-download.json", "nimflow-manifest.json")


def model_files(directory: Path) -> list[Path]:
    """Regular files of a model directory in a stable order, without download bookkeeping."""
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(p in _IGNORED_PARTS for p in rel.parts) and rel.name not in _IGNORED_NAMES:
            files.append(path)
    return files


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(directory: Path, files: Iterable[Path] | None = None) -> str:
    """sha256 over the relative names and contents of a directory's model files."""
    chosen = files if files is not None else model_files(directory)
    return files_digest({path.relative_to(directory).as_posix(): path for path in chosen})


def files_digest(files: dict[str, Path]) -> str:
    """sha256 over (relative name, content sha256) of files that would form one directory.

    The same value :func:`directory_digest` gives once the files are copied into one place, so a
    staged directory's digest can be known before staging (``nimflow plan``).
    """
    digest = hashlib.sha256()
    for name in sorted(files, key=lambda n: n.split("/")):  # Path order: component by component
        digest.update(name.encode() + b"\0")
        digest.update(sha256_file(files[name]).encode() + b"\n")
    return digest.hexdigest()


def detect_weight_format(directory: Path) -> WeightFormat:
    """Say which weight format a Hugging Face-style checkpoint directory holds.

    Raises:
        InvalidWeights: the directory is missing, is a TensorRT-LLM engine directory, or holds no
            safetensors/pickle/binary weights.
    """
    if not directory.is_dir():
        raise InvalidWeights(f"{directory}: not a directory; expected a checkpoint directory with *.safetensors weights")
    names = [p.relative_to(directory).as_posix() for p in model_files(directory)]
    engines = [n for n in names if n.endswith(".engine") or n.startswith("trtllm_engine/")]
    if engines or _is_engine_config(directory / "config.json"):
        found = ", ".join(engines[:3]) or "config.json with build_config/pretrained_config"
        raise InvalidWeights(
            f"{directory}: this is a TensorRT-LLM engine directory (found {found}), not weights. "
            "NIM_FT_MODEL and engine builds need Hugging Face weights (*.safetensors, *.bin or *.pt; "
            "NIM would fail with 'Only safetensors/pickle/binary directories are supported'). "
            "Point finetune.path at the checkpoint the engine was built from; to serve a built engine, "
            "let nimflow build it (the `build` section) or set source.local_dir to the engine directory without `finetune`."
        )
    if any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if any(n.endswith(".bin") for n in names):
        return "binary"
    if any(n.endswith((".pt", ".pth")) for n in names):
        return "pickle"
    shown = ", ".join(names[:8]) or "nothing"
    raise InvalidWeights(
        f"{directory}: no weights found (found: {shown}); expected *.safetensors (preferred), "
        "pytorch_model*.bin or *.pt files next to config.json"
    )


def _is_engine_config(config_path: Path) -> bool:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("build_config" in config or "pretrained_config" in config)


def check_safetensors(path: Path) -> int:
    """Check a safetensors file's header against its size; return the number of tensors.

    Only the header is read. A truncated upload or a file that is not safetensors fails here
    instead of minutes into a GPU build.

    Raises:
        InvalidWeights: naming the file and what is wrong with it.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InvalidWeights(f"{path}: too short to be safetensors ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise InvalidWeights(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            raise InvalidWeights(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidWeights(f"{path}: safetensors header is not a mapping")
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
            raise InvalidWeights(f"{path}: tensor {name!r} has no valid data_offsets; the file is corrupt")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for start, stop, name in sorted(spans):
        # safetensors stores tensors back to back: a gap, overlap or overrun means corruption.
        if start != position or stop < start or stop > data_len:
            raise InvalidWeights(
                f"{path}: tensor {name!r} lies outside its place in the file (offsets {start}-{stop}, "
                f"data {data_len} bytes); the file is truncated or corrupt, re-export or re-upload it"
            )
        position = stop
    if position != data_len:
        raise InvalidWeights(f"{path}: {data_len - position} bytes after the last tensor; the file is corrupt")
    return len(spans)


def read_config(directory: Path) -> dict:
    """The parsed config.json of a checkpoint.

    Raises:
        InvalidWeights: config.json is missing or not JSON.
    """
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidWeights(f"{directory}: no config.json; a Hugging Face checkpoint needs one") from None
    except ValueError as exc:
        raise InvalidWeights(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidWeights(f"{path}: expected a JSON object")
    return config


def check_matches_base(finetune_config: dict, base_config: dict, where: str) -> None:
    """Refuse fine-tuned weights whose architecture differs from the base model's.

    Raises:
        InvalidWeights: naming each differing key with both values.
    """
    diffs = [
        f"{key}: base {base_config.get(key)!r}, fine-tune {finetune_config.get(key)!r}"
        for key in ARCHITECTURE_KEYS
        if key in base_config and key in finetune_config and base_config[key] != finetune_config[key]
    ]
    if diffs:
        raise InvalidWeights(
            f"{where}: the fine-tuned model does not match the base model ({'; '.join(diffs)}); "
            "fine-tune from the same base checkpoint or change `source`"
        )


def check_weights(directory: Path) -> WeightFormat:
    """Run every GPU-free check on a weights directory; return its format.

    Raises:
        InvalidWeights: the first problem found, naming the file and the fix.
    """
    weight_format = detect_weight_format(directory)
    if weight_format == "safetensors":
        for path in sorted(directory.rglob("*.safetensors")):
            check_safetensors(path)
    return weight_format

"""Tensor names, shapes and dtypes of a checkpoint, read from safetensors headers only.

A fine-tune that misses a tensor, renames one or changes a shape fails TensorRT-LLM's converter
(or NIM's loader) minutes after a GPU container started. The headers say all of it up front: no
tensor is ever loaded, only the JSON header at the start of each file is read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nimflow.errors import InvalidWeights

#: safetensors dtype -> bytes per element (the dtypes nimflow reads or writes).
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: Dtypes a fine-tune of a floating-point base may use (integers mean quantized or corrupt weights).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024
_SHOWN = 5


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # the file holding it, relative to the checkpoint directory


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's size (nothing else is read).

    A truncated upload or a file that is not safetensors fails here instead of minutes into a GPU build.

    Raises:
        InvalidWeights: naming the file and what is wrong with it.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InvalidWeights(f"{path}: too short to be safetensors ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
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
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)) or not isinstance(info.get("dtype"), str):
            raise InvalidWeights(f"{path}: tensor {name!r} has no valid dtype and shape; the file is corrupt")
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
    return header


def tensor_inventory(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of the top-level ``*.safetensors`` files of a checkpoint (what TensorRT-LLM reads).

    When ``model.safetensors.index.json`` is present, its weight map must agree with the files.

    Raises:
        InvalidWeights: a corrupt header, a tensor in two files, or an index that names missing
            files or tensors.
    """
    found: dict[str, TensorInfo] = {}
    for path in sorted(directory.glob("*.safetensors")):
        for name, info in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            if name in found:
                raise InvalidWeights(
                    f"{path}: tensor {name!r} is also in {directory / found[name].file}; "
                    "expected each tensor in exactly one shard (remove stale shards from an earlier save)"
                )
            found[name] = TensorInfo(name, info["dtype"], tuple(info["shape"]), path.name)
    index_path = directory / SAFETENSORS_INDEX
    if index_path.is_file():
        _check_index(index_path, found)
    return found


def _check_index(index_path: Path, found: dict[str, TensorInfo]) -> None:
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise InvalidWeights(f"{index_path}: not a safetensors index (expected a JSON object with a weight_map)")
    wrong = [
        f"{name} -> {file} (found in {found[name].file if name in found else 'no file'})"
        for name, file in weight_map.items()
        if name not in found or found[name].file != file
    ]
    if wrong:
        raise InvalidWeights(
            f"{index_path}: the index names tensors its shards do not hold: {_few(wrong)}; "
            "expected the index written with these shards (re-save the checkpoint, or upload the missing shards)"
        )


def compare_to_base(
    finetune: dict[str, TensorInfo],
    base: dict[str, TensorInfo],
    *,
    where: Callable[[str], str],
    base_where: Callable[[str], str],
) -> None:
    """Refuse fine-tuned tensors that are not exactly the base model's tensors, re-trained.

    Args:
        finetune: the fine-tune's inventory.
        base: the base checkpoint's inventory.
        where: renders a fine-tune file name for messages (the user's location, not a temp dir).
        base_where: the same for a base checkpoint file name.

    Raises:
        InvalidWeights: a tensor the base does not have (e.g. a LoRA adapter's names), a missing
            tensor, a different shape, or a non-floating dtype, naming the file, the tensor, what
            was found and what was expected.
    """
    unexpected = sorted(set(finetune) - set(base))
    if unexpected:
        files = sorted({finetune[n].file for n in unexpected})
        lora = any(".lora_" in n for n in unexpected)
        raise InvalidWeights(
            f"{where(files[0])}: {len(unexpected)} tensor(s) the base model does not have: {_few(unexpected)}; "
            f"expected only the base's tensor names (e.g. {_few(sorted(base), 2)}). "
            + ("These are LoRA adapter weights: list the adapter under lora.adapters instead of finetune."
               if lora else "Fine-tune from the same base checkpoint (source), and save with its tensor names.")
        )
    missing = sorted(set(base) - set(finetune))
    if missing:
        raise InvalidWeights(
            f"{where('')}: the fine-tune lacks {len(missing)} tensor(s) the base model has: {_few(missing)} "
            f"(in {base_where(base[missing[0]].file)}); expected every tensor of the base model. "
            "Save the complete model (all shards, model.save_pretrained), not a partial state dict."
        )
    for name in sorted(base):
        ours, theirs = finetune[name], base[name]
        if ours.shape != theirs.shape:
            raise InvalidWeights(
                f"{where(ours.file)}: tensor {name!r} has shape {list(ours.shape)}, the base model "
                f"({base_where(theirs.file)}) has {list(theirs.shape)}; expected the base's shapes. "
                "Fine-tune from the same base checkpoint (a resized embedding means vocab_size changed)."
            )
        if ours.dtype not in FLOAT_DTYPES:
            raise InvalidWeights(
                f"{where(ours.file)}: tensor {name!r} has dtype {ours.dtype}, expected a floating dtype "
                f"({', '.join(FLOAT_DTYPES)}) like the base's {theirs.dtype}. Integer weights are quantized "
                "or corrupt: export the fine-tune unquantized (float16/bfloat16)."
            )


def _few(items: list[str], limit: int = _SHOWN) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

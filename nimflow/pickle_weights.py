"""Convert PyTorch pickle checkpoints to safetensors without torch and without running pickle code.

``torch.save`` (>= 1.6) writes a zip archive: ``<archive>/data.pkl`` describes the objects,
``<archive>/data/<key>`` holds each storage's raw bytes and ``<archive>/byteorder`` their byte
order. A pickle can name any Python callable and have the loader call it, which is why loading one
from an untrusted source runs its code. Here ``data.pkl`` is read by an unpickler whose
``find_class`` knows only what a state dict of tensors needs (a subset of torch's own
``weights_only`` allow-list), mapped to inert stand-ins that record (storage, offset, shape,
stride); every other global is refused by name before anything is called. The tensor bytes are
then streamed from the zip members into safetensors files, never held in memory.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nimflow.errors import InvalidWeights
from nimflow.tensor_inventory import DTYPE_SIZES

PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Trainer side files that are pickles but not weights: never converted, never staged.
TRAINING_STATE_PREFIXES = ("training_args", "optimizer", "scheduler", "rng_state", "scaler", "trainer_state")
_CHUNK = 8 * 1024 * 1024
_MAX_DATA_PKL = 256 * 1024 * 1024  # data.pkl holds metadata only; a huge one is not a state dict

#: torch's legacy storage classes (what ``torch.save`` names in a storage's persistent id) -> dtype.
_STORAGE_TYPES = {
    "HalfStorage": "F16", "BFloat16Storage": "BF16", "FloatStorage": "F32", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "UntypedStorage": "U8",
}
#: torch dtypes (named by ``_rebuild_tensor_v3``, used for float8 and unsigned types) -> dtype.
_TORCH_DTYPES = {
    "float16": "F16", "half": "F16", "bfloat16": "BF16", "float32": "F32", "float": "F32", "float64": "F64",
    "double": "F64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _DType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int  # elements of ``dtype``

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes are in the archive: a storage, an element offset, a shape, a stride."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)):
        raise ValueError(f"{what} is {value!r}, expected a tuple of non-negative ints")
    return value


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records where the tensor is, builds nothing."""
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise ValueError("a tensor without a storage reference")
    return TensorRef(storage, storage_offset, _ints(size, "a size"), _ints(stride, "a stride"), storage.dtype)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v3`` (an untyped byte storage plus a dtype)."""
    if not isinstance(dtype, _DType) or not isinstance(storage, _Storage) or type(storage_offset) is not int:
        raise ValueError("a tensor without a storage reference or dtype")
    if storage.numel % DTYPE_SIZES[dtype.dtype]:
        raise ValueError(f"a {storage.numel}-byte storage cannot hold {dtype.dtype} elements")
    typed = _Storage(storage.key, dtype.dtype, storage.numel // DTYPE_SIZES[dtype.dtype])
    return TensorRef(typed, storage_offset, _ints(size, "a size"), _ints(stride, "a stride"), dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its tensor."""
    if not isinstance(data, TensorRef):
        raise ValueError("a parameter without a tensor")
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,  # the state dict, backward hooks
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch", "Size"): tuple,
    }
    for name, dtype in _STORAGE_TYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("U8")
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(dtype)
    return allowed


_ALLOWED = _allowed_globals()


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles only a state dict of tensors; any other global is refused before it is called."""

    def __init__(self, data: bytes, source: str, storages: dict[str, int]) -> None:
        super().__init__(io.BytesIO(data))
        self._source = source
        self._storages = storages  # key -> member size in bytes

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise InvalidWeights(
                f"{self._source}: the pickle refers to {module}.{name}, which a state dict of tensors never needs "
                "(it may run code); nimflow refused it without executing anything. Expected only tensors "
                "(torch.save(model.state_dict())); convert the file to safetensors where it was made, from a source you trust"
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise InvalidWeights(
                f"{self._source}: unexpected persistent id {pid!r:.120}; expected ('storage', <type>, key, location, numel)"
            )
        _, storage_type, key, _location, numel = pid
        if not isinstance(key, str) or type(numel) is not int or key not in self._storages:
            raise InvalidWeights(f"{self._source}: storage {key!r} is not in the archive; the file is truncated or corrupt")
        return _Storage(key, storage_type.dtype, numel)


@dataclass(frozen=True)
class TorchArchive:
    """A ``torch.save`` zip archive's tensors, by name, and where their bytes are."""

    path: Path
    prefix: str  # "<archive>/"
    tensors: dict[str, TensorRef]


def read_torch_archive(path: Path) -> TorchArchive:
    """Read the tensor layout of a ``torch.save`` zip file without running any pickle code.

    Raises:
        InvalidWeights: a legacy (non-zip) pickle, a TorchScript archive, a global outside the
            allow-list, something other than a flat state dict of tensors, a big-endian file, or
            a storage whose member does not match its size.
    """
    if not zipfile.is_zipfile(path):
        raise InvalidWeights(
            f"{path}: a legacy PyTorch pickle (not the zip format torch.save writes since torch 1.6); nimflow "
            "cannot read it without executing it. Re-save it with torch >= 1.6 (torch.save(torch.load(f, "
            "weights_only=True), f)) or convert it to safetensors where it was made"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1 or any(n.endswith("/constants.pkl") for n in names):
            raise InvalidWeights(
                f"{path}: not a torch.save state dict archive (found {', '.join(names[:5])}); expected "
                "<archive>/data.pkl with <archive>/data/<n> storages (a TorchScript model cannot be converted)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        if byteorder != "little":
            raise InvalidWeights(f"{path}: written on a {byteorder}-endian machine; convert it to safetensors there")
        info = archive.getinfo(pickles[0])
        if info.file_size > _MAX_DATA_PKL:
            raise InvalidWeights(f"{path}: data.pkl is {info.file_size} bytes; a state dict's is far smaller (not weights)")
        storages = {n[len(prefix) + len("data/"):]: archive.getinfo(n).file_size
                    for n in names if n.startswith(prefix + "data/")}
        data = archive.read(pickles[0])
    try:
        loaded = _StateDictUnpickler(data, str(path), storages).load()
    except InvalidWeights:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure means a malformed pickle
        raise InvalidWeights(f"{path}: data.pkl is not a state dict of tensors ({type(exc).__name__}: {exc})") from None
    return TorchArchive(path, prefix, _tensors_of(path, loaded, storages))


def _tensors_of(path: Path, loaded: Any, storages: dict[str, int]) -> dict[str, TensorRef]:
    if not isinstance(loaded, dict):
        raise InvalidWeights(f"{path}: holds a {type(loaded).__name__}, expected a state dict (a mapping of names to tensors)")
    tensors: dict[str, TensorRef] = {}
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, TensorRef):
            raise InvalidWeights(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; expected a flat state dict "
                "(torch.save(model.state_dict())), not a training checkpoint with nested objects"
            )
        _check_layout(path, name, value, storages)
        tensors[name] = value
    return tensors


def _check_layout(path: Path, name: str, tensor: TensorRef, storages: dict[str, int]) -> None:
    expected: list[int] = []
    step = 1
    for dim in reversed(tensor.shape):
        expected.insert(0, step)
        step *= dim
    if len(tensor.stride) != len(tensor.shape) or (
        tensor.numel and any(s != e for s, e, d in zip(tensor.stride, expected, tensor.shape, strict=False) if d != 1)
    ):
        raise InvalidWeights(
            f"{path}: tensor {name!r} is not contiguous (stride {list(tensor.stride)} for shape {list(tensor.shape)}, "
            f"expected {expected}); safetensors stores contiguous tensors. Re-save it with "
            "torch.save({k: v.contiguous() for k, v in state_dict.items()}, f)"
        )
    if storages[tensor.storage.key] != tensor.storage.nbytes or tensor.offset + tensor.numel > tensor.storage.numel:
        raise InvalidWeights(
            f"{path}: tensor {name!r} lies outside its storage (data/{tensor.storage.key} is "
            f"{storages[tensor.storage.key]} bytes, the tensor needs elements {tensor.offset}..{tensor.offset + tensor.numel} "
            f"of {tensor.storage.numel}); the file is truncated or corrupt"
        )


def write_safetensors_from_archive(archive: TorchArchive, dest: Path) -> int:
    """Stream an archive's tensors into a safetensors file at ``dest`` (temp name, renamed last).

    Returns:
        The number of tensor data bytes written (what an index's ``total_size`` counts).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "converted_from": archive.path.name}}
    offset = 0
    for name, tensor in archive.tensors.items():
        nbytes = tensor.numel * DTYPE_SIZES[tensor.dtype]
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    tmp = dest.with_name(f".{dest.name}.tmp")
    with zipfile.ZipFile(archive.path) as zf, tmp.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for tensor in archive.tensors.values():
            size = DTYPE_SIZES[tensor.dtype]
            with zf.open(f"{archive.prefix}data/{tensor.storage.key}") as member:
                member.seek(tensor.offset * size)
                left = tensor.numel * size
                while left:
                    chunk = member.read(min(_CHUNK, left))
                    if not chunk:
                        raise InvalidWeights(f"{archive.path}: storage data/{tensor.storage.key} ends early; the file is corrupt")
                    out.write(chunk)
                    left -= len(chunk)
    os.replace(tmp, dest)
    return offset


def weight_pickles(directory: Path, weight_format: str) -> list[Path]:
    """The pickle files holding weights: those the index names, else every top-level ``*.bin``/``*.pth``
    except trainer state (training_args.bin, optimizer.pt...).

    Raises:
        InvalidWeights: the index is not JSON or names a file that is not there.
    """
    index = directory / PICKLE_INDEX
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise InvalidWeights(f"{index}: names {', '.join(missing[:3])}, which is not in {directory}; upload every shard")
        return [directory / f for f in files]
    suffix = ".bin" if weight_format == "binary" else ".pth"
    return sorted(p for p in directory.glob(f"*{suffix}") if p.is_file() and not p.name.startswith(TRAINING_STATE_PREFIXES))


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidWeights(f"{index}: not a weights index (expected a JSON object with a weight_map of names to files)")
    return weight_map


def convert_pickle_weights(directory: Path, dest: Path, weight_format: str) -> dict[str, str]:
    """Convert a checkpoint's pickle weights into safetensors files in ``dest``, keeping tensor names.

    One pickle becomes ``model.safetensors``; several (sharded, with or without
    ``pytorch_model.bin.index.json``) become ``model-0000k-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``.

    Returns:
        Written safetensors file name -> the pickle file it came from (for messages).

    Raises:
        InvalidWeights: see :func:`read_torch_archive`; also a tensor in two shards, or an index
            that disagrees with the shards.
    """
    sources = weight_pickles(directory, weight_format)
    if not sources:
        raise InvalidWeights(f"{directory}: no weight pickles to convert (only trainer state); expected pytorch_model*.bin")
    dest.mkdir(parents=True, exist_ok=True)
    index = directory / PICKLE_INDEX
    claimed = _weight_map(index) if index.is_file() else None
    written: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for k, source in enumerate(sources, start=1):
        archive = read_torch_archive(source)
        name = "model.safetensors" if len(sources) == 1 else f"model-{k:05d}-of-{len(sources):05d}.safetensors"
        for tensor in archive.tensors:
            if tensor in weight_map:
                raise InvalidWeights(
                    f"{source}: tensor {tensor!r} is also in {written[weight_map[tensor]]}; expected each tensor in one shard"
                )
            if claimed is not None and claimed.get(tensor) != source.name:
                raise InvalidWeights(
                    f"{source}: holds tensor {tensor!r}, which {index.name} places in {claimed.get(tensor)}; "
                    "expected the index saved with these shards"
                )
            weight_map[tensor] = name
        total += write_safetensors_from_archive(archive, dest / name)
        written[name] = source.name
    if claimed is not None and set(claimed) != set(weight_map):
        lost = sorted(set(claimed) - set(weight_map))
        raise InvalidWeights(f"{index}: names {len(lost)} tensor(s) no shard holds ({', '.join(lost[:3])}); upload every shard")
    if len(sources) > 1:
        (dest / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return written

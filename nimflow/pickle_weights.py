"""Convert PyTorch pickle checkpoints to safetensors without torch and without running pickle code.

``torch.save`` (>= 1.6) writes a zip archive: ``<archive>/data.pkl`` describes the objects,
``<archive>/data/<key>`` holds each storage's raw bytes and ``<archive>/byteorder`` their byte
order. A pickle can name any Python callable and have the loader call it, which is why loading one
from an untrusted source runs its code.

Here ``data.pkl`` is read by nimflow's own opcode loop (:class:`_StateDictUnpickler`), not by
Python's unpickler. It knows only the opcodes torch's own ``weights_only`` loader reads and only
the globals a state dict of tensors needs, mapped to inert stand-ins that record (storage, offset,
shape, stride); every other global is refused by name before anything is called. And it bounds
what a file can make it do:

- containers nest at most :data:`MAX_DEPTH` deep, checked as each one is built, and dict keys are
  strings or ints: nothing deep is ever hashed (CPython hashes nested tuples recursively with no
  guard; a million-deep key crashes the interpreter);
- memo indices stay below the pickle's length (a pickler numbers them from 0, one per ``PUT``) in
  a dict, no allowed call copies or expands its arguments, and ``data.pkl`` is at most
  :data:`MAX_DATA_PKL`: memory grows with the pickle's bytes, never faster;
- ``BUILD`` only on a state dict's ``OrderedDict`` (of the objects torch's loader builds, the one a
  state dict has), and every stand-in is made fresh for each file: nothing one file does reaches
  the next;
- tensors have at most :data:`MAX_DIMS` dimensions and non-negative int64 sizes, strides and
  offsets, checked in linear time;
- storages are stored (uncompressed) zip members, each inside the file and none overlapping another,
  and no two tensors share a storage byte: the output is at most the storage bytes the archive
  really holds, so aliases cannot multiply it.

The tensor bytes are then copied from the archive into a safetensors file, never held in memory.
All of it runs in a child process (:func:`convert_pickle_file`) limited to
``NIMFLOW_PICKLE_MEMORY_MIB`` of address space, so a bug that gets past these checks still cannot
take the flow run down: a crash, a signal or exhausted memory there becomes one
:class:`~nimflow.errors.InvalidWeights` naming the file.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickletools
import reprlib
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from nimflow.containment import safe_relative
from nimflow.errors import InvalidWeights
from nimflow.tensor_inventory import DTYPE_SIZES

PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Trainer side files that are pickles but not weights: never converted, never staged.
TRAINING_STATE_PREFIXES = ("training_args", "optimizer", "scheduler", "rng_state", "scaler", "trainer_state")
#: Deepest nesting of tuples, lists and dicts in data.pkl (a state dict needs 3).
MAX_DEPTH = 32
#: Most dimensions a tensor may have (torch's own kernels stop at 25).
MAX_DIMS = 64
#: Largest data.pkl read: a state dict's takes ~150 bytes per tensor, so this is ~100,000 tensors.
MAX_DATA_PKL = 16 * 1024 * 1024
_MAX_INT64 = 2**63 - 1
_MIB = 1024 * 1024
_CHUNK = 8 * _MIB
_MAX_REPORT = 64 * _MIB  # the child's JSON report: the tensor names of one file
_FIX = ("Expected a state dict as torch.save(model.state_dict()) writes it; convert the file to safetensors where "
        "it was made, from a source you trust")

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
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


# --- stand-ins for the globals a state dict names ----------------------------------------------------


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is tuple and len(value) > MAX_DIMS:
        raise ValueError(f"{what} has {len(value)} dimensions; at most {MAX_DIMS} are accepted")
    if not (type(value) is tuple and all(type(v) is int and 0 <= v <= _MAX_INT64 for v in value)):
        raise ValueError(f"{what} is {reprlib.repr(value)}, expected a tuple of ints from 0 to 2**63-1")
    return value


def _index(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INT64:
        raise ValueError(f"{what} is {reprlib.repr(value)}, expected an int from 0 to 2**63-1")
    return value


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records where the tensor is, builds nothing."""
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor without a storage reference")
    offset = _index(storage_offset, "a tensor's storage offset")
    return TensorRef(storage, offset, _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride"), storage.dtype)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v3`` (an untyped byte storage plus a dtype)."""
    if not isinstance(dtype, _DType) or not isinstance(storage, _Storage):
        raise ValueError("a tensor without a storage reference or dtype")
    if storage.nbytes % DTYPE_SIZES[dtype.dtype]:
        raise ValueError(f"a {storage.nbytes}-byte storage cannot hold {dtype.dtype} elements")
    typed = _Storage(storage.key, dtype.dtype, storage.nbytes // DTYPE_SIZES[dtype.dtype])
    return _rebuild_tensor_v2(typed, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its tensor."""
    if not isinstance(data, TensorRef):
        raise ValueError("a parameter without a tensor")
    return data


def _torch_size(dims: Any) -> tuple[int, ...]:
    """Stand-in for ``torch.Size``: the tuple of ints it was given, never a copy of anything else."""
    return _ints(dims, "a torch.Size")


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    """Stand-in for ``collections.OrderedDict``: torch.save makes it empty and fills it with SETITEMS."""
    if args:
        raise ValueError("collections.OrderedDict called with arguments (torch.save passes none)")
    return collections.OrderedDict()


#: What REDUCE may call: the stand-ins, none of which copies or expands its arguments.
_REDUCERS = (_ordered_dict, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter, _torch_size)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a state dict names, as fresh objects: one file's unpickler never shares them with another's."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _ordered_dict,  # the state dict, backward hooks
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch", "Size"): _torch_size,
    }
    for name, dtype in _STORAGE_TYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("U8")
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(dtype)
    return allowed


# --- data.pkl -----------------------------------------------------------------------------------------

_CONTAINERS = (tuple, list, dict, collections.OrderedDict)
_OPCODE_NAMES = {op.code: op.name for op in pickletools.opcodes}


class _StateDictUnpickler:
    """Reads a state dict of tensors from data.pkl: the pickle machine, cut down to what torch.save writes.

    The opcodes are those torch's ``weights_only`` loader reads (protocol 2, no ``NEWOBJ``); any
    other is refused by name. Every bound in the module docstring is enforced here, as each opcode
    runs, so nothing is hashed, called or kept before the check that concerns it.
    """

    def __init__(self, data: bytes, source: str, storages: dict[str, int]) -> None:
        self._data = data
        self._pos = 0
        self._source = source
        self._storages = storages  # key -> member size in bytes
        self._allowed = _allowed_globals()
        self._stack: list[Any] = []
        self._marks: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._depths: dict[int, int] = {}  # id -> nesting depth, for containers deeper than 1
        self._deep: list[Any] = []  # those containers, kept alive so that their ids stay theirs
        push = self._stack_push
        self._ops: dict[int, Callable[[], object]] = {
            0x80: lambda: self._read(1),  # PROTO: the version does not change these opcodes' meaning
            ord("c"): self._global, ord("R"): self._reduce, ord("b"): self._build, ord("Q"): self._persistent_id,
            ord("("): self._mark, ord("t"): lambda: self._tuple(self._pop_mark()),
            0x85: lambda: self._tuple(self._pop(1)), 0x86: lambda: self._tuple(self._pop(2)),
            0x87: lambda: self._tuple(self._pop(3)),
            ord(")"): lambda: push(()), ord("]"): lambda: push([]), ord("}"): lambda: push({}),
            ord("N"): lambda: push(None), 0x88: lambda: push(True), 0x89: lambda: push(False),
            ord("K"): lambda: push(self._read(1)[0]), ord("M"): lambda: push(self._unpack("<H")),
            ord("J"): lambda: push(self._unpack("<i")), ord("G"): lambda: push(self._unpack(">d")),
            0x8A: lambda: push(int.from_bytes(self._read(self._read(1)[0]), "little", signed=True)),  # LONG1
            ord("X"): lambda: push(self._read(self._unpack("<I")).decode("utf-8", "surrogatepass")),
            ord("U"): lambda: push(self._read(self._read(1)[0]).decode("ascii")),
            ord("h"): lambda: push(self._memo[self._read(1)[0]]), ord("j"): lambda: push(self._memo[self._unpack("<I")]),
            ord("q"): lambda: self._put(self._read(1)[0]), ord("r"): lambda: self._put(self._unpack("<I")),
            ord("a"): lambda: self._append(self._pop(1)), ord("e"): lambda: self._append(self._pop_mark()),
            ord("s"): lambda: self._set_items(self._pop(2)), ord("u"): lambda: self._set_items(self._pop_mark()),
        }

    def load(self) -> Any:
        """The object data.pkl describes.

        Raises:
            InvalidWeights: a bound is exceeded, or an opcode, global or call a state dict never uses.
            Exception: malformed bytes (IndexError, KeyError, ValueError...); the caller names the file.
        """
        while True:  # each opcode consumes at least one byte, so this ends within len(data) rounds
            code = self._read(1)[0]
            if code == ord("."):  # STOP
                return self._stack.pop()
            op = self._ops.get(code)
            if op is None:
                name = _OPCODE_NAMES.get(chr(code), "an unknown opcode")
                raise self._refuse(f"uses {name} ({code:#04x}) at byte {self._pos - 1}, an opcode torch.save never writes")
            op()

    def _refuse(self, what: str) -> InvalidWeights:
        return InvalidWeights(f"{self._source}: data.pkl {what}; nimflow refused it without executing anything. {_FIX}")

    def _read(self, count: int) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise ValueError(f"data.pkl ends inside an opcode at byte {self._pos}")
        chunk, self._pos = self._data[self._pos:end], end
        return chunk

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _readline(self) -> str:
        end = self._data.find(b"\n", self._pos)
        if end < 0:
            raise ValueError(f"data.pkl ends inside a GLOBAL at byte {self._pos}")
        line, self._pos = self._data[self._pos:end], end + 1
        return line.decode("utf-8")

    def _stack_push(self, value: Any) -> None:
        self._stack.append(value)

    def _pop(self, count: int) -> list[Any]:
        if len(self._stack) < count:
            raise IndexError("an opcode found too few values on the stack")
        items = self._stack[len(self._stack) - count:]
        del self._stack[len(self._stack) - count:]
        return items

    def _mark(self) -> None:
        if len(self._marks) >= MAX_DEPTH:
            raise self._refuse(f"opens marks nested deeper than {MAX_DEPTH} (a state dict needs 3)")
        self._marks.append(self._stack)
        self._stack = []

    def _pop_mark(self) -> list[Any]:
        items, self._stack = self._stack, self._marks.pop()
        return items

    def _depth(self, value: Any) -> int:
        if type(value) not in _CONTAINERS:
            return 0
        return self._depths.get(id(value), 1)

    def _nest(self, container: Any, items: Iterable[Any]) -> None:
        """Note that ``container`` now holds ``items``; refuse it when that nests deeper than MAX_DEPTH.

        A tuple's depth is exact (it never changes after it is built), and tuples are the only
        containers a hash recurses into; a list or dict's grows as items are added.
        """
        depth = max(self._depth(container), 1 + max(map(self._depth, items), default=0))
        if depth > MAX_DEPTH:
            raise self._refuse(f"holds objects nested deeper than {MAX_DEPTH} (a state dict needs 3)")
        if depth > 1:
            if id(container) not in self._depths:
                self._deep.append(container)
            self._depths[id(container)] = depth

    def _tuple(self, items: list[Any]) -> None:
        built = tuple(items)
        self._nest(built, items)
        self._stack.append(built)

    def _append(self, items: list[Any]) -> None:
        target = self._stack[-1]
        if type(target) is not list:
            raise self._refuse(f"appends to a {type(target).__name__}, not a list")
        self._nest(target, items)
        target.extend(items)

    def _set_items(self, items: list[Any]) -> None:
        target = self._stack[-1]
        if type(target) not in (dict, collections.OrderedDict) or len(items) % 2:
            raise self._refuse(f"sets items of a {type(target).__name__}, not of a dict")
        keys, values = items[::2], items[1::2]
        for key in keys:
            if type(key) not in (str, int):  # checked before the key is hashed
                raise self._refuse(f"uses a {type(key).__name__} as a dict key (a state dict's keys are strings)")
        self._nest(target, values)
        target.update(zip(keys, values, strict=True))

    def _put(self, index: int) -> None:
        if index >= len(self._data):  # a pickler numbers memo entries from 0, one per PUT of 2+ bytes
            raise self._refuse(f"uses memo index {index}, beyond its own length of {len(self._data)} bytes")
        self._memo[index] = self._stack[-1]

    def _global(self) -> None:
        module, name = self._readline(), self._readline()
        found = self._allowed.get((module, name))
        if found is None:
            raise InvalidWeights(
                f"{self._source}: the pickle refers to {module[:100]}.{name[:100]}, which a state dict of tensors never needs "
                "(it may run code); nimflow refused it without executing anything. Expected only tensors "
                "(torch.save(model.state_dict())); convert the file to safetensors where it was made, from a source you trust"
            )
        self._stack.append(found)

    def _reduce(self) -> None:
        (args,) = self._pop(1)
        func = self._stack[-1]
        if not any(func is reducer for reducer in _REDUCERS) or type(args) is not tuple:
            raise self._refuse(f"calls {reprlib.repr(func)}, which is not a function a state dict calls")
        self._stack[-1] = func(*args)

    def _build(self) -> None:
        (state,) = self._pop(1)
        target = self._stack[-1]
        if type(target) is not collections.OrderedDict or type(state) is not dict:
            raise self._refuse(
                f"sets the state of a {type(target).__name__} (BUILD); in a state dict only the OrderedDict has "
                "state, and nimflow sets no other object's"
            )
        # The state is the state dict's `_metadata` (per-module versions): conversion needs none of it,
        # so it is dropped rather than set on anything.

    def _persistent_id(self) -> None:
        (pid,) = self._pop(1)
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise InvalidWeights(
                f"{self._source}: unexpected persistent id {reprlib.repr(pid)}; expected ('storage', <type>, key, location, numel)"
            )
        _, storage_type, key, _location, numel = pid
        if type(key) is not str or key not in self._storages:
            raise InvalidWeights(f"{self._source}: storage {reprlib.repr(key)} is not in the archive; the file is truncated or corrupt")
        self._stack.append(_Storage(key, storage_type.dtype, _index(numel, "a storage's size")))


# --- the archive ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """A storage's bytes in the archive file: how many, and where they start."""

    size: int
    start: int


@dataclass(frozen=True)
class TorchArchive:
    """A ``torch.save`` zip archive's tensors, by name, and where their bytes are."""

    path: Path
    prefix: str  # "<archive>/"
    storages: dict[str, _Member]
    tensors: dict[str, TensorRef]


def read_torch_archive(path: Path) -> TorchArchive:
    """Read the tensor layout of a ``torch.save`` zip file without running any pickle code.

    Raises:
        InvalidWeights: a legacy (non-zip) pickle, a TorchScript archive, a global outside the
            allow-list, something other than a flat state dict of tensors, a big-endian file, a
            bound of the module docstring exceeded, or a storage whose member does not match its size.
        MemoryError: the process's memory limit was reached (the converter child reports it).
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
        byteorder = _read_member(archive, prefix + "byteorder", 16).decode().strip() if prefix + "byteorder" in names else "little"
        if byteorder != "little":
            raise InvalidWeights(f"{path}: written on a {byteorder}-endian machine; convert it to safetensors there")
        data = _read_member(archive, pickles[0], MAX_DATA_PKL + 1)
        if len(data) > MAX_DATA_PKL:
            raise InvalidWeights(f"{path}: data.pkl is over {MAX_DATA_PKL} bytes; a state dict's is far smaller (not weights)")
        storages = _storage_members(path, archive, prefix)
    sizes = {key: member.size for key, member in storages.items()}
    try:
        loaded = _StateDictUnpickler(data, str(path), sizes).load()
    except (InvalidWeights, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure means a malformed pickle
        raise InvalidWeights(f"{path}: data.pkl is not a state dict of tensors ({type(exc).__name__}: {exc}). {_FIX}") from None
    return TorchArchive(path, prefix, storages, _tensors_of(path, loaded, sizes))


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a member, whatever size it declares or decompresses to."""
    with archive.open(name) as member:
        return member.read(limit)


def _storage_members(path: Path, archive: zipfile.ZipFile, prefix: str) -> dict[str, _Member]:
    """Every storage member, checked to be stored as torch.save stores it: uncompressed, inside the file,
    overlapping no other member. The storages' sizes then add up to at most the file's size."""
    file_size = path.stat().st_size
    members: dict[str, _Member] = {}
    spans: list[tuple[int, int, str]] = []
    with path.open("rb") as raw:
        for info in archive.infolist():
            if not info.filename.startswith(prefix + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise InvalidWeights(
                    f"{path}: storage {info.filename} is compressed (zip method {info.compress_type}); torch.save "
                    "stores storages uncompressed, and nimflow writes no more bytes than the archive holds. Re-save "
                    "it with torch.save, or convert it to safetensors where it was made"
                )
            raw.seek(info.header_offset)
            header = raw.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise InvalidWeights(f"{path}: storage {info.filename} has no zip entry where the directory says; the file is corrupt")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_length + extra_length
            if info.compress_size != info.file_size or start + info.file_size > file_size:
                raise InvalidWeights(
                    f"{path}: storage {info.filename} declares {info.file_size} bytes, more than the archive holds "
                    f"there ({max(0, file_size - start)} bytes); the file is truncated or corrupt"
                )
            members[info.filename[len(prefix) + len("data/"):]] = _Member(info.file_size, start)
            spans.append((info.header_offset, start + info.file_size, info.filename))
    for (_, end, first), (begin, _, second) in pairwise(sorted(spans)):
        if begin < end:
            raise InvalidWeights(
                f"{path}: storages {first} and {second} overlap in the archive (two entries over the same bytes); "
                "torch.save writes each storage once. The file is crafted or corrupt"
            )
    return members


def _tensors_of(path: Path, loaded: Any, storages: dict[str, int]) -> dict[str, TensorRef]:
    if not isinstance(loaded, dict):
        raise InvalidWeights(f"{path}: holds a {type(loaded).__name__}, expected a state dict (a mapping of names to tensors)")
    tensors: dict[str, TensorRef] = {}
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, TensorRef):
            raise InvalidWeights(
                f"{path}: entry {reprlib.repr(name)} is a {type(value).__name__}, not a tensor; expected a flat state dict "
                "(torch.save(model.state_dict())), not a training checkpoint with nested objects"
            )
        _check_layout(path, name, value, storages)
        tensors[name] = value
    _check_no_shared_bytes(path, tensors)
    return tensors


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides = [0] * len(shape)
    step = 1
    for axis in reversed(range(len(shape))):
        strides[axis] = step
        step *= shape[axis]
    return strides


def _check_layout(path: Path, name: str, tensor: TensorRef, storages: dict[str, int]) -> None:
    expected = _contiguous_strides(tensor.shape)
    numel = tensor.numel
    if len(tensor.stride) != len(tensor.shape) or (
        numel and any(s != e for s, e, d in zip(tensor.stride, expected, tensor.shape, strict=False) if d != 1)
    ):
        raise InvalidWeights(
            f"{path}: tensor {name!r} is not contiguous (stride {list(tensor.stride)} for shape {list(tensor.shape)}, "
            f"expected {expected}); safetensors stores contiguous tensors. Re-save it with "
            "torch.save({k: v.contiguous() for k, v in state_dict.items()}, f)"
        )
    if storages[tensor.storage.key] != tensor.storage.nbytes or tensor.offset + numel > tensor.storage.numel:
        raise InvalidWeights(
            f"{path}: tensor {name!r} lies outside its storage (data/{tensor.storage.key} is "
            f"{storages[tensor.storage.key]} bytes, the tensor needs elements {tensor.offset}..{tensor.offset + numel} "
            f"of {tensor.storage.numel}); the file is truncated or corrupt"
        )


def _check_no_shared_bytes(path: Path, tensors: dict[str, TensorRef]) -> None:
    """No storage byte belongs to two tensors, so the output is at most the storages' bytes."""
    spans = sorted(
        (t.storage.key, t.offset * DTYPE_SIZES[t.dtype], t.offset * DTYPE_SIZES[t.dtype] + t.nbytes, name)
        for name, t in tensors.items() if t.nbytes
    )
    for (key, _, end, first), (other, begin, _, second) in pairwise(spans):
        if key == other and begin < end:
            raise InvalidWeights(
                f"{path}: tensors {first!r} and {second!r} share bytes of storage data/{key}; safetensors holds each "
                "tensor's own bytes, and nimflow writes no more than the archive stores. Save the state dict without "
                "shared (tied) tensors, e.g. model.save_pretrained(dir, safe_serialization=True)"
            )


def _partial(dest: Path) -> Path:
    """Where a safetensors file is written before it is renamed into place."""
    return dest.with_name(f".{dest.name}.tmp")


def write_safetensors_from_archive(archive: TorchArchive, dest: Path) -> int:
    """Stream an archive's tensors into a safetensors file at ``dest`` (temp name, renamed last).

    Returns:
        The number of tensor data bytes written (what an index's ``total_size`` counts).

    Raises:
        InvalidWeights: a storage's bytes end before the file does (it changed since it was read).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "converted_from": archive.path.name}}
    offset = 0
    for name, tensor in archive.tensors.items():
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    tmp = _partial(dest)
    with archive.path.open("rb") as source, tmp.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for tensor in archive.tensors.values():
            source.seek(archive.storages[tensor.storage.key].start + tensor.offset * DTYPE_SIZES[tensor.dtype])
            left = tensor.nbytes
            while left:
                chunk = source.read(min(_CHUNK, left))
                if not chunk:
                    raise InvalidWeights(f"{archive.path}: storage data/{tensor.storage.key} ends early; the file is corrupt")
                out.write(chunk)
                left -= len(chunk)
    os.replace(tmp, dest)
    return offset


# --- the converter process -----------------------------------------------------------------------------

#: The package's parent: the child imports this very nimflow, whatever its working directory or environment.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from nimflow.pickle_weights import child_main; child_main(sys.argv[2:])"


@dataclass(frozen=True)
class ConvertedFile:
    """What converting one pickle wrote: its tensors' names, their data bytes, and the converter's peak memory."""

    tensors: tuple[str, ...]
    nbytes: int
    peak_rss_kib: int


def convert_pickle_file(source: Path, dest: Path, *, memory_mib: int | None = None) -> ConvertedFile:
    """Convert one ``torch.save`` archive into a safetensors file at ``dest``, in a child process.

    The child runs this module with ``-I`` (no environment, no working directory on its path) and
    an address-space limit of ``memory_mib`` MiB (default ``NIMFLOW_PICKLE_MEMORY_MIB``).

    Raises:
        InvalidWeights: the file is refused (see :func:`read_torch_archive`), or the converter ran
            out of memory, crashed or was killed; the message names ``source``.
    """
    if memory_mib is None:
        from nimflow.settings import get_settings  # here, so the child never imports pydantic

        memory_mib = get_settings().pickle_memory_mib
    command = [sys.executable, "-I", "-c", _CHILD, str(_PACKAGE_ROOT), str(source), str(dest), str(memory_mib)]
    return run_converter(command, source, dest, memory_mib)


def run_converter(command: list[str], source: Path, dest: Path, memory_mib: int) -> ConvertedFile:
    """Run a converter process and turn its report, or the way it ended, into a result.

    Raises:
        InvalidWeights: it refused ``source``, reported exhausted memory, died of a signal or
            exited without a report; ``dest``'s partial file is removed.
    """
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        try:
            assert child.stdout is not None
            with child.stdout:
                output = child.stdout.read(_MAX_REPORT)
            child.wait()
        finally:
            if child.returncode is None:  # interrupted while waiting: the converter does not outlive the run
                child.kill()
                child.wait()
        errors.seek(0, os.SEEK_END)
        errors.seek(max(0, errors.tell() - 2000))
        last_error = (errors.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
    report = _report(output) if child.returncode == 0 else {}
    if "tensors" in report:
        return ConvertedFile(tuple(report["tensors"]), int(report["bytes"]), int(report["peak_rss_kib"]))
    _partial(dest).unlink(missing_ok=True)
    if "refused" in report:
        raise InvalidWeights(str(report["refused"]))
    limit = (f"nimflow converts pickles in a separate process limited to {memory_mib} MiB of memory "
             "(NIMFLOW_PICKLE_MEMORY_MIB), so nothing else was affected")
    if report.get("memory"):
        raise InvalidWeights(
            f"{source}: converting it needed more than {memory_mib} MiB of memory; a state dict's metadata needs far "
            f"less, so the file was refused ({limit}). If it is a genuine checkpoint, raise NIMFLOW_PICKLE_MEMORY_MIB; "
            "else convert it to safetensors where it was made"
        )
    ended = (f"was killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0
             else f"exited with status {child.returncode} ({last_error[:300]})")
    raise InvalidWeights(f"{source}: the pickle converter {ended} while reading this file; it was refused ({limit}). {_FIX}")


def _report(output: bytes) -> dict[str, Any]:
    try:
        report = json.loads(output)
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def child_main(argv: list[str]) -> None:
    """The converter process: limit its memory, convert one archive, print a JSON report on stdout.

    ``argv`` is ``[source, dest, memory_mib]``. The report is ``{"tensors": [...], "bytes": n,
    "peak_rss_kib": n}``,
    ``{"refused": message}`` or ``{"memory": true}``; anything else (a crash) the parent reads from
    the exit status.
    """
    source, dest, memory_mib = Path(argv[0]), Path(argv[1]), int(argv[2])
    _limit_address_space(memory_mib * _MIB)
    report: dict[str, Any]
    try:
        archive = read_torch_archive(source)
        nbytes = write_safetensors_from_archive(archive, dest)
        report = {"tensors": list(archive.tensors), "bytes": nbytes, "peak_rss_kib": _peak_rss_kib()}
    except InvalidWeights as exc:
        report = {"refused": str(exc)}
    except MemoryError:
        report = {"memory": True}  # what held the memory was released with the exception's frames
    sys.stdout.write(json.dumps(report))
    sys.stdout.flush()


def _peak_rss_kib() -> int:
    """This process's peak resident memory since it started this program (VmHWM; getrusage's
    ru_maxrss would include the parent's memory, inherited until exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _limit_address_space(limit: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# --- a checkpoint's pickles ----------------------------------------------------------------------------


def weight_pickles(directory: Path, weight_format: str) -> list[Path]:
    """The pickle files holding weights: those the index names, else every top-level ``*.bin``/``*.pth``
    except trainer state (training_args.bin, optimizer.pt...).

    Raises:
        InvalidWeights: the index is not JSON, names a file that is not there, or names anything but a
            plain file name next to it (``..``, an absolute path, a subdirectory).
    """
    index = directory / PICKLE_INDEX
    if index.is_file():
        files = sorted({_shard_name(index, name) for name in _weight_map(index).values()})
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise InvalidWeights(f"{index}: names {', '.join(missing[:3])}, which is not in {directory}; upload every shard")
        return [directory / f for f in files]
    suffix = ".bin" if weight_format == "binary" else ".pth"
    return sorted(p for p in directory.glob(f"*{suffix}") if p.is_file() and not p.name.startswith(TRAINING_STATE_PREFIXES))


def _shard_name(index: Path, name: str) -> str:
    """A shard named by the index: a plain file name beside it, as transformers writes them."""
    relative = safe_relative(name, source=str(index))
    if "/" in relative:
        raise InvalidWeights(f"{index}: refused the name {name!r}: shards lie next to the index (a plain file name)")
    return relative


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidWeights(f"{index}: not a weights index (expected a JSON object with a weight_map of names to files)")
    return weight_map


def convert_pickle_weights(directory: Path, dest: Path, weight_format: str, *, memory_mib: int | None = None) -> dict[str, str]:
    """Convert a checkpoint's pickle weights into safetensors files in ``dest``, keeping tensor names.

    One pickle becomes ``model.safetensors``; several (sharded, with or without
    ``pytorch_model.bin.index.json``) become ``model-0000k-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. Each file is converted in its own process
    (:func:`convert_pickle_file`, ``memory_mib`` MiB at most).

    Returns:
        Written safetensors file name -> the pickle file it came from (for messages).

    Raises:
        InvalidWeights: see :func:`read_torch_archive` and :func:`convert_pickle_file`; also a tensor
            in two shards, or an index that disagrees with the shards or names a file outside.
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
        name = "model.safetensors" if len(sources) == 1 else f"model-{k:05d}-of-{len(sources):05d}.safetensors"
        converted = convert_pickle_file(source, dest / name, memory_mib=memory_mib)
        for tensor in converted.tensors:
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
        total += converted.nbytes
        written[name] = source.name
    if claimed is not None and set(claimed) != set(weight_map):
        lost = sorted(set(claimed) - set(weight_map))
        raise InvalidWeights(f"{index}: names {len(lost)} tensor(s) no shard holds ({', '.join(lost[:3])}); upload every shard")
    if len(sources) > 1:
        (dest / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return written

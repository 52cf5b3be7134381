"""Issue 13: a hostile ``pytorch_model.bin`` cannot crash, inflate or steer the pickle converter.

Each attack is the review's, its ``data.pkl`` written opcode by opcode here and packed in a
torch.save zip archive, given to ``nimflow host`` as a fine-tune with ``finetune.allow_pickle:
true``. Every run must end with exit 1 and one ``nimflow: InvalidWeights`` line naming the file and
what was refused (never a signal, never a traceback), write nothing outside the cache directory and
leave no inflated output in it. The converter runs in a child process limited to
``NIMFLOW_PICKLE_MEMORY_MIB`` of address space; the runs here set it to 256 MiB, so each specific
refusal shows the converter's peak memory stayed under 256 MiB (above it the run would end with the
memory-limit message instead).

How each failed before the fix (these tests run against a copy of the tree before it): the deep
tuple killed ``nimflow host`` with SIGSEGV (exit -11); ``torch.Size`` over a memoised string and the
huge ``LONG_BINPUT`` index were read (the process growing past 1 GiB) and refused only later, as an
empty state dict; the bzip2 aliases were expanded into 160 tensors of 10 MiB (1.6 GiB written) and
refused only for their names; 200,000 dimensions and the negative offset were accepted and refused
only for the tensor's name; the index entry ``../outside/pytorch_model.bin`` was followed and the
outside file converted, refused only because its name differed from the index's.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from nimflow.errors import InvalidWeights
from nimflow.pickle_weights import (
    MAX_DATA_PKL,
    MAX_DEPTH,
    MAX_DIMS,
    convert_pickle_file,
    convert_pickle_weights,
    read_torch_archive,
    run_converter,
)
from nimflow.testbed.tiny_model import (
    PickleWriter,
    torch_state_dict_pickle,
    write_tiny_llama,
    write_torch_checkpoint,
    write_torch_zip,
)
from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec

MARKER = b"PICKLE-MARKER-7f3a9c"
MEMORY_MIB = 256  # the converter's limit in these runs: each specific refusal proves the peak stayed below it


# --- the attacks, byte by byte -----------------------------------------------------------------------


def deep_tuple_key(depth: int) -> bytes:
    """``{((((...),),),): 1}``: CPython hashes a dict key's tuples recursively with no depth guard."""
    return PickleWriter().op(b"}").op(b")").op(b"\x85" * depth).int_(1).op(b"s").bytes_()  # EMPTY_TUPLE, TUPLE1 x depth


def size_over_memoised_string(length: int, times: int) -> bytes:
    """``torch.Size(s)`` of one memoised ``length``-character string, ``times`` times: each call
    makes a ``length``-item tuple from 5 bytes of pickle."""
    w = PickleWriter().unicode("x" * length).op(b"q\x00").global_("torch", "Size").op(b"q\x01")  # BINPUT 0, 1
    w.op(b"h\x01h\x00\x85R" * times)  # BINGET Size, BINGET s, TUPLE1, REDUCE: results stay on the stack
    return w.op(b"0}").bytes_()  # POP, an empty dict on top


def huge_memo_index(index: int) -> bytes:
    """One ``LONG_BINPUT`` with a huge index: CPython's unpickler sizes its memo array to fit it."""
    return PickleWriter().op(b"N").op(b"r" + struct.pack("<I", index)).op(b"0}").bytes_()


def tensor_pickle(name: str, storage: tuple[str, str, int], offset: int, shape: list[int], *, v3: str | None = None) -> bytes:
    """A one-tensor state dict: ``_rebuild_tensor_v2(storage, offset, shape, contiguous stride, ...)``,
    or ``_rebuild_tensor_v3`` over an untyped storage with torch dtype ``v3``."""
    storage_type, key, numel = storage
    stride, step = [], 1
    for dim in reversed(shape):
        stride.append(step)
        step *= dim
    stride.reverse()
    w = PickleWriter().op(b"}(").unicode(name).global_("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
    w.op(b"((").unicode("storage").global_("torch", storage_type).unicode(key).unicode("cpu").int_(numel).op(b"tQ")
    w.int_(offset).int_tuple(shape).int_tuple(stride).bool_(False).empty_ordered_dict()
    if v3:
        w.global_("torch", v3)
    return w.op(b"tRu").bytes_()


def _write_deep_tuple(ft: Path, tmp: Path) -> str:
    write_torch_zip(ft / "pytorch_model.bin", deep_tuple_key(1_000_000), [], compression=zipfile.ZIP_DEFLATED)
    return "nested deeper than"


def _write_size_over_string(ft: Path, tmp: Path) -> str:
    write_torch_zip(ft / "pytorch_model.bin", size_over_memoised_string(1_000_000, 180), [], compression=zipfile.ZIP_DEFLATED)
    return "torch.Size"


def _write_huge_memo_index(ft: Path, tmp: Path) -> str:
    write_torch_zip(ft / "pytorch_model.bin", huge_memo_index(2**27), [])
    return "memo index 134217728"


def _write_bzip2_aliases(ft: Path, tmp: Path) -> str:
    numel = 10 * 1024 * 1024 // 4  # one 10 MiB float32 storage of zeros: a few hundred bytes of bzip2
    entries = [(f"t{i}", "F32", "0", numel, [numel], [1]) for i in range(160)]  # 160 tensors, all of it
    write_torch_zip(ft / "pytorch_model.bin", torch_state_dict_pickle(entries), [("0", bytes(numel * 4))],
                    compression=zipfile.ZIP_BZIP2)
    return "compressed"


def _write_many_dims(ft: Path, tmp: Path) -> str:
    write_torch_zip(ft / "pytorch_model.bin", tensor_pickle("w", ("FloatStorage", "0", 1), 0, [1] * 200_000),
                    [("0", bytes(4))])
    return "200000 dimensions"


def _write_negative_offset(ft: Path, tmp: Path) -> str:
    data = tensor_pickle("w", ("UntypedStorage", "0", 8), -1, [1], v3="float32")
    write_torch_zip(ft / "pytorch_model.bin", data, [("0", bytes(8))])
    return "storage offset is -1"


def _write_index_outside(ft: Path, tmp: Path) -> str:
    outside = tmp / "outside" / "pytorch_model.bin"
    write_torch_zip(outside, tensor_pickle("marker", ("ByteStorage", "0", len(MARKER)), 0, [len(MARKER)]), [("0", MARKER)])
    (ft / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"marker": "../outside/pytorch_model.bin"}}))
    return "refused the name '../outside/pytorch_model.bin'"


ATTACKS: dict[str, Callable[[Path, Path], str]] = {
    "a million-deep tuple as a dict key": _write_deep_tuple,
    "torch.Size over a memoised string": _write_size_over_string,
    "LONG_BINPUT with a huge index": _write_huge_memo_index,
    "160 tensors aliasing one bzip2 storage": _write_bzip2_aliases,
    "a tensor with 200,000 dimensions": _write_many_dims,
    "a negative storage offset": _write_negative_offset,
    "an index entry naming ../outside": _write_index_outside,
}


# --- through `nimflow host` ------------------------------------------------------------------------------


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but ``skip``: relative name -> (size, mtime)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and skip not in path.parents:
            stat = path.stat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.testbed
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_pickle_finetune_ends_with_one_clear_line(
    attack: str, tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, docker_client: Any,
) -> None:
    base = write_tiny_llama(tmp_path / "base")
    finetune = write_tiny_llama(tmp_path / "ft", seed=3, weight_format="pickle")
    expected = ATTACKS[attack](finetune, tmp_path)
    name = f"pickle-{unique}"
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["finetune"] = {"path": str(finetune), "allow_pickle": True}
    config = write_spec(tmp_path / "spec.yaml", spec)
    cache = Path(spec["deploy"]["cache_dir"])
    before, around = _tree(tmp_path, cache), sorted(os.listdir(tmp_path.parent))

    result = subprocess.run(
        [str(Path(sys.executable).with_name("nimflow")), "host", str(config)], capture_output=True, text=True, timeout=600,
        env={**os.environ, **testbed_env, "PREFECT_API_URL": prefect_api, "NIMFLOW_PICKLE_MEMORY_MIB": str(MEMORY_MIB)},
    )

    output = result.stdout + result.stderr
    assert result.returncode == 1, (result.returncode, output[-3000:])  # a signal would be negative
    lines = [line for line in result.stderr.splitlines() if line.startswith("nimflow: ")]
    assert len(lines) == 1, output[-3000:]
    assert lines[0].startswith("nimflow: InvalidWeights: ") and expected in lines[0], lines[0]
    assert str(finetune) in lines[0] and "MiB of memory" not in lines[0]  # the check refused it, not the limit
    assert "Traceback" not in output
    assert _tree(tmp_path, cache) == before and sorted(os.listdir(tmp_path.parent)) == around
    files = _files_under(cache)
    assert sum(p.stat().st_size for p in files) < 16 * 1024 * 1024  # no inflated output
    assert not any(MARKER in p.read_bytes() for p in files)
    assert not docker_client.containers.list(all=True, filters={"label": f"nimflow.deployment={name}"})


# --- the converter itself -------------------------------------------------------------------------------


def test_build_cannot_change_how_a_later_file_is_read(tmp_path: Path) -> None:
    """BUILD on an allowed global is refused, and a valid float16 file read next in the same process
    is still float16. Before the fix BUILD set ``dtype`` on the shared ``torch.HalfStorage`` stand-in:
    that file was refused ("holds a _StorageType"), and every later file's float16 read as BF16."""
    evil = PickleWriter().global_("torch", "HalfStorage").op(b"}").unicode("dtype").unicode("BF16").op(b"sb").bytes_()
    with pytest.raises(InvalidWeights) as info:
        read_torch_archive(write_torch_zip(tmp_path / "evil.bin", evil, []))
    valid = write_torch_checkpoint(tmp_path / "valid.bin", [("w", "F16", [2], np.array([1.5, -2], "<f2").tobytes())])
    assert read_torch_archive(valid).tensors["w"].dtype == "F16"
    assert "sets the state of a _StorageType (BUILD)" in str(info.value) and str(tmp_path / "evil.bin") in str(info.value)


@pytest.mark.parametrize(("depth", "refusal"), [(MAX_DEPTH - 1, "entry 'k' is a tuple, not a tensor"),
                                                (MAX_DEPTH, f"holds objects nested deeper than {MAX_DEPTH}")])
def test_nesting_is_bounded_as_objects_are_built(tmp_path: Path, depth: int, refusal: str) -> None:
    """A dict holding a tuple MAX_DEPTH - 1 deep (MAX_DEPTH in all) is read, and refused as no tensor;
    one level more is refused as it is built, before the dict holds it."""
    data = PickleWriter().op(b"}").unicode("k").op(b")" + b"\x85" * (depth - 1) + b"s").bytes_()
    with pytest.raises(InvalidWeights, match=refusal):
        read_torch_archive(write_torch_zip(tmp_path / "nested.bin", data, []))


def test_marks_are_bounded(tmp_path: Path) -> None:
    """A million MARKs (a stack of stacks) is refused at the first one too many."""
    data = PickleWriter().op(b"(" * 1_000_000).bytes_()
    with pytest.raises(InvalidWeights, match=f"opens marks nested deeper than {MAX_DEPTH}"):
        read_torch_archive(write_torch_zip(tmp_path / "marks.bin", data, [], compression=zipfile.ZIP_DEFLATED))


@pytest.mark.parametrize(("dims", "accepted"), [(MAX_DIMS, True), (MAX_DIMS + 1, False)])
def test_dimensions_are_bounded(tmp_path: Path, dims: int, accepted: bool) -> None:
    path = write_torch_zip(tmp_path / "dims.bin", tensor_pickle("w", ("FloatStorage", "0", 1), 0, [1] * dims), [("0", bytes(4))])
    if accepted:
        assert read_torch_archive(path).tensors["w"].shape == (1,) * dims
    else:
        with pytest.raises(InvalidWeights, match=f"has {dims} dimensions; at most {MAX_DIMS}"):
            read_torch_archive(path)


def test_tensors_sharing_storage_bytes_are_refused(tmp_path: Path) -> None:
    """Aliases of a stored storage would multiply the output as compressed ones did: refused by name."""
    entries = [("a", "F32", "0", 4, [3], [1]), ("b", "F32", "0", 4, [4], [1])]
    path = write_torch_zip(tmp_path / "alias.bin", torch_state_dict_pickle(entries), [("0", bytes(16))])
    with pytest.raises(InvalidWeights, match="tensors 'a' and 'b' share bytes of storage data/0"):
        read_torch_archive(path)


def _central_records(blob: bytes) -> dict[str, int]:
    """Member name -> offset of its central directory record in a zip file's bytes."""
    records, pos = {}, blob.find(b"PK\x01\x02")
    while pos >= 0:
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", blob, pos + 28)
        records[blob[pos + 46:pos + 46 + name_length].decode()] = pos
        pos = blob.find(b"PK\x01\x02", pos + 46 + name_length + extra_length + comment_length)
    return records


def test_zip_entries_over_the_same_bytes_are_refused(tmp_path: Path) -> None:
    """Two directory entries pointing at one stored member would count its bytes twice."""
    entries = [("a", "F32", "0", 4, [4], [1]), ("b", "F32", "1", 4, [4], [1])]
    path = write_torch_zip(tmp_path / "overlap.bin", torch_state_dict_pickle(entries), [("0", bytes(16)), ("1", bytes(16))])
    blob = bytearray(path.read_bytes())
    records = _central_records(bytes(blob))
    first = struct.unpack_from("<I", blob, records["archive/data/0"] + 42)[0]
    struct.pack_into("<I", blob, records["archive/data/1"] + 42, first)  # data/1's entry now starts at data/0's
    path.write_bytes(blob)
    with pytest.raises(InvalidWeights, match="storages archive/data/0 and archive/data/1 overlap in the archive"):
        read_torch_archive(path)


def test_a_size_declared_beyond_the_file_is_refused(tmp_path: Path) -> None:
    """A member whose directory entry claims 2 GiB of a few-byte file (and a storage id to match)."""
    numel = 2**31 // 4
    path = write_torch_zip(tmp_path / "big.bin", torch_state_dict_pickle([("w", "F32", "0", numel, [numel], [1])]),
                           [("0", bytes(16))])
    blob = bytearray(path.read_bytes())
    record = _central_records(bytes(blob))["archive/data/0"]
    struct.pack_into("<II", blob, record + 20, 2**31, 2**31)  # compressed and uncompressed size
    path.write_bytes(blob)
    with pytest.raises(InvalidWeights, match=r"storage archive/data/0 declares 2147483648 bytes, more than the archive holds"):
        read_torch_archive(path)


def test_index_shards_lie_next_to_the_index(tmp_path: Path) -> None:
    src = write_tiny_llama(tmp_path / "src", weight_format="pickle")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "sub/pytorch_model.bin"}}))
    with pytest.raises(InvalidWeights, match="refused the name 'sub/pytorch_model.bin': shards lie next to the index"):
        convert_pickle_weights(src, tmp_path / "out", "binary")


def test_memory_limit_ends_the_converter_not_the_caller(tmp_path: Path) -> None:
    """A 16 MiB data.pkl of EMPTY_DICTs (16 KB deflated) would make 16 million dicts, over 1 GiB: the
    converter process reaches its 128 MiB limit and the caller gets one clear error."""
    data = b"\x80\x02" + b"}" * (MAX_DATA_PKL - 3) + b"."
    source = write_torch_zip(tmp_path / "dicts.bin", data, [], compression=zipfile.ZIP_DEFLATED)
    assert source.stat().st_size < 64 * 1024
    with pytest.raises(InvalidWeights) as info:
        convert_pickle_file(source, tmp_path / "out.safetensors", memory_mib=128)
    message = str(info.value)
    assert message.startswith(f"{source}: ") and "128 MiB" in message and "NIMFLOW_PICKLE_MEMORY_MIB" in message
    assert not list(tmp_path.glob("*out.safetensors*"))


@pytest.mark.parametrize(("code", "ended"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "was killed by SIGSEGV"),
    ("raise RuntimeError('converter bug')", "exited with status 1 (RuntimeError: converter bug)"),
])
def test_a_converter_that_dies_is_one_clear_error(tmp_path: Path, code: str, ended: str) -> None:
    """However the converter process ends without a report, the caller gets InvalidWeights naming the file."""
    source = tmp_path / "pytorch_model.bin"
    with pytest.raises(InvalidWeights) as info:
        run_converter([sys.executable, "-c", code], source, tmp_path / "out.safetensors", 256)
    message = str(info.value)
    assert message.startswith(f"{source}: the pickle converter {ended} while reading this file") and "256 MiB" in message


def test_valid_pickle_converts_in_a_bounded_child(tmp_path: Path) -> None:
    """The real conversion runs in the child and reports its peak memory, far under the limit."""
    source = write_tiny_llama(tmp_path / "src", weight_format="pickle") / "pytorch_model.bin"
    converted = convert_pickle_file(source, tmp_path / "model.safetensors", memory_mib=128)
    assert converted.tensors == tuple(read_torch_archive(source).tensors) and converted.nbytes > 0
    assert 0 < converted.peak_rss_kib < 128 * 1024
    assert load_file(tmp_path / "model.safetensors").keys() == set(converted.tensors)


def test_opcodes_torch_save_never_writes_are_refused_by_name(tmp_path: Path) -> None:
    """Protocol 4's FRAME (and anything else outside torch's weights_only set) is refused, not guessed at."""
    data = b"\x80\x04\x95" + struct.pack("<Q", 2) + b"}."
    with pytest.raises(InvalidWeights, match=r"data.pkl uses FRAME \(0x95\) at byte 2, an opcode torch.save never writes"):
        read_torch_archive(write_torch_zip(tmp_path / "frame.bin", data, []))

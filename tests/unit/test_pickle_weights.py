"""Pickle → safetensors conversion without torch and without running pickle code."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from nimflow.errors import InvalidWeights
from nimflow.pickle_weights import convert_pickle_weights, read_torch_archive
from nimflow.testbed.tiny_model import (
    PickleWriter,
    torch_state_dict_pickle,
    write_tiny_llama,
    write_torch_checkpoint,
    write_torch_zip,
)


def _floats(values: list[float], dtype: str = "<f4") -> bytes:
    return np.array(values, dtype=dtype).tobytes()


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("parameters", [True, False])
def test_round_trip_keeps_names_dtypes_and_bytes(tmp_path: Path, ordered: bool, parameters: bool) -> None:
    """Every container torch.save writes for a state dict converts to identical safetensors tensors."""
    tensors = {
        "a.weight": ("F32", [2, 3], _floats([1, 2, 3, 4, 5, 6])),
        "b.bias": ("F16", [4], np.array([0.5, -1, 2, 65504], dtype="<f2").tobytes()),
        "c.scalar": ("F32", [], _floats([3.25])),
        "d.bf16": ("BF16", [2], b"\x80\x3f\x00\x40"),  # 1.0, 2.0 in bfloat16
    }
    src = tmp_path / "src"
    write_torch_checkpoint(src / "pytorch_model.bin", [(n, d, s, b) for n, (d, s, b) in tensors.items()],
                           ordered=ordered, parameters=parameters, archive="pytorch_model")
    written = convert_pickle_weights(src, tmp_path / "out", "binary")
    assert written == {"model.safetensors": "pytorch_model.bin"}
    out = tmp_path / "out" / "model.safetensors"
    raw = _raw_tensors(out)
    assert raw == {n: (d, s, b) for n, (d, s, b) in tensors.items()}  # names, dtypes, shapes, bytes
    with safe_open(out, framework="np") as f:  # and safetensors itself reads them back the same
        assert f.get_tensor("a.weight").tolist() == [[1, 2, 3], [4, 5, 6]]
        assert f.get_tensor("b.bias").dtype == np.float16 and f.get_tensor("b.bias").tolist() == [0.5, -1, 2, 65504]
        assert f.get_tensor("c.scalar").shape == ()


def _raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, bytes) straight from a safetensors file (numpy has no bfloat16)."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], blob[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]) for k, v in header.items()}


def test_tensor_with_storage_offset(tmp_path: Path) -> None:
    """A tensor that is a slice of a larger storage takes only its own elements."""
    data = _floats([10, 11, 12, 13, 14, 15])
    w = PickleWriter().op(b"}(").unicode("tail")
    w.global_("torch._utils", "_rebuild_tensor_v2").op(b"((").unicode("storage").global_("torch", "FloatStorage")
    w.unicode("0").unicode("cpu").int_(6).op(b"tQ").int_(4).int_tuple([2]).int_tuple([1]).bool_(False)
    w.empty_ordered_dict().op(b"tRu")
    write_torch_zip(tmp_path / "src" / "model.pth", w.bytes_(), [("0", data)])
    convert_pickle_weights(tmp_path / "src", tmp_path / "out", "pickle")
    assert load_file(tmp_path / "out" / "model.safetensors")["tail"].tolist() == [14.0, 15.0]


def test_code_in_the_pickle_is_refused_without_running(tmp_path: Path) -> None:
    """A pickle that calls os.system is refused by name; the command never runs."""
    marker = tmp_path / "pwned"
    w = PickleWriter().op(b"}(").unicode("x").global_("os", "system").op(b"(").unicode(f"touch {marker}").op(b"tRu")
    path = write_torch_zip(tmp_path / "src" / "pytorch_model.bin", w.bytes_(), [])
    with pytest.raises(InvalidWeights) as info:
        read_torch_archive(path)
    message = str(info.value)
    assert str(path) in message and "os.system" in message and "refused it without executing anything" in message
    assert "Expected only tensors" in message
    assert not marker.exists()


def test_code_hidden_in_backward_hooks_is_refused(tmp_path: Path) -> None:
    """A callable smuggled into a tensor's arguments is refused like one at the top."""
    entries = [("w", "F32", "0", 1, [1], [1])]
    data = torch_state_dict_pickle(entries).replace(
        b"ccollections\nOrderedDict\n)R", b"cbuiltins\neval\n(X\x04\x00\x00\x001+1tR", 2
    )
    path = write_torch_zip(tmp_path / "evil.bin", data, [("0", _floats([1.0]))])
    with pytest.raises(InvalidWeights, match=r"builtins\.eval"):
        read_torch_archive(path)


def test_legacy_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(InvalidWeights) as info:
        read_torch_archive(path)
    message = str(info.value)
    assert str(path) in message and "legacy PyTorch pickle (not the zip format" in message
    assert "torch >= 1.6" in message and "safetensors" in message


def test_non_contiguous_tensor_is_refused(tmp_path: Path) -> None:
    path = write_torch_checkpoint(tmp_path / "t.bin", [("w.T", "F32", [2, 3], _floats([0] * 6))], strides={"w.T": [1, 2]})
    with pytest.raises(InvalidWeights) as info:
        read_torch_archive(path)
    message = str(info.value)
    assert str(path) in message and "'w.T' is not contiguous (stride [1, 2] for shape [2, 3], expected [3, 1])" in message
    assert "v.contiguous()" in message


def test_training_checkpoint_is_refused(tmp_path: Path) -> None:
    w = PickleWriter().op(b"}(").unicode("epoch").int_(3).op(b"u")
    path = write_torch_zip(tmp_path / "ckpt.pth", w.bytes_(), [])
    with pytest.raises(InvalidWeights) as info:
        read_torch_archive(path)
    assert "entry 'epoch' is a int, not a tensor" in str(info.value) and "state_dict()" in str(info.value)


def test_big_endian_archive_is_refused(tmp_path: Path) -> None:
    entries = [("w", "F32", "0", 1, [1], [1])]
    path = write_torch_zip(tmp_path / "be.bin", torch_state_dict_pickle(entries), [("0", b"\0" * 4)], byteorder="big")
    with pytest.raises(InvalidWeights, match="big-endian"):
        read_torch_archive(path)


def test_truncated_storage_is_refused(tmp_path: Path) -> None:
    entries = [("w", "F32", "0", 4, [4], [1])]
    path = write_torch_zip(tmp_path / "short.bin", torch_state_dict_pickle(entries), [("0", b"\0" * 8)])
    with pytest.raises(InvalidWeights) as info:
        read_torch_archive(path)
    assert "'w' lies outside its storage (data/0 is 8 bytes" in str(info.value) and "truncated or corrupt" in str(info.value)


def test_sharded_pickles_with_an_index_that_lies(tmp_path: Path) -> None:
    src = write_tiny_llama(tmp_path / "src", weight_format="pickle", shards=2)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "pytorch_model-00001-of-00002.bin"  # it is in shard 2
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidWeights) as info:
        convert_pickle_weights(src, tmp_path / "out", "binary")
    message = str(info.value)
    assert "pytorch_model-00002-of-00002.bin" in message and "'model.norm.weight'" in message
    assert "places in pytorch_model-00001-of-00002.bin" in message


def test_trainer_state_is_not_converted(tmp_path: Path) -> None:
    """training_args.bin next to the weights is a pickle of settings, not weights: left alone."""
    src = write_tiny_llama(tmp_path / "src", weight_format="pickle")
    w = PickleWriter().global_("transformers.training_args", "TrainingArguments").op(b")R")
    write_torch_zip(src / "training_args.bin", w.bytes_(), [])
    written = convert_pickle_weights(src, tmp_path / "out", "binary")
    assert written == {"model.safetensors": "pytorch_model.bin"}

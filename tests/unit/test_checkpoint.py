"""GPU-free weight checks: format detection, engine-dir refusal, safetensors headers, base match, digests."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from nimflow.checkpoint import (
    check_matches_base,
    check_safetensors,
    check_weights,
    detect_weight_format,
    directory_digest,
    read_config,
)
from nimflow.errors import InvalidWeights
from nimflow.testbed.tiny_model import read_safetensors_header, write_safetensors, write_tiny_llama


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A tiny, valid Llama checkpoint with one safetensors file."""
    return write_tiny_llama(tmp_path / "tiny")


def _raw_safetensors(path: Path, header: bytes, data: bytes) -> Path:
    """Write a safetensors-shaped file with an arbitrary header and data section."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# --- detect_weight_format -----------------------------------------------------------------------


def test_detects_safetensors(tiny: Path) -> None:
    """A checkpoint with *.safetensors is safetensors."""
    assert detect_weight_format(tiny) == "safetensors"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["pytorch_model.bin"], "binary"),
        (["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"], "binary"),
        (["consolidated.pt"], "pickle"),
        (["model.pth"], "pickle"),
        (["model.safetensors", "pytorch_model.bin"], "safetensors"),
        (["pytorch_model.bin", "consolidated.pt"], "binary"),
    ],
)
def test_detects_bin_and_pt(tmp_path: Path, files: list[str], expected: str) -> None:
    """bin and pt/pth weights are recognised; safetensors wins when several formats are present."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in files:
        (tmp_path / name).write_bytes(b"\0" * 16)
    assert detect_weight_format(tmp_path) == expected


def test_engine_directory_is_refused(tmp_path: Path) -> None:
    """A TensorRT-LLM engine directory is refused, naming what was found and what is expected."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "trtllm_engine").mkdir()
    (tmp_path / "trtllm_engine" / "rank0.engine").write_bytes(b"engine")
    with pytest.raises(InvalidWeights) as info:
        detect_weight_format(tmp_path)
    message = str(info.value)
    assert "TensorRT-LLM engine directory" in message
    assert "trtllm_engine/rank0.engine" in message
    assert "safetensors" in message
    assert str(tmp_path) in message


def test_engine_refused_even_with_weights_next_to_it(tiny: Path) -> None:
    """Weights next to an engine do not hide the engine: the directory is still refused."""
    (tiny / "rank0.engine").write_bytes(b"engine")
    with pytest.raises(InvalidWeights, match=r"rank0\.engine"):
        detect_weight_format(tiny)


@pytest.mark.parametrize("key", ["build_config", "pretrained_config"])
def test_engine_config_json_is_refused(tmp_path: Path, key: str) -> None:
    """A config.json written by TensorRT-LLM (build_config / pretrained_config) marks an engine dir."""
    (tmp_path / "config.json").write_text(json.dumps({key: {"max_batch_size": 8}}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(InvalidWeights) as info:
        detect_weight_format(tmp_path)
    assert "engine directory" in str(info.value)
    assert "build_config" in str(info.value)


def test_empty_directory_lists_nothing_found(tmp_path: Path) -> None:
    """An empty directory says nothing was found and what is expected."""
    with pytest.raises(InvalidWeights) as info:
        detect_weight_format(tmp_path)
    assert "found: nothing" in str(info.value)
    assert "*.safetensors" in str(info.value)


def test_directory_without_weights_lists_its_files(tmp_path: Path) -> None:
    """A directory with only side files lists them in the error."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(InvalidWeights) as info:
        detect_weight_format(tmp_path)
    assert "config.json" in str(info.value)
    assert "tokenizer.json" in str(info.value)
    assert "no weights found" in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    """A path that is not a directory is refused with the expected layout."""
    missing = tmp_path / "absent"
    with pytest.raises(InvalidWeights) as info:
        detect_weight_format(missing)
    assert str(missing) in str(info.value)
    assert "not a directory" in str(info.value)
    assert "*.safetensors" in str(info.value)


def test_bookkeeping_files_are_not_weights(tmp_path: Path) -> None:
    """Files under .cache/ are download bookkeeping, never counted as weights."""
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(InvalidWeights, match="no weights found"):
        detect_weight_format(tmp_path)


# --- check_safetensors --------------------------------------------------------------------------


def test_valid_file_counts_tensors(tiny: Path) -> None:
    """A file from write_tiny_llama passes and reports its number of tensors."""
    path = tiny / "model.safetensors"
    expected = len([k for k in read_safetensors_header(path) if k != "__metadata__"])
    assert check_safetensors(path) == expected
    assert expected == 2 * 9 + 3  # two layers of nine tensors, embeddings, norm, lm_head


def test_sharded_checkpoint_passes_check_weights(tmp_path: Path) -> None:
    """check_weights checks every shard of a sharded checkpoint."""
    directory = write_tiny_llama(tmp_path / "sharded", shards=3)
    assert len(list(directory.glob("*.safetensors"))) == 3
    assert check_weights(directory) == "safetensors"


def test_truncated_file(tiny: Path, tmp_path: Path) -> None:
    """A truncated copy is refused, saying it is truncated or corrupt."""
    source = tiny / "model.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[:-100])
    with pytest.raises(InvalidWeights) as info:
        check_safetensors(truncated)
    assert str(truncated) in str(info.value)
    assert "truncated or corrupt" in str(info.value)


def test_truncated_shard_fails_check_weights(tiny: Path) -> None:
    """check_weights finds a truncated shard in a directory."""
    path = tiny / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(InvalidWeights, match="truncated or corrupt"):
        check_weights(tiny)


def test_garbage_header(tmp_path: Path) -> None:
    """A file whose header is not JSON is refused."""
    path = _raw_safetensors(tmp_path / "garbage.safetensors", b"\xff\xfe not json at all", b"\0" * 32)
    with pytest.raises(InvalidWeights, match="header is not valid JSON"):
        check_safetensors(path)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    """A file that is not safetensors at all (huge length prefix) is refused."""
    path = tmp_path / "text.safetensors"
    path.write_bytes(b"this is just a text file, not weights at all\n")
    with pytest.raises(InvalidWeights, match="not a safetensors file"):
        check_safetensors(path)


def test_too_short(tmp_path: Path) -> None:
    """A file shorter than the length prefix is refused."""
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidWeights, match="too short"):
        check_safetensors(path)


def test_non_mapping_header(tmp_path: Path) -> None:
    """A JSON header that is not an object is refused."""
    path = _raw_safetensors(tmp_path / "list.safetensors", b"[1, 2, 3]", b"")
    with pytest.raises(InvalidWeights, match="not a mapping"):
        check_safetensors(path)


def test_missing_offsets(tmp_path: Path) -> None:
    """A tensor entry without data_offsets is refused, naming the tensor."""
    header = json.dumps({"w": {"dtype": "F16", "shape": [1]}}).encode()
    path = _raw_safetensors(tmp_path / "nooffsets.safetensors", header, b"\0\0")
    with pytest.raises(InvalidWeights, match="'w' has no valid data_offsets"):
        check_safetensors(path)


def test_trailing_bytes(tiny: Path, tmp_path: Path) -> None:
    """Bytes after the last tensor mean a corrupt file."""
    path = tmp_path / "trailing.safetensors"
    path.write_bytes((tiny / "model.safetensors").read_bytes() + b"\0" * 7)
    with pytest.raises(InvalidWeights) as info:
        check_safetensors(path)
    assert "7 bytes after the last tensor" in str(info.value)


def test_written_file_with_metadata_only(tmp_path: Path) -> None:
    """write_safetensors output with one tensor passes."""
    path = write_safetensors(tmp_path / "one.safetensors", [("w", "F32", [2, 2], b"\0" * 16)], metadata={"k": "v"})
    assert check_safetensors(path) == 1


def test_non_numeric_offsets(tmp_path: Path) -> None:
    """A header whose offsets are not numbers is refused as InvalidWeights, not a TypeError."""
    header = json.dumps({"w": {"dtype": "F16", "shape": [1], "data_offsets": ["0", "2"]}}).encode()
    path = _raw_safetensors(tmp_path / "strs.safetensors", header, b"\0\0")
    with pytest.raises(InvalidWeights):
        check_safetensors(path)


# --- check_matches_base / read_config -----------------------------------------------------------


def test_matching_configs_pass(tiny: Path) -> None:
    """A fine-tune with the base's architecture passes (extra or missing keys are not compared)."""
    base = read_config(tiny)
    finetune = {**base, "torch_dtype": "bfloat16"}
    finetune.pop("vocab_size")
    check_matches_base(finetune, base, "s3://ft/run")


def test_mismatch_names_key_and_both_values(tiny: Path) -> None:
    """A differing architecture key is named with the base and fine-tune values."""
    base = read_config(tiny)
    finetune = {**base, "hidden_size": 128, "num_hidden_layers": 5}
    with pytest.raises(InvalidWeights) as info:
        check_matches_base(finetune, base, "s3://ft/run")
    message = str(info.value)
    assert message.startswith("s3://ft/run: ")
    assert "hidden_size: base 64, fine-tune 128" in message
    assert "num_hidden_layers: base 2, fine-tune 5" in message
    assert "vocab_size" not in message


def test_read_config_missing_and_invalid(tmp_path: Path) -> None:
    """read_config refuses a missing or non-JSON config.json."""
    with pytest.raises(InvalidWeights, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidWeights, match="not valid JSON"):
        read_config(tmp_path)


# --- directory_digest ---------------------------------------------------------------------------


def test_digest_is_stable(tiny: Path, tmp_path: Path) -> None:
    """The same content gives the same digest, wherever the directory is."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    digest = directory_digest(tiny)
    assert len(digest) == 64
    assert directory_digest(tiny) == digest
    assert directory_digest(copy) == digest


def test_digest_is_content_sensitive(tiny: Path) -> None:
    """Changing one byte, renaming or adding a file changes the digest."""
    before = directory_digest(tiny)
    config = tiny / "config.json"
    config.write_text(config.read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    changed = directory_digest(tiny)
    assert changed != before
    (tiny / "generation_config.json").rename(tiny / "generation.json")
    renamed = directory_digest(tiny)
    assert renamed != changed
    (tiny / "extra.txt").write_text("x")
    assert directory_digest(tiny) != renamed


def test_digest_differs_for_different_weights(tmp_path: Path) -> None:
    """Two checkpoints with different weights (seeds) have different digests."""
    a = write_tiny_llama(tmp_path / "a", seed=1)
    b = write_tiny_llama(tmp_path / "b", seed=2)
    assert directory_digest(a) != directory_digest(b)


def test_digest_ignores_bookkeeping(tiny: Path) -> None:
    """.cache/ and .nimflow-download.json do not change the digest."""
    before = directory_digest(tiny)
    (tiny / ".cache" / "huggingface").mkdir(parents=True)
    (tiny / ".cache" / "huggingface" / "model.safetensors.lock").write_text("lock")
    (tiny / ".nimflow-download.json").write_text(json.dumps({"sha": "abc"}))
    assert directory_digest(tiny) == before

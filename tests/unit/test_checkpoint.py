"""GPU-free weight checks: format detection, engine-dir refusal, safetensors headers, base match, digests,
and fine-tune staging (every refusal, reuse of an unchanged source)."""

from __future__ import annotations

import json
import shutil
import stat
import struct
from pathlib import Path

import pytest

from nimflow.checkpoint import (
    chat_template_present,
    check_matches_base,
    check_safetensors,
    check_weights,
    detect_weight_format,
    directory_digest,
    local_checkpoint,
    model_files,
    open_to_readers,
    read_config,
    resolve_verify_api,
)
from nimflow.errors import InvalidWeights
from nimflow.finetune import stage_finetune
from nimflow.records import Checkpoint
from nimflow.spec import FinetuneSpec
from nimflow.tensor_inventory import DTYPE_SIZES
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
        (["model.pth"], "pickle"),
        (["model.safetensors", "pytorch_model.bin"], "safetensors"),
        (["pytorch_model.bin", "consolidated.pt"], "binary"),
        (["model.pth", "pytorch_model.bin"], "binary"),
    ],
)
def test_detects_bin_and_pth(tmp_path: Path, files: list[str], expected: str) -> None:
    """As TensorRT-LLM's detect_format: safetensors, then *.bin (binary), then *.pth (pickle)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in files:
        (tmp_path / name).write_bytes(b"\0" * 16)
    assert detect_weight_format(tmp_path) == expected


@pytest.mark.parametrize("layout", [["consolidated.pt"], ["weights/model.safetensors"]])
def test_pt_only_or_sub_folder_is_refused(tmp_path: Path, layout: list[str]) -> None:
    """*.pt files and weights in sub-folders are never read by TensorRT-LLM: refused, naming them."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\0" * 16)
    with pytest.raises(InvalidWeights) as info:
        detect_weight_format(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and f"found {layout[0]}" in message
    assert "*.safetensors, *.bin and *.pth at the top level" in message  # what is expected
    assert "Convert the weights to safetensors" in message  # the fix


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


# --- stage_finetune: every refusal names the file, what was found, what was expected -----------

@pytest.fixture
def base(tmp_path: Path) -> Checkpoint:
    return local_checkpoint(write_tiny_llama(tmp_path / "base"))


def _finetune(tmp_path: Path, **kwargs: object) -> Path:
    return write_tiny_llama(tmp_path / "ft", seed=7, **kwargs)  # type: ignore[arg-type]


def _rewrite_weights(
    directory: Path, change: dict[str, tuple[str, list[int]] | None], add: dict[str, tuple[str, list[int]]] | None = None
) -> None:
    """Rewrite model.safetensors with some tensors changed (dtype, shape), dropped (None) or added; zero data."""
    header = read_safetensors_header(directory / "model.safetensors")
    specs = [(n, h["dtype"], h["shape"]) for n, h in header.items() if n != "__metadata__"]
    out = []
    for name, dtype, shape in specs:
        if name in change:
            if change[name] is None:
                continue
            dtype, shape = change[name]  # type: ignore[misc]
        out.append((name, dtype, shape))
    out += [(n, d, s) for n, (d, s) in (add or {}).items()]
    meta, offset = {}, 0
    for name, dtype, shape in out:
        size = DTYPE_SIZES[dtype]
        for dim in shape:
            size *= dim
        meta[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    _raw_safetensors(directory / "model.safetensors", json.dumps(meta).encode(), b"\0" * offset)


def _refusal(ft: Path, base: Checkpoint, tmp_path: Path, **spec: object) -> str:
    with pytest.raises(InvalidWeights) as info:
        stage_finetune(FinetuneSpec(path=str(ft), **spec), base, tmp_path / "cache")  # type: ignore[arg-type]
    assert not list((tmp_path / "cache" / "finetune").glob("[0-9a-f]*"))  # nothing staged
    return str(info.value)


def test_finetune_is_staged_with_base_side_files(tmp_path: Path, base: Checkpoint) -> None:
    """The fine-tune's files are staged with the base's tokenizer where the fine-tune has none."""
    ft = _finetune(tmp_path)
    (ft / "tokenizer.json").unlink()
    weights = stage_finetune(FinetuneSpec(path=str(ft)), base, tmp_path / "cache")
    staged = Path(weights.path)
    assert weights.weight_format == "safetensors" and weights.staged_files == len(model_files(staged))
    assert (staged / "tokenizer.json").read_bytes() == (Path(base.path) / "tokenizer.json").read_bytes()
    assert (staged / "model.safetensors").read_bytes() == (ft / "model.safetensors").read_bytes()
    assert weights.digest == directory_digest(staged)


def test_unchanged_local_finetune_is_neither_copied_nor_hashed(tmp_path: Path, base: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second call finds the record: nothing copied, no file hashed; a touched file re-stages."""
    import nimflow.checkpoint as checkpoint

    ft = _finetune(tmp_path)
    first = stage_finetune(FinetuneSpec(path=str(ft)), base, tmp_path / "cache")
    hashed: list[Path] = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or real(p))
    second = stage_finetune(FinetuneSpec(path=str(ft)), base, tmp_path / "cache")
    assert second.staged_files == 0 and second.path == first.path and second.digest == first.digest
    assert hashed == []
    write_tiny_llama(ft, seed=8)  # new content: the fingerprint changes
    third = stage_finetune(FinetuneSpec(path=str(ft)), base, tmp_path / "cache")
    assert hashed and third.digest != first.digest and third.staged_files > 0


def test_damaged_staged_directory_is_staged_again(tmp_path: Path, base: Checkpoint) -> None:
    """A staged directory that lost a file is not reused: it is staged again, whole."""
    ft = _finetune(tmp_path)
    first = stage_finetune(FinetuneSpec(path=str(ft)), base, tmp_path / "cache")
    (Path(first.path) / "model.safetensors").unlink()
    again = stage_finetune(FinetuneSpec(path=str(ft)), base, tmp_path / "cache")
    assert again.staged_files > 0 and (Path(again.path) / "model.safetensors").is_file()


def test_engine_directory_as_finetune(tmp_path: Path, base: Checkpoint) -> None:
    ft = tmp_path / "engine"
    (ft / "trtllm_engine").mkdir(parents=True)
    (ft / "trtllm_engine" / "rank0.engine").write_bytes(b"\0" * 64)
    message = _refusal(ft, base, tmp_path)
    assert str(ft) in message and "TensorRT-LLM engine directory" in message and "trtllm_engine/rank0.engine" in message


def test_pickle_without_consent(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path, weight_format="pickle")
    message = _refusal(ft, base, tmp_path)
    assert str(ft) in message and "found pytorch_model.bin (PyTorch pickle)" in message
    assert "Pickles run code when loaded" in message
    assert "convert to safetensors, or set finetune.allow_pickle: true" in message


def test_pickle_with_consent_is_converted(tmp_path: Path, base: Checkpoint) -> None:
    """With allow_pickle the weights arrive as safetensors with the same names and bytes; no pickle is staged."""
    from safetensors.numpy import load_file

    ft = _finetune(tmp_path, weight_format="pickle", shards=2)
    reference = _finetune(tmp_path / "ref", shards=1)
    weights = stage_finetune(FinetuneSpec(path=str(ft), allow_pickle=True), base, tmp_path / "cache")
    staged = Path(weights.path)
    assert weights.weight_format == "binary"
    assert not list(staged.glob("*.bin")) and not (staged / "pytorch_model.bin.index.json").exists()
    assert (staged / "model.safetensors.index.json").is_file()
    converted = {}
    for shard in staged.glob("*.safetensors"):
        converted.update(load_file(shard))
    expected = load_file(reference / "model.safetensors")
    assert set(converted) == set(expected)
    assert all(converted[k].tobytes() == expected[k].tobytes() and converted[k].dtype == expected[k].dtype for k in expected)


def test_pt_only_finetune(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path)
    (ft / "model.safetensors").rename(ft / "consolidated.pt")
    message = _refusal(ft, base, tmp_path, allow_pickle=True)
    assert str(ft) in message and "found consolidated.pt" in message and "not *.pt" in message


def test_adapter_given_as_finetune(tmp_path: Path, base: Checkpoint) -> None:
    from nimflow.testbed.tiny_model import write_lora_adapter

    adapter = write_lora_adapter(tmp_path / "adapter", Path(base.path))
    message = _refusal(adapter, base, tmp_path)
    assert str(adapter) in message and "this is a LoRA adapter (found adapter_config.json)" in message
    assert "list it under lora.adapters" in message


def test_shape_mismatch(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path)
    _rewrite_weights(ft, {"model.layers.1.mlp.up_proj.weight": ("F16", [96, 64])})
    message = _refusal(ft, base, tmp_path)
    assert str(ft / "model.safetensors") in message
    assert "'model.layers.1.mlp.up_proj.weight' has shape [96, 64]" in message
    assert "has [128, 64]" in message and str(Path(base.path) / "model.safetensors") in message


def test_unexpected_tensor_names(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path)
    lora_name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_weights(ft, {}, add={lora_name: ("F16", [8, 64])})
    message = _refusal(ft, base, tmp_path)
    assert str(ft / "model.safetensors") in message and "1 tensor(s) the base model does not have" in message
    assert lora_name in message and "expected only the base's tensor names" in message
    assert "list the adapter under lora.adapters" in message


def test_missing_tensor(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path)
    _rewrite_weights(ft, {"lm_head.weight": None})
    message = _refusal(ft, base, tmp_path)
    assert str(ft) in message and "lacks 1 tensor(s) the base model has: lm_head.weight" in message
    assert "expected every tensor of the base model" in message


def test_integer_dtype(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path)
    _rewrite_weights(ft, {"model.norm.weight": ("I32", [64])})
    message = _refusal(ft, base, tmp_path)
    assert str(ft / "model.safetensors") in message and "'model.norm.weight' has dtype I32" in message
    assert "expected a floating dtype" in message and "like the base's F16" in message


def test_architecture_mismatch_names_config(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path, intermediate_size=96)
    message = _refusal(ft, base, tmp_path)
    assert str(ft / "config.json") in message and "intermediate_size: base 128, fine-tune 96" in message


def test_tokenizer_beyond_vocab_size(tmp_path: Path, base: Checkpoint) -> None:
    ft = _finetune(tmp_path)
    tokenizer = json.loads((ft / "tokenizer.json").read_text())
    vocab_size = json.loads((ft / "config.json").read_text())["vocab_size"]
    tokenizer["added_tokens"].append({"id": vocab_size + 2, "content": "<tool>", "special": True})
    (ft / "tokenizer.json").write_text(json.dumps(tokenizer))
    message = _refusal(ft, base, tmp_path)
    assert str(ft / "tokenizer.json") in message
    assert f"tokens (highest id {vocab_size + 2})" in message and f"vocab_size {vocab_size}" in message
    assert "resize_token_embeddings" in message


def test_missing_tokenizer(tmp_path: Path) -> None:
    base_dir = write_tiny_llama(tmp_path / "base")
    (base_dir / "tokenizer.json").unlink()
    base = local_checkpoint(base_dir)
    ft = _finetune(tmp_path)
    (ft / "tokenizer.json").unlink()
    message = _refusal(ft, base, tmp_path)
    assert "missing tokenizer" in message and "tokenizer.json" in message and "tokenizer.save_pretrained" in message


def test_finetune_path_that_is_not_a_directory(tmp_path: Path, base: Checkpoint) -> None:
    message = _refusal(tmp_path / "nowhere", base, tmp_path)
    assert str(tmp_path / "nowhere") in message and "not a directory" in message


# --- chat template / verify api -----------------------------------------------------------------


def test_chat_template_detection(tmp_path: Path) -> None:
    base_model = write_tiny_llama(tmp_path / "base", chat_template=False)
    assert not chat_template_present(base_model)
    assert resolve_verify_api("auto", base_model) == "completions"
    instruct = write_tiny_llama(tmp_path / "instruct")  # an instruct model's tokenizer has one
    assert chat_template_present(instruct) and resolve_verify_api("auto", instruct) == "chat"
    assert resolve_verify_api("completions", instruct) == "completions"


def test_chat_template_file(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "m", chat_template=False)
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert chat_template_present(model) and resolve_verify_api("chat", model) == "chat"


def test_chat_without_template_is_refused(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "m", chat_template=False)
    with pytest.raises(InvalidWeights) as info:
        resolve_verify_api("chat", model)
    message = str(info.value)
    assert str(model / "tokenizer_config.json") in message and "no chat_template" in message
    assert "verify.api: completions" in message


def test_a_download_is_opened_to_readers(tmp_path: Path) -> None:
    """What nimflow downloaded is read by NIM as deploy.user (default uid 1000), not as nimflow:
    huggingface_hub's 0600 ``.cache/huggingface/`` metadata in a snapshot becomes readable, a private
    directory searchable; links are left alone and nothing gains write.

    On main before this change: no such step; tests/integration/test_finetunes_and_rollouts.py's
    blue-green rollout was refused by the new permission check, naming
    ``.cache/huggingface/trees/<sha>.json (... mode -rw------- 0600)`` of the downloaded snapshot.
    """
    meta = tmp_path / "snap" / ".cache" / "huggingface" / "trees"
    meta.mkdir(parents=True)
    (meta / "sha.json").write_text("{}")
    (meta / "sha.json").chmod(0o600)
    meta.chmod(0o700)
    (tmp_path / "snap" / "config.json").write_text("{}")
    (tmp_path / "snap" / "config.json").chmod(0o640)
    (tmp_path / "target").write_text("")
    (tmp_path / "target").chmod(0o600)
    (tmp_path / "snap" / "link").symlink_to(tmp_path / "target")
    open_to_readers(tmp_path / "snap")
    assert stat.S_IMODE((meta / "sha.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(meta.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "snap" / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "target").stat().st_mode) == 0o600  # not followed

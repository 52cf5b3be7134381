"""The tiny Llama checkpoint is well-formed, consistent and deterministic."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from nimflow.testbed.tiny_model import read_safetensors_header, write_safetensors, write_tiny_llama

FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "model.safetensors"}


def _expected_shapes(cfg: dict) -> dict[str, list[int]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                   p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                   p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
                   p + "mlp.down_proj.weight": [h, inter], p + "input_layernorm.weight": [h],
                   p + "post_attention_layernorm.weight": [h]}
    return shapes


def test_files_config_tokenizer_and_tensors_agree(tmp_path: Path) -> None:
    d = write_tiny_llama(tmp_path / "m", num_layers=3)
    assert {p.name for p in d.iterdir()} == FILES
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float16" and cfg["tie_word_embeddings"] is False
    assert cfg["num_hidden_layers"] == 3 and cfg["num_key_value_heads"] == 2

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg["vocab_size"] >= 300
    assert tok.token_to_id("<s>") == cfg["bos_token_id"] and tok.token_to_id("</s>") == cfg["eos_token_id"]
    enc = tok.encode("Hello world, the model!")
    assert enc.tokens == ["<s>", "hello", "world", ",", "the", "model", "!"]
    assert tok.encode("zzzunknownzzz").tokens == ["<s>", "<unk>"]

    header = read_safetensors_header(d / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    assert {k: v["shape"] for k, v in header.items()} == _expected_shapes(cfg)
    assert {v["dtype"] for v in header.values()} == {"F16"}

    tensors = load_file(d / "model.safetensors")  # the reference reader accepts the file
    assert tensors["lm_head.weight"].dtype == np.float16
    assert all(np.isfinite(t).all() for t in tensors.values())
    assert 0 < float(np.abs(tensors["model.embed_tokens.weight"]).max()) <= 0.05
    assert np.allclose(tensors["model.norm.weight"], 1.0, atol=0.011)


def test_safetensors_offsets_cover_the_file_exactly(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m") / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8 + n - 1:8 + n] in (b"}", b" ")
    header = json.loads(raw[8:8 + n])
    ranges = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ranges[0][0] == 0 and ranges[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))

    path.write_bytes(raw + b"\0")  # one stray byte must be caught
    with pytest.raises(ValueError, match="data section"):
        read_safetensors_header(path)


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a", seed=1) / "model.safetensors"
    b = write_tiny_llama(tmp_path / "b", seed=1) / "model.safetensors"
    c = write_tiny_llama(tmp_path / "c", seed=2) / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes() and a.stat().st_size == c.stat().st_size
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype,st_dtype,width", [("bfloat16", "BF16", 2), ("float32", "F32", 4)])
def test_other_dtypes(tmp_path: Path, dtype: str, st_dtype: str, width: int) -> None:
    d = write_tiny_llama(tmp_path / "m", dtype=dtype, hidden_size=32, num_heads=2, num_kv_heads=1)
    header = read_safetensors_header(d / "model.safetensors")
    norm = header["model.norm.weight"]
    assert norm["dtype"] == st_dtype and norm["data_offsets"][1] - norm["data_offsets"][0] == 32 * width
    with safetensors.safe_open(str(d / "model.safetensors"), framework="numpy") as f:  # Rust-side validation
        assert set(f.keys()) == set(header) - {"__metadata__"}
    if dtype == "bfloat16":  # bf16 1.0 is 0x3F80; norms are 1.0 +- 0.01, so the high byte is 0x3F
        raw = (d / "model.safetensors").read_bytes()
        start = 8 + struct.unpack("<Q", raw[:8])[0] + norm["data_offsets"][0]
        assert all(raw[start + 2 * i + 1] == 0x3F for i in range(32))
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == dtype


def test_custom_vocab_sets_vocab_size(tmp_path: Path) -> None:
    d = write_tiny_llama(tmp_path / "m", vocab_words=["alpha", "beta", "alpha", "<s>", "gamma"])
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == 6  # 3 specials + 3 unique words
    assert read_safetensors_header(d / "model.safetensors")["lm_head.weight"]["shape"] == [6, 64]
    assert Tokenizer.from_file(str(d / "tokenizer.json")).encode("beta gamma").ids == [1, 4, 5]


def test_sharded_checkpoint(tmp_path: Path) -> None:
    single = load_file(write_tiny_llama(tmp_path / "one", seed=3) / "model.safetensors")
    d = write_tiny_llama(tmp_path / "two", seed=3, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert not (d / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    merged: dict[str, np.ndarray] = {}
    for name in set(index["weight_map"].values()):
        part = load_file(d / name)
        assert all(index["weight_map"][k] == name for k in part)
        merged |= part
    assert merged.keys() == single.keys()
    assert all(np.array_equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())


def test_write_safetensors_checks_payload_length(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "ok.safetensors", [("x", "F32", [2], struct.pack("<2f", 1.0, 2.0))], {"k": "v"})
    h = read_safetensors_header(tmp_path / "ok.safetensors")
    assert h["__metadata__"] == {"format": "pt", "k": "v"} and h["x"]["data_offsets"] == [0, 8]
    with pytest.raises(ValueError, match="needs 8"):
        write_safetensors(tmp_path / "bad.safetensors", [("x", "F32", [2], b"\0" * 4)])
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "bad", hidden_size=30, num_heads=4)

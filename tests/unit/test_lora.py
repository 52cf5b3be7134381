"""LoRA adapters: checks against the base model and the NIM_PEFT_SOURCE staging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nimflow.checkpoint import local_checkpoint
from nimflow.errors import InvalidWeights
from nimflow.lora import stage_adapters
from nimflow.records import Checkpoint
from nimflow.spec import LoraAdapterSpec, LoraSpec
from nimflow.testbed.tiny_model import write_lora_adapter, write_tiny_llama


@pytest.fixture
def base(tmp_path: Path) -> Checkpoint:
    return local_checkpoint(write_tiny_llama(tmp_path / "base"))


def _spec(*adapters: tuple[str, Path], **kwargs: object) -> LoraSpec:
    return LoraSpec(adapters=[LoraAdapterSpec(name=n, path=str(p)) for n, p in adapters], **kwargs)  # type: ignore[arg-type]


def _refusal(spec: LoraSpec, base: Checkpoint, tmp_path: Path) -> str:
    with pytest.raises(InvalidWeights) as info:
        stage_adapters(spec, base, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "lora").glob("[0-9a-f]*"))  # nothing staged
    return str(info.value)


def test_adapters_are_staged_in_nim_peft_source_layout(tmp_path: Path, base: Checkpoint) -> None:
    a = write_lora_adapter(tmp_path / "a", Path(base.path), rank=4)
    b = write_lora_adapter(tmp_path / "b", Path(base.path), rank=8, target_modules=("q_proj", "k_proj", "down_proj"), seed=1)
    staged, warnings = stage_adapters(_spec(("math", a), ("code", b)), base, tmp_path / "cache")
    root = Path(staged.path)
    assert root.parent == tmp_path / "cache" / "lora" and root.name == staged.digest[:32]
    assert staged.names == ["math", "code"] and staged.staged_files == 4 and warnings == []
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "code/adapter_config.json", "code/adapter_model.safetensors", "math/adapter_config.json", "math/adapter_model.safetensors",
    ]
    assert (root / "code" / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()


def test_unchanged_adapters_are_not_fetched_or_hashed(tmp_path: Path, base: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    import nimflow.checkpoint as checkpoint

    a = write_lora_adapter(tmp_path / "a", Path(base.path))
    first, _ = stage_adapters(_spec(("math", a)), base, tmp_path / "cache")
    hashed: list[Path] = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or real(p))
    second, _ = stage_adapters(_spec(("math", a)), base, tmp_path / "cache")
    assert second.staged_files == 0 and second.path == first.path and hashed == []
    write_lora_adapter(a, Path(base.path), seed=5)  # retrained: new bytes, new fingerprint
    third, _ = stage_adapters(_spec(("math", a)), base, tmp_path / "cache")
    assert third.digest != first.digest and third.staged_files == 2 and hashed


def test_rank_above_max_rank(tmp_path: Path, base: Checkpoint) -> None:
    a = write_lora_adapter(tmp_path / "a", Path(base.path), rank=48)
    message = _refusal(_spec(("big", a), max_rank=32), base, tmp_path)
    assert str(a / "adapter_config.json") in message and "rank 48" in message and "lora.max_rank 32" in message
    assert "Set lora.max_rank: 48" in message and "r <= 32" in message


def test_unknown_target_module(tmp_path: Path, base: Checkpoint) -> None:
    a = write_lora_adapter(tmp_path / "a", Path(base.path), extra_config={"target_modules": ["q_proj", "attn_qkv"]})
    message = _refusal(_spec(("x", a)), base, tmp_path)
    assert str(a / "adapter_config.json") in message and "'attn_qkv', not a module of the base model" in message
    assert "q_proj" in message and "another architecture" in message


def test_wrong_lora_shape(tmp_path: Path, base: Checkpoint) -> None:
    """An adapter trained on a model with another hidden size does not fit this base."""
    other = write_tiny_llama(tmp_path / "other", hidden_size=32)
    a = write_lora_adapter(tmp_path / "a", other, rank=4)
    message = _refusal(_spec(("x", a)), base, tmp_path)
    assert str(a / "adapter_model.safetensors") in message
    assert "model.layers.0.self_attn.q_proj.lora_A.weight has shape [4, 32], expected [4, 64]" in message
    assert "[64, 64]" in message and str(Path(base.path) / "model.safetensors") in message


def test_rank_in_config_differs_from_tensors(tmp_path: Path, base: Checkpoint) -> None:
    a = write_lora_adapter(tmp_path / "a", Path(base.path), rank=8, extra_config={"r": 4})
    message = _refusal(_spec(("x", a)), base, tmp_path)
    assert "lora_A.weight has shape [8, 64], expected [4, 64]" in message and "r=4" in message


def test_adapter_for_a_module_the_base_lacks(tmp_path: Path, base: Checkpoint) -> None:
    deeper = write_tiny_llama(tmp_path / "deeper", num_layers=3)
    a = write_lora_adapter(tmp_path / "a", deeper)
    message = _refusal(_spec(("x", a)), base, tmp_path)
    assert str(a / "adapter_model.safetensors") in message
    assert "adapts 'model.layers.2.self_attn.q_proj', which the base model" in message


def test_full_weights_are_not_an_adapter(tmp_path: Path, base: Checkpoint) -> None:
    full = write_tiny_llama(tmp_path / "full", seed=3)
    message = _refusal(_spec(("x", full)), base, tmp_path)
    assert str(full) in message and "not a LoRA adapter: no adapter_config.json" in message
    assert "model.safetensors" in message and "use finetune.path" in message


def test_pickled_adapter_needs_consent_then_is_converted(tmp_path: Path, base: Checkpoint) -> None:
    a = write_lora_adapter(tmp_path / "a", Path(base.path), weight_format="pickle")
    message = _refusal(_spec(("x", a)), base, tmp_path)
    assert str(a / "adapter_model.bin") in message and "set lora.allow_pickle: true" in message
    staged, _ = stage_adapters(_spec(("x", a), allow_pickle=True), base, tmp_path / "cache")
    reference = write_lora_adapter(tmp_path / "ref", Path(base.path))
    converted = Path(staged.path) / "x" / "adapter_model.safetensors"
    from safetensors.numpy import load_file

    got, want = load_file(converted), load_file(reference / "adapter_model.safetensors")
    assert set(got) == set(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_other_base_name_is_only_a_warning(tmp_path: Path) -> None:
    base_dir = write_tiny_llama(tmp_path / "base")
    base = Checkpoint(path=str(base_dir), identity="hf:org/base@" + "0" * 40, repo_id="org/base")
    a = write_lora_adapter(tmp_path / "a", base_dir, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    staged, warnings = stage_adapters(_spec(("x", a)), base, tmp_path / "cache")
    assert staged.staged_files == 2
    assert len(warnings) == 1 and "'meta-llama/Llama-3.1-8B'" in warnings[0] and "'org/base'" in warnings[0]
    _, again = stage_adapters(_spec(("x", a)), base, tmp_path / "cache")
    assert again == warnings  # an unchanged set still reports its warning


def test_not_lora_peft_type(tmp_path: Path, base: Checkpoint) -> None:
    a = write_lora_adapter(tmp_path / "a", Path(base.path), extra_config={"peft_type": "IA3"})
    message = _refusal(_spec(("x", a)), base, tmp_path)
    assert str(a / "adapter_config.json") in message and "peft_type is 'IA3', expected 'LORA'" in message


def test_adapter_config_written_as_peft_does(tmp_path: Path, base: Checkpoint) -> None:
    a = write_lora_adapter(tmp_path / "a", Path(base.path), rank=4, target_modules=("v_proj",))
    config = json.loads((a / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["v_proj"]

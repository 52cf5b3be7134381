"""The engine build config: what a spec asks each backend for, checked before and after the build.

Before any GPU time: :func:`check_against_model` (right after download, from the model's
``config.json``) and :func:`check_against_target` (from the probed GPUs). After the build:
:func:`read_engine_config` reads the engine's own ``trtllm_engine/config.json`` and
:func:`check_built_engine` refuses an engine whose shape differs from what was asked.

Rules follow TensorRT-LLM's own checks (``convert_checkpoint.py``, ``trtllm-build``,
``tensorrt_llm/builder.py``): heads divisible by tp, pp within the layer count, one GPU per rank,
``max_num_tokens <= max_batch_size * max_seq_len``, bf16 only on compute capability >= 8.0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from nimflow.errors import BuildFailed, ConfigError, Problem
from nimflow.gpu_identity import TargetIdentity
from nimflow.spec import BACKEND_FIELDS, BuildSpec
from nimflow.trtllm_families import (
    ConverterFamily,
    family_for,
    family_of_script,
    parallelism_problem,
    supported_architectures,
)
from nimflow.trtllm_families import convert_arguments as family_convert_arguments

#: Architectures each backend builds engines for. NIM's local builds cover the TensorRT-LLM
#: decoder families of its support matrix; trtllm-build those it has a converter for
#: (:data:`nimflow.trtllm_families.FAMILIES`).
SUPPORTED_ARCHITECTURES: dict[str, frozenset[str]] = {
    "trtllm-build": supported_architectures(),
    "nim-optimize": supported_architectures(),
    "nim-jit": supported_architectures(),
}
_ENGINE_CONFIG = Path("trtllm_engine") / "config.json"


#: ``build.env`` entries that cannot change the engine a build produces, so not in the engine key:
#: logging and progress output (NIM, TensorRT-LLM, NCCL, Hugging Face, Python) and network proxies.
#: Any other entry may steer the build (e.g. NIM_* profile or TensorRT-LLM feature switches) and is
#: hashed. Extend this list only with variables whose documentation says they affect output alone.
ENGINE_NEUTRAL_ENV: frozenset[str] = frozenset({
    "NIM_LOG_LEVEL", "NIM_JSONL_LOGGING", "TLLM_LOG_LEVEL", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "TRANSFORMERS_VERBOSITY",
    "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONUNBUFFERED", "TQDM_DISABLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
})


def normalized_build_config(build: BuildSpec) -> dict[str, Any]:
    """What the backend is asked to build: the backend, every field it honours, and the build env.

    This is the build part of the engine key. Host details (GPU ids, shm, timeout, image tag) are
    not in it, nor are env entries in :data:`ENGINE_NEUTRAL_ENV`: they do not change the engine.
    """
    fields = {name: getattr(build, name) for name in sorted(BACKEND_FIELDS[build.backend])}
    env = {name: value for name, value in sorted(build.env.items()) if name not in ENGINE_NEUTRAL_ENV}
    return {"backend": build.backend, **{k: v for k, v in fields.items() if v is not None}, "env": env}


# --- before the build ---------------------------------------------------------------------------


def check_against_model(build: BuildSpec, model_config: dict[str, Any], *, where: str) -> None:
    """Refuse a build config the model cannot be built with, before any container starts.

    Args:
        model_config: the checkpoint's ``config.json``.
        where: the checkpoint, for messages.

    Raises:
        ConfigError: every rule that fails, each naming the build field, the values and the fix.
    """
    problems: list[Problem] = []
    architecture = (model_config.get("architectures") or ["(none)"])[0]
    custom_converter = build.backend == "trtllm-build" and build.convert_script
    if architecture not in SUPPORTED_ARCHITECTURES[build.backend] and not custom_converter:
        problems.append(Problem(
            "build.backend",
            f"{where} is a {architecture}; the {build.backend} backend builds {sorted(SUPPORTED_ARCHITECTURES[build.backend])}. "
            "Serve it without `build` (NIM's vLLM backend)" + (", or set build.convert_script" if build.backend == "trtllm-build" else ""),
        ))
    heads = model_config.get("num_attention_heads")
    if isinstance(heads, int) and heads % build.tp_size:
        problems.append(Problem(
            "build.tp_size",
            f"num_attention_heads of {where} is {heads}, not divisible by tp_size {build.tp_size}; use one of {_divisors(heads)}",
        ))
    kv_heads = model_config.get("num_key_value_heads", heads)
    # TensorRT-LLM splits KV heads over the ranks, or duplicates them when tp is a multiple of them.
    if isinstance(kv_heads, int) and kv_heads % build.tp_size and build.tp_size % kv_heads:
        problems.append(Problem(
            "build.tp_size",
            f"num_key_value_heads of {where} is {kv_heads}: tp_size {build.tp_size} can neither split nor duplicate "
            f"them; use a divisor or a multiple of {kv_heads}",
        ))
    family = converter_family(build, model_config) if build.backend == "trtllm-build" else None
    if family is not None:
        limit = parallelism_problem(family, convert_script(build, model_config), build.tp_size, build.pp_size)
        if limit is not None:
            problems.append(limit)
    layers = model_config.get("num_hidden_layers")
    if isinstance(layers, int) and build.pp_size > layers:
        problems.append(Problem("build.pp_size", f"pp_size {build.pp_size} exceeds the {layers} layers of {where}"))
    if problems:
        raise ConfigError("hosting spec", problems)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


def check_against_target(build: BuildSpec, target: TargetIdentity) -> None:
    """Refuse a build the probed GPUs cannot run: wrong GPU count, bf16 before compute capability 8.0.

    Raises:
        ConfigError: naming the field, the values and the fix.
    """
    problems: list[Problem] = []
    if len(target.gpus) != build.world_size:
        problems.append(Problem(
            "build.gpus",
            f"the build container sees {len(target.gpus)} GPU(s) ({target.gpu.name}) but tp_size x pp_size = "
            f"{build.world_size}; give exactly one GPU per rank",
        ))
    major = _major(target.gpu.compute_capability)
    if build.dtype == "bfloat16" and major is not None and major < 8:
        problems.append(Problem(
            "build.dtype",
            f"bfloat16 needs compute capability >= 8.0; {target.gpu.describe()} has {target.gpu.compute_capability}: "
            "use float16 or a newer GPU",
        ))
    if problems:
        raise ConfigError("hosting spec", problems)


def _major(capability: str) -> int | None:
    try:
        return int(capability.split(".", 1)[0])
    except ValueError:
        return None


# --- what each backend is given -----------------------------------------------------------------


def render_nim_optimize_config(build: BuildSpec) -> str:
    """The ``nim-optimize --build_config`` YAML: exactly the fields nim-optimize honours."""
    config = {name: getattr(build, name) for name in _ordered(BACKEND_FIELDS["nim-optimize"])}
    return yaml.safe_dump(config, sort_keys=False)


def jit_environment(build: BuildSpec) -> dict[str, str]:
    """The NIM variables that shape a JIT build (NIM_FT_MODEL start-up)."""
    env = {"NIM_TENSOR_PARALLEL_SIZE": str(build.tp_size), "NIM_PIPELINE_PARALLEL_SIZE": str(build.pp_size)}
    if build.max_seq_len is not None:
        env["NIM_MAX_MODEL_LEN"] = str(build.max_seq_len)
    return env


def converter_family(build: BuildSpec, model_config: dict[str, Any]) -> ConverterFamily | None:
    """The converter family of this build: from ``build.convert_script``'s directory when set, else
    from the checkpoint's architecture; None for a custom script outside the table."""
    if build.convert_script:
        return family_of_script(build.convert_script)
    return family_for((model_config.get("architectures") or [""])[0])


def convert_script(build: BuildSpec, model_config: dict[str, Any], found: str | None = None) -> str:
    """The ``convert_checkpoint.py`` to run in the TensorRT-LLM image for this checkpoint.

    Args:
        found: where the image probe found the family's script (:mod:`nimflow.image_probe`); None:
            the 0.18+ layout (``examples/models/core/<dir>``), as the engine key records it.

    Raises:
        ConfigError: no ``build.convert_script`` and the architecture has no converter in the table.
    """
    if build.convert_script:
        return build.convert_script
    family = converter_family(build, model_config)
    if family is None:
        architecture = (model_config.get("architectures") or ["(none)"])[0]
        raise ConfigError("hosting spec", [Problem(
            "build.convert_script", f"no TensorRT-LLM converter is known for {architecture}; set build.convert_script")])
    return found or family.script()


def convert_arguments(build: BuildSpec, model_config: dict[str, Any], model_dir: str, checkpoint_dir: str) -> list[str]:
    """``convert_checkpoint.py`` flags, as the family's script names them (dtype and the mapping are fixed here).

    A custom ``build.convert_script`` outside the table gets the llama-style flags most converters take.

    Raises:
        ConfigError: the family's script cannot convert the spec's tp_size x pp_size.
    """
    family = converter_family(build, model_config)
    if family is None:
        return [
            "--model_dir", model_dir, "--output_dir", checkpoint_dir,
            "--dtype", str(build.dtype), "--tp_size", str(build.tp_size), "--pp_size", str(build.pp_size),
        ]
    return family_convert_arguments(family, build, model_dir, checkpoint_dir)


def trtllm_build_arguments(build: BuildSpec, checkpoint_dir: str, engine_dir: str, timing_cache: str) -> list[str]:
    """``trtllm-build`` flags: every limit explicit (its defaults changed between releases)."""
    return [
        "--checkpoint_dir", checkpoint_dir, "--output_dir", engine_dir,
        "--max_batch_size", str(build.max_batch_size),
        "--max_input_len", str(build.max_seq_len),
        "--max_seq_len", str(build.max_seq_len),
        "--max_num_tokens", str(build.max_num_tokens),
        "--output_timing_cache", timing_cache,
    ]


def _ordered(fields: frozenset[str]) -> list[str]:
    order = ["dtype", "tp_size", "pp_size", "max_seq_len", "max_batch_size", "max_num_tokens"]
    return [name for name in order if name in fields]


# --- after the build ----------------------------------------------------------------------------


def read_engine_config(engine_dir: Path) -> dict[str, Any]:
    """What was actually built, from the engine's own ``trtllm_engine/config.json``.

    Returns:
        ``version``, ``dtype``, ``tp_size``, ``pp_size``, ``max_batch_size``, ``max_seq_len``,
        ``max_num_tokens`` and ``architecture`` (values as the engine records them).

    Raises:
        BuildFailed: the file is missing or unreadable, lacks ``version`` (engines from before
            TensorRT-LLM 0.8), or a rank file is missing.
    """
    path = engine_dir / _ENGINE_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BuildFailed(f"{path}: cannot read the engine config ({exc}); the build output is incomplete") from None
    pretrained = config.get("pretrained_config") or {}
    mapping = pretrained.get("mapping") or {}
    build_config = config.get("build_config") or {}
    built = {
        "version": config.get("version"),
        "architecture": pretrained.get("architecture"),
        "dtype": pretrained.get("dtype"),
        "tp_size": mapping.get("tp_size", 1),
        "pp_size": mapping.get("pp_size", 1),
        "max_batch_size": build_config.get("max_batch_size"),
        "max_seq_len": build_config.get("max_seq_len"),
        "max_num_tokens": build_config.get("max_num_tokens"),
    }
    if not built["version"]:
        raise BuildFailed(f"{path}: no `version`; engines from TensorRT-LLM before 0.8 cannot be served by NIM")
    world = int(built["tp_size"]) * int(built["pp_size"])
    missing = [f"rank{r}.engine" for r in range(world) if not (path.parent / f"rank{r}.engine").is_file()]
    if missing:
        raise BuildFailed(f"{path.parent}: tp_size x pp_size = {world} but {', '.join(missing)} missing; the build is incomplete")
    return built


def check_built_engine(build: BuildSpec, built: dict[str, Any], *, trtllm_version: str | None) -> None:
    """Refuse an engine whose shape differs from what the spec asked for.

    Raises:
        BuildFailed: naming every field that differs, with the spec's and the engine's values.
    """
    asked = {name: getattr(build, name) for name in _ordered(BACKEND_FIELDS[build.backend])}
    differences = [
        f"{name}: spec {value}, engine {built.get(name)}"
        for name, value in asked.items()
        if value is not None and str(built.get(name)) != str(value)
    ]
    if trtllm_version and built.get("version") != trtllm_version:
        differences.append(f"TensorRT-LLM version: image {trtllm_version}, engine {built.get('version')}")
    if differences:
        raise BuildFailed(
            f"the {build.backend} build produced an engine that differs from the spec ({'; '.join(differences)}) "
            f"according to its {_ENGINE_CONFIG}; the backend ignored or clipped a setting: fix the spec or the image"
        )

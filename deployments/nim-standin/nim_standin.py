#!/usr/bin/python3
"""*** STAND-IN: NOT NVIDIA NIM, NOT TensorRT-LLM, NOT nvidia-smi ***

A CPU-only stand-in for the GPU-only NVIDIA NIM for LLMs container (and for the TensorRT-LLM
build tools and ``nvidia-smi``), for CPU test beds with no GPU and no registry.

It runs NO model and builds NO TensorRT plan: answers are canned echoes naming the weights served
(``[NIM stand-in] <model> (weights <digest16>[+lora <digest16>]) received: <text>``), "engines" are small files
starting with ``NIMSTANDIN-ENGINE``, the GPUs are fake (``NIMSTANDIN_GPU``). What it copies is the
*contract*, as strictly as the real tools: where NIM / TensorRT-LLM / TensorRT refuse or fail, it
fails the same way with their error text. Python 3.11 standard library only. Programs (chosen by
``basename(argv[0])``, or by a first argument ``nim_standin.py <program> ...``):

* ``start-server`` (also ``serve``/``nim-run``): OpenAI-compatible HTTP on ``$NIM_SERVER_PORT``
  (8000): ``/v1/health/live``, ``/v1/health/ready`` (503 until loaded), ``/v1/models``,
  ``/v1/chat/completions``, ``/v1/completions``, ``/v1/metrics``. Serves ``NIM_MODEL_NAME`` (an HF
  directory -> "vLLM backend", a directory with ``trtllm_engine/`` -> "TensorRT-LLM backend", or a
  name), a built ``NIM_MODEL_PROFILE``, or JIT-builds ``NIM_FT_MODEL`` into
  ``$NIM_CACHE_PATH/local_cache/<NIM_CUSTOM_MODEL_NAME>`` + ``local_manifest.yaml``. Engines are
  checked against the fake GPU and the TensorRT-LLM version before listening, like TensorRT
  deserialising a plan (NVIDIA/TensorRT-LLM issue #3031).
  Weights are checked at load as vLLM / TensorRT-LLM load them (safetensors headers only), chat
  needs a chat template, ``NIM_PEFT_SOURCE`` LoRA adapters are served and checked, a model name is
  looked up in the bundled manifest (/etc/nim/config/model_manifest.yaml).
* ``nim-serve`` (NIM 2.x image): serves ``NIM_MODEL_PATH`` (absolute dir) or the bundled model;
  answers ``/v1/version`` and ``/v1/metadata``; no TensorRT-LLM engines.
* ``nim-optimize --model_dir D --build_config Y --output_engine_dir O``: the NIM engine layout.
* ``list-model-profiles``: the fake GPUs (SYSTEM INFO) and the locally built profiles.
* ``convert_checkpoint.py`` (TensorRT-LLM ``examples/models/core/<dir>/convert_checkpoint.py``, one
  per family: the directory it is run from picks llama, qwen, gemma or phi, each with that script's own
  arguments) and ``trtllm-build`` (``tensorrt_llm/commands/build.py``): the two-step TensorRT-LLM build.
* ``nvidia-smi``: ``--query-gpu=... --format=csv[,noheader][,nounits]`` and ``-L`` for the fake GPUs.

Stand-in-only knobs: ``NIMSTANDIN_GPU`` ("NAME,COMPUTE_CAP,PCI_DEVICE_ID"), ``NIMSTANDIN_GPU_COUNT``,
``NIMSTANDIN_GPU_MEMORY_MIB``, ``NIMSTANDIN_BUILD_SECONDS``, ``NIMSTANDIN_BUILD_FAILURE``,
``NIMSTANDIN_DETERMINISTIC_BUILD``, ``NIMSTANDIN_READY_DELAY``, ``NIMSTANDIN_IGNORE_MODEL``,
``NIMSTANDIN_MODELS_ROOT`` (see deployments/nim-standin/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

STANDIN_VERSION = "standin-0.2"
#: The TensorRT-LLM version this stand-in reports when no ``tensorrt_llm`` dist-info is on
#: sys.path (the image carries one; ``nimflow.testbed.nim_image`` can build variants).
STANDIN_TRTLLM_VERSION = "0.0.0+standin"
ENGINE_MAGIC = b"NIMSTANDIN-ENGINE\n"
TIMING_CACHE_MAGIC = b"NIMSTANDIN-TIMING-CACHE\n"
#: What TRT-LLM ``ModelWeightsLoader.detect_format`` accepts, top level only (not ``*.pt``).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
DEFAULT_MODEL = "meta/llama-3.1-8b-instruct"
#: Where NIM 1.x (1.1.0 docs) keeps the bundled manifest. Later NIM docs name
#: /opt/nim/etc/default/model_manifest.yaml; a stand-in image built that way says so in
#: ``NIMSTANDIN_MANIFEST_PATH`` (its image ENV), and only that file is read: no public NIM document
#: describes a variable that redirects NIM to another manifest (``NIM_MANIFEST_PATH`` is ignored).
MANIFEST_PATH = "/etc/nim/config/model_manifest.yaml"
#: The NIM 2.x release this stand-in reports on /v1/version (2.x mode only).
STANDIN_NIM2_RELEASE = "2.0.0+standin"
#: NIM's default NIM_MAX_LORA_RANK.
DEFAULT_MAX_LORA_RANK = 32
#: NIM 2.x: vLLM's own default ``--max-lora-rank`` (vLLM ``LoRAConfig.max_lora_rank = 16``). The 2.x docs
#: give LoRA as vLLM options ("NIM passes the following LoRA-related flags to vLLM: --enable-lora,
#: --max-loras, --max-cpu-loras, --max-lora-rank", advanced-use-cases/finetune-lora.html) and say
#: "many 1.x variables have been removed" (reference/1.x-migration-guide.html): strictest reading,
#: NIM_MAX_LORA_RANK is not read by 2.x, and the rank comes from the vLLM option or its default.
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: Late NIM 1.x: "The default PyTorch TRT-LLM backend does not support fine-tuned models." The
#: fine-tune docs (ft-support.html) set both of these to 1; the stand-in (strictest documented
#: variant, every 1.x) refuses to serve a custom TensorRT-LLM engine or NIM_FT_MODEL without them.
LEGACY_BACKEND_ENV = ("NIM_USE_TRTLLM_LEGACY_BACKEND", "NIM_DISABLE_TRTLLM_PYTORCH_RT")
#: NIM's start-up check of its cache (NVIDIA/nim-deploy issue 16, NIM 1.0 on a read-only volume):
#: the frames and text it prints before exiting.
CACHE_CHECK_FRAMES = (
    '  File "/usr/local/bin/nim-llm-check-cache-env", line 8, in <module>\n    sys.exit(check_cache_dir())\n'
    '  File "/usr/local/lib/python3.10/dist-packages/vllm_nvext/utils/caches.py", line 29, in check_cache_dir\n'
    '    raise RuntimeError(f"Unable to write to NIM_CACHE_PATH ({cache_path})")')
#: The bundled model's config (Llama 3.1 8B): what LoRA adapters for it are checked against.
BUNDLED_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
#: The image's /etc/nim/config/model_manifest.yaml (NIM model_manifest v1 format, with its YAML
#: tags). Also used on the host when that file is absent. Not real profiles: stand-in ids.
BUNDLED_MANIFEST = """\
# NIM STAND-IN bundled manifest (model_manifest v1 format; not NVIDIA's profiles)
7a8c5e0f1d2b3c4a5968778695a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6:
  model: meta/llama-3.1-8b-instruct
  release: "1.3.0"
  tags:
    llm_engine: vllm
    precision: bf16
    tp: "1"
    pp: "1"
    feat_lora: "true"
    feat_lora_max_rank: "32"
  workspace: !workspace
    components:
      - dst: ""
        src:
          files:
            - !name config.json
            - !name tokenizer.json
            - !name tokenizer_config.json
            - !name model-00001-of-00004.safetensors
b1c2d3e4f5a6978877665544332211ffeeddccbbaa99887766554433221100ff:
  model: meta/llama-3.1-8b-instruct
  release: "1.3.0"
  tags:
    llm_engine: tensorrt_llm
    precision: bf16
    tp: "1"
    pp: "1"
    gpu: H100
    gpu_device: "2330:10de"
    profile: throughput
    feat_lora: "false"
    trtllm_buildable: "false"
  workspace: !workspace
    components:
      - dst: trtllm_engine
        src:
          files:
            - !name config.json
            - !name rank0.engine
"""
_SECRET_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.I)

# Fake GPUs: clearly not real unless a test asks for a real identity.
DEFAULT_GPU = "NIMFLOW STAND-IN FAKE GPU (NOT REAL),0.0,0x0000FFFF"
DEFAULT_GPU_MEMORY_MIB = 81559
STANDIN_DRIVER_VERSION = "000.00.00"  # not a real driver: nvidia-smi's driver_version field
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")
NO_TORCH_DRIVER = ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an "
                   "NVIDIA GPU and installed a driver from http://www.nvidia.com/Download/index.aspx")

# TensorRT-LLM defaults (BuildConfig in tensorrt_llm/builder.py, PluginConfig in tensorrt_llm/plugin).
DEFAULT_MAX_BATCH_SIZE = 2048
DEFAULT_MAX_INPUT_LEN = 1024
DEFAULT_MAX_NUM_TOKENS = 8192
DEFAULT_TOKENS_PER_BLOCK = 32
KV_CACHE_TYPES = ("continuous", "paged", "disabled")
BUILD_FAILED = "Engine building failed, please check error log."
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")  # what examples/.../llama converts
# transformers' LlamaConfig defaults: a config.json without a field gets these, as in real loads.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0}

#: NIMSTANDIN_BUILD_FAILURE -> (stderr lines, exit code of a standalone build). ``{arch}`` is
#: filled in. Texts: TensorRT / TensorRT-LLM errors as reported in NVIDIA/TensorRT-LLM issues.
BUILD_FAILURES: dict[str, tuple[tuple[str, ...], int]] = {
    "gpu-oom": ((
        "[TRT] [E] 2: [virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory "
        "(no further information)",
        "[TRT] [E] Requested amount of GPU memory (17179869184 bytes) could not be allocated. "
        "There may not be enough free memory for allocation to succeed."), 1),
    "host-oom": (("Killed",), 137),
    "cuda-init": ((
        "RuntimeError: [TensorRT-LLM][ERROR] CUDA runtime error in cudaMemGetInfo(&free, &total): "
        "unknown error (/src/tensorrt_llm/cpp/tensorrt_llm/runtime/tllmRuntime.cpp:123)",), 1),
    "nccl": ((
        "RuntimeError: NCCL error in: /src/tensorrt_llm/cpp/tensorrt_llm/plugins/ncclPlugin/"
        "allreducePlugin.cpp:512, unhandled system error",), 1),
    "unsupported-arch": (("ValueError: Unsupported model architecture: {arch}",), 1),
}


class StandinError(Exception):
    """A failure reported like the real program does: ``pre`` lines (e.g. ``[TRT] [E]``), a
    traceback-looking block, then ``Type: message``; exit 1."""

    def __init__(self, exc_type: str, message: str, where: str = "",
                 pre: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(message)
        self.exc_type, self.where, self.pre = exc_type, where, tuple(pre)


class BuildError(Exception):
    """An engine build that failed while building: ``lines`` then BUILD_FAILED on stderr."""

    def __init__(self, lines: tuple[str, ...] | list[str], code: int = 1) -> None:
        super().__init__(lines[-1] if lines else BUILD_FAILED)
        self.lines, self.code = tuple(lines), code


class _Shutdown(BaseException):
    """Raised from the SIGTERM/SIGINT handler to unwind whatever the main thread is doing."""


# ----------------------------------------------------------------------------------------- logging
def log(msg: str, level: str = "INFO") -> None:
    """One log line on stdout, flushed at once so ``docker logs`` shows it live."""
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if os.environ.get("NIM_JSONL_LOGGING") == "1":
        line = json.dumps({"level": level, "time": ts, "logger": "nim_standin", "message": msg})
    else:
        line = f"{level} {ts} nim_standin] {msg}"
    print(line, flush=True)


def log_warning(msg: str) -> None:
    log(msg, "WARNING")


def tllm_log(msg: str, severity: str = "I", source: str = "TRT-LLM") -> None:
    """A TensorRT-LLM logger line (``[TRT-LLM] [W] ...``; ``source="TRT"``: TensorRT's own) for the builders."""
    ts = time.strftime("%m/%d/%Y-%H:%M:%S", time.gmtime())
    print(f"[{ts}] [{source}] [{severity}] {msg}", flush=True)


def tllm_warning(msg: str) -> None:
    tllm_log(msg, "W")


def fail(err: StandinError) -> int:
    """Print ``err`` to stderr the way a crashing NIM / TensorRT-LLM program does; return 1."""
    for line in err.pre:
        print(line, file=sys.stderr)
    if err.where:  # mimic the frames that end a real TRT-LLM/NIM traceback
        print("Traceback (most recent call last):\n" + err.where, file=sys.stderr)
    print(f"{err.exc_type}: {err}", file=sys.stderr, flush=True)
    return 1


def build_failed(err: BuildError) -> int:
    """Print a failed build's lines and TensorRT-LLM's closing line to stderr; return its code."""
    for line in err.lines:
        print(line, file=sys.stderr)
    print(BUILD_FAILED, file=sys.stderr, flush=True)
    return err.code


def safe_env_summary() -> str:
    """The NIM_* settings for the start-up log; never the value of anything secret-looking."""
    parts = []
    for name in sorted(os.environ):
        if name.startswith(("NIM_", "NIMSTANDIN_")) or name in ("NGC_API_KEY", "HF_TOKEN"):
            value = "<redacted>" if _SECRET_RE.search(name) else os.environ[name]
            parts.append(f"{name}={value}")
    return " ".join(parts) or "(none)"


def hms(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(seconds, 0.0)))


# ------------------------------------------------------------------------------------ tiny YAML
def _scalar(text: str) -> Any:
    """A YAML scalar: quoted string, int, float, bool, null or a plain string."""
    text = text.strip()
    if text.startswith("{") and text.endswith("}"):  # one-line flow mapping: {a: 1, b: "x"}
        pairs = (item.partition(":") for item in text[1:-1].split(",") if ":" in item)
        return {str(_scalar(k)): _scalar(v) for k, _, v in pairs}
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _strip_comment(line: str) -> str:
    """Drop a ``# comment`` that is not inside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def parse_yaml(text: str) -> dict[str, Any]:
    """Parse block mappings (``key: value`` / nested ``key:``) - enough for build configs and
    NIM v1 manifests. Lists, anchors and tags are kept as raw strings or skipped."""
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict[str, Any]]] = [(-1, root)]
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if not line.strip() or line.lstrip().startswith("-") or ":" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        key = str(_scalar(key))
        if value.strip():
            parent[key] = _scalar(value)
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root



# ----------------------------------------------------------------------------- fake GPUs, versions
_GPU_RE = re.compile(r"^(?P<name>.*\S)\s*,\s*(?P<cc>\d+\.\d+)\s*,\s*(?P<pci>0[xX][0-9A-Fa-f]{8})\s*$")


def fake_gpu() -> dict[str, str]:
    """The fake GPU model from ``NIMSTANDIN_GPU`` ("NAME,COMPUTE_CAP,PCI_DEVICE_ID", in the order
    and format ``nvidia-smi --query-gpu=name,compute_cap,pci.device_id --format=csv,noheader``
    prints them). Every visible fake GPU is this model."""
    spec = os.environ.get("NIMSTANDIN_GPU") or DEFAULT_GPU
    m = _GPU_RE.match(spec)
    if not m:
        raise StandinError("ValueError", f"NIMSTANDIN_GPU={spec!r} is not NAME,COMPUTE_CAP,PCI_DEVICE_ID "
                           "(e.g. 'NVIDIA H100 80GB HBM3,9.0,0x233010DE') [NIM stand-in setting]")
    return {"name": m["name"], "compute_cap": m["cc"], "pci_device_id": "0x" + m["pci"][2:].upper()}


def gpu_count() -> int:
    """How many fake GPUs are visible (``NIMSTANDIN_GPU_COUNT``, default 1; 0 = no driver)."""
    raw = os.environ.get("NIMSTANDIN_GPU_COUNT", "1").strip() or "1"
    if not raw.isdigit():
        raise StandinError("ValueError", f"NIMSTANDIN_GPU_COUNT={raw!r} must be an integer >= 0 "
                           "[NIM stand-in setting]")
    return int(raw)


def gpu_memory_mib() -> int:
    raw = os.environ.get("NIMSTANDIN_GPU_MEMORY_MIB", str(DEFAULT_GPU_MEMORY_MIB)).strip()
    if not raw.isdigit():
        raise StandinError("ValueError", f"NIMSTANDIN_GPU_MEMORY_MIB={raw!r} must be an integer "
                           "[NIM stand-in setting]")
    return int(raw)


def gpu_uuid(gpu: dict[str, str], index: int) -> str:
    """A stable fake ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` per (model, index)."""
    h = hashlib.sha256(f"nimstandin|{gpu['name']}|{gpu['pci_device_id']}|{index}".encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def gpu_device_tag(gpu: dict[str, str]) -> str:
    """NIM's ``gpu_device`` tag: ``<device>:<vendor>`` in lower case, 0x233010DE -> 2330:10de."""
    pci = gpu["pci_device_id"][2:].lower()
    return f"{pci[:4]}:{pci[4:]}"


def gpu_short_name(gpu: dict[str, str]) -> str:
    """NIM's ``gpu`` tag: the product without vendor and variant, "NVIDIA H100 80GB HBM3" -> H100."""
    words = gpu["name"].split()
    if len(words) > 1 and words[0].upper() == "NVIDIA":
        words = words[1:]
    return words[0].split("-")[0] if words else "unknown"


def _cc(value: str) -> tuple[int, int]:
    major, _, minor = str(value).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return 0, 0


def trtllm_version() -> str:
    """The TensorRT-LLM version "installed" here: the ``tensorrt_llm`` dist-info the image carries,
    read like real tools read it (package metadata; importing tensorrt_llm would need libcuda)."""
    try:
        from importlib import metadata
        return metadata.version("tensorrt_llm")
    except Exception:  # PackageNotFoundError: on the host, outside the image
        return STANDIN_TRTLLM_VERSION


def release_before(version: str, release: tuple[int, int]) -> bool:
    """Whether a TensorRT-LLM version is a release older than ``release`` (``0.11.0`` < (0, 12)); the
    stand-in's own version (a ``+standin`` local label) counts as the newest."""
    m = re.match(r"^(\d+)\.(\d+)", version)
    return bool(m) and "+standin" not in version and (int(m.group(1)), int(m.group(2))) < release


# ------------------------------------------------------------------------------------ nvidia-smi
SMI_FIELDS = ("index", "name", "compute_cap", "pci.device_id", "memory.total", "uuid", "driver_version")
SMI_HEADERS = {"memory.total": "memory.total [MiB]"}


def nvidia_smi(argv: list[str]) -> int:
    """``nvidia-smi`` for the fake GPUs: ``--query-gpu=F1,F2 --format=csv[,noheader][,nounits]``,
    ``-L``, or a short summary. No driver (``NIMSTANDIN_GPU_COUNT=0``) exits 9 like the real one."""
    query: str | None = None
    fmt: str | None = None
    list_gpus = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--query-gpu="):
            query = arg.split("=", 1)[1]
        elif arg == "--query-gpu" and args:
            query = args.pop(0)
        elif arg.startswith("--format="):
            fmt = arg.split("=", 1)[1]
        elif arg == "--format" and args:
            fmt = args.pop(0)
        elif arg in ("-L", "--list-gpus"):
            list_gpus = True
        elif arg in ("-h", "--help"):
            print("NVIDIA System Management Interface -- NIM STAND-IN (fake GPUs, not real)\n"
                  "    nvidia-smi --query-gpu=FIELDS --format=csv[,noheader][,nounits]\n"
                  f"    FIELDS: {', '.join(SMI_FIELDS)}\n    nvidia-smi -L")
            return 0
        else:
            print("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.",
                  file=sys.stderr)
            return 2
    fields: list[str] = []
    options: set[str] = set()
    if query is not None:
        fields = [f.strip() for f in query.split(",") if f.strip()]
        for field in fields:
            if field not in SMI_FIELDS:
                print(f'Field "{field}" is not a valid field to query.', file=sys.stderr)
                return 2
        if not fields:
            print('Field "" is not a valid field to query.', file=sys.stderr)
            return 2
        options = {o.strip() for o in (fmt or "").split(",") if o.strip()}
        if "csv" not in options or options - {"csv", "noheader", "nounits"}:
            print(f'"--format" must be csv with optional noheader,nounits (got {fmt!r}). '
                  "Please run 'nvidia-smi -h' for help.", file=sys.stderr)
            return 2
    try:
        gpu, count, mem = fake_gpu(), gpu_count(), gpu_memory_mib()
    except StandinError as err:
        print(f"{err.exc_type}: {err}", file=sys.stderr)
        return 2
    if count == 0:
        print(NO_DRIVER, flush=True)
        return 9
    if list_gpus:
        for i in range(count):
            print(f"GPU {i}: {gpu['name']} (UUID: {gpu_uuid(gpu, i)})")
        return 0
    if query is None:
        print(f"NVIDIA-SMI (NIM STAND-IN: fake GPUs, not real)   Driver Version: {STANDIN_DRIVER_VERSION}")
        for i in range(count):
            print(f"| {i}  {gpu['name']}  compute {gpu['compute_cap']}  {gpu['pci_device_id']}  "
                  f"0MiB / {mem}MiB |")
        return 0
    units = "nounits" not in options
    if "noheader" not in options:
        print(", ".join(SMI_HEADERS.get(f, f) for f in fields))
    for i in range(count):
        values = {"index": str(i), "name": gpu["name"], "compute_cap": gpu["compute_cap"],
                  "pci.device_id": gpu["pci_device_id"], "uuid": gpu_uuid(gpu, i),
                  "memory.total": f"{mem} MiB" if units else str(mem),
                  "driver_version": STANDIN_DRIVER_VERSION}
        print(", ".join(values[f] for f in fields))
    return 0


# ------------------------------------------------------------------------------ model directories
def weight_files(model_dir: Path, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> list[Path]:
    """Top-level weight files, sorted (the order they are hashed in)."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(suffixes))


def hash_files(paths: list[Path], root: Path) -> str:
    """sha256 over (relative name, size, content) of each file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def detect_format(model_dir: Path) -> None:
    """Mirror TRT-LLM ``ModelWeightsLoader.detect_format``: a checkpoint directory must hold
    safetensors/pickle/binary files, so a built engine directory is rejected."""
    if model_dir.is_dir() and weight_files(model_dir):
        return
    raise StandinError(
        "NotImplementedError", "Only safetensors/pickle/binary directories are supported.",
        '  File "/opt/nim/llm/.venv/lib/python3.12/site-packages/tensorrt_llm/models/'
        'model_weights_loader.py", line 148, in detect_format\n    raise NotImplementedError(')


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Load a JSON object or raise a StandinError naming ``what``."""
    try:
        data = json.loads(path.read_text())
    except PermissionError:
        raise  # an unreadable file fails as Python's open() does (see _serve), not as a bad file
    except (OSError, ValueError) as exc:
        raise StandinError("ValueError", f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise StandinError("ValueError", f"{what} {path} is not a JSON object")
    return data


def check_checkpoint(model_dir: Path) -> dict[str, Any]:
    """Validate an HF checkpoint for a build and return its config.json."""
    if not model_dir.is_dir():
        raise StandinError("FileNotFoundError", f"model directory {model_dir} does not exist")
    detect_format(model_dir)
    if not (model_dir / "config.json").is_file():
        raise StandinError("FileNotFoundError", f"{model_dir}/config.json not found")
    cfg = read_json(model_dir / "config.json", "model config")
    check_weights(model_dir, cfg, "trtllm")  # what TensorRT-LLM's weight loader would refuse
    return cfg


def _mapping(config: dict[str, Any]) -> tuple[int, int]:
    """(tp_size, pp_size) of an engine or TRT-LLM checkpoint config (Mapping() defaults: 1, 1)."""
    pretrained = config.get("pretrained_config", config)
    mapping = pretrained.get("mapping") if isinstance(pretrained, dict) else None
    mapping = mapping if isinstance(mapping, dict) else {}
    try:
        tp = int(mapping.get("tp_size", config.get("tp_size", 1)))
        pp = int(mapping.get("pp_size", config.get("pp_size", 1)))
    except (TypeError, ValueError) as exc:
        raise StandinError("ValueError", f"invalid mapping {mapping!r}: {exc}") from exc
    return tp, pp


def check_served_dir(model_dir: Path) -> str:
    """Validate a directory given as NIM_MODEL_NAME; return the backend that would serve it.

    An engine is also checked against this machine's (fake) GPUs and TensorRT-LLM version, as
    loading it would: see :func:`check_engine_loadable`."""
    if not model_dir.is_dir():
        raise StandinError("FileNotFoundError", f"NIM_MODEL_NAME={model_dir}: no such directory")
    if not (model_dir / "config.json").is_file():
        raise StandinError("FileNotFoundError", f"{model_dir}/config.json not found")
    engine_dir = model_dir / "trtllm_engine"
    if engine_dir.is_dir():
        cfg = read_json(engine_dir / "config.json", "engine config")
        tp, pp = _mapping(cfg)
        missing = [f"rank{r}.engine" for r in range(tp * pp)
                   if not (engine_dir / f"rank{r}.engine").is_file()]
        if missing:
            raise StandinError("FileNotFoundError",
                               f"{engine_dir}: engine files missing for tp={tp} pp={pp}: {missing}")
        check_engine_loadable(engine_dir, tp, pp)
        return "tensorrt_llm"
    if not weight_files(model_dir, (".safetensors", ".bin")):
        raise StandinError("FileNotFoundError",
                           f"{model_dir}: no *.safetensors or *.bin weights (vLLM backend)")
    return "vllm"


_DESERIALIZE_FAILED = ("[TensorRT-LLM][ERROR] Assertion failed: Failed to deserialize cuda engine. "
                       "(/src/tensorrt_llm/cpp/tensorrt_llm/runtime/tllmRuntime.cpp:239)")


def read_engine_header(path: Path) -> dict[str, Any]:
    """The JSON header of a stand-in ``rank{N}.engine``; a file that is not one fails like
    TensorRT deserialising a foreign plan."""
    with path.open("rb") as fh:
        head = fh.read(len(ENGINE_MAGIC))
        line = fh.readline(1 << 20)
    header: Any = None
    if head == ENGINE_MAGIC:
        try:
            header = json.loads(line)
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise StandinError("RuntimeError", _DESERIALIZE_FAILED, pre=(
            "[TRT] [E] 1: [stdArchiveReader.cpp::StdArchiveReader::32] Error Code 1: Serialization "
            "(Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)",
            "[TRT] [E] 4: [runtime.cpp::deserializeCudaEngine::66] Error Code 4: Internal Error "
            f"(Engine deserialization failed.) [{path}]"))
    return header


def check_engine_loadable(engine_dir: Path, tp: int, pp: int) -> None:
    """Refuse to serve an engine this (fake) machine cannot load, as TensorRT-LLM/TensorRT do:

    * fewer visible GPUs than the engine's world size -> RuntimeError;
    * a plan from another TensorRT(-LLM) version -> "not compatible with this version of TensorRT";
    * a plan from another compute capability -> "generated on an incompatible device";
    * same compute capability, other GPU model -> TensorRT's warning only.
    """
    gpu, count, version = fake_gpu(), gpu_count(), trtllm_version()
    world = tp * pp
    if count < world:
        raise StandinError(
            "RuntimeError",
            f"The engine in {engine_dir} was built for world_size {world} (tp_size {tp} x pp_size {pp}) "
            f"and needs {world} GPU(s), but only {count} GPU(s) are visible "
            f"(NIMSTANDIN_GPU_COUNT={count}); give the container {world} GPUs or rebuild the engine")
    warned = False
    for rank in range(world):
        header = read_engine_header(engine_dir / f"rank{rank}.engine")
        built_version = str(header.get("trtllm_version"))
        if built_version != version:
            raise StandinError("RuntimeError", _DESERIALIZE_FAILED, pre=(
                "[TRT] [E] 6: The engine plan file is not compatible with this version of TensorRT, "
                f"expecting library version {version} got {built_version}, please rebuild.",
                "[TRT] [E] 4: [runtime.cpp::deserializeCudaEngine::66] Error Code 4: Internal Error "
                f"(Engine deserialization failed.) [rank{rank}.engine]"))
        built_cc = str(header.get("compute_cap"))
        if built_cc != gpu["compute_cap"]:
            raise StandinError("RuntimeError", _DESERIALIZE_FAILED, pre=(
                "[TRT] [E] 6: The engine plan file is generated on an incompatible device, "
                f"expecting compute {built_cc} got compute {gpu['compute_cap']}, please rebuild.",
                "[TRT] [E] 2: [engine.cpp::deserializeEngine::1148] Error Code 2: Internal Error "
                "(Assertion engine->deserialize(start, size, allocator, runtime) failed. ) "
                f"[rank{rank}.engine]"))
        if header.get("gpu_name") != gpu["name"] and not warned:
            log(f"[TRT] [W] Using an engine plan file across different models of devices is not "
                f"recommended and is likely to affect performance or even cause errors. (engine built "
                f"on {header.get('gpu_name')}, running on {gpu['name']})", "WARNING")
            warned = True


# ------------------------------------------------------------------- weights: what loaders check
#: safetensors dtypes that hold real numbers (what an unquantized checkpoint may contain).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
#: vLLM's fused parameters (``stacked_params_mapping`` in vllm/model_executor/models/llama.py).
VLLM_STACKED = ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj"))
#: HF Llama name part -> TensorRT-LLM name part (``ModelWeightsLoader.tllm_to_externel_key_dict``).
TRTLLM_KEYS = (("model.embed_tokens.", "transformer.vocab_embedding."), ("model.norm.", "transformer.ln_f."),
               ("model.layers.", "transformer.layers."), (".self_attn.q_proj.", ".attention.qkv."),
               (".self_attn.k_proj.", ".attention.qkv."), (".self_attn.v_proj.", ".attention.qkv."),
               (".self_attn.o_proj.", ".attention.dense."), (".mlp.gate_proj.", ".mlp.fc."),
               (".mlp.up_proj.", ".mlp.gate."), (".mlp.down_proj.", ".mlp.proj."),
               (".post_attention_layernorm.", ".post_layernorm."))
#: The modules a Llama base accepts LoRA on (vLLM ``supported_lora_modules``, packed ones expanded).
LLAMA_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "embed_tokens", "lm_head"]
_VLLM_LOADER = ('  File "/opt/nim/llm/.venv/lib/python3.12/site-packages/vllm/model_executor/'
                'model_loader/default_loader.py", line 277, in load_weights\n    loaded_weights = '
                'model.load_weights(self.get_all_weights(model_config, model))')
_TRTLLM_LOADER = ('  File "/usr/local/lib/python3.12/dist-packages/tensorrt_llm/models/'
                  'model_weights_loader.py", line 358, in fill\n    w_shape = weights[tllm_key].shape')


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file (header only, never the data), opened like
    ``safetensors.safe_open``: a malformed header fails with its error text."""
    if not path.is_file():
        raise StandinError("FileNotFoundError", f"[Errno 2] No such file or directory: '{path}'")
    size = path.stat().st_size
    header: Any = None
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            problem = "HeaderTooSmall"
        else:
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8 or n > 100 << 20:
                problem = "HeaderTooLarge"
            else:
                try:
                    header = json.loads(fh.read(n))
                    problem = "" if isinstance(header, dict) else "InvalidHeaderDeserialization"
                except ValueError:
                    problem = "InvalidHeaderDeserialization"
    if not problem:
        for name, info in header.items():
            if name != "__metadata__" and not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                                               and isinstance(info.get("dtype"), str)):
                problem = "InvalidHeaderDeserialization"
    if problem:
        raise StandinError("safetensors_rust.SafetensorError",
                           f"Error while deserializing header: {problem} ({path})")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def check_safetensors(path: Path) -> None:
    """Open a safetensors file like ``safetensors.safe_open`` does (header only)."""
    read_safetensors_header(path)


def expected_llama_tensors(cfg: dict[str, Any]) -> dict[str, list[int]]:
    """HF tensor name -> shape for a Llama/Mistral ``config.json`` (transformers' defaults for
    missing fields; ``head_dim`` from the config or hidden/heads; no ``lm_head`` when tied)."""
    def get(key: str) -> int:
        value = cfg.get(key)
        return _int(HF_DEFAULTS.get(key) if value is None else value, key)

    hidden, heads, inter = get("hidden_size"), get("num_attention_heads"), get("intermediate_size")
    kv = _int(cfg.get("num_key_value_heads") or heads, "num_key_value_heads")
    head_dim = _int(cfg.get("head_dim") or hidden // heads, "head_dim")
    vocab = get("vocab_size")
    out: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(get("num_hidden_layers")):
        p = f"model.layers.{i}."
        attn = {"q_proj": [heads * head_dim, hidden], "k_proj": [kv * head_dim, hidden],
                "v_proj": [kv * head_dim, hidden], "o_proj": [hidden, heads * head_dim]}
        mlp = {"gate_proj": [inter, hidden], "up_proj": [inter, hidden], "down_proj": [hidden, inter]}
        out[p + "input_layernorm.weight"] = [hidden]
        for mod, shape in attn.items():
            out[f"{p}self_attn.{mod}.weight"] = shape
            if cfg.get("attention_bias"):
                out[f"{p}self_attn.{mod}.bias"] = [shape[0]]
        out[p + "post_attention_layernorm.weight"] = [hidden]
        for mod, shape in mlp.items():
            out[f"{p}mlp.{mod}.weight"] = shape
            if cfg.get("mlp_bias"):
                out[f"{p}mlp.{mod}.bias"] = [shape[0]]
    out["model.norm.weight"] = [hidden]
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = [vocab, hidden]
    return out


def loaded_weight_files(model_dir: Path, loader: str) -> tuple[str, list[Path]]:
    """(format, files) a loader reads from ``model_dir`` (top level only). vLLM: ``*.safetensors``
    (only those named by ``model.safetensors.index.json`` when it exists), else ``*.bin``;
    TensorRT-LLM ``ModelWeightsLoader``: every ``*.safetensors``, else ``*.bin``, else ``*.pth``."""
    suffixes = (".safetensors", ".bin") if loader == "vllm" else WEIGHT_SUFFIXES
    for suffix in suffixes:
        files = weight_files(model_dir, (suffix,))
        if not files:
            continue
        index = model_dir / "model.safetensors.index.json"
        if loader == "vllm" and suffix == ".safetensors" and index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map") or {}
            named = set(weight_map.values()) if isinstance(weight_map, dict) else set()
            files = [f for f in files if f.name in named]
        return suffix[1:], files
    return "", []


def _size(shape: list[int]) -> str:
    return f"torch.Size({list(shape)})"


def _dtype_error(name: str, dtype: str, where: Path) -> StandinError:
    return StandinError("TypeError", f"tensor '{name}' in {where} has dtype {dtype}, not a floating-point type, "
                        "and config.json has no quantization_config [NIM stand-in check: vLLM and "
                        "TensorRT-LLM would cast it silently and serve garbage]")


def check_weights(model_dir: Path, cfg: dict[str, Any], loader: str) -> str:
    """Check the weights in ``model_dir`` as the loader would load them, reading safetensors
    headers only; return the format. ``loader`` is ``vllm`` (serving) or ``trtllm`` (builds).

    vLLM (``LlamaForCausalLM.load_weights``, ``default_weight_loader``, ``DefaultModelLoader``):
    an unknown top-level name -> "There is no module or parameter named ...", an unknown name under
    ``model.`` -> KeyError, a wrong shape -> "Attempted to load weight ...", missing tensors ->
    "Following weights were not initialized from checkpoint: {...}". TensorRT-LLM
    (``ModelWeightsLoader``): names it does not look up are ignored, a missing tensor ->
    KeyError on the TensorRT-LLM name, a wrong shape -> "Parameter ... has invalid shape ...".
    Pickled ``.bin``/``.pth`` files cannot be read here (no torch): accepted unchecked."""
    fmt, files = loaded_weight_files(model_dir, loader)
    arch = str((cfg.get("architectures") or ["unknown"])[0])
    if fmt != "safetensors":
        if fmt:
            log(f"Weights are pickled *.{fmt} files: the stand-in cannot read them (no torch); tensor "
                "names and shapes are not checked")
        return fmt
    if arch not in LLAMA_FAMILY:
        log(f"Architecture {arch}: the stand-in knows no tensor layout for it; tensor names and shapes are not checked")
        return fmt
    expected = expected_llama_tensors(cfg)
    quantized = isinstance(cfg.get("quantization_config"), dict)
    found: dict[str, tuple[str, list[int], Path]] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            found.setdefault(name, (str(info["dtype"]), [int(d) for d in info["shape"]], path))
    if loader == "vllm":
        _check_vllm(found, expected, arch, quantized, bool(cfg.get("tie_word_embeddings")))
    else:
        _check_trtllm(found, expected, quantized)
    log(f"Weights checked ({loader} loader): {len(found)} tensors in {len(files)} safetensors file(s) match {arch}")
    return fmt


def _vllm_name(name: str) -> str:
    for old, new in VLLM_STACKED:
        if old in name:
            return name.replace(old, new)
    return name


def _check_vllm(found: dict[str, tuple[str, list[int], Path]], expected: dict[str, list[int]], arch: str,
                quantized: bool, tied: bool) -> None:
    for name, (dtype, shape, path) in found.items():
        if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
            continue  # LlamaForCausalLM.load_weights skips these
        if tied and name.startswith("lm_head."):
            continue  # AutoWeightsLoader(skip_prefixes=["lm_head."]) with tie_word_embeddings
        first = name.split(".", 1)[0]
        if first not in ("model", "lm_head"):
            raise StandinError("ValueError", f"There is no module or parameter named '{first}' in {arch}", _VLLM_LOADER)
        if name not in expected:
            raise StandinError("KeyError", repr(_vllm_name(name)), _VLLM_LOADER)
        if shape != expected[name]:
            raise StandinError("AssertionError", f"Attempted to load weight ({_size(shape)}) into parameter "
                               f"({_size(expected[name])})", _VLLM_LOADER)
        if dtype not in FLOAT_DTYPES and not quantized:
            raise _dtype_error(name, dtype, path)
    missing = sorted({_vllm_name(n) for n in expected if n not in found})
    if missing:
        raise StandinError("ValueError", "Following weights were not initialized from checkpoint: {"
                           + ", ".join(repr(n) for n in missing) + "}", _VLLM_LOADER)


def trtllm_key(name: str) -> str:
    """The TensorRT-LLM parameter an HF Llama tensor loads into (q/k/v -> attention.qkv)."""
    for old, new in TRTLLM_KEYS:
        name = name.replace(old, new)
    return name


def _check_trtllm(found: dict[str, tuple[str, list[int], Path]], expected: dict[str, list[int]],
                  quantized: bool) -> None:
    ignored = [n for n in found if n not in expected]
    if ignored:  # ModelWeightsLoader only looks up the names it needs
        log(f"TensorRT-LLM loader ignores {len(ignored)} tensor(s) it does not use, e.g. {ignored[0]}")
    groups: dict[str, list[str]] = {}
    for name in expected:
        groups.setdefault(trtllm_key(name), []).append(name)
    for key, names in groups.items():
        if any(n not in found for n in names):
            raise StandinError("KeyError", repr(key), _TRTLLM_LOADER)
        shapes = [found[n][1] for n in names]
        want = [expected[n] for n in names]
        if len(names) > 1:  # fused qkv: rows concatenated
            got_shape = [sum(s[0] for s in shapes)] + shapes[0][1:] if all(s[1:] == shapes[0][1:] for s in shapes) \
                else shapes[0]
            want_shape = [sum(s[0] for s in want)] + want[0][1:]
        else:
            got_shape, want_shape = shapes[0], want[0]
        if got_shape != want_shape:
            raise StandinError(
                "ValueError", f"Parameter {key} has invalid shape {_size(got_shape)} compared with expected shape "
                f"{tuple(want_shape)}. Auto padding failed.", pre=(
                    f"[TRT-LLM] [W] {key} has invalid shape {_size(got_shape)}. Expected {tuple(want_shape)}.",
                    f"[TRT-LLM] [W] {key} is going to be padded by "
                    f"{_pad_dims(got_shape, want_shape)}."))
        for n in names:
            if found[n][0] not in FLOAT_DTYPES and not quantized:
                raise _dtype_error(n, found[n][0], found[n][2])


def _pad_dims(got: list[int], want: list[int]) -> list[int]:
    """``ModelWeightsLoader.fill``'s pad list: (0, missing) per dimension, last dimension first."""
    pad = []
    for dim in range(min(len(got), len(want))):
        pad += [0, max(0, want[-1 - dim] - got[-1 - dim])]
    return pad


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer in ``model_dir`` has a chat template (``chat_template`` in
    tokenizer_config.json, or chat_template.jinja / chat_template.json next to it)."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    except PermissionError:
        raise  # transformers opening an unreadable tokenizer_config.json fails; it is not "no template"
    except (OSError, ValueError):
        return False
    return isinstance(tok, dict) and bool(tok.get("chat_template"))


def weights_digest(model_dir: Path) -> str:
    """First 16 hex of the sha256 over the top-level weight files (``hash_files``), what answers
    show; ``nimflow.testbed.nim_image.standin_weights_digest`` computes the same."""
    return hash_files(weight_files(model_dir), model_dir)[:16]


def name_digest(name: str) -> str:
    """A bundled / manifest model has no weights here: its digest is the sha256 of its name."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- LoRA
class Adapter:
    """One LoRA adapter of NIM_PEFT_SOURCE: checked at start-up, its error (if any) kept for the
    requests that name it (NIM loads adapters on request: a bad one fails the request)."""

    def __init__(self, name: str, path: Path, digest: str, error: str | None) -> None:
        self.name, self.path, self.digest, self.error = name, path, digest, error


def _lora_module(name: str) -> tuple[str, str] | None:
    """vLLM ``parse_fine_tuned_lora_name``: (module, "A"|"B") or None when it is no LoRA weight."""
    parts = name.split(".")
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2][-1]
    if len(parts) >= 2 and parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), parts[-1][-1]
    return None


def check_adapter(path: Path, base_cfg: dict[str, Any], max_rank: int) -> None:
    """Check one adapter like vLLM loading it (``PEFTHelper``, ``LoRAModel.from_local_checkpoint``,
    ``WorkerLoRAManager._load_adapter``); raise a StandinError with vLLM's text."""
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise StandinError("FileNotFoundError", f"[Errno 2] No such file or directory: '{cfg_path}'")
    cfg = read_json(cfg_path, "adapter config")
    missing = {k for k in ("r", "lora_alpha", "target_modules") if k not in cfg}
    if missing:
        raise StandinError("ValueError", f"Missing required configuration fields: {missing}")
    rank = _int(cfg["r"], "r")
    if rank > max_rank:
        raise StandinError("ValueError", f"LoRA rank {rank} is greater than max_lora_rank {max_rank}.")
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    failed = f"Loading lora {path} failed"
    expected_modules = LLAMA_LORA_MODULES
    if st.is_file():
        tensors = read_safetensors_header(st)
        unexpected, loras = [], {}
        for name, info in tensors.items():
            parsed = _lora_module(name)
            if parsed is None:
                raise StandinError("RuntimeError", failed, pre=(f"ValueError: {name} is unsupported LoRA weight",))
            module, ab = parsed
            if module.rsplit(".", 1)[-1] not in expected_modules:
                unexpected.append(module)
            loras[(module, ab)] = ([int(d) for d in info["shape"]], str(info["dtype"]))
        if unexpected:
            raise StandinError("RuntimeError", failed, pre=(
                f"ValueError: While loading {path}, expected target modules in {expected_modules} but received "
                f"{unexpected}. Please verify that the loaded LoRA module is correct",))
        base = expected_llama_tensors(base_cfg) if str((base_cfg.get("architectures") or [""])[0]) in LLAMA_FAMILY else {}
        for (module, ab), (shape, dtype) in sorted(loras.items()):
            if dtype not in FLOAT_DTYPES:
                raise _dtype_error(f"{module}.lora_{ab}", dtype, st)
            base_shape = base.get(module + ".weight")
            if base_shape is None:
                if base:  # e.g. a layer index beyond the base's layers
                    raise StandinError("RuntimeError", failed, pre=(
                        f"ValueError: While loading {path}, the base model has no module {module}",))
                continue
            out_dim, in_dim = base_shape[0], base_shape[-1]
            want = [rank, in_dim] if ab == "A" else [out_dim, rank]
            if module.endswith("embed_tokens"):
                want = [rank, base_shape[0]] if ab == "A" else [base_shape[1], rank]
            for dim, (got_d, want_d) in enumerate(zip(shape + [0] * (2 - len(shape)), want)):
                if got_d != want_d:
                    raise StandinError("RuntimeError", f"The size of tensor a ({want_d}) must match the size of "
                                       f"tensor b ({got_d}) at non-singleton dimension {dim}",
                                       pre=(f"[{module}.lora_{ab}: shape {shape}, the base {module} needs {want}]",))
    elif binf.is_file():  # vLLM checks a .bin adapter's target_modules from its config
        targets = cfg["target_modules"] if isinstance(cfg["target_modules"], list) else [cfg["target_modules"]]
        unexpected = [t for t in targets if str(t).split(".")[-1] not in expected_modules]
        if unexpected:
            raise StandinError("RuntimeError", failed, pre=(
                f"ValueError: While loading {path}, expected target modules in {expected_modules} but received "
                f"{unexpected}. Please verify that the loaded LoRA module is correct",))
    else:
        raise StandinError("ValueError", f"{path} doesn't contain tensors")


def lora_max_rank(nim_api: str, argv: list[str]) -> int:
    """The largest adapter rank NIM loads. 1.x: ``NIM_MAX_LORA_RANK`` (default 32). 2.x: vLLM's
    ``--max-lora-rank`` from the CLI after ``nim-serve`` or ``NIM_PASSTHROUGH_ARGS`` (CLI wins, the
    last of repeated options wins: reference/advanced-configuration.html), else vLLM's default 16;
    a NIM_MAX_LORA_RANK there is a removed 1.x variable and is ignored (with a warning)."""
    if nim_api == "1.x":
        return _int(os.environ.get("NIM_MAX_LORA_RANK") or str(DEFAULT_MAX_LORA_RANK), "NIM_MAX_LORA_RANK")
    if os.environ.get("NIM_MAX_LORA_RANK"):
        log("NIM_MAX_LORA_RANK is a NIM 1.x variable, not read by NIM 2.x: give vLLM's --max-lora-rank "
            "(CLI after nim-serve, or NIM_PASSTHROUGH_ARGS)", "WARNING")
    parser = argparse.ArgumentParser(prog="nim-serve", add_help=False)
    parser.add_argument("--max-lora-rank", type=int)
    passthrough, _ = parser.parse_known_args(shlex.split(os.environ.get("NIM_PASSTHROUGH_ARGS", "")))
    cli, _ = parser.parse_known_args(argv)
    rank = cli.max_lora_rank or passthrough.max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    return _int(rank, "--max-lora-rank")


def load_adapters(source: str, base_cfg: dict[str, Any], max_rank: int = DEFAULT_MAX_LORA_RANK) -> dict[str, Adapter]:
    """NIM_PEFT_SOURCE: one adapter per sub-directory (its name = the directory name)."""
    root = Path(source)
    if not root.is_dir():
        raise StandinError("FileNotFoundError", f"NIM_PEFT_SOURCE={source}: no such directory")
    adapters: dict[str, Adapter] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        error = None
        try:
            check_adapter(sub, base_cfg, max_rank)
        except StandinError as err:
            error = "\n".join([*err.pre, f"{err.exc_type}: {err}"])
        digest = weights_digest(sub) if weight_files(sub) else name_digest(str(sub))
        adapters[sub.name] = Adapter(sub.name, sub, digest, error)
    log(f"LoRA adapters in NIM_PEFT_SOURCE={source} (max rank {max_rank}): "
        + (", ".join(adapters) if adapters else "none"))
    return adapters


# -------------------------------------------------------------------------- bundled manifest
def manifest_models(text: str) -> list[str]:
    """The ``model:`` of each profile in a NIM model_manifest v1 (a tolerant line scan: real
    manifests carry YAML tags such as ``!workspace`` / ``!name`` that plain loaders refuse)."""
    models = []
    for line in text.splitlines():
        m = re.match(r"^( {2}|\t)model:\s*(.+?)\s*$", _strip_comment(line))
        if m:
            value = m.group(2)
            models.append(value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" else value)
    return list(dict.fromkeys(models))


def lookup_manifest(model_name: str) -> str:
    """Resolve a NIM_MODEL_NAME that is not a path in the image's bundled manifest (its
    ``NIMSTANDIN_MANIFEST_PATH``, default /etc/nim/config/model_manifest.yaml; the built-in copy on a
    host without it). A manifest anywhere else is not read, as real NIM reads only its own path."""
    path = Path(os.environ.get("NIMSTANDIN_MANIFEST_PATH") or MANIFEST_PATH)
    if path.is_file():
        text, where = path.read_text(), str(path)
    elif os.environ.get("NIMSTANDIN_MANIFEST_PATH"):
        raise StandinError("FileNotFoundError", f"{path}: no such file (the image's model manifest)")
    else:
        text, where = BUNDLED_MANIFEST, f"{MANIFEST_PATH} (built-in copy: not on this host)"
    models = manifest_models(text)
    if model_name not in models:
        raise StandinError("ValueError", f"Model '{model_name}' (NIM_MODEL_NAME) has no profile in the model "
                           f"manifest {where}, which lists {models or 'no models'}; give NIM_MODEL_NAME a model "
                           "of that manifest or an absolute path to a model directory")
    return where


# ------------------------------------------------------------------------------ engine building
def _int(value: Any, what: str, minimum: int = 1) -> int:
    """An integer setting (YAML/env/JSON), refused unless it is one and >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, str) and not value.strip().lstrip("-").isdigit()):
        raise StandinError("ValueError", f"{what} must be an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise StandinError("ValueError", f"{what} must be >= {minimum}, got {number}")
    return number


def auto_dtype(torch_dtype: Any) -> str:
    """TensorRT-LLM ``infer_dtype('auto', torch_dtype)``: the checkpoint's, float32 -> float16."""
    if torch_dtype in (None, "float32"):
        return "float16"
    return str(torch_dtype)


def hf_pretrained_config(model_cfg: dict[str, Any], dtype: str, tp: int, pp: int) -> dict[str, Any]:
    """A TensorRT-LLM ``PretrainedConfig`` (checkpoint / engine ``pretrained_config``) from an HF
    config.json; missing fields get transformers' LlamaConfig defaults, as a real load does."""
    def get(key: str, hf_key: str | None = None) -> Any:
        value = model_cfg.get(hf_key or key)
        return HF_DEFAULTS.get(hf_key or key) if value is None else value

    heads = _int(get("num_attention_heads"), "num_attention_heads")
    kv = model_cfg.get("num_key_value_heads")
    kv_heads = heads if kv is None else _int(kv, "num_key_value_heads")
    hidden = _int(get("hidden_size"), "hidden_size")
    head_size = model_cfg.get("head_dim") or hidden // heads
    return {
        "architecture": str((model_cfg.get("architectures") or ["unknown"])[0]),
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": _int(get("vocab_size"), "vocab_size"),
        "max_position_embeddings": _int(get("max_position_embeddings"), "max_position_embeddings"),
        "hidden_size": hidden,
        "num_hidden_layers": _int(get("num_hidden_layers"), "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_size": _int(head_size, "head_dim"),
        "intermediate_size": _int(get("intermediate_size"), "intermediate_size"),
        "hidden_act": str(get("hidden_act")),
        "norm_epsilon": get("norm_epsilon", "rms_norm_eps"),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": get("rotary_base", "rope_theta"),
        "rotary_scaling": model_cfg.get("rope_scaling"),
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def check_parallel(pretrained: dict[str, Any], exc_type: str = "ValueError") -> None:
    """What TensorRT-LLM refuses for a tp/pp mapping: heads % tp, KV heads that can be neither
    split nor duplicated over tp (``dup_kv_weight``: tp % kv == 0), pp beyond the layer count."""
    tp, pp = pretrained["mapping"]["tp_size"], pretrained["mapping"]["pp_size"]
    heads, kv, layers = (pretrained["num_attention_heads"], pretrained["num_key_value_heads"],
                         pretrained["num_hidden_layers"])
    if heads % tp:
        raise StandinError(exc_type, f"num_attention_heads ({heads}) must be divisible by tp_size ({tp})")
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise StandinError(exc_type, f"num_key_value_heads ({kv}) must be divisible by tp_size ({tp}) "
                           f"(or, when smaller, divide it so KV heads can be duplicated)")
    if pp > layers:
        raise StandinError(exc_type, f"pp_size ({pp}) must not exceed num_hidden_layers ({layers})")


def _rotary_factor(rotary_scaling: Any) -> float:
    """``builder._init_max_seq_len``: rope factor, except 1 for su/longrope/llama3 scaling."""
    if not isinstance(rotary_scaling, dict):
        return 1.0
    kind = rotary_scaling.get("type", rotary_scaling.get("rope_type"))
    return 1.0 if kind in ("su", "longrope", "llama3") else float(rotary_scaling.get("factor", 1.0))


def plugin_config(dtype: str, *, kv_cache_type: str, gemm_plugin: str | None = None,
                  context_fmha: bool = True, remove_input_padding: bool = True,
                  tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK, use_paged_context_fmha: bool = True,
                  multiple_profiles: bool = False, manage_weights: bool = False) -> dict[str, Any]:
    """A few real ``PluginConfig`` keys with TensorRT-LLM's defaults."""
    gemm = None if gemm_plugin in (None, "disable") else (dtype if gemm_plugin == "auto" else gemm_plugin)
    return {"dtype": dtype, "bert_attention_plugin": "auto", "gpt_attention_plugin": "auto",
            "gemm_plugin": gemm, "nccl_plugin": "auto", "lora_plugin": None,
            "context_fmha": context_fmha, "remove_input_padding": remove_input_padding,
            "paged_kv_cache": kv_cache_type == "PAGED", "paged_state": False,
            "tokens_per_block": tokens_per_block, "use_paged_context_fmha": use_paged_context_fmha,
            "use_fused_mlp": True, "multiple_profiles": multiple_profiles, "streamingllm": False,
            "manage_weights": manage_weights}


def resolve_build_config(pretrained: dict[str, Any], warn: Callable[[str], None], *,
                         max_batch_size: Any = None, max_input_len: Any = None, max_seq_len: Any = None,
                         max_num_tokens: Any = None, max_beam_width: Any = None,
                         opt_num_tokens: Any = None, kv_cache_type: Any = None,
                         gemm_plugin: str | None = None, strip_plan: bool = False,
                         input_timing_cache: str | None = None, output_timing_cache: str | None = None,
                         **plugin: Any) -> dict[str, Any]:
    """A ``BuildConfig`` dict as TensorRT-LLM completes it: defaults, ``_init_max_seq_len`` and
    ``check_max_num_tokens`` (clipping with their warnings; the engine records clipped values)."""
    mbs = _int(DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size, "max_batch_size")
    input_len = _int(DEFAULT_MAX_INPUT_LEN if max_input_len is None else max_input_len, "max_input_len")
    tokens = _int(DEFAULT_MAX_NUM_TOKENS if max_num_tokens is None else max_num_tokens, "max_num_tokens")
    beam = _int(1 if max_beam_width is None else max_beam_width, "max_beam_width")
    kv = str(kv_cache_type or "paged").lower()
    if kv not in KV_CACHE_TYPES:
        raise StandinError("ValueError", f"Invalid value '{kv_cache_type}'. Expected one of {list(KV_CACHE_TYPES)}")
    pcfg = plugin_config(pretrained["dtype"], kv_cache_type=kv.upper(), gemm_plugin=gemm_plugin, **plugin)
    factor = _rotary_factor(pretrained.get("rotary_scaling"))
    max_pos = pretrained.get("max_position_embeddings")
    if max_seq_len is None:
        seq = int(math.ceil((max_pos or 2048) * factor))
        if factor != 1:
            warn(f"max_seq_len is scaled to {seq} by rotary scaling {factor}")
    else:
        seq = _int(max_seq_len, "max_seq_len")
        if max_pos is not None and seq > max_pos * factor:
            warn(f"max_seq_len {seq} is larger than max_position_embeddings {max_pos} * rotary scaling "
                 f"{factor}, the model accuracy might be affected")
    if input_len > seq:
        warn(f"max_input_len is {input_len} is larger than max_seq_len {seq}, clipping it to max_seq_len")
        input_len = seq
    # _common.check_max_num_tokens
    if not pcfg["remove_input_padding"]:
        tokens = mbs * seq
        warn("remove_input_padding is not enabled, the specified max_num_tokens/opt_num_tokens will be ignored.")
        opt = None if opt_num_tokens is None else _int(opt_num_tokens, "opt_num_tokens")
    else:
        opt = (None if pcfg["multiple_profiles"] else min(mbs * beam, tokens)) if opt_num_tokens is None \
            else _int(opt_num_tokens, "opt_num_tokens")
        if tokens > 16384:
            warn("Specifying a `max_num_tokens` larger than 16384 is usually not recommended, we do not "
                 "expect perf gain with that and too large `max_num_tokens` could possibly exceed the "
                 f"TensorRT tensor volume, causing runtime errors. Got `max_num_tokens` = {tokens}")
        if tokens > seq * mbs:
            warn(f"max_num_tokens ({tokens}) shouldn't be greater than max_seq_len * max_batch_size "
                 f"({seq * mbs}), specifying to max_seq_len * max_batch_size ({seq * mbs}).")
            tokens = seq * mbs
        if tokens < input_len and not pcfg["context_fmha"]:
            warn(f"When enable_context_fmha is not turned on, max_num_tokens ({tokens}) should be at "
                 f"least max_input_len ({input_len}), specifying to max_input_len ({input_len}).")
            tokens = input_len
        elif tokens < pcfg["tokens_per_block"] and pcfg["context_fmha"]:
            warn(f"When enable_context_fmha is turned on, max_num_tokens ({tokens}) should be at least "
                 f"tokens_per_block ({pcfg['tokens_per_block']}), specifying to tokens_per_block "
                 f"({pcfg['tokens_per_block']}). At this time, you also need to enable context "
                 "chunking at runtime, otherwise you may encounter errors.")
            tokens = pcfg["tokens_per_block"]
        if opt is not None and opt > tokens:
            opt = tokens
    return {"max_input_len": input_len, "max_seq_len": seq, "opt_batch_size": 8, "max_batch_size": mbs,
            "max_beam_width": beam, "max_num_tokens": tokens, "opt_num_tokens": opt,
            "max_prompt_embedding_table_size": 0, "kv_cache_type": kv.upper(),
            "gather_context_logits": False, "gather_generation_logits": False, "strongly_typed": True,
            "use_strip_plan": bool(strip_plan), "input_timing_cache": input_timing_cache,
            "output_timing_cache": output_timing_cache, "plugin_config": pcfg}


def require_gpu() -> dict[str, str]:
    """Builds time kernels on a GPU: none visible fails like torch.cuda.set_device without a driver."""
    gpu = fake_gpu()
    if gpu_count() == 0:
        raise BuildError((NO_TORCH_DRIVER,))
    return gpu


def check_bf16(dtype: str, gpu: dict[str, str]) -> None:
    """bfloat16 engines need SM >= 80 (Ampere)."""
    if dtype == "bfloat16" and _cc(gpu["compute_cap"]) < (8, 0):
        raise BuildError((f"RuntimeError: bf16 is not supported on compute capability "
                          f"{gpu['compute_cap']} (needs SM >= 80)",))


def run_build(architecture: str, what: str, say: Callable[[str], None], *, ranks: int, engine_dir: str) -> None:
    """The engine build itself: ``NIMSTANDIN_BUILD_SECONDS`` of simulated work, then the failure
    ``NIMSTANDIN_BUILD_FAILURE`` asks for, if any. Nothing is written before this returns.

    Each rank prints the lines TensorRT-LLM's builder prints, in its order (``tensorrt_llm/builder.py``,
    ``commands/build.py``; TensorRT's ``Engine generation completed``), with most of the time in the
    TensorRT phase, where a real failure surfaces too."""
    failure = os.environ.get("NIMSTANDIN_BUILD_FAILURE", "").strip()
    if failure and failure not in BUILD_FAILURES:
        raise StandinError("ValueError", f"NIMSTANDIN_BUILD_FAILURE={failure!r} is not one of "
                           f"{sorted(BUILD_FAILURES)} [NIM stand-in setting]")
    try:
        delay = max(float(os.environ.get("NIMSTANDIN_BUILD_SECONDS", "1")), 0.0)
    except ValueError as exc:
        raise StandinError("ValueError", f"NIMSTANDIN_BUILD_SECONDS: {exc}") from exc
    say(f"Building {what} (stand-in: no TensorRT, {delay:.1f}s simulated)")
    per_rank = delay / max(ranks, 1)
    for rank in range(max(ranks, 1)):
        tik = time.time()
        time.sleep(per_rank * 0.1)
        tllm_log(f"Total time of constructing network from module object {per_rank * 0.1} seconds")
        tllm_log("Total optimization profiles added: 1")
        tllm_log("Total time to initialize the weights in network Unnamed Network 0: 00:00:00")
        tllm_log("Build TensorRT engine Unnamed Network 0")
        if failure:
            time.sleep(per_rank * 0.9)  # a real OOM or kernel failure comes late in this phase
            lines, code = BUILD_FAILURES[failure]
            raise BuildError(tuple(line.format(arch=architecture) for line in lines), code)
        time.sleep(per_rank * 0.8)
        tllm_log(f"Engine generation completed in {per_rank * 0.8:.5f} seconds.", source="TRT")
        tllm_log(f"Total time of building Unnamed Network 0: {hms(time.time() - tik)}")
        tllm_log(f"Serializing engine to {engine_dir}/rank{rank}.engine...")
        time.sleep(per_rank * 0.1)
        tllm_log("Engine serialized. Total time: 00:00:00")


def write_engine_dir(engine_dir: Path, pretrained: dict[str, Any], build_cfg: dict[str, Any],
                     weights_sha256: str, builder: str) -> str:
    """Write ``config.json`` (``Engine.save`` format) and one ``rank{N}.engine`` per rank; return
    the build id. Bound to the fake GPU and the TensorRT-LLM version, like a real plan, and not
    byte-reproducible unless ``NIMSTANDIN_DETERMINISTIC_BUILD=1``."""
    gpu, version = fake_gpu(), trtllm_version()
    tp, pp = pretrained["mapping"]["tp_size"], pretrained["mapping"]["pp_size"]
    if os.environ.get("NIMSTANDIN_DETERMINISTIC_BUILD") == "1":
        inputs = [builder, version, gpu, pretrained, build_cfg, weights_sha256]
        build_id = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    else:  # real builds time tactics: two builds of the same inputs differ in bytes
        build_id = os.urandom(16).hex()
    engine_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(tp * pp):
        header = {"rank": rank, "world_size": tp * pp, "tp_size": tp, "pp_size": pp,
                  "dtype": pretrained["dtype"], "trtllm_version": version, "gpu_name": gpu["name"],
                  "compute_cap": gpu["compute_cap"], "pci_device_id": gpu["pci_device_id"],
                  "build_id": build_id, "weights_sha256": weights_sha256,
                  "note": "NIM stand-in engine: not a TensorRT plan"}
        (engine_dir / f"rank{rank}.engine").write_bytes(
            ENGINE_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
    config = {"version": version, "pretrained_config": pretrained, "build_config": build_cfg,
              "standin": {"note": "NIM stand-in engine: not built by TensorRT-LLM", "builder": builder,
                          "build_id": build_id, "weights_sha256": weights_sha256, "gpu": gpu}}
    (engine_dir / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return build_id


def plan_build(model_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Validate an HF checkpoint and NIM build options (nim-optimize YAML keys / JIT env); return
    the resolved build (nothing written). Unknown option keys are kept in ``build_config``."""
    model_cfg = check_checkpoint(model_dir)
    dtype = str(options.get("dtype") or auto_dtype(model_cfg.get("torch_dtype")))
    if dtype not in DTYPES:
        raise StandinError("ValueError", f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    tp = _int(options.get("tp_size") if options.get("tp_size") is not None else 1, "tp_size")
    pp = _int(options.get("pp_size") if options.get("pp_size") is not None else 1, "pp_size")
    pretrained = hf_pretrained_config(model_cfg, dtype, tp, pp)
    check_parallel(pretrained)
    known = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "kv_cache_type")
    build_cfg = resolve_build_config(pretrained, log_warning, **{k: options.get(k) for k in known})
    for key, value in options.items():  # other keys: kept as given
        if key not in known and key not in ("dtype", "tp_size", "pp_size"):
            build_cfg[key] = value
    return {"dtype": dtype, "tp": tp, "pp": pp, "pretrained": pretrained, "build_config": build_cfg,
            "architecture": pretrained["architecture"],
            "weights_sha256": hash_files(weight_files(model_dir), model_dir)}


def write_engine(model_dir: Path, plan: dict[str, Any], out_dir: Path, builder: str) -> str:
    """Write the NIM engine layout for ``plan`` into the existing, empty ``out_dir``."""
    for name in MODEL_FILES:  # the HF files NIM keeps next to the engine
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return write_engine_dir(out_dir / "trtllm_engine", plan["pretrained"], plan["build_config"],
                            plan["weights_sha256"], builder)


def _rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cached_engine(cache: Path, name: str) -> Path | None:
    """``local_cache/<name>`` if a finished build is there (builds are renamed in when complete)."""
    target = cache / "local_cache" / name
    return target if (target / "trtllm_engine" / "config.json").is_file() else None


def jit_options() -> dict[str, Any]:
    """The NIM variables that shape a JIT build."""
    options: dict[str, Any] = {"tp_size": os.environ.get("NIM_TENSOR_PARALLEL_SIZE") or 1,
                               "pp_size": os.environ.get("NIM_PIPELINE_PARALLEL_SIZE") or 1}
    if os.environ.get("NIM_MAX_MODEL_LEN"):
        options["max_seq_len"] = os.environ["NIM_MAX_MODEL_LEN"]
    return options


def jit_build(ft_model: Path, cache: Path, name: str, served: str) -> Path:
    """NIM_FT_MODEL: build into ``local_cache/<name>`` (reused if present) and register the profile."""
    local_cache = cache / "local_cache"
    target = local_cache / name
    if cached_engine(cache, name):
        log(f"Found cached engine for NIM_CUSTOM_MODEL_NAME={name} at {target}; skipping the build")
        return target
    plan = plan_build(ft_model, jit_options())  # validates before anything is created
    gpu = require_gpu()
    check_bf16(plan["dtype"], gpu)
    run_build(plan["architecture"], f"TensorRT-LLM engine for {name} (dtype={plan['dtype']} "
              f"tp={plan['tp']} pp={plan['pp']})", log, ranks=plan["tp"] * plan["pp"],
              engine_dir=str(target / "trtllm_engine"))
    tmp = local_cache / f".tmp-{name}-{os.getpid()}"
    profile_id = hashlib.sha256(json.dumps(
        [name, plan["weights_sha256"], plan["dtype"], plan["tp"], plan["pp"], plan["build_config"],
         gpu, trtllm_version()], sort_keys=True).encode()).hexdigest()
    try:
        local_cache.mkdir(parents=True, exist_ok=True)
        _rmtree_quiet(tmp)
        tmp.mkdir()
        write_engine(ft_model, plan, tmp, "nim-jit")
        os.rename(tmp, target)  # atomic: a partial build is never visible under <name>
        update_local_manifest(local_cache / "local_manifest.yaml", profile_id, name, served, plan, gpu)
    except OSError as exc:  # e.g. a cache volume not writable by the container's -u user
        raise StandinError(type(exc).__name__,
                           f"Unable to write to NIM_CACHE_PATH={cache}: {exc}") from exc
    finally:
        _rmtree_quiet(tmp)
    log(f"Engine built: {target} (profile {profile_id})")
    return target


def update_local_manifest(path: Path, profile_id: str, name: str, served: str,
                          plan: dict[str, Any], gpu: dict[str, str]) -> None:
    """Add the built profile to ``local_manifest.yaml`` (NIM model_manifest v1 shape), replacing
    any earlier profile for the same ``model_name``; written atomically."""
    blocks: list[str] = []
    if path.is_file():  # keep the other top-level profiles verbatim
        for line in path.read_text().splitlines(keepends=True):
            if line.strip() and not line[0].isspace() and not line.startswith("#"):
                blocks.append(line)
            elif blocks:
                blocks[-1] += line
    old = parse_yaml(path.read_text()) if path.is_file() else {}
    stale = {pid for pid, p in old.items()
             if pid == profile_id or (isinstance(p, dict) and isinstance(p.get("tags"), dict)
                                      and str(p["tags"].get("model_name")) == name)}
    blocks = [b for b in blocks if b.split(":", 1)[0].strip().strip("\"'") not in stale]
    tags = {"llm_engine": "tensorrt_llm", "precision": DTYPES[plan["dtype"]], "tp": plan["tp"],
            "pp": plan["pp"], "number_of_gpus": plan["tp"] * plan["pp"], "gpu": gpu_short_name(gpu),
            "gpu_device": gpu_device_tag(gpu), "profile": "latency", "feat_lora": "false",
            "model_name": name, "trtllm_buildable": "false"}
    block = [f"{profile_id}:", f"  model: {json.dumps(served)}", f'  release: "{STANDIN_VERSION}"',
             "  tags:"] + [f"    {k}: {json.dumps(str(v))}" for k, v in tags.items()] + [
             "  workspace:", f"    dst: {json.dumps(name)}",
             f'    weights_sha256: "{plan["weights_sha256"]}"']
    blocks.append("\n".join(block) + "\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(blocks))
    os.replace(tmp, path)

# ----------------------------------------------------------------------------------------- server
class Model:
    """What the server answers for: served name, backend and path (shared by handler threads)."""

    def __init__(self, served: str, root: str, backend: str, nim_api: str = "1.x") -> None:
        self.served, self.root, self.backend, self.nim_api = served, root, backend, nim_api
        self.weights = ""  # digest16 of the weights served (set once loaded)
        self.chat_template = True  # False: /v1/chat/completions is refused like vLLM does
        self.adapters: dict[str, Adapter] = {}
        self.ready_at = float("inf")  # monotonic time from which /v1/health/ready says 200
        self.lock = threading.Lock()
        self.counters = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def ready(self) -> bool:
        return time.monotonic() >= self.ready_at

    def count(self, text: str) -> int:
        """Token count: whitespace words (the stand-in has no real tokenizer)."""
        return len(text.split())


def _text_of(content: Any) -> str:
    """A message's text, for string content or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def listed_root(m: Model) -> str:
    """The ``root`` ``/v1/models`` gives for the served model.

    NIM 1.x reports the model's *name*, not the path it was given: a llama3-8b-instruct NIM answers
    ``"id": "meta/llama3-8b-instruct", ..., "root": "meta/llama3-8b-instruct"``
    (GoogleCloudPlatform/ai-on-gke, best-practices/ml-platform/terraform/features/nim/README.md).
    What a multi-LLM 1.x NIM reports for a local directory has no public answer, so the stand-in
    takes the strictest reading: a name (the manifest model's, else the served name), never the
    path. NIM 2.x serves through vLLM, whose card has ``root=base_model.model_path``
    (vllm-project/vllm ``vllm/entrypoints/openai/serving_models.py``): the path it loaded.
    ``NIMSTANDIN_MODELS_ROOT=path`` makes 1.x report the path too (tests that tell two rollouts
    apart by ``root``).
    """
    if m.nim_api == "2.x" or os.environ.get("NIMSTANDIN_MODELS_ROOT") == "path" or not m.root.startswith("/"):
        return m.root
    return m.served


def metadata_v2(m: Model) -> dict[str, Any]:
    """NIM 2.x ``GET /v1/metadata``: the documented fields ``version``, ``modelInfo`` (the models
    served), ``selectedModelProfileId``, ``repository_override``, ``assetInfo``, ``licenseInfo``
    ("Deployment metadata", docs.nvidia.com/nim/large-language-models/latest/reference/api-reference/get-metadata).
    The fields of each ``modelInfo`` entry are not spelled out there, so nothing documents the local
    NIM_MODEL_PATH appearing in the answer: the strictest reading is that it does not, and the
    stand-in names a local model by its served name (a named model by its name)."""
    profile = hashlib.sha256(f"nim-standin/vllm/{m.root}".encode()).hexdigest()
    model_url = m.served if m.root.startswith("/") else m.root
    return {
        "version": STANDIN_NIM2_RELEASE,
        "modelInfo": [{"modelUrl": model_url, "shortName": m.served}]
        + [{"modelUrl": a.name, "shortName": a.name} for a in m.adapters.values()],
        "selectedModelProfileId": profile, "repository_override": "", "assetInfo": [],
        "licenseInfo": {"name": "LICENSE", "path": "/opt/nim/LICENSE", "sha": "",
                        "size": 0, "url": "", "type": "file"}}


#: vLLM's 400 for /v1/chat/completions when the tokenizer has no chat template (the
#: ``chat_template`` field doc of vllm/entrypoints/openai/protocol.py; transformers >= 4.44).
CHAT_TEMPLATE_ERROR = ("As of transformers v4.44, default chat template is no longer allowed, so you must "
                       "provide a chat template if the tokenizer does not define one.")


class Handler(BaseHTTPRequestHandler):
    """OpenAI/NIM HTTP surface. JSON in, JSON out; one log line per request."""

    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = "nim-standin/" + STANDIN_VERSION
    model: Model  # set on the subclass built in serve()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log(f"http: {format % args}", "WARNING")

    def _send(self, status: int, body: Any, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if status >= 400 and self.command == "POST":  # failed inference requests only
            with self.model.lock:
                self.model.counters["errors"] += 1
        log(f'{self.client_address[0]} "{self.command} {self.path}" {status} '
            f"{(time.monotonic() - self._t0) * 1000:.1f}ms")

    def _error(self, status: int, message: str, etype: str) -> None:
        """vLLM's error body: flat (``ErrorResponse`` of the vLLM versions NIM 1.x ships) and
        nested under ``error`` (newer vLLM / OpenAI), so clients of either shape can read it."""
        self._send(status, {"object": "error", "message": message, "type": etype, "param": None,
                            "code": status, "error": {"message": message, "type": etype, "param": None,
                                                      "code": status}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._t0 = time.monotonic()
        m, path = self.model, self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/health/live":
            self._send(200, {"object": "health.response", "message": "Service is live."})
        elif path == "/v1/health/ready":
            if m.ready():
                self._send(200, {"object": "health.response", "message": "Service is ready."})
            else:
                self._send(503, {"object": "health.response", "message": "Service is not ready."})
        elif path == "/v1/models":  # vLLM: the base, then one card per LoRA (root = its path)
            data = [{"id": m.served, "object": "model", "created": 0, "owned_by": "system",
                     "root": listed_root(m), "parent": None, "max_model_len": None}]
            data += [{"id": a.name, "object": "model", "created": 0, "owned_by": "system",
                      "root": str(a.path), "parent": m.served, "max_model_len": None}
                     for a in m.adapters.values()]
            self._send(200, {"object": "list", "data": data})
        elif path == "/v1/version" and m.nim_api == "2.x":
            self._send(200, {"release": STANDIN_NIM2_RELEASE, "api": "1.0.0"})
        elif path == "/v1/metadata" and m.nim_api == "2.x":
            self._send(200, metadata_v2(m))
        elif path == "/v1/metrics":
            with m.lock:
                c = dict(m.counters)
            lines = [
                "# HELP num_requests_running Number of requests currently running (stand-in).",
                "# TYPE num_requests_running gauge", "num_requests_running 0",
                "# TYPE request_success_total counter",
                f'request_success_total{{model_name="{m.served}"}} {c["requests"]}',
                "# TYPE request_failure_total counter",
                f'request_failure_total{{model_name="{m.served}"}} {c["errors"]}',
                "# TYPE prompt_tokens_total counter",
                f'prompt_tokens_total{{model_name="{m.served}"}} {c["prompt_tokens"]}',
                "# TYPE generation_tokens_total counter",
                f'generation_tokens_total{{model_name="{m.served}"}} {c["completion_tokens"]}',
                "# TYPE nim_standin_ready gauge", f"nim_standin_ready {int(m.ready())}"]
            self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")
        else:
            self._error(404, f"Not found: {self.path}", "NotFoundError")

    do_HEAD = do_GET

    def _read_body(self, limit: int) -> bytes:
        """The request body, Content-Length or chunked (uvicorn reads both); b"" past ``limit`` bytes.

        A body left unread (too large, or malformed chunks) makes the connection unusable: it is closed.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, size = [], 0
            try:
                while (chunk := int(self.rfile.readline(64).split(b";", 1)[0].strip() or b"0", 16)) > 0:
                    size += chunk
                    if size > limit:
                        self.close_connection = True
                        return b""
                    parts.append(self.rfile.read(chunk))
                    self.rfile.readline(64)
                while self.rfile.readline(64 << 10) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
            except ValueError:
                self.close_connection = True
                return b""
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True
            return b""
        return self.rfile.read(length) if length > 0 else b""

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._t0 = time.monotonic()
        path = self.path.split("?", 1)[0].rstrip("/")
        raw = self._read_body(16 << 20)
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"Not found: {self.path}", "NotFoundError")
            return
        try:
            req = json.loads(raw)
            assert isinstance(req, dict)
        except (ValueError, AssertionError):
            self._error(400, "Request body must be a JSON object", "BadRequestError")
            return
        m = self.model
        adapter = m.adapters.get(str(req.get("model"))) if req.get("model") != m.served else None
        if req.get("model") != m.served and adapter is None:
            self._error(404, f"The model `{req.get('model')}` does not exist.", "NotFoundError")
            return
        if not m.ready():
            self._error(503, "Model is not ready yet.", "ServiceUnavailableError")
            return
        chat = path == "/v1/chat/completions"
        if chat:
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(x, dict) for x in msgs):
                self._error(400, "`messages` must be a non-empty list of objects", "BadRequestError")
                return
            if not m.chat_template:  # transformers >= 4.44 via vLLM's apply_hf_chat_template
                self._error(400, CHAT_TEMPLATE_ERROR, "BadRequestError")
                return
        if adapter is not None and adapter.error:  # NIM loads an adapter when a request names it
            log(f"LoRA adapter {adapter.name} ({adapter.path}) failed to load: {adapter.error}", "ERROR")
            self._error(400, adapter.error, "BadRequestError")
            return
        if chat:
            users = [_text_of(x.get("content")) for x in msgs if x.get("role") == "user"]
            prompt_text = " ".join(_text_of(x.get("content")) for x in msgs)
            last = users[-1] if users else _text_of(msgs[-1].get("content"))
        else:
            prompt = req.get("prompt")
            if isinstance(prompt, list):
                prompt = " ".join(str(p) for p in prompt)
            if not isinstance(prompt, str):
                self._error(400, "`prompt` must be a string or a list of strings", "BadRequestError")
                return
            prompt_text = last = prompt
        weights = m.weights + (f"+lora {adapter.digest}" if adapter is not None else "")
        words = f"[NIM stand-in] {req.get('model')} (weights {weights}) received: {last}".split(" ")
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
        text = " ".join(words)
        usage = {"prompt_tokens": m.count(prompt_text), "completion_tokens": m.count(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with m.lock:
            m.counters["requests"] += 1
            m.counters["prompt_tokens"] += usage["prompt_tokens"]
            m.counters["completion_tokens"] += usage["completion_tokens"]
        rid = hashlib.sha256(raw).hexdigest()[:24]  # deterministic for the same request
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            body = {"id": f"chatcmpl-{rid}", "object": "chat.completion"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"id": f"cmpl-{rid}", "object": "text_completion"}
        body.update(created=int(time.time()), model=str(req.get("model")), choices=[choice], usage=usage)
        if req.get("stream"):  # one content chunk, then [DONE]: enough for streaming clients
            body["object"] += ".chunk" if chat else ""
            if chat:
                choice["delta"] = choice.pop("message")
            events = b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"
            self._send(200, events, "text/event-stream")
        else:
            self._send(200, body)


def _find_profile(cache: Path, profile: str) -> Path | None:
    """The local_cache directory of a built profile id, via local_manifest.yaml."""
    manifest = cache / "local_cache" / "local_manifest.yaml"
    if not manifest.is_file():
        return None
    entry = parse_yaml(manifest.read_text()).get(profile)
    if isinstance(entry, dict) and isinstance(entry.get("tags"), dict):
        return cache / "local_cache" / str(entry["tags"].get("model_name"))
    return None




def engine_weights_digest(model_dir: Path) -> str:
    """An engine answers with the digest of the weights it was built from (its config's
    ``standin.weights_sha256``), so HF dir, JIT build and engine of the same weights agree."""
    try:
        cfg = read_json(model_dir / "trtllm_engine" / "config.json", "engine config")
    except StandinError:
        cfg = {}
    standin = cfg.get("standin") if isinstance(cfg.get("standin"), dict) else {}
    digest = str(standin.get("weights_sha256") or "")
    return digest[:16] if digest else name_digest(str(model_dir))


def _dir_config(model_dir: Path) -> dict[str, Any]:
    try:
        return read_json(model_dir / "config.json", "model config")
    except StandinError:
        return {}


_REMOTE_SCHEMES = ("hf://", "s3://", "ngc://", "gs://", "http://", "https://")


def check_model_path(value: str) -> Path:
    """NIM 2.x ``NIM_MODEL_PATH``: an absolute directory served with vLLM; remote URIs cannot be
    downloaded here; an engine directory is refused (2.x has no TensorRT-LLM engine backend)."""
    if value.startswith(_REMOTE_SCHEMES):
        raise StandinError("ValueError", f"NIM_MODEL_PATH={value}: the stand-in cannot download; mount the "
                           "model and give an absolute path [NIM stand-in limitation]")
    if not value.startswith("/"):
        raise StandinError("ValueError", f"NIM_MODEL_PATH={value} must be an absolute path or an hf://, "
                           "s3://, ngc:// or gs:// URI")
    root = Path(value)
    if not root.is_dir():
        raise StandinError("FileNotFoundError", f"NIM_MODEL_PATH={root}: no such directory")
    if (root / "trtllm_engine").is_dir() or list(root.glob("rank*.engine")):
        raise StandinError("ValueError", f"NIM_MODEL_PATH={root} holds a TensorRT-LLM engine: NIM 2.x serves "
                           "Hugging Face checkpoints with vLLM and has no TensorRT-LLM engine backend; give "
                           "it the checkpoint the engine was built from")
    if not (root / "config.json").is_file():
        raise StandinError("FileNotFoundError", f"{root}/config.json not found")
    if not weight_files(root, (".safetensors", ".bin")):
        raise StandinError("FileNotFoundError", f"{root}: no *.safetensors or *.bin weights (vLLM backend)")
    return root


def serve(argv: list[str]) -> int:
    """``start-server`` (NIM 1.x): resolve the model (JIT build if asked), then serve until
    SIGTERM/SIGINT."""
    return _serve("1.x")


def serve_v2(argv: list[str]) -> int:
    """``nim-serve`` (NIM 2.x): serve ``NIM_MODEL_PATH`` (or the bundled model) with vLLM rules;
    ``argv``: vLLM options after ``nim-serve``."""
    return _serve("2.x", argv)


def check_cache_dir(cache: Path) -> None:
    """NIM's start-up check that it can write ``NIM_CACHE_PATH`` (a container run with ``-u`` on a
    cache its user cannot write exits here, before anything else: NVIDIA/nim-deploy issue 16)."""
    probe = cache / f".nim-write-check-{os.getpid()}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StandinError("RuntimeError", f"Unable to write to NIM_CACHE_PATH ({cache})", CACHE_CHECK_FRAMES) from exc


def check_legacy_backend(env: Any) -> None:
    """Late NIM 1.x serves a custom-built TensorRT-LLM engine or fine-tuned weights only with the
    legacy backend flags (NIM docs, ft-support.html); the stand-in requires them on every 1.x."""
    missing = [name for name in LEGACY_BACKEND_ENV if env.get(name) != "1"]
    if missing:
        raise StandinError(
            "RuntimeError", "The default PyTorch TRT-LLM backend does not support fine-tuned models. Set "
            + " and ".join(f"{name}=1" for name in LEGACY_BACKEND_ENV) + f" (unset or not 1: {', '.join(missing)})")


def _serve(nim_api: str, argv: list[str] | None = None) -> int:
    def on_signal(signum: int, _frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not break the clean-up
            signal.signal(sig, signal.SIG_IGN)
        raise _Shutdown(signum)

    # Python as PID 1 gets no default SIGTERM action: without this, `docker stop` waits and kills.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    env = os.environ
    cache = Path(env.get("NIM_CACHE_PATH", "/opt/nim/.cache"))
    port = int(env.get("NIM_SERVER_PORT") or env.get("NIM_HTTP_API_PORT") or 8000)
    ignore = env.get("NIMSTANDIN_IGNORE_MODEL") == "1"  # fault injection: serve the bundled model
    if nim_api == "2.x":  # NIM_MODEL_NAME / NIM_FT_MODEL were removed in 2.x
        ft_model, model_name = None, DEFAULT_MODEL
        model_path = None if ignore else (env.get("NIM_MODEL_PATH") or None)
    else:
        ft_model = None if ignore else env.get("NIM_FT_MODEL")
        model_name = DEFAULT_MODEL if ignore else (env.get("NIM_MODEL_NAME") or DEFAULT_MODEL)
        model_path = None
    custom = env.get("NIM_CUSTOM_MODEL_NAME") or "custom_1"
    served = env.get("NIM_SERVED_MODEL_NAME") or (custom if ft_model else (model_path or model_name))
    program = "nim-serve (NIM 2.x)" if nim_api == "2.x" else "start-server (NIM 1.x)"
    log(f"=== NIM STAND-IN (CPU, no model is run; NOT NVIDIA NIM) {STANDIN_VERSION}, {program} ===")
    log(f"Environment: {safe_env_summary()}")
    if ignore:
        log("NIMSTANDIN_IGNORE_MODEL=1: ignoring NIM_MODEL_NAME / NIM_FT_MODEL / NIM_MODEL_PATH and serving "
            f"the bundled model {DEFAULT_MODEL} [NIM stand-in fault injection]", "WARNING")
    elif nim_api == "2.x" and (env.get("NIM_MODEL_NAME") or env.get("NIM_FT_MODEL")):
        log("NIM_MODEL_NAME / NIM_FT_MODEL are not NIM 2.x settings (removed in 2.x) and are ignored; "
            "NIM 2.x reads NIM_MODEL_PATH", "WARNING")

    httpd: ThreadingHTTPServer | None = None
    try:
        check_cache_dir(cache)  # NIM checks its cache before anything else
        # Everything that can be checked quickly is checked before listening, so a bad layout or an
        # engine this machine cannot load exits 1 at once (like NIM's start-up), with no
        # half-alive server. Weights are checked while loading (after listening), as in NIM.
        gpu = fake_gpu()
        log(f"TensorRT-LLM version: {trtllm_version()}; GPUs (fake): {gpu_count()} x {gpu['name']} "
            f"(compute {gpu['compute_cap']}, {gpu['pci_device_id']})")
        profile = "" if nim_api == "2.x" else env.get("NIM_MODEL_PROFILE", "")
        profile_dir = _find_profile(cache, profile) if profile else None
        if profile_dir is None and re.fullmatch(r"[0-9a-f]{64}", profile):
            raise StandinError("ValueError", f"NIM_MODEL_PROFILE={profile} is not in "
                               f"{cache}/local_cache/local_manifest.yaml (stand-in has no NGC profiles)")
        root: Path | None = None
        load_dir: Path | None = None  # an HF directory whose weights vLLM loads after listening
        base_cfg: dict[str, Any] = BUNDLED_CONFIG
        if ft_model:
            backend, root = "tensorrt_llm", Path(ft_model)
            cached = cached_engine(cache, custom)
            if cached is not None:
                check_served_dir(cached)  # a cached engine is loaded, so it is checked now
            else:
                if not root.is_dir():
                    raise StandinError("FileNotFoundError", f"NIM_FT_MODEL={root}: no such directory")
                detect_format(root)
                options = jit_options()
                tp, pp = _int(options["tp_size"], "NIM_TENSOR_PARALLEL_SIZE"), \
                    _int(options["pp_size"], "NIM_PIPELINE_PARALLEL_SIZE")
                if gpu_count() < tp * pp:
                    raise StandinError(
                        "RuntimeError",
                        f"NIM_TENSOR_PARALLEL_SIZE x NIM_PIPELINE_PARALLEL_SIZE = {tp} x {pp} needs "
                        f"{tp * pp} GPU(s), but only {gpu_count()} GPU(s) are visible "
                        f"(NIMSTANDIN_GPU_COUNT={gpu_count()})")
            base_cfg = _dir_config(root)
        elif model_path is not None:
            root = load_dir = check_model_path(model_path)
            backend, base_cfg = "vllm", _dir_config(root)
        elif profile_dir is not None:
            root = profile_dir
            backend = check_served_dir(root)
            base_cfg = _dir_config(root)
            if env.get("NIM_SERVED_MODEL_NAME") is None:
                served = root.name
        elif nim_api == "1.x" and (model_name.startswith("/") or Path(model_name).is_dir()):
            root = Path(model_name)
            backend = check_served_dir(root)
            base_cfg = _dir_config(root)
            load_dir = root if backend == "vllm" else None
        else:  # a model name: the bundled model (2.x) or a model of the bundled manifest (1.x)
            backend = "vllm"
            if nim_api == "1.x" and not ignore:
                log(f"NIM_MODEL_NAME={model_name} found in the model manifest {lookup_manifest(model_name)}")
        if nim_api == "1.x" and not ignore and (ft_model or backend == "tensorrt_llm"):
            check_legacy_backend(env)
        model = Model(served, str(root) if root else model_name, backend, nim_api)
        if root is None:
            model.weights = name_digest(model_name)
        elif backend == "tensorrt_llm" and not ft_model:
            model.weights, model.chat_template = engine_weights_digest(root), has_chat_template(root)
        if env.get("NIM_PEFT_SOURCE"):
            model.adapters = load_adapters(env["NIM_PEFT_SOURCE"], base_cfg, lora_max_rank(nim_api, argv or []))
        handler = type("BoundHandler", (Handler,), {"model": model})
        try:
            httpd = ThreadingHTTPServer(("0.0.0.0", port), handler)
        except OSError as exc:
            raise StandinError(type(exc).__name__, f"cannot listen on port {port}: {exc}") from exc
        httpd.daemon_threads = True  # idle keep-alive connections must not block exit
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
        log(f"Listening on http://0.0.0.0:{port} (live now; ready after load)")

        if ft_model:  # the slow part runs while /v1/health/live already answers, as in NIM
            root = jit_build(Path(ft_model), cache, custom, served)
            check_served_dir(root)  # the build must be servable, as NIM loads it next
            model.root = str(root)
            model.weights, model.chat_template = engine_weights_digest(root), has_chat_template(root)
        elif load_dir is not None:  # vLLM loads the weights: what it would refuse fails here
            log(f"Loading weights from {load_dir} (vLLM loader rules)")
            check_weights(load_dir, base_cfg, "vllm")
            model.weights, model.chat_template = weights_digest(load_dir), has_chat_template(load_dir)
        if not model.chat_template:
            log("The tokenizer has no chat_template: /v1/chat/completions will answer 400 (as vLLM with "
                "transformers >= 4.44); /v1/completions works", "WARNING")
        backend_name = {"tensorrt_llm": "TensorRT-LLM", "vllm": "vLLM"}[backend]
        log(f"Backend: {backend_name} backend (stand-in); model path: {model.root}; "
            f"served model name: {served}; weights {model.weights}")
        delay = float(env.get("NIMSTANDIN_READY_DELAY", "2"))
        model.ready_at = time.monotonic() + max(delay, 0.0)
        log(f"Model loaded; /v1/health/ready answers 200 in {delay:.1f}s")
        while True:
            time.sleep(3600)
    except _Shutdown as sig:
        log(f"Received signal {sig.args[0]}; shutting down")
        return 0
    except StandinError as err:
        log(f"Start-up failed: {err.exc_type}: {err}", "ERROR")
        return fail(err)
    except PermissionError as exc:  # a file or directory the container's -u user cannot read: Python's own error
        log(f"Start-up failed: PermissionError: {exc}", "ERROR")
        return fail(StandinError("PermissionError", str(exc)))
    except BuildError as err:  # NIM start-up exits 1 whatever killed its build
        log(f"Start-up failed: the engine build failed: {err}", "ERROR")
        build_failed(err)
        return 1
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


# --------------------------------------------------------------------------------- nim-optimize
def optimize(argv: list[str]) -> int:
    """``nim-optimize``: validate, build into ``OUT/.tmp-*``, then move the result into OUT."""
    parser = argparse.ArgumentParser(
        prog="nim-optimize",
        description="NIM STAND-IN (CPU, test bed only; NOT NVIDIA NIM): write a TensorRT-LLM engine "
                    "layout (config.json, tokenizer files, trtllm_engine/rank*.engine) from an HF checkpoint.")
    parser.add_argument("--model_dir", required=True, help="HF checkpoint: config.json + weights")
    parser.add_argument("--build_config", help="flat YAML: dtype, tp_size, pp_size, max_seq_len, "
                        "max_batch_size, max_num_tokens (other keys are kept)")
    parser.add_argument("--output_engine_dir", required=True, help="where the engine layout goes")
    args = parser.parse_args(argv)
    model_dir, out = Path(args.model_dir), Path(args.output_engine_dir)
    try:
        options: dict[str, Any] = {}
        if args.build_config:
            try:
                options = parse_yaml(Path(args.build_config).read_text())
            except OSError as exc:
                raise StandinError("FileNotFoundError", f"build config: {exc}") from exc
        log(f"nim-optimize (stand-in): {model_dir} -> {out} with {json.dumps(options)}")
        plan = plan_build(model_dir, options)  # every check runs before OUT is touched
        check_bf16(plan["dtype"], require_gpu())
        run_build(plan["architecture"], f"TensorRT-LLM engine (dtype={plan['dtype']} tp={plan['tp']} "
                  f"pp={plan['pp']} weights_sha256={plan['weights_sha256'][:12]}...)", log,
                  ranks=plan["tp"] * plan["pp"], engine_dir=str(out / "trtllm_engine"))
        # OUT may be a bind mount (cannot be renamed), so build inside it and move entries up.
        tmp = out / f".tmp-nim-optimize-{os.getpid()}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            _rmtree_quiet(tmp)
            tmp.mkdir()
            write_engine(model_dir, plan, tmp, "nim-optimize")
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "trtllm_engine"):  # engine last
                dest = out / entry.name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                elif dest.exists() or dest.is_symlink():
                    dest.unlink()
                os.rename(entry, dest)
        except OSError as exc:
            raise StandinError(type(exc).__name__, f"cannot write {out}: {exc}") from exc
        finally:
            _rmtree_quiet(tmp)
    except StandinError as err:
        return fail(err)
    except BuildError as err:
        return build_failed(err)
    log(f"Engine written to {out}/trtllm_engine")
    return 0


# -------------------------------------------------------------------------- list-model-profiles
def list_profiles(argv: list[str]) -> int:
    """``list-model-profiles``: the fake GPUs, then the locally built profiles (compatible when
    built for this GPU model and no more GPUs than visible), plus the generic vLLM one."""
    cache = Path(os.environ.get("NIM_CACHE_PATH", "/opt/nim/.cache"))
    manifest = cache / "local_cache" / "local_manifest.yaml"
    try:
        gpu, count = fake_gpu(), gpu_count()
    except StandinError as err:
        return fail(err)
    profiles = parse_yaml(manifest.read_text()) if manifest.is_file() else {}
    print("SYSTEM INFO")
    if count:
        print("- Free GPUs:")
        for i in range(count):
            print(f"  -  [{gpu_device_tag(gpu)}] ({i}) {gpu['name']} ({gpu_short_name(gpu)}) "
                  "[current utilization: 0%]")
    else:
        print("- Free GPUs: <None>\n- No GPUs detected (NIM stand-in: NIMSTANDIN_GPU_COUNT=0)")
    compatible, incompatible = [], []
    for pid, entry in profiles.items():
        tags = entry.get("tags", {}) if isinstance(entry, dict) else {}
        tags = tags if isinstance(tags, dict) else {}
        line = f"  - {pid} ({tags.get('model_name', '?')})"
        device, need = tags.get("gpu_device"), str(tags.get("number_of_gpus", "1"))
        fits = (device in (None, gpu_device_tag(gpu))) and need.isdigit() and int(need) <= count
        (compatible if fits else incompatible).append(line)
    generic = hashlib.sha256(b"nim-standin/vllm-fp16-tp1").hexdigest()
    (compatible if count else incompatible).append(f"  - {generic} (vllm-fp16-tp1)")
    print("MODEL PROFILES\n- Compatible with system and runnable:")
    print("\n".join(compatible) if compatible else "  <None>")
    print("- Incompatible with system:")
    print("\n".join(incompatible) if incompatible else "  <None>")
    return 0


# ------------------------------------------------------------------ TensorRT-LLM: checkpoints
def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    """A valid safetensors file: 8-byte little-endian header length, JSON header (space-padded to
    8 bytes), then the tensor data."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, data = 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset, data = offset + len(raw), data + raw
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


#: TensorRT-LLM's converters by their examples directory, with the architectures each converts
#: (NVIDIA/TensorRT-LLM ``examples/models/core/<dir>/convert_checkpoint.py`` from 0.18,
#: ``examples/<dir>/convert_checkpoint.py`` up to 0.17; the llama example converts Mistral and Mixtral).
CONVERTERS = {
    "llama": ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
    "qwen": ("Qwen2ForCausalLM",),
    "gemma": ("GemmaForCausalLM", "Gemma2ForCausalLM"),
    "phi": ("Phi3ForCausalLM",),
}
_CONVERT_DTYPES = ["auto", "float16", "bfloat16", "float32"]


def converter_parser(family: str) -> argparse.ArgumentParser:
    """The argument parser of one family's ``convert_checkpoint.py``, with that script's real option
    names (``parse_arguments()`` of the sources cited in ``nimflow/trtllm_families.py``); an unknown
    flag fails as argparse does (exit 2, ``unrecognized arguments``)."""
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=f"NIM STAND-IN (NOT TensorRT-LLM): examples/.../{family}/convert_checkpoint.py; converts an "
                    "HF checkpoint into the TensorRT-LLM checkpoint layout (tiny placeholder rank*.safetensors).")
    if family == "gemma":
        # examples/gemma/convert_checkpoint.py (TensorRT-LLM 201135e, 0.17; 310decb, models/core, 0.18+):
        # dash-separated names, --world-size (tensor parallelism only: "We don't support pipeline
        # parallelism yet for Gemma"), a checkpoint type. The older script has no --model_dir /
        # --output_dir aliases, and no default --ckpt-type (no loader for None): both required here.
        parser.add_argument("--ckpt-type", type=str, choices=["jax", "keras", "torch", "hf"], required=True)
        parser.add_argument("--model-dir", type=str, required=True)
        parser.add_argument("--output-model-dir", type=str, required=True)
        parser.add_argument("--world-size", type=int, default=1,
                            help="world size, only support tensor parallelism now")
        parser.add_argument("--use-weight-only-with-precision", dest="weight_only_precision",
                            choices=["int8", "int4", "w4a8_awq", "w4a16_awq"], default=None)
        parser.add_argument("--dtype", type=str, default="float16", choices=["float32", "bfloat16", "float16"])
        parser.add_argument("--load_model_on_cpu", action="store_true")
        return parser
    # llama (04a2cac / 368f8f2), qwen (05316d3 / 0df9aaf), phi (04a2cac / 10c1d59): --model_dir,
    # --output_dir, --tp_size, --pp_size, --dtype.
    parser.add_argument("--model_dir", type=str, required=True)
    parser.add_argument("--tp_size", type=int, default=1, help="N-way tensor parallelism size")
    parser.add_argument("--pp_size", type=int, default=1, help="N-way pipeline parallelism size")
    parser.add_argument("--dtype", type=str, default="auto", choices=_CONVERT_DTYPES,
                        help="auto: the checkpoint's torch_dtype, float32 becoming float16")
    parser.add_argument("--output_dir", type=str, default="tllm_checkpoint")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--use_weight_only", action="store_true", default=False)
    parser.add_argument("--weight_only_precision", const="int8", type=str, nargs="?", default="int8",
                        choices=["int8", "int4", "int4_awq"] if family != "phi" else ["int8", "int4"])
    if family != "phi":  # the phi script has no --load_model_on_cpu
        parser.add_argument("--load_model_on_cpu", action="store_true")
    if family in ("llama", "phi"):
        parser.add_argument("--moe_tp_size", type=int, default=-1)
        parser.add_argument("--moe_ep_size", type=int, default=-1)
    return parser


def converter_family(script: str | None) -> str:
    """The family of the converter run as ``script`` (its directory: ``.../<dir>/convert_checkpoint.py``);
    llama when run otherwise (``nim_standin.py convert_checkpoint ...`` on a host)."""
    directory = os.path.basename(os.path.dirname(script)) if script else ""
    return directory if directory in CONVERTERS else "llama"


def convert_checkpoint(argv: list[str], script: str | None = None) -> int:
    """``examples/models/core/<family>/convert_checkpoint.py``: HF checkpoint -> TensorRT-LLM checkpoint
    (``config.json`` + ``rank{N}.safetensors``; TP/PP are fixed here). The family is the script's directory."""
    family = converter_family(script)
    args = converter_parser(family).parse_args(argv)
    if family == "gemma":
        model_dir_arg, out_arg, tp_arg, pp_arg = args.model_dir, args.output_model_dir, args.world_size, 1
        quant = args.weight_only_precision
    else:
        model_dir_arg, out_arg, tp_arg, pp_arg = args.model_dir, args.output_dir, args.tp_size, args.pp_size
        quant = args.weight_only_precision if args.use_weight_only else None
    tik = time.time()
    print(f"[TensorRT-LLM] TensorRT-LLM version: {trtllm_version()} (NIM STAND-IN, not TensorRT-LLM)",
          flush=True)
    try:
        if family == "phi" and pp_arg != 1:  # examples/models/core/phi/convert_checkpoint.py, main()
            raise StandinError("AssertionError", "Pipeline parallelism is not supported.")
        model_dir, out = Path(model_dir_arg), Path(out_arg)
        model_cfg = check_checkpoint(model_dir)
        arch = str((model_cfg.get("architectures") or ["unknown"])[0])
        if arch not in CONVERTERS[family]:
            raise StandinError("ValueError", f"Unsupported model architecture: {arch} "
                               f"(examples/models/core/{family}/convert_checkpoint.py converts "
                               f"{', '.join(CONVERTERS[family])})")
        dtype = auto_dtype(model_cfg.get("torch_dtype")) if args.dtype == "auto" else args.dtype
        if dtype not in DTYPES:
            raise StandinError("ValueError", f"Unsupported dtype {dtype!r} in {model_dir}/config.json")
        tp = _int(tp_arg, "tp_size" if family != "gemma" else "world_size")
        pp = _int(pp_arg, "pp_size")
        config = hf_pretrained_config(model_cfg, dtype, tp, pp)
        check_parallel(config, "AssertionError")
        if quant:
            algo = {"int8": "W8A16", "int4": "W4A16", "int4_awq": "W4A16_AWQ", "w4a16_awq": "W4A16_AWQ",
                    "w4a8_awq": "W4A8_AWQ"}[quant]
            config["quantization"] = {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 128}
        else:
            config["quantization"] = {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128}
        source = hash_files(weight_files(model_dir), model_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
            for rank in range(tp * pp):
                digest = hashlib.sha256(json.dumps([source, config, rank], sort_keys=True).encode()).digest()
                (out / f"rank{rank}.safetensors").write_bytes(safetensors_bytes(
                    {"transformer.standin.digest": ("U8", [len(digest)], digest)},
                    {"format": "pt", "standin": "NIM stand-in checkpoint shard: not real weights",
                     "source_weights_sha256": source, "rank": str(rank)}))
        except OSError as exc:
            raise StandinError(type(exc).__name__, str(exc)) from exc
    except StandinError as err:
        return fail(err)
    print(f"Total time of converting checkpoints: {hms(time.time() - tik)}", flush=True)
    return 0


# ------------------------------------------------------------------------------ trtllm-build
def checkpoint_source_weights(ckpt: Path, ranks: int) -> str:
    """The HF weights a TensorRT-LLM checkpoint was converted from (``source_weights_sha256`` that
    convert_checkpoint.py records in every shard), so the engine answers with their digest; a
    checkpoint from elsewhere: the sha256 of its shards."""
    sources = set()
    for rank in range(ranks):
        with (ckpt / f"rank{rank}.safetensors").open("rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            meta = json.loads(fh.read(n)).get("__metadata__") or {}
        sources.add(meta.get("source_weights_sha256") if isinstance(meta, dict) else None)
    if len(sources) == 1 and isinstance(next(iter(sources)), str):
        return str(sources.pop())
    return hash_files([ckpt / f"rank{r}.safetensors" for r in range(ranks)], ckpt)


def _enable(value: str) -> bool:
    return value == "enable"


def trtllm_build(argv: list[str]) -> int:
    """``trtllm-build`` (``tensorrt_llm/commands/build.py``): TensorRT-LLM checkpoint -> engine dir
    (``config.json`` + ``rank{N}.engine``) and a timing cache."""
    parser = argparse.ArgumentParser(
        prog="trtllm-build", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="NIM STAND-IN (NOT TensorRT-LLM): write a stand-in engine from a TensorRT-LLM "
                    "checkpoint, with TensorRT-LLM's defaults, checks and clipping.")
    parser.add_argument("--checkpoint_dir", type=str, default=None)
    parser.add_argument("--output_dir", type=str, default="engine_outputs")
    parser.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    parser.add_argument("--max_input_len", type=int, default=DEFAULT_MAX_INPUT_LEN)
    legacy = release_before(trtllm_version(), (0, 12))
    if legacy:  # TensorRT-LLM 0.12 release notes: --max_output_len was replaced by --max_seq_len
        parser.add_argument("--max_output_len", type=int, default=None)
    else:
        parser.add_argument("--max_seq_len", "--max_decoder_seq_len", dest="max_seq_len", type=int, default=None)
    parser.add_argument("--max_beam_width", type=int, default=1)
    parser.add_argument("--max_num_tokens", type=int, default=DEFAULT_MAX_NUM_TOKENS)
    parser.add_argument("--opt_num_tokens", type=int, default=None)
    parser.add_argument("--kv_cache_type", type=str.lower, choices=list(KV_CACHE_TYPES), default=None)
    parser.add_argument("--input_timing_cache", type=str, default=None)
    parser.add_argument("--output_timing_cache", type=str, default="model.cache")
    parser.add_argument("--strip_plan", action="store_true", default=False)
    parser.add_argument("--fast_build", action="store_true", default=False)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log_level", type=str, default="info",
                        choices=["internal_error", "error", "warning", "info", "verbose", "debug"])
    plugins = parser.add_argument_group("Plugin config arguments")
    plugins.add_argument("--gemm_plugin", type=str, default="disable",
                         choices=["auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable"])
    plugins.add_argument("--gpt_attention_plugin", type=str, default="auto",
                         choices=["auto", "float16", "float32", "bfloat16", "int32", "disable"])
    for flag in ("context_fmha", "remove_input_padding", "use_paged_context_fmha"):
        plugins.add_argument(f"--{flag}", type=str, default="enable", choices=["enable", "disable"])
    plugins.add_argument("--multiple_profiles", type=str, default="disable", choices=["enable", "disable"])
    plugins.add_argument("--tokens_per_block", type=int, default=DEFAULT_TOKENS_PER_BLOCK)
    args = parser.parse_args(argv)
    if legacy:  # before 0.12 the sequence limit was input + output
        args.max_seq_len = None if args.max_output_len is None else args.max_input_len + args.max_output_len
    tik = time.time()
    print(f"[TensorRT-LLM] TensorRT-LLM version: {trtllm_version()} (NIM STAND-IN, not TensorRT-LLM)",
          flush=True)
    try:
        if args.checkpoint_dir is None:  # build.py: ckpt_dir_or_model_config.lower()
            raise StandinError("AttributeError", "'NoneType' object has no attribute 'lower'")
        ckpt = Path(args.checkpoint_dir)
        if not (ckpt / "config.json").is_file():
            raise StandinError("FileNotFoundError",
                               f"[Errno 2] No such file or directory: '{ckpt / 'config.json'}'")
        config = read_json(ckpt / "config.json", "checkpoint config")
        tp, pp = _mapping(config)
        for rank in range(tp * pp):
            check_safetensors(ckpt / f"rank{rank}.safetensors")
        pretrained = dict(config)
        pretrained["dtype"] = str(config.get("dtype") or "float16")
        pretrained["mapping"] = {**(config.get("mapping") or {}), "world_size": tp * pp,
                                 "tp_size": tp, "pp_size": pp}
        quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
        pretrained["quantization"] = {"quant_algo": None, "kv_cache_quant_algo": None, **quant}
        arch = str(config.get("architecture") or "unknown")
        gpu = require_gpu()
        check_bf16(pretrained["dtype"], gpu)
        build_cfg = resolve_build_config(
            pretrained, tllm_warning, max_batch_size=args.max_batch_size,
            max_input_len=args.max_input_len, max_seq_len=args.max_seq_len,
            max_num_tokens=args.max_num_tokens, max_beam_width=args.max_beam_width,
            opt_num_tokens=args.opt_num_tokens, kv_cache_type=args.kv_cache_type,
            gemm_plugin=args.gemm_plugin, strip_plan=args.strip_plan,
            input_timing_cache=args.input_timing_cache, output_timing_cache=args.output_timing_cache,
            context_fmha=_enable(args.context_fmha), remove_input_padding=_enable(args.remove_input_padding),
            use_paged_context_fmha=_enable(args.use_paged_context_fmha),
            multiple_profiles=_enable(args.multiple_profiles),
            tokens_per_block=_int(args.tokens_per_block, "tokens_per_block"),
            manage_weights=args.fast_build)
        build_cfg["plugin_config"]["gpt_attention_plugin"] = args.gpt_attention_plugin
        if args.input_timing_cache is not None and not Path(args.input_timing_cache).is_file():
            tllm_warning("Invalid timing cache, using freshly created one")
        weights = checkpoint_source_weights(ckpt, tp * pp)
        run_build(arch, f"{tp * pp} engine(s) for {arch} ({pretrained['dtype']}, tp={tp}, pp={pp})",
                  tllm_log, ranks=tp * pp, engine_dir=args.output_dir)
        try:  # the timing cache is saved by build() before Engine.save writes the engine
            cache_path = Path(args.output_timing_cache)
            cache_path.write_bytes(TIMING_CACHE_MAGIC + json.dumps(
                {"trtllm_version": trtllm_version(), "gpu": gpu,
                 "note": "NIM stand-in: not a TensorRT timing cache"}, sort_keys=True).encode() + b"\n")
            tllm_log(f"Timing cache serialized to {cache_path}")
        except OSError as exc:
            raise BuildError((f"{type(exc).__name__}: {exc}",)) from exc
        out = Path(args.output_dir)
        try:
            write_engine_dir(out, pretrained, build_cfg, weights, "trtllm-build")
            if args.fast_build:  # --fast_build keeps weights out of the plan (managed weights)
                for rank in range(tp * pp):
                    (out / f"rank{rank}_managed_weights.safetensors").write_bytes(safetensors_bytes(
                        {"standin.managed": ("U8", [32], hashlib.sha256(f"{weights}{rank}".encode()).digest())},
                        {"standin": "NIM stand-in managed weights: not real"}))
        except OSError as exc:
            raise StandinError(type(exc).__name__, f"cannot write {out}: {exc}") from exc
    except StandinError as err:
        return fail(err)
    except BuildError as err:
        return build_failed(err)
    tllm_log(f"Total time of building all engines: {hms(time.time() - tik)}")
    return 0


# ------------------------------------------------------------------------------------- dispatch
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "start-server": serve, "serve": serve, "nim-run": serve, "nim-serve": serve_v2,
    "nim-optimize": optimize, "list-model-profiles": list_profiles, "nvidia-smi": nvidia_smi,
    "trtllm-build": trtllm_build, "convert_checkpoint.py": convert_checkpoint,
    "convert_checkpoint": convert_checkpoint}


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the program name (image links) or on a subcommand (host use)."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else ""
    if prog == "convert_checkpoint.py":  # the family is the directory it was run from
        return convert_checkpoint(argv[1:], script=argv[0])
    if prog in COMMANDS:
        return COMMANDS[prog](argv[1:])
    if len(argv) > 1 and argv[1] in COMMANDS:
        return COMMANDS[argv[1]](argv[2:])
    if len(argv) > 1:
        print(f"usage: {prog} [{'|'.join(COMMANDS)}] ...", file=sys.stderr)
        return 2
    return serve([])


if __name__ == "__main__":
    sys.exit(main())

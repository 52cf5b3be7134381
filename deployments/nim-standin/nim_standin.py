#!/usr/bin/python3
"""*** STAND-IN — NOT NVIDIA NIM ***

A CPU-only stand-in for the GPU-only NVIDIA NIM for LLMs container, for CPU test beds.

Real NIM images need a GPU and a registry; neither exists on the test bed. This one file plays the
parts of the NIM container that nimflow relies on (docs/reference: nim.md), so the pipeline can be
exercised end to end on a laptop or a CPU CI runner. It runs NO model: answers are canned echoes and
"engines" are small deterministic files. Python 3.11 standard library only (the image holds nothing
else). The contract it honours:

* ``start-server`` (the default CMD): OpenAI-compatible HTTP on ``$NIM_SERVER_PORT`` (8000):
  ``/v1/health/live``, ``/v1/health/ready`` (503 until loaded), ``/v1/models``,
  ``/v1/chat/completions``, ``/v1/completions``, ``/v1/metrics``.
  Serves ``NIM_MODEL_NAME`` (an HF directory -> "vLLM backend", a directory with ``trtllm_engine/``
  -> "TensorRT-LLM backend", or just a name) or JIT-builds ``NIM_FT_MODEL`` into
  ``$NIM_CACHE_PATH/local_cache/<NIM_CUSTOM_MODEL_NAME>`` + ``local_manifest.yaml``; an engine
  directory given as ``NIM_FT_MODEL`` fails like TRT-LLM's ``ModelWeightsLoader.detect_format``.
* ``nim-optimize --model_dir D --build_config Y --output_engine_dir O``: writes the NIM engine layout.
* ``list-model-profiles``: lists the locally built profiles.

The program is chosen by ``basename(argv[0])`` (the image has wrappers with those names) or by a
subcommand: ``nim_standin.py serve|nim-optimize|list-model-profiles ...``.
Knobs that exist only here: ``NIMSTANDIN_READY_DELAY`` (s, default 2) and ``NIMSTANDIN_BUILD_SECONDS``
(simulated build time, default 1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STANDIN_VERSION = "standin-0.1"
ENGINE_MAGIC = b"NIMSTANDIN-ENGINE\n"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what detect_format accepts
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
MODEL_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
DEFAULT_MODEL = "meta/llama-3.1-8b-instruct"
_SECRET_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.I)


class StandinError(Exception):
    """A failure reported like the real container does: a traceback-looking block, then exit 1."""

    def __init__(self, exc_type: str, message: str, where: str = "") -> None:
        super().__init__(message)
        self.exc_type, self.where = exc_type, where


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


def fail(err: StandinError) -> int:
    """Print ``err`` to stderr the way a crashing NIM start-up does and return exit code 1."""
    if err.where:  # mimic the frames that end a real TRT-LLM/NIM traceback
        print("Traceback (most recent call last):\n" + err.where, file=sys.stderr)
    print(f"{err.exc_type}: {err}", file=sys.stderr, flush=True)
    return 1


def safe_env_summary() -> str:
    """The NIM_* settings for the start-up log; never the value of anything secret-looking."""
    parts = []
    for name in sorted(os.environ):
        if name.startswith(("NIM_", "NIMSTANDIN_")) or name in ("NGC_API_KEY", "HF_TOKEN"):
            value = "<redacted>" if _SECRET_RE.search(name) else os.environ[name]
            parts.append(f"{name}={value}")
    return " ".join(parts) or "(none)"


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
    return read_json(model_dir / "config.json", "model config")


def check_served_dir(model_dir: Path) -> str:
    """Validate a directory given as NIM_MODEL_NAME; return the backend that would serve it."""
    if not model_dir.is_dir():
        raise StandinError("FileNotFoundError", f"NIM_MODEL_NAME={model_dir}: no such directory")
    if not (model_dir / "config.json").is_file():
        raise StandinError("FileNotFoundError", f"{model_dir}/config.json not found")
    engine_dir = model_dir / "trtllm_engine"
    if engine_dir.is_dir():
        cfg = read_json(engine_dir / "config.json", "engine config")
        mapping = cfg.get("pretrained_config", {}).get("mapping", {})
        tp = int(mapping.get("tp_size", cfg.get("tp_size", 1)))
        pp = int(mapping.get("pp_size", cfg.get("pp_size", 1)))
        missing = [f"rank{r}.engine" for r in range(tp * pp)
                   if not (engine_dir / f"rank{r}.engine").is_file()]
        if missing:
            raise StandinError("FileNotFoundError",
                               f"{engine_dir}: engine files missing for tp={tp} pp={pp}: {missing}")
        return "tensorrt_llm"
    if not weight_files(model_dir, (".safetensors", ".bin")):
        raise StandinError("FileNotFoundError",
                           f"{model_dir}: no *.safetensors or *.bin weights (vLLM backend)")
    return "vllm"


# ----------------------------------------------------------------------------------------- build
def plan_build(model_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Validate ``model_dir`` and the build options; return the resolved build (nothing written).

    Checks what the real build rejects: not a checkpoint, unknown dtype, heads not divisible by tp.
    """
    model_cfg = check_checkpoint(model_dir)
    dtype = str(options.get("dtype") or model_cfg.get("torch_dtype") or "float16")
    if dtype not in DTYPES:
        raise StandinError("ValueError", f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    tp, pp = int(options.get("tp_size") or 1), int(options.get("pp_size") or 1)
    if tp < 1 or pp < 1:
        raise StandinError("ValueError", f"tp_size ({tp}) and pp_size ({pp}) must be >= 1")
    heads = model_cfg.get("num_attention_heads")
    if isinstance(heads, int) and heads % tp:
        raise StandinError("ValueError",
                           f"num_attention_heads ({heads}) must be divisible by tp_size ({tp})")
    build_cfg = {k: v for k, v in options.items() if k not in ("dtype", "tp_size", "pp_size")}
    build_cfg.setdefault("max_seq_len", int(model_cfg.get("max_position_embeddings", 4096)))
    build_cfg.setdefault("max_batch_size", 256)
    build_cfg.setdefault("max_num_tokens", 8192)
    return {"dtype": dtype, "tp": tp, "pp": pp, "build_config": build_cfg,
            "architecture": (model_cfg.get("architectures") or ["unknown"])[0],
            "num_attention_heads": heads,
            "weights_sha256": hash_files(weight_files(model_dir), model_dir)}


def write_engine(model_dir: Path, plan: dict[str, Any], out_dir: Path) -> None:
    """Write the NIM engine layout for ``plan`` into the existing, empty ``out_dir``."""
    delay = float(os.environ.get("NIMSTANDIN_BUILD_SECONDS", "1"))
    dtype, tp, pp, build_cfg = plan["dtype"], plan["tp"], plan["pp"], plan["build_config"]
    log(f"Building TensorRT-LLM engine (stand-in): dtype={dtype} tp={tp} pp={pp} "
        f"weights_sha256={plan['weights_sha256'][:12]}... ({delay:.1f}s simulated)")
    time.sleep(max(delay, 0.0))
    for name in MODEL_FILES:  # the HF files NIM keeps next to the engine
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    engine_dir = out_dir / "trtllm_engine"
    engine_dir.mkdir()
    world = tp * pp
    (engine_dir / "config.json").write_text(json.dumps({
        "version": STANDIN_VERSION,
        "pretrained_config": {
            "architecture": plan["architecture"], "dtype": dtype,
            "num_attention_heads": plan["num_attention_heads"],
            "mapping": {"world_size": world, "tp_size": tp, "pp_size": pp},
        },
        "build_config": build_cfg,
        "standin": {"weights_sha256": plan["weights_sha256"]},
    }, indent=2, sort_keys=True) + "\n")
    for rank in range(world):  # deterministic bytes: same inputs, same engine
        header = {"rank": rank, "world_size": world, "tp_size": tp, "pp_size": pp, "dtype": dtype,
                  "weights_sha256": plan["weights_sha256"], "build_config": build_cfg}
        (engine_dir / f"rank{rank}.engine").write_bytes(
            ENGINE_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")


def _rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cached_engine(cache: Path, name: str) -> Path | None:
    """``local_cache/<name>`` if a finished build is there (builds are renamed in when complete)."""
    target = cache / "local_cache" / name
    return target if (target / "trtllm_engine" / "config.json").is_file() else None


def jit_build(ft_model: Path, cache: Path, name: str, served: str) -> Path:
    """NIM_FT_MODEL: build into ``local_cache/<name>`` (reused if present) and register the profile."""
    local_cache = cache / "local_cache"
    target = local_cache / name
    if cached_engine(cache, name):
        log(f"Found cached engine for NIM_CUSTOM_MODEL_NAME={name} at {target}; skipping the build")
        return target
    options: dict[str, Any] = {"tp_size": int(os.environ.get("NIM_TENSOR_PARALLEL_SIZE") or 1),
                               "pp_size": int(os.environ.get("NIM_PIPELINE_PARALLEL_SIZE") or 1)}
    if os.environ.get("NIM_MAX_MODEL_LEN"):
        options["max_seq_len"] = int(os.environ["NIM_MAX_MODEL_LEN"])
    plan = plan_build(ft_model, options)  # validates before anything is created
    tmp = local_cache / f".tmp-{name}-{os.getpid()}"
    profile_id = hashlib.sha256(json.dumps(
        [name, plan["weights_sha256"], plan["dtype"], plan["tp"], plan["pp"], plan["build_config"]],
        sort_keys=True).encode()).hexdigest()
    try:
        local_cache.mkdir(parents=True, exist_ok=True)
        _rmtree_quiet(tmp)
        tmp.mkdir()
        write_engine(ft_model, plan, tmp)
        os.rename(tmp, target)  # atomic: a partial build is never visible under <name>
        update_local_manifest(local_cache / "local_manifest.yaml", profile_id, name, served, plan)
    except OSError as exc:  # e.g. a cache volume not writable by the container's -u user
        raise StandinError(type(exc).__name__,
                           f"Unable to write to NIM_CACHE_PATH={cache}: {exc}") from exc
    finally:
        _rmtree_quiet(tmp)
    log(f"Engine built: {target} (profile {profile_id})")
    return target


def update_local_manifest(path: Path, profile_id: str, name: str, served: str,
                          plan: dict[str, Any]) -> None:
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
            "pp": plan["pp"], "number_of_gpus": plan["tp"] * plan["pp"], "gpu": "CPU-STANDIN",
            "profile": "latency", "feat_lora": "false", "model_name": name,
            "trtllm_buildable": "false"}
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

    def __init__(self, served: str, root: str, backend: str) -> None:
        self.served, self.root, self.backend = served, root, backend
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
        self._send(status, {"object": "error", "error": {
            "message": message, "type": etype, "param": None, "code": status}})

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
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{
                "id": m.served, "object": "model", "created": 0, "owned_by": "system",
                "root": m.root, "parent": None, "max_model_len": None}]})
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

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._t0 = time.monotonic()
        path = self.path.split("?", 1)[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if 0 < length <= 16 << 20 else b""
        if length > 16 << 20:  # body left unread: this connection cannot be reused
            self.close_connection = True
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
        if req.get("model") != m.served:
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
        words = f"[NIM stand-in] {m.served} received: {last}".split(" ")
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
        body.update(created=int(time.time()), model=m.served, choices=[choice], usage=usage)
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


def serve(argv: list[str]) -> int:
    """``start-server``: resolve the model (JIT build if asked), then serve until SIGTERM/SIGINT."""
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
    ft_model, model_name = env.get("NIM_FT_MODEL"), env.get("NIM_MODEL_NAME") or DEFAULT_MODEL
    custom = env.get("NIM_CUSTOM_MODEL_NAME") or "custom_1"
    served = env.get("NIM_SERVED_MODEL_NAME") or (custom if ft_model else model_name)
    log("=== NIM STAND-IN (CPU, no model is run; NOT NVIDIA NIM) " + STANDIN_VERSION + " ===")
    log(f"Environment: {safe_env_summary()}")

    httpd: ThreadingHTTPServer | None = None
    try:
        # Everything that can be checked quickly is checked before listening, so a bad layout
        # exits 1 at once (like NIM's start-up), with no half-alive server.
        profile = env.get("NIM_MODEL_PROFILE", "")
        profile_dir = _find_profile(cache, profile) if profile else None
        if profile_dir is None and re.fullmatch(r"[0-9a-f]{64}", profile):
            raise StandinError("ValueError", f"NIM_MODEL_PROFILE={profile} is not in "
                               f"{cache}/local_cache/local_manifest.yaml (stand-in has no NGC profiles)")
        if ft_model:
            backend, root = "tensorrt_llm", Path(ft_model)
            if cached_engine(cache, custom) is None:
                if not root.is_dir():
                    raise StandinError("FileNotFoundError", f"NIM_FT_MODEL={root}: no such directory")
                detect_format(root)
        elif profile_dir is not None:
            root = profile_dir
            backend = check_served_dir(root)
            if env.get("NIM_SERVED_MODEL_NAME") is None:
                served = root.name
        elif model_name.startswith("/") or Path(model_name).is_dir():
            root = Path(model_name)
            backend = check_served_dir(root)
        else:
            backend, root = "vllm", None
        model = Model(served, str(root) if root else model_name, backend)
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
        backend_name = {"tensorrt_llm": "TensorRT-LLM", "vllm": "vLLM"}[backend]
        log(f"Backend: {backend_name} backend (stand-in); model path: {model.root}; "
            f"served model name: {served}")
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
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


# --------------------------------------------------------------------------------- nim-optimize
def optimize(argv: list[str]) -> int:
    """``nim-optimize``: validate, build into ``OUT/.tmp-*``, then move the result into OUT."""
    parser = argparse.ArgumentParser(
        prog="nim-optimize",
        description="NIM STAND-IN (CPU, test bed only): write a TensorRT-LLM engine layout "
                    "(config.json, tokenizer files, trtllm_engine/rank*.engine) from an HF checkpoint.")
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
        # OUT may be a bind mount (cannot be renamed), so build inside it and move entries up.
        tmp = out / f".tmp-nim-optimize-{os.getpid()}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            _rmtree_quiet(tmp)
            tmp.mkdir()
            write_engine(model_dir, plan, tmp)
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
    log(f"Engine written to {out}/trtllm_engine")
    return 0


# -------------------------------------------------------------------------- list-model-profiles
def list_profiles(argv: list[str]) -> int:
    """``list-model-profiles``: the locally built profiles, plus the generic vLLM one."""
    cache = Path(os.environ.get("NIM_CACHE_PATH", "/opt/nim/.cache"))
    manifest = cache / "local_cache" / "local_manifest.yaml"
    profiles = parse_yaml(manifest.read_text()) if manifest.is_file() else {}
    print("SYSTEM INFO\n- Free GPUs: <None>\n- No GPUs detected (NIM stand-in on CPU)")
    print("MODEL PROFILES\n- Compatible with system and runnable:")
    for pid, entry in profiles.items():
        tags = entry.get("tags", {}) if isinstance(entry, dict) else {}
        print(f"  - {pid} ({tags.get('model_name', '?') if isinstance(tags, dict) else '?'})")
    generic = hashlib.sha256(b"nim-standin/vllm-fp16-tp1").hexdigest()
    print(f"  - {generic} (vllm-fp16-tp1)")
    print("- Incompatible with system:\n  (none: the stand-in accepts every profile it knows)")
    return 0


# ------------------------------------------------------------------------------------- dispatch
COMMANDS = {"start-server": serve, "serve": serve, "nim-serve": serve, "nim-run": serve,
            "nim-optimize": optimize, "list-model-profiles": list_profiles}


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the program name (image wrappers) or on a subcommand (host use)."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else ""
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

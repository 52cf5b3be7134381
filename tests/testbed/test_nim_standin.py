"""The CPU stand-in for NIM: the script on the host, the Docker engine helper, the image and containers.

Host tests run ``nim_standin.py`` with ``python -S`` (no site-packages), so a stray third-party
import fails here as it would inside the stdlib-only image. Docker tests never skip: on a bare CI
machine ``ensure_docker_engine`` installs and starts dockerd, and if it cannot the tests fail.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimflow.testbed import TestbedError, docker_engine
from nimflow.testbed.nim_image import build_standin_image, source_hash, source_tag
from nimflow.testbed.tiny_model import write_lora_adapter, write_tiny_llama

STANDIN = Path(__file__).resolve().parents[2] / "deployments" / "nim-standin" / "nim_standin.py"
NOT_IMPLEMENTED = "NotImplementedError: Only safetensors/pickle/binary directories are supported."
BUILD_FAILED = "Engine building failed, please check error log."
SECRET = "nvapi-DO-NOT-LOG-ME"
H100 = "NVIDIA H100 80GB HBM3,9.0,0x233010DE"
H100_PCIE = "NVIDIA H100 PCIe,9.0,0x233110DE"  # same compute capability, another model
A100 = "NVIDIA A100-SXM4-80GB,8.0,0x20B210DE"
T4 = "Tesla T4,7.5,0x1EB810DE"
DEFAULT_TRTLLM = "0.0.0+standin"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _load_standin() -> Any:
    spec = importlib.util.spec_from_file_location("nim_standin_mod", STANDIN)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------- helpers
def make_model(root: Path, heads: int = 4, kv_heads: int = 2, layers: int = 2, dtype: str = "float16",
               arch: str = "LlamaForCausalLM", **extra: Any) -> Path:
    """A tiny HF-like checkpoint: configs, tokenizer files and a (fake but well-formed) safetensors."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({
        "architectures": [arch], "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "hidden_size": 16 * heads, "intermediate_size": 128,
        "vocab_size": 300, "torch_dtype": dtype, "max_position_embeddings": 2048, **extra}))
    (root / "generation_config.json").write_text('{"temperature": 0.6}')
    (root / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"hello": 0, "world": 1}}}))
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    write_llama_weights(root / "model.safetensors", json.loads((root / "config.json").read_text()))
    return root


def llama_tensors(cfg: dict[str, Any]) -> dict[str, list[int]]:
    """HF Llama tensor names and shapes for ``cfg`` (what vLLM / TensorRT-LLM look up)."""
    hidden, heads, inter = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
    kv, vocab = cfg.get("num_key_value_heads") or heads, cfg["vocab_size"]
    dim = cfg.get("head_dim") or hidden // heads
    out = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": [heads * dim, hidden], p + "self_attn.k_proj.weight": [kv * dim, hidden],
                    p + "self_attn.v_proj.weight": [kv * dim, hidden], p + "self_attn.o_proj.weight": [hidden, heads * dim],
                    p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                    p + "mlp.down_proj.weight": [hidden, inter], p + "input_layernorm.weight": [hidden],
                    p + "post_attention_layernorm.weight": [hidden]})
    out["model.norm.weight"] = [hidden]
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = [vocab, hidden]
    return out


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], fill: int = 0) -> Path:
    """A well-formed safetensors file (data bytes all ``fill``)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I8": 1}[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes([fill]) * offset)
    return path


def write_llama_weights(path: Path, cfg: dict[str, Any], fill: int = 0) -> Path:
    dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(cfg.get("torch_dtype"), "F16")
    return write_safetensors(path, {n: (dtype, s) for n, s in llama_tensors(cfg).items()}, fill)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text) for a GET, or a POST when ``body``/``raw`` is given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_for(url: str, status: int = 200, timeout: float = 15.0) -> float:
    """Poll ``url`` until it answers ``status``; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError):
            if http(url)[0] == status:
                return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {timeout}s")


#: A writable NIM_CACHE_PATH for host runs (NIM checks it at start-up; /opt/nim/.cache is the image's).
HOST_CACHE = tempfile.mkdtemp(prefix="nimflow-standin-cache-")
#: What nimflow gives a 1.x serving container of a custom engine or fine-tune (NIM ft-support docs).
LEGACY_BACKEND = {"NIM_USE_TRTLLM_LEGACY_BACKEND": "1", "NIM_DISABLE_TRTLLM_PYTORCH_RT": "1"}


def standin_env(**extra: str) -> dict[str, str]:
    """The host environment without NIM settings, plus the stand-in's test defaults (a writable
    cache, the legacy backend flags) and ``extra``; an ``extra`` value "" unsets that variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIM") and k != "PYTHONPATH"}
    env.update({"NIMSTANDIN_BUILD_SECONDS": "0.2", "NGC_API_KEY": SECRET, "HF_TOKEN": SECRET,
                "NIM_CACHE_PATH": HOST_CACHE, **LEGACY_BACKEND, **extra})
    return {k: v for k, v in env.items() if v != "" or k not in (*LEGACY_BACKEND, "NIM_CACHE_PATH")}


def run_cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-S", str(STANDIN), *args], env=standin_env(**env),
                          capture_output=True, text=True, timeout=30, cwd=cwd)


@contextlib.contextmanager
def server(_program: str = "serve", **env: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run ``nim_standin.py serve`` (or ``_program``, e.g. ``nim-serve``) on a free port; yield
    (base URL, process); SIGTERM at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-S", str(STANDIN), _program],
                            env=standin_env(NIM_SERVER_PORT=str(port), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def serve_once(_program: str = "serve", **env: str) -> subprocess.CompletedProcess[str]:
    """Start the server expecting it to exit at once (start-up failure)."""
    return run_cli(_program, **{"NIM_SERVER_PORT": str(free_port()), "NIMSTANDIN_READY_DELAY": "0", **env})


def chat(base: str, model: str, text: str = "hello world") -> tuple[int, Any]:
    return http(f"{base}/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": text}]})


def optimize(model_dir: Path, out: Path, config: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    args = ["nim-optimize", "--model_dir", str(model_dir), "--output_engine_dir", str(out)]
    if config is not None:
        args += ["--build_config", str(config)]
    return run_cli(*args, **env)


def fake_trtllm(root: Path, version: str) -> str:
    """A PYTHONPATH entry holding a ``tensorrt_llm`` dist-info of ``version`` (what the image has)."""
    info = root / f"tensorrt_llm-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")
    return str(root)


def engine_header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    assert data.startswith(b"NIMSTANDIN-ENGINE\n")
    return json.loads(data.splitlines()[1])


def read_safetensors_header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(data) == 8 + size + end  # the data section is exactly what the header describes
    return header


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model(tmp_path / "hf-model")


# ----------------------------------------------------------------------------- host: the server
def test_models_root_is_a_name_unless_the_path_is_asked_for(model_dir: Path) -> None:
    """1.x ``/v1/models`` gives ``root`` as the model's name (as a published NIM 1.x answer does), the
    path only with NIMSTANDIN_MODELS_ROOT=path. Before this change the stand-in echoed the path, so
    nimflow's old check (root == NIM_MODEL_NAME) passed against it and failed against real NIM."""
    with server(NIM_MODEL_NAME=str(model_dir), NIM_SERVED_MODEL_NAME="tiny-llm", NIMSTANDIN_READY_DELAY="0") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == "tiny-llm"
    with server(NIM_MODEL_NAME=str(model_dir), NIM_SERVED_MODEL_NAME="tiny-llm", NIMSTANDIN_READY_DELAY="0",
                NIMSTANDIN_MODELS_ROOT="path") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == str(model_dir)


def test_serve_hf_dir_full_http_contract(model_dir: Path) -> None:
    with server(NIM_MODEL_NAME=str(model_dir), NIM_SERVED_MODEL_NAME="tiny-llm",
                NIMSTANDIN_READY_DELAY="0.5") as (base, proc):
        wait_for(f"{base}/v1/health/live")
        assert http(f"{base}/v1/health/ready")[0] == 503  # live, not yet ready
        assert chat(base, "tiny-llm")[0] == 503
        wait_for(f"{base}/v1/health/ready", timeout=5)
        assert http(f"{base}/v1/health/ready")[1]["message"] == "Service is ready."

        status, models = http(f"{base}/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-llm"]
        # Real NIM 1.x lists the model's name as root, not the path it was given.
        assert models["data"][0]["root"] == "tiny-llm"

        status, resp = chat(base, "tiny-llm", "what is two plus two")
        assert status == 200 and resp["object"] == "chat.completion"
        content = resp["choices"][0]["message"]["content"]
        assert "stand-in" in content and content.endswith("what is two plus two")
        assert resp["usage"]["prompt_tokens"] == 5
        assert resp["usage"]["total_tokens"] == 5 + resp["usage"]["completion_tokens"]
        assert chat(base, "tiny-llm", "what is two plus two")[1]["choices"] == resp["choices"]

        status, err = chat(base, "meta/llama-3.1-8b-instruct")
        assert status == 404 and "does not exist" in err["error"]["message"]
        assert http(f"{base}/v1/chat/completions", raw=b"{not json")[0] == 400
        assert http(f"{base}/v1/chat/completions", {"model": "tiny-llm"})[0] == 400
        status, comp = http(f"{base}/v1/completions", {"model": "tiny-llm", "prompt": "once upon"})
        assert status == 200 and comp["choices"][0]["text"].endswith("once upon")
        status, metrics = http(f"{base}/v1/metrics")
        assert status == 200 and 'request_success_total{model_name="tiny-llm"} 3' in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # handled: a clean exit, not a kill
        out = proc.stdout.read() if proc.stdout else ""
    assert "vLLM backend" in out and '"POST /v1/chat/completions" 200' in out
    assert SECRET not in out and "NGC_API_KEY=<redacted>" in out


def test_serve_reads_chunked_request_bodies(model_dir: Path) -> None:
    """A chunked request body is read like a Content-Length one (uvicorn, under NIM, reads both): the
    front proxy streams a chunked client body on as chunked."""
    import http.client

    with server(NIM_MODEL_NAME=str(model_dir), NIM_SERVED_MODEL_NAME="tiny-llm", NIMSTANDIN_READY_DELAY="0") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        connection = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
        body = json.dumps({"model": "tiny-llm", "prompt": "once upon"}).encode()
        connection.request("POST", "/v1/completions", body=iter([body[:7], body[7:]]), encode_chunked=True,
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"][0]["text"].endswith("once upon")
        # The connection stays usable: the whole chunked body, terminator included, was read.
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        connection.close()


def test_serve_plain_name_and_bad_paths(tmp_path: Path, model_dir: Path) -> None:
    with server(NIM_MODEL_NAME="meta/llama-3.1-8b-instruct", NIMSTANDIN_READY_DELAY="0") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["id"] == "meta/llama-3.1-8b-instruct"
        assert chat(base, "meta/llama-3.1-8b-instruct")[0] == 200

    missing = serve_once(NIM_MODEL_NAME=str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no such directory" in missing.stderr
    (model_dir / "model.safetensors").unlink()
    no_weights = serve_once(NIM_MODEL_NAME=str(model_dir))
    assert no_weights.returncode == 1 and "safetensors" in no_weights.stderr


# ----------------------------------------------------------------------------- host: nvidia-smi
def test_nvidia_smi_query_list_and_failures() -> None:
    default = run_cli("nvidia-smi", "--query-gpu=name,compute_cap,pci.device_id", "--format=csv,noheader")
    assert default.returncode == 0
    assert default.stdout == "NIMFLOW STAND-IN FAKE GPU (NOT REAL), 0.0, 0x0000FFFF\n"

    two = run_cli("nvidia-smi", "--query-gpu=index,name,compute_cap,pci.device_id,memory.total",
                  "--format=csv", NIMSTANDIN_GPU=H100, NIMSTANDIN_GPU_COUNT="2")
    assert two.returncode == 0
    assert two.stdout.splitlines() == [
        "index, name, compute_cap, pci.device_id, memory.total [MiB]",
        "0, NVIDIA H100 80GB HBM3, 9.0, 0x233010DE, 81559 MiB",
        "1, NVIDIA H100 80GB HBM3, 9.0, 0x233010DE, 81559 MiB"]
    nounits = run_cli("nvidia-smi", "--query-gpu=memory.total,driver_version,uuid",
                      "--format=csv,noheader,nounits", NIMSTANDIN_GPU_MEMORY_MIB="40960")
    mem, driver, uuid = nounits.stdout.strip().split(", ")
    assert (mem, nounits.returncode) == ("40960", 0) and driver and uuid.startswith("GPU-")

    listing = run_cli("nvidia-smi", "-L", NIMSTANDIN_GPU=A100, NIMSTANDIN_GPU_COUNT="2")
    lines = listing.stdout.splitlines()
    assert listing.returncode == 0 and len(lines) == 2
    assert lines[0].startswith("GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-") and lines[1].startswith("GPU 1: ")
    assert lines[0].split("UUID: ")[1] != lines[1].split("UUID: ")[1]  # one uuid per GPU
    assert uuid in run_cli("nvidia-smi", "-L").stdout  # stable across runs

    bad = run_cli("nvidia-smi", "--query-gpu=name,foo", "--format=csv")
    assert bad.returncode == 2 and 'Field "foo" is not a valid field to query.' in bad.stderr
    assert bad.stdout == ""
    no_driver = run_cli("nvidia-smi", "--query-gpu=name", "--format=csv,noheader", NIMSTANDIN_GPU_COUNT="0")
    assert no_driver.returncode == 9
    assert "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." in no_driver.stdout
    assert run_cli("nvidia-smi", "--query-gpu=name", "--format=json").returncode == 2
    assert run_cli("nvidia-smi", "--bogus").returncode == 2
    assert run_cli("nvidia-smi", "-L", NIMSTANDIN_GPU="H100 without fields").returncode != 0


# ------------------------------------------------------------------------ host: nim-optimize
def write_build_config(path: Path, tp: int, dtype: str = "float16") -> Path:
    path.write_text(f"# nim-optimize build config\ndtype: \"{dtype}\"  # quoted\ntp_size: {tp}\n"
                    "pp_size: 1\nmax_seq_len: 1024\nmax_batch_size: 8\nmax_num_tokens: 2048\n"
                    "extra_key: 'kept # not a comment'\n")
    return path


def test_nim_optimize_layout_deterministic_and_served(tmp_path: Path, model_dir: Path) -> None:
    cfg = write_build_config(tmp_path / "build.yaml", tp=2)
    outs = [tmp_path / "engine-a", tmp_path / "engine-b"]
    for out in outs:
        proc = optimize(model_dir, out, cfg, NIMSTANDIN_DETERMINISTIC_BUILD="1")
        assert proc.returncode == 0, proc.stderr
    out = outs[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "trtllm_engine"]
    engine = out / "trtllm_engine"
    assert sorted(p.name for p in engine.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    econf = json.loads((engine / "config.json").read_text())
    assert econf["version"] == DEFAULT_TRTLLM
    pretrained, build = econf["pretrained_config"], econf["build_config"]
    assert pretrained["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert pretrained["dtype"] == "float16" and pretrained["architecture"] == "LlamaForCausalLM"
    assert (pretrained["num_hidden_layers"], pretrained["num_attention_heads"], pretrained["num_key_value_heads"],
            pretrained["hidden_size"], pretrained["vocab_size"], pretrained["max_position_embeddings"]) == (
        2, 4, 2, 64, 300, 2048)
    assert pretrained["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert {k: build[k] for k in ("max_seq_len", "max_batch_size", "max_num_tokens", "max_input_len",
                                  "max_beam_width", "kv_cache_type")} == {
        "max_seq_len": 1024, "max_batch_size": 8, "max_num_tokens": 2048, "max_input_len": 1024,
        "max_beam_width": 1, "kv_cache_type": "PAGED"}
    assert build["extra_key"] == "kept # not a comment"
    assert build["plugin_config"]["paged_kv_cache"] is True and build["plugin_config"]["dtype"] == "float16"
    assert econf["standin"]["gpu"] == {"name": "NIMFLOW STAND-IN FAKE GPU (NOT REAL)", "compute_cap": "0.0",
                                       "pci_device_id": "0x0000FFFF"}
    header = engine_header(engine / "rank1.engine")
    assert {k: header[k] for k in ("rank", "world_size", "tp_size", "pp_size", "dtype", "trtllm_version",
                                   "gpu_name", "compute_cap", "pci_device_id")} == {
        "rank": 1, "world_size": 2, "tp_size": 2, "pp_size": 1, "dtype": "float16",
        "trtllm_version": DEFAULT_TRTLLM, "gpu_name": "NIMFLOW STAND-IN FAKE GPU (NOT REAL)",
        "compute_cap": "0.0", "pci_device_id": "0x0000FFFF"}
    assert header["build_id"] == engine_header(engine / "rank0.engine")["build_id"] == econf["standin"]["build_id"]
    for name in ("rank0.engine", "rank1.engine", "config.json"):  # deterministic mode: same bytes
        assert (engine / name).read_bytes() == (outs[1] / "trtllm_engine" / name).read_bytes()

    with server(NIM_MODEL_NAME=str(out), NIMSTANDIN_READY_DELAY="0", NIMSTANDIN_GPU_COUNT="2") as (base, proc):
        wait_for(f"{base}/v1/health/ready")
        assert chat(base, str(out))[0] == 200
    assert "TensorRT-LLM backend" in (proc.stdout.read() if proc.stdout else "")

    too_few = serve_once(NIM_MODEL_NAME=str(out))  # tp=2 engine, one fake GPU
    assert too_few.returncode == 1 and "RuntimeError" in too_few.stderr
    assert "world_size 2" in too_few.stderr and "only 1 GPU(s) are visible" in too_few.stderr
    assert "Listening" not in too_few.stdout

    (engine / "rank1.engine").unlink()  # an incomplete engine must not be served
    broken = serve_once(NIM_MODEL_NAME=str(out), NIMSTANDIN_GPU_COUNT="2")
    assert broken.returncode == 1 and "rank1.engine" in broken.stderr


def test_builds_differ_unless_deterministic(tmp_path: Path, model_dir: Path) -> None:
    """Real engine builds are not byte-reproducible: each build draws its own build_id."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert optimize(model_dir, a).returncode == 0 and optimize(model_dir, b).returncode == 0
    ids = [json.loads((d / "trtllm_engine" / "config.json").read_text())["standin"]["build_id"] for d in (a, b)]
    assert ids[0] != ids[1] and all(len(i) == 32 for i in ids)
    assert (a / "trtllm_engine" / "rank0.engine").read_bytes() != (b / "trtllm_engine" / "rank0.engine").read_bytes()
    assert engine_header(a / "trtllm_engine" / "rank0.engine")["build_id"] == ids[0]
    # ... but the same weights (the HF files NIM keeps next to the engine are copied unchanged)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()


def test_nim_optimize_defaults_are_trtllm_defaults(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", dtype="float32", max_position_embeddings=4096)
    out = tmp_path / "out"
    proc = optimize(model, out)
    assert proc.returncode == 0, proc.stderr
    econf = json.loads((out / "trtllm_engine" / "config.json").read_text())
    build = econf["build_config"]
    assert econf["pretrained_config"]["dtype"] == "float16"  # auto: float32 -> float16
    assert (build["max_batch_size"], build["max_num_tokens"], build["max_seq_len"], build["max_input_len"]) == (
        2048, 8192, 4096, 1024)
    assert all(type(build[k]) is int for k in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len"))

    bf16 = make_model(tmp_path / "bf16", dtype="bfloat16")
    on_a100 = optimize(bf16, tmp_path / "bf16-out", NIMSTANDIN_GPU=A100)
    assert on_a100.returncode == 0
    assert json.loads((tmp_path / "bf16-out" / "trtllm_engine" / "config.json").read_text())[
        "pretrained_config"]["dtype"] == "bfloat16"  # from torch_dtype
    on_t4 = optimize(bf16, tmp_path / "t4-out", NIMSTANDIN_GPU=T4)
    assert on_t4.returncode == 1
    assert "bf16 is not supported on compute capability 7.5 (needs SM >= 80)" in on_t4.stderr
    assert on_t4.stderr.rstrip().endswith(BUILD_FAILED) and not (tmp_path / "t4-out").exists()


def test_nim_optimize_rejects_bad_inputs(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    bad_tp = optimize(model_dir, out, write_build_config(tmp_path / "tp3.yaml", tp=3))
    assert bad_tp.returncode == 1
    assert "ValueError: num_attention_heads (4) must be divisible by tp_size (3)" in bad_tp.stderr
    bad_dtype = optimize(model_dir, out, write_build_config(tmp_path / "dt.yaml", 1, "int3"))
    assert bad_dtype.returncode == 1 and "int3" in bad_dtype.stderr
    assert not out.exists()  # validation happens before the output is touched

    engine = tmp_path / "engine"
    assert optimize(model_dir, engine).returncode == 0
    again = optimize(engine, out)
    assert again.returncode == 1 and again.stderr.rstrip().endswith(NOT_IMPLEMENTED)
    assert "Traceback" in again.stderr

    no_gpu = optimize(model_dir, out, NIMSTANDIN_GPU_COUNT="0")
    assert no_gpu.returncode == 1 and "Found no NVIDIA driver" in no_gpu.stderr and not out.exists()

    usage = run_cli("nim-optimize", "-h")
    assert usage.returncode == 0 and "--output_engine_dir" in usage.stdout


# ------------------------------------------------------------- host: engines bound to GPU/version
def test_engine_refused_on_another_compute_capability(tmp_path: Path, model_dir: Path) -> None:
    engine = tmp_path / "engine"
    assert optimize(model_dir, engine, NIMSTANDIN_GPU=A100).returncode == 0
    assert engine_header(engine / "trtllm_engine" / "rank0.engine")["compute_cap"] == "8.0"
    on_h100 = serve_once(NIM_MODEL_NAME=str(engine), NIMSTANDIN_GPU=H100)
    assert on_h100.returncode == 1
    assert ("The engine plan file is generated on an incompatible device, expecting compute 8.0 got "
            "compute 9.0, please rebuild.") in on_h100.stderr
    assert "Listening" not in on_h100.stdout  # refused before the server starts
    with server(NIM_MODEL_NAME=str(engine), NIMSTANDIN_GPU=A100, NIMSTANDIN_READY_DELAY="0") as (base, proc):
        wait_for(f"{base}/v1/health/ready")
    assert "different models of devices" not in (proc.stdout.read() if proc.stdout else "")


def test_engine_on_another_model_same_compute_only_warns(tmp_path: Path, model_dir: Path) -> None:
    engine = tmp_path / "engine"
    assert optimize(model_dir, engine, NIMSTANDIN_GPU=H100).returncode == 0
    with server(NIM_MODEL_NAME=str(engine), NIMSTANDIN_GPU=H100_PCIE, NIMSTANDIN_READY_DELAY="0") as (base, proc):
        wait_for(f"{base}/v1/health/ready")
        assert chat(base, str(engine))[0] == 200
    out = proc.stdout.read() if proc.stdout else ""
    assert ("WARNING" in out and "Using an engine plan file across different models of devices is not recommended "
            "and is likely to affect performance or even cause errors.") in out


def test_engine_refused_by_another_trtllm_version(tmp_path: Path, model_dir: Path) -> None:
    engine = tmp_path / "engine"
    newer = fake_trtllm(tmp_path / "site", "9.9.9")
    assert optimize(model_dir, engine, PYTHONPATH=newer).returncode == 0
    econf = json.loads((engine / "trtllm_engine" / "config.json").read_text())
    assert econf["version"] == "9.9.9" == engine_header(engine / "trtllm_engine" / "rank0.engine")["trtllm_version"]
    here = serve_once(NIM_MODEL_NAME=str(engine))  # the host has the stand-in's default version
    assert here.returncode == 1
    assert ("The engine plan file is not compatible with this version of TensorRT, expecting library version "
            f"{DEFAULT_TRTLLM} got 9.9.9") in here.stderr
    with server(NIM_MODEL_NAME=str(engine), PYTHONPATH=newer, NIMSTANDIN_READY_DELAY="0") as (base, _):
        wait_for(f"{base}/v1/health/ready")


def test_foreign_engine_file_is_refused(tmp_path: Path, model_dir: Path) -> None:
    engine = tmp_path / "engine"
    assert optimize(model_dir, engine).returncode == 0
    (engine / "trtllm_engine" / "rank0.engine").write_bytes(b"\x00" * 64)
    proc = serve_once(NIM_MODEL_NAME=str(engine))
    assert proc.returncode == 1 and "Magic tag does not match" in proc.stderr
    assert "Failed to deserialize cuda engine" in proc.stderr


# ----------------------------------------------------------------------------- host: JIT build
def test_jit_build_caches_and_registers_profile(tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    manifest = cache / "local_cache" / "local_manifest.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("other-profile:\n  model: x\n  tags: {llm_engine: vllm, model_name: other}\n")
    env = dict(NIM_CACHE_PATH=str(cache), NIM_FT_MODEL=str(model_dir), NIM_CUSTOM_MODEL_NAME="my_ft",
               NIM_SERVED_MODEL_NAME="acme/ft", NIM_TENSOR_PARALLEL_SIZE="2", NIM_MAX_MODEL_LEN="512",
               NIMSTANDIN_GPU=H100, NIMSTANDIN_GPU_COUNT="2",
               NIMSTANDIN_BUILD_SECONDS="0.5", NIMSTANDIN_READY_DELAY="0")
    with server(**env) as (base, proc):
        wait_for(f"{base}/v1/health/live")
        assert http(f"{base}/v1/health/ready")[0] == 503  # building
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["id"] == "acme/ft"
        assert chat(base, "acme/ft")[0] == 200
    built = cache / "local_cache" / "my_ft"
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in built.iterdir()}
    assert sorted(p.name for p in (built / "trtllm_engine").iterdir()) == [
        "config.json", "rank0.engine", "rank1.engine"]
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".tmp")]
    econf = json.loads((built / "trtllm_engine" / "config.json").read_text())
    assert econf["pretrained_config"]["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert econf["pretrained_config"]["dtype"] == "float16"  # the checkpoint's torch_dtype
    assert (econf["build_config"]["max_seq_len"], econf["build_config"]["max_batch_size"],
            econf["build_config"]["max_num_tokens"]) == (512, 2048, 8192)
    assert econf["standin"]["builder"] == "nim-jit" and econf["standin"]["gpu"]["name"] == "NVIDIA H100 80GB HBM3"

    profiles = yaml.safe_load(manifest.read_text())
    assert "other-profile" in profiles  # foreign profiles are kept
    (pid, prof), = [(k, v) for k, v in profiles.items() if v["tags"]["model_name"] == "my_ft"]
    assert len(pid) == 64 and prof["tags"]["llm_engine"] == "tensorrt_llm"
    assert prof["tags"]["tp"] == "2" and prof["tags"]["trtllm_buildable"] == "false"
    assert prof["tags"]["gpu"] == "H100" and prof["tags"]["gpu_device"] == "2330:10de"
    listing = run_cli("list-model-profiles", NIM_CACHE_PATH=str(cache), NIMSTANDIN_GPU=H100, NIMSTANDIN_GPU_COUNT="2")
    assert listing.returncode == 0
    compatible = listing.stdout.split("- Incompatible with system:")[0]
    assert f"  - {pid} (my_ft)" in compatible
    assert "  -  [2330:10de] (0) NVIDIA H100 80GB HBM3 (H100)" in listing.stdout
    assert "  -  [2330:10de] (1) NVIDIA H100 80GB HBM3 (H100)" in listing.stdout
    elsewhere = run_cli("list-model-profiles", NIM_CACHE_PATH=str(cache), NIMSTANDIN_GPU=A100, NIMSTANDIN_GPU_COUNT="2")
    assert f"  - {pid} (my_ft)" in elsewhere.stdout.split("- Incompatible with system:")[1]

    engine_before = (built / "trtllm_engine" / "rank0.engine").stat().st_mtime_ns
    with server(**env) as (base, proc):  # second start: reuse the cache, no rebuild
        wait_for(f"{base}/v1/health/ready")
    assert "skipping the build" in (proc.stdout.read() if proc.stdout else "")
    assert (built / "trtllm_engine" / "rank0.engine").stat().st_mtime_ns == engine_before
    assert len(yaml.safe_load(manifest.read_text())) == 2

    # The cached engine is checked before listening: built for an H100, refused on an A100.
    on_a100 = serve_once(**{**env, "NIMSTANDIN_GPU": A100})
    assert on_a100.returncode == 1 and "expecting compute 9.0 got compute 8.0" in on_a100.stderr
    assert "Listening" not in on_a100.stdout

    # NIM_MODEL_PROFILE=<built id> serves the cached engine (how NIMService uses a NIMBuild).
    profile_env = {k: v for k, v in env.items() if k not in ("NIM_FT_MODEL", "NIM_SERVED_MODEL_NAME")}
    with server(**profile_env, NIM_MODEL_PROFILE=pid) as (base, proc):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == built.name  # the served name: the profile's
    one_gpu = serve_once(**{**profile_env, "NIM_MODEL_PROFILE": pid, "NIMSTANDIN_GPU_COUNT": "1"})
    assert one_gpu.returncode == 1 and "needs 2 GPU(s), but only 1 GPU(s) are visible" in one_gpu.stderr
    unknown = serve_once(**{**profile_env, "NIM_MODEL_PROFILE": "0" * 64})
    assert unknown.returncode == 1 and "local_manifest.yaml" in unknown.stderr


def test_jit_refuses_before_building(tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    too_few = serve_once(NIM_FT_MODEL=str(model_dir), NIM_CACHE_PATH=str(cache), NIM_TENSOR_PARALLEL_SIZE="2")
    assert too_few.returncode == 1 and "needs 2 GPU(s), but only 1 GPU(s) are visible" in too_few.stderr
    assert "Listening" not in too_few.stdout and not (cache / "local_cache").exists()


def test_jit_rejects_engine_dir(tmp_path: Path, model_dir: Path) -> None:
    engine = tmp_path / "engine"
    assert optimize(model_dir, engine).returncode == 0
    for ft in (engine, engine / "trtllm_engine"):  # the NGC layout, and the bare rank*.engine dir
        proc = serve_once(NIM_FT_MODEL=str(ft), NIM_CACHE_PATH=str(tmp_path / "cache"))
        assert proc.returncode == 1 and proc.stderr.rstrip().endswith(NOT_IMPLEMENTED)
    assert not (tmp_path / "cache" / "local_cache" / "custom_1").exists()


# ------------------------------------------------------------------- host: injected build failures
FAILURES = {
    "gpu-oom": (1, ["[TRT] [E] 2: [virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory "
                    "(no further information)",
                    "[TRT] [E] Requested amount of GPU memory (17179869184 bytes) could not be allocated. "
                    "There may not be enough free memory for allocation to succeed."]),
    "host-oom": (137, ["Killed"]),
    "cuda-init": (1, ["RuntimeError: [TensorRT-LLM][ERROR] CUDA runtime error in cudaMemGetInfo(&free, &total): "
                      "unknown error (/src/tensorrt_llm/cpp/tensorrt_llm/runtime/tllmRuntime.cpp:123)"]),
    "nccl": (1, ["RuntimeError: NCCL error in: /src/tensorrt_llm/cpp/tensorrt_llm/plugins/ncclPlugin/"
                 "allreducePlugin.cpp:512, unhandled system error"]),
    "unsupported-arch": (1, ["ValueError: Unsupported model architecture: LlamaForCausalLM"]),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_nim_optimize_build_failures(tmp_path: Path, model_dir: Path, failure: str) -> None:
    code, lines = FAILURES[failure]
    out = tmp_path / "out"
    proc = optimize(model_dir, out, NIMSTANDIN_BUILD_FAILURE=failure, NIMSTANDIN_BUILD_SECONDS="0")
    assert proc.returncode == code
    stderr = proc.stderr.splitlines()
    assert stderr[-1] == BUILD_FAILED and stderr[:-1] == lines
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("failure", ["gpu-oom", "host-oom", "nccl"])
def test_jit_build_failures_exit_1_and_leave_no_cache_entry(tmp_path: Path, model_dir: Path, failure: str) -> None:
    cache = tmp_path / "cache"
    with server(NIM_FT_MODEL=str(model_dir), NIM_CACHE_PATH=str(cache), NIM_CUSTOM_MODEL_NAME="ft",
                NIMSTANDIN_BUILD_FAILURE=failure, NIMSTANDIN_BUILD_SECONDS="0.5") as (base, proc):
        wait_for(f"{base}/v1/health/live")  # live while building, as NIM
        assert proc.wait(timeout=10) == 1
        stderr = proc.stderr.read() if proc.stderr else ""
    assert stderr.rstrip().endswith(BUILD_FAILED) and FAILURES[failure][1][0] in stderr
    local = cache / "local_cache"
    assert not local.exists() or [p.name for p in local.iterdir()] == []


def test_unknown_build_failure_is_refused(tmp_path: Path, model_dir: Path) -> None:
    proc = optimize(model_dir, tmp_path / "out", NIMSTANDIN_BUILD_FAILURE="disk-full")
    assert proc.returncode == 1 and "NIMSTANDIN_BUILD_FAILURE='disk-full'" in proc.stderr


# ----------------------------------------------------------- host: convert_checkpoint + trtllm-build
def convert(model: Path, ckpt: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli("convert_checkpoint.py", "--model_dir", str(model), "--output_dir", str(ckpt), *flags, **env)


def trtllm_build(ckpt: Path, out: Path, *flags: str, cwd: Path | None = None,
                 **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli("trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(out), *flags, cwd=cwd, **env)


def test_convert_checkpoint_writes_trtllm_checkpoint(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", heads=8, kv_heads=2, layers=4, dtype="bfloat16")
    ckpt = tmp_path / "ckpt"
    proc = convert(model, ckpt, "--tp_size", "2", "--pp_size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Total time of converting checkpoints: 00:00:0" in proc.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors", "rank3.safetensors"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "bfloat16"  # auto
    assert config["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["hidden_size"], config["vocab_size"]) == (4, 8, 2, 128, 300)
    assert config["quantization"]["quant_algo"] is None
    header = read_safetensors_header(ckpt / "rank3.safetensors")
    assert header["__metadata__"]["rank"] == "3"
    assert (ckpt / "rank0.safetensors").read_bytes() != (ckpt / "rank1.safetensors").read_bytes()

    fp32 = make_model(tmp_path / "fp32", dtype="float32")
    assert convert(fp32, tmp_path / "c32").returncode == 0
    assert json.loads((tmp_path / "c32" / "config.json").read_text())["dtype"] == "float16"  # auto: fp32 -> fp16
    assert convert(fp32, tmp_path / "c32b", "--dtype", "float32").returncode == 0
    assert json.loads((tmp_path / "c32b" / "config.json").read_text())["dtype"] == "float32"
    woq = convert(model, tmp_path / "woq", "--use_weight_only", "--weight_only_precision", "int4")
    assert woq.returncode == 0
    assert json.loads((tmp_path / "woq" / "config.json").read_text())["quantization"]["quant_algo"] == "W4A16"
    kv_dup = convert(model, tmp_path / "kvdup", "--tp_size", "4")  # 2 KV heads duplicated over tp 4
    assert kv_dup.returncode == 0


def test_convert_checkpoint_refusals(tmp_path: Path, model_dir: Path) -> None:
    bad_heads = convert(model_dir, tmp_path / "c1", "--tp_size", "3")
    assert bad_heads.returncode == 1
    assert "AssertionError: num_attention_heads (4) must be divisible by tp_size (3)" in bad_heads.stderr
    kv = convert(make_model(tmp_path / "kv3", heads=12, kv_heads=3), tmp_path / "c2", "--tp_size", "2")
    assert kv.returncode == 1 and "AssertionError: num_key_value_heads (3)" in kv.stderr
    pp = convert(model_dir, tmp_path / "c3", "--pp_size", "3")
    assert pp.returncode == 1 and "pp_size (3) must not exceed num_hidden_layers (2)" in pp.stderr
    gpt2 = convert(make_model(tmp_path / "gpt2", arch="GPT2LMHeadModel"), tmp_path / "c4")
    assert gpt2.returncode == 1 and "Unsupported model architecture: GPT2LMHeadModel" in gpt2.stderr
    engine = tmp_path / "engine"
    assert optimize(model_dir, engine).returncode == 0
    not_ckpt = convert(engine / "trtllm_engine", tmp_path / "c5")
    assert not_ckpt.returncode == 1 and not_ckpt.stderr.rstrip().endswith(NOT_IMPLEMENTED)
    assert not any((tmp_path / f"c{i}").exists() for i in range(1, 6))
    assert convert(model_dir, tmp_path / "c6", "--dtype", "int8").returncode == 2  # argparse choices


def test_trtllm_build_defaults_timing_cache_and_serving(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", max_position_embeddings=4096)
    ckpt, out = tmp_path / "ckpt", tmp_path / "engine" / "trtllm_engine"
    assert convert(model, ckpt, "--tp_size", "2").returncode == 0
    work = tmp_path / "cwd"
    work.mkdir()
    proc = trtllm_build(ckpt, out, cwd=work, NIMSTANDIN_GPU=A100)
    assert proc.returncode == 0, proc.stderr
    assert "Total time of building all engines" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    assert (work / "model.cache").is_file()  # --output_timing_cache defaults to model.cache in CWD
    econf = json.loads((out / "config.json").read_text())
    build = econf["build_config"]
    assert (build["max_batch_size"], build["max_input_len"], build["max_seq_len"], build["max_num_tokens"]) == (
        2048, 1024, 4096, 8192)
    assert econf["version"] == DEFAULT_TRTLLM and econf["standin"]["builder"] == "trtllm-build"
    assert econf["pretrained_config"]["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert engine_header(out / "rank1.engine")["compute_cap"] == "8.0"

    # served by NIM as an engine directory next to the HF files
    for name in ("config.json", "tokenizer.json"):
        (out.parent / name).write_bytes((model / name).read_bytes())
    with server(NIM_MODEL_NAME=str(out.parent), NIMSTANDIN_GPU=A100, NIMSTANDIN_GPU_COUNT="2",
                NIMSTANDIN_READY_DELAY="0") as (base, _):
        wait_for(f"{base}/v1/health/ready")
    on_h100 = serve_once(NIM_MODEL_NAME=str(out.parent), NIMSTANDIN_GPU=H100, NIMSTANDIN_GPU_COUNT="2")
    assert on_h100.returncode == 1 and "expecting compute 8.0 got compute 9.0" in on_h100.stderr


def test_trtllm_build_clips_and_checks(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    ckpt = tmp_path / "ckpt"
    assert convert(model, ckpt).returncode == 0
    cache = tmp_path / "scratch" / "timing.cache"
    cache.parent.mkdir()
    clipped = trtllm_build(ckpt, tmp_path / "e1", "--max_batch_size", "2", "--max_seq_len", "512",
                           "--max_input_len", "512", "--max_num_tokens", "4096", "--kv_cache_type", "continuous",
                           "--output_timing_cache", str(cache))
    assert clipped.returncode == 0, clipped.stderr
    assert ("max_num_tokens (4096) shouldn't be greater than max_seq_len * max_batch_size (1024), "
            "specifying to max_seq_len * max_batch_size (1024).") in clipped.stdout
    build = json.loads((tmp_path / "e1" / "config.json").read_text())["build_config"]
    assert (build["max_num_tokens"], build["max_seq_len"], build["max_batch_size"]) == (1024, 512, 2)
    assert build["kv_cache_type"] == "CONTINUOUS" and build["plugin_config"]["paged_kv_cache"] is False
    assert cache.read_bytes().startswith(b"NIMSTANDIN-TIMING-CACHE\n")

    input_clipped = trtllm_build(ckpt, tmp_path / "e2", "--max_seq_len", "256", cwd=tmp_path)
    assert input_clipped.returncode == 0 and "clipping it to max_seq_len" in input_clipped.stdout
    assert json.loads((tmp_path / "e2" / "config.json").read_text())["build_config"]["max_input_len"] == 256

    bf16_ckpt = tmp_path / "bf16"
    assert convert(model, bf16_ckpt, "--dtype", "bfloat16").returncode == 0
    on_t4 = trtllm_build(bf16_ckpt, tmp_path / "e3", cwd=tmp_path, NIMSTANDIN_GPU=T4)
    assert on_t4.returncode == 1
    assert "bf16 is not supported on compute capability 7.5 (needs SM >= 80)" in on_t4.stderr
    assert on_t4.stderr.rstrip().endswith(BUILD_FAILED) and not (tmp_path / "e3").exists()
    assert trtllm_build(bf16_ckpt, tmp_path / "e3", cwd=tmp_path, NIMSTANDIN_GPU=A100).returncode == 0

    oom = trtllm_build(ckpt, tmp_path / "e4", "--output_timing_cache", str(tmp_path / "oom.cache"),
                       NIMSTANDIN_BUILD_FAILURE="unsupported-arch")
    assert oom.returncode == 1
    assert oom.stderr.splitlines()[-2:] == ["ValueError: Unsupported model architecture: LlamaForCausalLM", BUILD_FAILED]
    assert not (tmp_path / "e4").exists() and not (tmp_path / "oom.cache").exists()
    killed = trtllm_build(ckpt, tmp_path / "e5", cwd=tmp_path, NIMSTANDIN_BUILD_FAILURE="host-oom")
    assert killed.returncode == 137 and "Killed" in killed.stderr and not (tmp_path / "e5").exists()

    no_gpu = trtllm_build(ckpt, tmp_path / "e6", cwd=tmp_path, NIMSTANDIN_GPU_COUNT="0")
    assert no_gpu.returncode == 1 and "Found no NVIDIA driver" in no_gpu.stderr

    (tmp_path / "tp2").mkdir()
    assert convert(model, tmp_path / "tp2", "--tp_size", "2").returncode == 0
    (tmp_path / "tp2" / "rank1.safetensors").unlink()
    missing = trtllm_build(tmp_path / "tp2", tmp_path / "e7", cwd=tmp_path)
    assert missing.returncode == 1 and "rank1.safetensors" in missing.stderr and "FileNotFoundError" in missing.stderr
    (tmp_path / "tp2" / "rank1.safetensors").write_bytes(b"\xff" * 16)
    corrupt = trtllm_build(tmp_path / "tp2", tmp_path / "e7", cwd=tmp_path)
    assert corrupt.returncode == 1 and "Error while deserializing header" in corrupt.stderr
    no_config = trtllm_build(tmp_path / "m", tmp_path / "e8", cwd=tmp_path)  # HF dir: has config.json, no ranks
    assert no_config.returncode == 1 and "rank0.safetensors" in no_config.stderr
    nothing = trtllm_build(tmp_path / "nope", tmp_path / "e9", cwd=tmp_path)
    assert nothing.returncode == 1 and "No such file or directory" in nothing.stderr
    assert not any((tmp_path / f"e{i}").exists() for i in (6, 7, 8, 9))


def test_yaml_parser() -> None:
    mod = _load_standin()
    text = 'a: 1\nb: "x: y"  # c\nnested:\n  tags:\n    tp: "2"\n    on: true\n  f: {k: v, n: 3}\n'
    assert mod.parse_yaml(text) == {"a": 1, "b": "x: y", "nested": {
        "tags": {"tp": "2", "on": True}, "f": {"k": "v", "n": 3}}}
    assert mod.STANDIN_TRTLLM_VERSION == DEFAULT_TRTLLM
    assert mod.gpu_device_tag({"pci_device_id": "0x233010DE"}) == "2330:10de"


# -------------------------------------------------------------------- docker engine helper
def test_ensure_docker_engine_installs_and_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fresh-machine path, with a fake dockerd: install, start detached, poll until it answers."""
    pidfile, fake = tmp_path / "pid", tmp_path / "dockerd"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\necho 'API listen on /var/run/docker.sock'\n"
                    "exec sleep 30\n")
    fake.chmod(0o755)
    log = tmp_path / "dockerd.log"
    installed: list[bool] = []
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(docker_engine, "DOCKERD_LOG", log)
    monkeypatch.setattr(docker_engine, "_LOCK", tmp_path / "lock")
    monkeypatch.setattr(docker_engine.os, "geteuid", lambda: 0)
    monkeypatch.setattr(docker_engine.shutil, "which",
                        lambda name: str(fake) if name == "dockerd" and installed else None)
    monkeypatch.setattr(docker_engine, "_apt_install_docker", lambda: installed.append(True))
    sentinel = object()
    monkeypatch.setattr(docker_engine, "_ping",
                        lambda: sentinel if log.exists() and "API listen" in log.read_text() else None)
    try:
        assert docker_engine.ensure_docker_engine(timeout=10) is sentinel
        assert installed == [True]
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_ensure_docker_engine_reports_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "dockerd"
    fake.write_text("#!/bin/sh\necho 'failed to start daemon: boom'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(docker_engine, "DOCKERD_LOG", tmp_path / "dockerd.log")
    monkeypatch.setattr(docker_engine, "_LOCK", tmp_path / "lock")
    monkeypatch.setattr(docker_engine, "_ping", lambda: None)
    monkeypatch.setattr(docker_engine.shutil, "which", lambda name: str(fake))
    monkeypatch.setattr(docker_engine.os, "geteuid", lambda: 0)
    # The daemon's exit is noticed and its own words reported (a timeout would say exit code None).
    with pytest.raises(TestbedError, match="boom") as caught:
        docker_engine.ensure_docker_engine(timeout=30)
    assert "(exit code 1)" in str(caught.value)
    monkeypatch.setattr(docker_engine.os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedError, match="not root"):
        docker_engine.ensure_docker_engine()


# --------------------------------------------------------------------------- docker: the image
# Own fixtures, not conftest's skip-on-a-laptop ones: these never skip. A missing engine is
# installed/started by ensure_docker_engine, and if that fails the tests fail (CI=true or not).
@pytest.fixture(scope="module")
def engine_client() -> Any:
    return docker_engine.ensure_docker_engine()


@pytest.fixture(scope="module")
def standin_image_id(engine_client: Any) -> str:
    return build_standin_image(engine_client, source_tag())


@pytest.fixture
def containers(engine_client: Any) -> Iterator[list[Any]]:
    """Containers a test creates (labelled nimflow.test=1); always force-removed afterwards."""
    created: list[Any] = []
    yield created
    for c in created:
        with contextlib.suppress(Exception):
            c.remove(force=True)


def run_container(client: Any, created: list[Any], image: str, command: Any = None, **kw: Any) -> Any:
    c = client.containers.run(image, command, detach=True, labels={"nimflow.test": "1"}, **kw)
    created.append(c)
    return c


def run_to_end(client: Any, created: list[Any], image: str, command: Any, **kw: Any) -> tuple[int, str, str]:
    """Run a one-shot container; (exit code, stdout, stderr)."""
    c = run_container(client, created, image, command, **kw)
    code = c.wait(timeout=30)["StatusCode"]
    return code, c.logs(stdout=True, stderr=False).decode(), c.logs(stdout=False, stderr=True).decode()


@pytest.mark.testbed
def test_image_is_cached_by_source_hash(engine_client: Any, standin_image_id: str) -> None:
    image = engine_client.images.get(source_tag())
    assert image.id == standin_image_id
    assert image.labels["nimflow.stand-in"] == "true"
    assert image.labels["nimflow.source-hash"] == source_hash()
    assert image.labels["nimflow.trtllm-version"] == DEFAULT_TRTLLM
    assert image.attrs["Config"]["Cmd"] == ["/usr/local/bin/start-server"]
    assert build_standin_image(engine_client, source_tag()) == standin_image_id  # served from the cache, not rebuilt
    assert engine_client.images.get(source_tag()).attrs["Created"] == image.attrs["Created"]
    assert source_hash(trtllm_version="1.2.1") != source_hash()  # variants never share a cache key


@pytest.mark.testbed
def test_container_nvidia_smi_and_trtllm_version(engine_client: Any, standin_image_id: str,
                                                 containers: list[Any]) -> None:
    code, out, _ = run_to_end(engine_client, containers, standin_image_id,
                              ["nvidia-smi", "--query-gpu=name,compute_cap,pci.device_id", "--format=csv,noheader"],
                              environment={"NIMSTANDIN_GPU": H100, "NIMSTANDIN_GPU_COUNT": "2"})
    assert code == 0 and out == "NVIDIA H100 80GB HBM3, 9.0, 0x233010DE\n" * 2
    code, out, _ = run_to_end(engine_client, containers, standin_image_id, ["nvidia-smi", "-L"],
                              environment={"NIMSTANDIN_GPU_COUNT": "0"})
    assert code == 9 and "couldn't communicate with the NVIDIA driver" in out
    metadata = ["python3", "-c", "import importlib.metadata as m; print(m.version('tensorrt_llm'))"]
    code, out, _ = run_to_end(engine_client, containers, standin_image_id, metadata)
    assert code == 0 and out.strip() == DEFAULT_TRTLLM
    code, _, err = run_to_end(engine_client, containers, standin_image_id, ["python3", "-c", "import tensorrt_llm"])
    assert code == 1 and "ModuleNotFoundError" in err  # metadata only: no fake module to import


@pytest.mark.testbed
def test_variant_image_reports_its_trtllm_version(engine_client: Any, standin_image_id: str,
                                                  containers: list[Any], tmp_path: Path, model_dir: Path) -> None:
    tag = "nimflow/nim-standin:test-trtllm-9.9.9"
    try:
        variant = build_standin_image(engine_client, tag, trtllm_version="9.9.9")
        assert variant != standin_image_id
        assert engine_client.images.get(tag).labels["nimflow.source-hash"] == source_hash(trtllm_version="9.9.9")
        code, out, _ = run_to_end(engine_client, containers, variant, [
            "python3", "-c", "import importlib.metadata as m; print(m.version('tensorrt_llm'))"])
        assert code == 0 and out.strip() == "9.9.9"
        out_dir = tmp_path / "engine"
        out_dir.mkdir()
        code, _, err = run_to_end(
            engine_client, containers, variant,
            ["nim-optimize", "--model_dir", "/in/model", "--output_engine_dir", "/out"],
            environment={"NIMSTANDIN_BUILD_SECONDS": "0"},
            volumes={str(model_dir): {"bind": "/in/model", "mode": "ro"}, str(out_dir): {"bind": "/out", "mode": "rw"}})
        assert code == 0, err
        assert json.loads((out_dir / "trtllm_engine" / "config.json").read_text())["version"] == "9.9.9"
        # the default image (another TensorRT-LLM) refuses it
        code, _, err = run_to_end(engine_client, containers, standin_image_id, None,
                                  environment={"NIM_MODEL_NAME": "/engine"},
                                  volumes={str(out_dir): {"bind": "/engine", "mode": "ro"}})
        assert code == 1
        assert f"expecting library version {DEFAULT_TRTLLM} got 9.9.9" in err
    finally:
        for c in containers:
            with contextlib.suppress(Exception):
                c.remove(force=True)
        with contextlib.suppress(Exception):
            engine_client.images.remove(tag, force=True)


@pytest.mark.testbed
def test_container_convert_trtllm_build_and_serve(engine_client: Any, standin_image_id: str,
                                                  containers: list[Any], tmp_path: Path, model_dir: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    env = {"NIMSTANDIN_GPU": A100, "NIMSTANDIN_BUILD_SECONDS": "0"}
    code, stdout, err = run_to_end(
        engine_client, containers, standin_image_id,
        ["python3", "/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py", "--model_dir", "/model",
         "--output_dir", "/work/ckpt", "--dtype", "bfloat16", "--tp_size", "2"],
        environment=env, volumes={str(model_dir): {"bind": "/model", "mode": "ro"},
                                  str(work): {"bind": "/work", "mode": "rw"}})
    assert code == 0, err
    assert "Total time of converting checkpoints" in stdout
    assert json.loads((work / "ckpt" / "config.json").read_text())["mapping"]["tp_size"] == 2
    code, stdout, err = run_to_end(
        engine_client, containers, standin_image_id,
        ["trtllm-build", "--checkpoint_dir", "/work/ckpt", "--output_dir", "/out/trtllm_engine",
         "--max_batch_size", "2", "--max_seq_len", "512", "--max_input_len", "512", "--max_num_tokens", "256",
         "--output_timing_cache", "/work/timing.cache"],
        environment=env, volumes={str(work): {"bind": "/work", "mode": "rw"}, str(out): {"bind": "/out", "mode": "rw"}})
    assert code == 0, err
    econf = json.loads((out / "trtllm_engine" / "config.json").read_text())
    assert econf["version"] == DEFAULT_TRTLLM and econf["pretrained_config"]["dtype"] == "bfloat16"
    assert (econf["build_config"]["max_num_tokens"], econf["build_config"]["max_seq_len"]) == (256, 512)
    assert (work / "timing.cache").is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((model_dir / name).read_bytes())

    serve_env = {"NIM_MODEL_NAME": "/engine", "NIM_SERVED_MODEL_NAME": "trt", "NIMSTANDIN_READY_DELAY": "0",
                 "NIMSTANDIN_GPU_COUNT": "2", **LEGACY_BACKEND}
    c = run_container(engine_client, containers, standin_image_id,
                      environment={**serve_env, "NIMSTANDIN_GPU": A100},
                      volumes={str(out): {"bind": "/engine", "mode": "ro"}}, ports={"8000/tcp": ("127.0.0.1", None)})
    c.reload()
    base = f"http://127.0.0.1:{c.ports['8000/tcp'][0]['HostPort']}"
    wait_for(f"{base}/v1/health/ready", timeout=20)
    assert chat(base, "trt")[0] == 200
    c.stop(timeout=5)

    code, stdout, err = run_to_end(engine_client, containers, standin_image_id, None,
                                   environment={**serve_env, "NIMSTANDIN_GPU": H100},
                                   volumes={str(out): {"bind": "/engine", "mode": "ro"}})
    assert code == 1
    assert ("The engine plan file is generated on an incompatible device, expecting compute 8.0 got compute 9.0, "
            "please rebuild.") in err
    assert "Listening" not in stdout


@pytest.mark.testbed
def test_container_jit_serve_and_stop(engine_client: Any, standin_image_id: str, containers: list[Any],
                                      tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    c = run_container(
        engine_client, containers, standin_image_id,
        environment={"NIM_FT_MODEL": "/models/ft", "NIM_CUSTOM_MODEL_NAME": "custom_1",
                     "NIM_SERVED_MODEL_NAME": "acme/ft", "NIMSTANDIN_BUILD_SECONDS": "0.3",
                     "NIMSTANDIN_READY_DELAY": "0.2", "NGC_API_KEY": SECRET, **LEGACY_BACKEND},
        volumes={str(cache): {"bind": "/opt/nim/.cache", "mode": "rw"},
                 str(model_dir): {"bind": "/models/ft", "mode": "ro"}},
        ports={"8000/tcp": ("127.0.0.1", None)})
    c.reload()
    base = f"http://127.0.0.1:{c.ports['8000/tcp'][0]['HostPort']}"
    wait_for(f"{base}/v1/health/ready", timeout=20)
    assert http(f"{base}/v1/models")[1]["data"][0]["id"] == "acme/ft"
    status, resp = chat(base, "acme/ft", "ping from the host")
    assert status == 200 and resp["choices"][0]["message"]["content"].endswith("ping from the host")
    assert (cache / "local_cache" / "custom_1" / "trtllm_engine" / "rank0.engine").is_file()

    c.stop(timeout=5)
    c.reload()
    assert c.attrs["State"]["ExitCode"] == 0  # SIGTERM handled by PID 1 (a SIGKILL after 5 s would be 137)
    logs = c.logs().decode()
    assert "TensorRT-LLM backend" in logs and "Engine built" in logs and SECRET not in logs

    listing = run_container(engine_client, containers, standin_image_id, "list-model-profiles",
                            volumes={str(cache): {"bind": "/opt/nim/.cache", "mode": "ro"}})
    assert listing.wait(timeout=20)["StatusCode"] == 0
    text = listing.logs().decode()
    assert "(custom_1)" in text and "[0000:ffff] (0) NIMFLOW STAND-IN FAKE GPU (NOT REAL)" in text


@pytest.mark.testbed
def test_container_nim_optimize_matches_host(engine_client: Any, standin_image_id: str,
                                             containers: list[Any], tmp_path: Path,
                                             model_dir: Path) -> None:
    cfg = write_build_config(tmp_path / "build.yaml", tp=2)
    host_out, out = tmp_path / "host-engine", tmp_path / "container-engine"
    out.mkdir()  # a bind-mounted output dir (cannot be renamed into place)
    assert optimize(model_dir, host_out, cfg, NIMSTANDIN_DETERMINISTIC_BUILD="1").returncode == 0
    c = run_container(
        engine_client, containers, standin_image_id,
        ["nim-optimize", "--model_dir", "/in/model", "--build_config", "/in/build.yaml",
         "--output_engine_dir", "/out"],
        environment={"NIMSTANDIN_BUILD_SECONDS": "0", "NIMSTANDIN_DETERMINISTIC_BUILD": "1"},
        volumes={str(model_dir): {"bind": "/in/model", "mode": "ro"},
                 str(cfg): {"bind": "/in/build.yaml", "mode": "ro"},
                 str(out): {"bind": "/out", "mode": "rw"}})
    assert c.wait(timeout=30)["StatusCode"] == 0, c.logs().decode()
    for name in ("config.json", "rank0.engine", "rank1.engine"):  # host and image agree bytewise
        assert (out / "trtllm_engine" / name).read_bytes() == (host_out / "trtllm_engine" / name).read_bytes()
    assert (out / "tokenizer.json").is_file() and not list(out.glob(".tmp*"))

    bad = run_container(engine_client, containers, standin_image_id,
                        ["nim-optimize", "--model_dir", "/in/engine", "--output_engine_dir", "/tmp/o"],
                        volumes={str(out): {"bind": "/in/engine", "mode": "ro"}})
    assert bad.wait(timeout=30)["StatusCode"] == 1
    assert NOT_IMPLEMENTED in bad.logs(stdout=False, stderr=True).decode()


def test_custom_engine_on_1x_needs_the_legacy_backend_flags(tmp_path: Path, model_dir: Path) -> None:
    """Late NIM 1.x: "The default PyTorch TRT-LLM backend does not support fine-tuned models" (NIM docs,
    ft-support.html): without NIM_USE_TRTLLM_LEGACY_BACKEND=1 and NIM_DISABLE_TRTLLM_PYTORCH_RT=1 a built
    engine (and NIM_FT_MODEL) is refused at start-up; a plain HF directory is not affected.

    On main before this change: the engine was served without them (serve_once timed out waiting for an exit).
    """
    out = tmp_path / "engine"
    assert optimize(model_dir, out, write_build_config(tmp_path / "build.yaml", tp=1)).returncode == 0
    for unset in LEGACY_BACKEND:
        refused = serve_once(NIM_MODEL_NAME=str(out), **{unset: ""})
        assert refused.returncode == 1 and "Listening" not in refused.stdout
        assert "RuntimeError: The default PyTorch TRT-LLM backend does not support fine-tuned models." in refused.stderr
        assert f"unset or not 1: {unset}" in refused.stderr
    ft = serve_once(NIM_FT_MODEL=str(model_dir), NIM_CACHE_PATH=str(tmp_path / "cache"), NIM_USE_TRTLLM_LEGACY_BACKEND="0")
    assert ft.returncode == 1 and "does not support fine-tuned models" in ft.stderr
    with server(NIM_MODEL_NAME=str(model_dir), NIMSTANDIN_READY_DELAY="0", **dict.fromkeys(LEGACY_BACKEND, "")) as (base, _):
        wait_for(f"{base}/v1/health/ready")  # the vLLM backend of an HF directory needs neither


def test_standin_exits_when_it_cannot_write_its_cache(tmp_path: Path) -> None:
    """NIM checks NIM_CACHE_PATH first (``nim-llm-check-cache-env``, NVIDIA/nim-deploy issue 16): a cache
    that cannot be written (here a path under a regular file) ends start-up with NIM's text.

    On main before this change: the stand-in never checked and served (serve_once timed out).
    """
    (tmp_path / "file").write_text("")
    proc = serve_once(NIM_CACHE_PATH=str(tmp_path / "file" / "cache"))
    assert proc.returncode == 1 and "Listening" not in proc.stdout
    assert proc.stderr.rstrip().endswith(f"RuntimeError: Unable to write to NIM_CACHE_PATH ({tmp_path}/file/cache)")
    assert 'File "/usr/local/bin/nim-llm-check-cache-env", line 8, in <module>' in proc.stderr


def test_2x_lora_rank_comes_from_vllm_options(tmp_path: Path) -> None:
    """NIM 2.x: the LoRA rank is vLLM's ``--max-lora-rank`` (CLI after nim-serve, else NIM_PASSTHROUGH_ARGS,
    else vLLM's 16); NIM_MAX_LORA_RANK, a 1.x variable, is not read (a warning says so).

    On main before this change: 2.x read NIM_MAX_LORA_RANK (default 32), so the rank-32 adapter answered.
    """
    base = write_tiny_llama(tmp_path / "base")
    write_lora_adapter(tmp_path / "loras" / "sql", base, rank=32)
    common = {"NIM_MODEL_PATH": str(base), "NIM_PEFT_SOURCE": str(tmp_path / "loras"), "NIMSTANDIN_READY_DELAY": "0"}
    for env, status in (({"NIM_MAX_LORA_RANK": "32"}, 400), ({"NIM_PASSTHROUGH_ARGS": "--enable-lora --max-lora-rank 32"}, 200)):
        with server("nim-serve", **common, **env) as (base_url, proc):
            wait_for(f"{base_url}/v1/health/ready")
            code, body = http(f"{base_url}/v1/completions", {"model": "sql", "prompt": "hi"})
            assert code == status, body
        if status == 400:
            assert "LoRA rank 32 is greater than max_lora_rank 16." in json.dumps(body)
            assert "NIM_MAX_LORA_RANK is a NIM 1.x variable" in (proc.stdout.read() if proc.stdout else "")

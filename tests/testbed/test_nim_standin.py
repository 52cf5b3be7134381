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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimflow.testbed import TestbedError, docker_engine
from nimflow.testbed.nim_image import STANDIN_IMAGE, build_standin_image, source_hash

STANDIN = Path(__file__).resolve().parents[2] / "deployments" / "nim-standin" / "nim_standin.py"
NOT_IMPLEMENTED = "NotImplementedError: Only safetensors/pickle/binary directories are supported."
SECRET = "nvapi-DO-NOT-LOG-ME"


# ------------------------------------------------------------------------------------- helpers
def make_model(root: Path, heads: int = 4) -> Path:
    """A tiny HF-like checkpoint: configs, tokenizer files and a (fake but well-formed) safetensors."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_attention_heads": heads,
        "torch_dtype": "bfloat16", "max_position_embeddings": 2048}))
    (root / "generation_config.json").write_text('{"temperature": 0.6}')
    (root / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"hello": 0, "world": 1}}}))
    (root / "tokenizer_config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(32)))
    return root


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


def standin_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIM")}
    env.update({"NIMSTANDIN_BUILD_SECONDS": "0.2", "NGC_API_KEY": SECRET, "HF_TOKEN": SECRET, **extra})
    return env


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-S", str(STANDIN), *args], env=standin_env(**env),
                          capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def server(**env: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run ``nim_standin.py serve`` on a free port; yield (base URL, process); SIGTERM at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-S", str(STANDIN), "serve"],
                            env=standin_env(NIM_SERVER_PORT=str(port), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def chat(base: str, model: str, text: str = "hello world") -> tuple[int, Any]:
    return http(f"{base}/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": text}]})


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model(tmp_path / "hf-model")


# ----------------------------------------------------------------------------- host: the server
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
        assert models["data"][0]["root"] == str(model_dir)

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

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0 and time.monotonic() - start < 2
        out = proc.stdout.read() if proc.stdout else ""
    assert "vLLM backend" in out and '"POST /v1/chat/completions" 200' in out
    assert SECRET not in out and "NGC_API_KEY=<redacted>" in out


def test_serve_plain_name_and_bad_paths(tmp_path: Path, model_dir: Path) -> None:
    with server(NIM_MODEL_NAME="meta/llama-3.1-8b-instruct", NIMSTANDIN_READY_DELAY="0") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["id"] == "meta/llama-3.1-8b-instruct"
        assert chat(base, "meta/llama-3.1-8b-instruct")[0] == 200

    missing = run_cli("serve", NIM_MODEL_NAME=str(tmp_path / "nope"), NIM_SERVER_PORT=str(free_port()))
    assert missing.returncode == 1 and "no such directory" in missing.stderr
    (model_dir / "model.safetensors").unlink()
    no_weights = run_cli("serve", NIM_MODEL_NAME=str(model_dir), NIM_SERVER_PORT=str(free_port()))
    assert no_weights.returncode == 1 and "safetensors" in no_weights.stderr


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
        proc = run_cli("nim-optimize", "--model_dir", str(model_dir), "--build_config", str(cfg),
                       "--output_engine_dir", str(out))
        assert proc.returncode == 0, proc.stderr
    out = outs[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "trtllm_engine"]
    engine = out / "trtllm_engine"
    assert sorted(p.name for p in engine.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    econf = json.loads((engine / "config.json").read_text())
    assert econf["pretrained_config"]["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert econf["pretrained_config"]["dtype"] == "float16"
    assert econf["build_config"] == {"max_seq_len": 1024, "max_batch_size": 8,
                                     "max_num_tokens": 2048, "extra_key": "kept # not a comment"}
    rank1 = (engine / "rank1.engine").read_bytes()
    assert rank1.startswith(b"NIMSTANDIN-ENGINE\n")
    assert json.loads(rank1.splitlines()[1])["rank"] == 1
    for name in ("rank0.engine", "rank1.engine", "config.json"):  # same inputs, same bytes
        assert (engine / name).read_bytes() == (outs[1] / "trtllm_engine" / name).read_bytes()

    with server(NIM_MODEL_NAME=str(out), NIMSTANDIN_READY_DELAY="0") as (base, proc):
        wait_for(f"{base}/v1/health/ready")
        assert chat(base, str(out))[0] == 200
    assert "TensorRT-LLM backend" in (proc.stdout.read() if proc.stdout else "")

    (engine / "rank1.engine").unlink()  # an incomplete engine must not be served
    broken = run_cli("serve", NIM_MODEL_NAME=str(out), NIM_SERVER_PORT=str(free_port()))
    assert broken.returncode == 1 and "rank1.engine" in broken.stderr


def test_nim_optimize_rejects_bad_inputs(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    bad_tp = run_cli("nim-optimize", "--model_dir", str(model_dir), "--build_config",
                     str(write_build_config(tmp_path / "tp3.yaml", tp=3)), "--output_engine_dir", str(out))
    assert bad_tp.returncode == 1
    assert "ValueError: num_attention_heads (4) must be divisible by tp_size (3)" in bad_tp.stderr
    bad_dtype = run_cli("nim-optimize", "--model_dir", str(model_dir), "--build_config",
                        str(write_build_config(tmp_path / "dt.yaml", 1, "int3")), "--output_engine_dir", str(out))
    assert bad_dtype.returncode == 1 and "int3" in bad_dtype.stderr
    assert not out.exists()  # validation happens before the output is touched

    engine = tmp_path / "engine"
    assert run_cli("nim-optimize", "--model_dir", str(model_dir), "--output_engine_dir",
                   str(engine)).returncode == 0
    again = run_cli("nim-optimize", "--model_dir", str(engine), "--output_engine_dir", str(out))
    assert again.returncode == 1 and again.stderr.rstrip().endswith(NOT_IMPLEMENTED)
    assert "Traceback" in again.stderr

    usage = run_cli("nim-optimize", "-h")
    assert usage.returncode == 0 and "--output_engine_dir" in usage.stdout


# ----------------------------------------------------------------------------- host: JIT build
def test_jit_build_caches_and_registers_profile(tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    manifest = cache / "local_cache" / "local_manifest.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("other-profile:\n  model: x\n  tags: {llm_engine: vllm, model_name: other}\n")
    env = dict(NIM_CACHE_PATH=str(cache), NIM_FT_MODEL=str(model_dir), NIM_CUSTOM_MODEL_NAME="my_ft",
               NIM_SERVED_MODEL_NAME="acme/ft", NIM_TENSOR_PARALLEL_SIZE="2",
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

    profiles = yaml.safe_load(manifest.read_text())
    assert "other-profile" in profiles  # foreign profiles are kept
    (pid, prof), = [(k, v) for k, v in profiles.items() if v["tags"]["model_name"] == "my_ft"]
    assert len(pid) == 64 and prof["tags"]["llm_engine"] == "tensorrt_llm"
    assert prof["tags"]["tp"] == "2" and prof["tags"]["trtllm_buildable"] == "false"
    listing = run_cli("list-model-profiles", NIM_CACHE_PATH=str(cache))
    assert listing.returncode == 0 and f"  - {pid} (my_ft)" in listing.stdout
    assert "No GPUs detected (NIM stand-in on CPU)" in listing.stdout

    engine_before = (built / "trtllm_engine" / "rank0.engine").stat().st_mtime_ns
    with server(**env) as (base, proc):  # second start: reuse the cache, no rebuild
        wait_for(f"{base}/v1/health/ready")
    assert "skipping the build" in (proc.stdout.read() if proc.stdout else "")
    assert (built / "trtllm_engine" / "rank0.engine").stat().st_mtime_ns == engine_before
    assert len(yaml.safe_load(manifest.read_text())) == 2

    # NIM_MODEL_PROFILE=<built id> serves the cached engine (how NIMService uses a NIMBuild).
    profile_env = {k: v for k, v in env.items() if k not in ("NIM_FT_MODEL", "NIM_SERVED_MODEL_NAME")}
    with server(**profile_env, NIM_MODEL_PROFILE=pid) as (base, proc):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == str(built)
    unknown = run_cli("serve", **{**profile_env, "NIM_MODEL_PROFILE": "0" * 64,
                                  "NIM_SERVER_PORT": str(free_port())})
    assert unknown.returncode == 1 and "local_manifest.yaml" in unknown.stderr


def test_jit_rejects_engine_dir(tmp_path: Path, model_dir: Path) -> None:
    engine = tmp_path / "engine"
    assert run_cli("nim-optimize", "--model_dir", str(model_dir), "--output_engine_dir",
                   str(engine)).returncode == 0
    for ft in (engine, engine / "trtllm_engine"):  # the NGC layout, and the bare rank*.engine dir
        proc = run_cli("serve", NIM_FT_MODEL=str(ft), NIM_CACHE_PATH=str(tmp_path / "cache"),
                       NIM_SERVER_PORT=str(free_port()))
        assert proc.returncode == 1 and proc.stderr.rstrip().endswith(NOT_IMPLEMENTED)
    assert not (tmp_path / "cache" / "local_cache" / "custom_1").exists()


def test_yaml_parser() -> None:
    spec = importlib.util.spec_from_file_location("nim_standin_mod", STANDIN)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = 'a: 1\nb: "x: y"  # c\nnested:\n  tags:\n    tp: "2"\n    on: true\n  f: {k: v, n: 3}\n'
    assert mod.parse_yaml(text) == {"a": 1, "b": "x: y", "nested": {
        "tags": {"tp": "2", "on": True}, "f": {"k": "v", "n": 3}}}


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
    start = time.monotonic()
    with pytest.raises(TestbedError, match="boom"):
        docker_engine.ensure_docker_engine(timeout=30)
    assert time.monotonic() - start < 10  # a dead daemon is reported at once, not after the timeout
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
    return build_standin_image(engine_client)


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


@pytest.mark.testbed
def test_image_is_cached_by_source_hash(engine_client: Any, standin_image_id: str) -> None:
    image = engine_client.images.get(STANDIN_IMAGE)
    assert image.id == standin_image_id
    assert image.labels["nimflow.stand-in"] == "true"
    assert image.labels["nimflow.source-hash"] == source_hash()
    assert image.attrs["Config"]["Cmd"] == ["/usr/local/bin/start-server"]
    start = time.monotonic()
    assert build_standin_image(engine_client) == standin_image_id
    assert time.monotonic() - start < 2  # served from the cache, not rebuilt


@pytest.mark.testbed
def test_container_jit_serve_and_stop(engine_client: Any, standin_image_id: str, containers: list[Any],
                                      tmp_path: Path, model_dir: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    c = run_container(
        engine_client, containers, standin_image_id,
        environment={"NIM_FT_MODEL": "/models/ft", "NIM_CUSTOM_MODEL_NAME": "custom_1",
                     "NIM_SERVED_MODEL_NAME": "acme/ft", "NIMSTANDIN_BUILD_SECONDS": "0.3",
                     "NIMSTANDIN_READY_DELAY": "0.2", "NGC_API_KEY": SECRET},
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

    start = time.monotonic()
    c.stop(timeout=5)
    assert time.monotonic() - start < 3  # SIGTERM handled by PID 1, no 5 s wait + SIGKILL
    c.reload()
    assert c.attrs["State"]["ExitCode"] == 0
    logs = c.logs().decode()
    assert "TensorRT-LLM backend" in logs and "Engine built" in logs and SECRET not in logs

    listing = run_container(engine_client, containers, standin_image_id, "list-model-profiles",
                            volumes={str(cache): {"bind": "/opt/nim/.cache", "mode": "ro"}})
    assert listing.wait(timeout=20)["StatusCode"] == 0
    assert "(custom_1)" in listing.logs().decode()


@pytest.mark.testbed
def test_container_nim_optimize_matches_host(engine_client: Any, standin_image_id: str,
                                             containers: list[Any], tmp_path: Path,
                                             model_dir: Path) -> None:
    cfg = write_build_config(tmp_path / "build.yaml", tp=2)
    host_out, out = tmp_path / "host-engine", tmp_path / "container-engine"
    out.mkdir()  # a bind-mounted output dir (cannot be renamed into place)
    assert run_cli("nim-optimize", "--model_dir", str(model_dir), "--build_config", str(cfg),
                   "--output_engine_dir", str(host_out)).returncode == 0
    c = run_container(
        engine_client, containers, standin_image_id,
        ["nim-optimize", "--model_dir", "/in/model", "--build_config", "/in/build.yaml",
         "--output_engine_dir", "/out"],
        environment={"NIMSTANDIN_BUILD_SECONDS": "0"},
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

"""The NIM stand-in's load-time checks (issue 6): weights as vLLM / TensorRT-LLM load them, answers
that name the weights served, the chat-template rule, LoRA adapters (NIM_PEFT_SOURCE), the bundled
manifest, an image that ignores what it is told, and the NIM 2.x variant (``nim-serve``).

Host tests run ``nim_standin.py`` with ``python -S``; Docker tests never skip (CI=true or not).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimflow.testbed import docker_engine
from nimflow.testbed.nim_image import build_standin_image, source_hash, source_tag, standin_weights_digest
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.testbed.test_nim_standin import (
    CHAT_TEMPLATE,
    chat,
    http,
    llama_tensors,
    optimize,
    run_cli,
    run_container,
    run_to_end,
    serve_once,
    server,
    wait_for,
    write_safetensors,
)

BUNDLED = "meta/llama-3.1-8b-instruct"
CHAT_TEMPLATE_ERROR = ("As of transformers v4.44, default chat template is no longer allowed, so you must "
                       "provide a chat template if the tokenizer does not define one.")


def tiny(root: Path, seed: int = 0, template: bool = True, **kw: Any) -> Path:
    """write_tiny_llama (the model other tests use), with a chat template unless told otherwise."""
    d = write_tiny_llama(root, seed=seed, chat_template=False, **kw)
    if template:
        tok = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": CHAT_TEMPLATE}))
    return d


def answer(base: str, model: str, text: str = "hello world") -> str:
    status, body = http(f"{base}/v1/completions", {"model": model, "prompt": text})
    assert status == 200, body
    return str(body["choices"][0]["text"])


def serve_ready(**env: str) -> Any:
    """server(...) with no ready delay; the caller waits for ready."""
    return server(NIMSTANDIN_READY_DELAY="0", **env)


def lora_adapter(root: Path, cfg: dict[str, Any], rank: int = 8, modules: tuple[str, ...] = ("q_proj", "v_proj"),
                 bad_shape: bool = False) -> Path:
    """A PEFT LoRA adapter directory for the Llama ``cfg`` (names and shapes as PEFT saves them)."""
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules),
        "base_model_name_or_path": "tiny", "bias": "none"}))
    base = llama_tensors(cfg)
    tensors: dict[str, tuple[str, list[int]]] = {}
    for i in range(cfg["num_hidden_layers"]):
        for mod in modules:
            group = "mlp" if mod.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            out_dim, in_dim = base.get(f"model.layers.{i}.{group}.{mod}.weight", [16, 16])
            prefix = f"base_model.model.model.layers.{i}.{group}.{mod}"
            tensors[prefix + ".lora_A.weight"] = ("F16", [rank, in_dim + (3 if bad_shape else 0)])
            tensors[prefix + ".lora_B.weight"] = ("F16", [out_dim, rank])
    write_safetensors(root / "adapter_model.safetensors", tensors, fill=rank)
    return root


def cfg_of(model: Path) -> dict[str, Any]:
    return dict(json.loads((model / "config.json").read_text()))


# ------------------------------------------------------------------ weights as vLLM loads them
def test_weights_digest_in_answers_and_helper(tmp_path: Path) -> None:
    a, b = tiny(tmp_path / "a", seed=1), tiny(tmp_path / "b", seed=2, shards=3)
    assert re.fullmatch(r"[0-9a-f]{16}", standin_weights_digest(a))
    assert standin_weights_digest(a) != standin_weights_digest(b)
    for model in (a, b):
        with serve_ready(NIM_MODEL_NAME=str(model), NIM_SERVED_MODEL_NAME="tiny") as (base, _):
            wait_for(f"{base}/v1/health/ready")
            text = answer(base, "tiny", "once upon")
            assert text == f"[NIM stand-in] tiny (weights {standin_weights_digest(model)}) received: once upon"
            status, resp = chat(base, "tiny", "hi there")
            assert status == 200 and resp["choices"][0]["message"]["content"].endswith("received: hi there")


@pytest.mark.parametrize("case", ["lora-as-model", "missing", "shape", "dtype", "extra-under-model"])
def test_vllm_refuses_bad_weights_at_load(tmp_path: Path, case: str) -> None:
    model = tiny(tmp_path / "m")
    cfg = cfg_of(model)
    tensors = {n: ("F16", s) for n, s in llama_tensors(cfg).items()}
    expect = {
        "lora-as-model": "ValueError: There is no module or parameter named 'base_model' in LlamaForCausalLM",
        "missing": "ValueError: Following weights were not initialized from checkpoint: {'model.norm.weight'}",
        "shape": "AssertionError: Attempted to load weight (torch.Size([64, 60])) into parameter "
                 "(torch.Size([64, 64]))",
        "dtype": "TypeError: tensor 'model.norm.weight'",
        "extra-under-model": "KeyError: 'model.layers.0.self_attn.qkv_proj.lora_A.weight'",
    }[case]
    if case == "lora-as-model":
        shutil.rmtree(model)
        model.mkdir()
        (model / "config.json").write_text(json.dumps(cfg))
        lora = lora_adapter(tmp_path / "lora", cfg)
        for f in lora.iterdir():
            shutil.copy(f, model)
    else:
        if case == "missing":
            del tensors["model.norm.weight"]
        elif case == "shape":
            tensors["model.layers.1.self_attn.o_proj.weight"] = ("F16", [64, 60])
        elif case == "dtype":
            tensors["model.norm.weight"] = ("I32", [64])
        else:
            tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = ("F16", [8, 64])
        write_safetensors(model / "model.safetensors", tensors)
    done = serve_once(NIM_MODEL_NAME=str(model))
    assert done.returncode == 1 and expect in done.stderr, done.stderr[-2000:]
    assert "Listening on" in done.stdout  # refused while loading, after the server came up


def test_pickled_weights_are_accepted_unchecked(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with serve_ready(NIM_MODEL_NAME=str(model), NIM_SERVED_MODEL_NAME="tiny") as (base, proc):
        wait_for(f"{base}/v1/health/ready")
        assert f"(weights {standin_weights_digest(model)})" in answer(base, "tiny")


def test_index_json_limits_the_shards_vllm_reads(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m", shards=2)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    dropped = "model-00002-of-00002.safetensors"
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != dropped}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    done = serve_once(NIM_MODEL_NAME=str(model))
    assert done.returncode == 1 and "Following weights were not initialized from checkpoint" in done.stderr


# ---------------------------------------------------------- weights as TensorRT-LLM builds load them
def test_builders_refuse_bad_weights(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m")
    cfg = cfg_of(model)
    lora_dir = lora_adapter(tmp_path / "lora", cfg)
    (lora_dir / "config.json").write_text(json.dumps(cfg))  # an adapter dir mistaken for a checkpoint
    out = optimize(lora_dir, tmp_path / "eng")
    assert out.returncode == 1 and "KeyError: 'transformer.vocab_embedding.weight'" in out.stderr
    assert not (tmp_path / "eng" / "trtllm_engine").exists()
    conv = run_cli("convert_checkpoint.py", "--model_dir", str(lora_dir), "--output_dir", str(tmp_path / "ck"))
    assert conv.returncode == 1 and "KeyError: 'transformer.vocab_embedding.weight'" in conv.stderr

    tensors = {n: ("F16", s) for n, s in llama_tensors(cfg).items()}
    tensors["model.layers.0.mlp.down_proj.weight"] = ("F16", [64, 200])
    write_safetensors(model / "model.safetensors", tensors)
    out = optimize(model, tmp_path / "eng2")
    assert out.returncode == 1
    assert ("ValueError: Parameter transformer.layers.0.mlp.proj.weight has invalid shape torch.Size([64, 200]) "
            "compared with expected shape (64, 128). Auto padding failed.") in out.stderr

    jit = serve_once(NIM_FT_MODEL=str(lora_dir), NIM_CACHE_PATH=str(tmp_path / "cache"))
    assert jit.returncode == 1 and "KeyError: 'transformer.vocab_embedding.weight'" in jit.stderr
    assert not list((tmp_path / "cache" / "local_cache").glob("custom_1*"))


def test_trtllm_ignores_tensors_it_does_not_use(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m")
    tensors = {n: ("F16", s) for n, s in llama_tensors(cfg_of(model)).items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = ("F32", [8])
    tensors["some.extra.weight"] = ("F16", [2])
    write_safetensors(model / "model.safetensors", tensors)
    out = optimize(model, tmp_path / "eng")
    assert out.returncode == 0 and "ignores 2 tensor(s)" in out.stdout, out.stdout


def test_same_weights_same_digest_everywhere(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m", seed=5)
    want = f"(weights {standin_weights_digest(model)})"
    assert optimize(model, tmp_path / "opt").returncode == 0
    ckpt, eng = tmp_path / "ckpt", tmp_path / "trt"
    assert run_cli("convert_checkpoint.py", "--model_dir", str(model), "--output_dir", str(ckpt)).returncode == 0
    assert run_cli("trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(eng / "trtllm_engine"),
                   cwd=tmp_path).returncode == 0
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / f, eng / f)
    for env in ({"NIM_MODEL_NAME": str(model)}, {"NIM_MODEL_NAME": str(tmp_path / "opt")},
                {"NIM_MODEL_NAME": str(eng)},
                {"NIM_FT_MODEL": str(model), "NIM_CACHE_PATH": str(tmp_path / "cache")}):
        with serve_ready(NIM_SERVED_MODEL_NAME="tiny", **env) as (base, _):
            wait_for(f"{base}/v1/health/ready")
            assert want in answer(base, "tiny"), env
            assert chat(base, "tiny")[0] == 200  # tokenizer (and its template) travel with the engine


# ---------------------------------------------------------------------------------- chat template
def test_chat_needs_a_chat_template(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m", template=False)
    with serve_ready(NIM_MODEL_NAME=str(model), NIM_SERVED_MODEL_NAME="tiny") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        status, err = chat(base, "tiny")
        assert status == 400 and err["message"] == CHAT_TEMPLATE_ERROR and err["type"] == "BadRequestError"
        assert err["error"]["message"] == CHAT_TEMPLATE_ERROR and err["code"] == 400
        assert "received: hello world" in answer(base, "tiny")  # /v1/completions still works
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    with serve_ready(NIM_MODEL_NAME=str(model), NIM_SERVED_MODEL_NAME="tiny") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert chat(base, "tiny")[0] == 200
    with serve_ready() as (base, _):  # the bundled model has a template
        wait_for(f"{base}/v1/health/ready")
        assert chat(base, BUNDLED)[0] == 200


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_adapters_served_and_checked(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m")
    cfg = cfg_of(model)
    peft = tmp_path / "loras"
    good = lora_adapter(peft / "math", cfg)
    lora_adapter(peft / "big", cfg, rank=64)
    lora_adapter(peft / "alien", cfg, modules=("W_pack",))
    lora_adapter(peft / "skewed", cfg, bad_shape=True)
    with serve_ready(NIM_MODEL_NAME=str(model), NIM_SERVED_MODEL_NAME="tiny", NIM_PEFT_SOURCE=str(peft)) as (base, _):
        wait_for(f"{base}/v1/health/ready")
        cards = {c["id"]: c for c in http(f"{base}/v1/models")[1]["data"]}
        assert list(cards) == ["tiny", "alien", "big", "math", "skewed"]
        assert cards["math"]["root"] == str(good) and cards["math"]["parent"] == "tiny"
        base16, lora16 = standin_weights_digest(model), standin_weights_digest(good)
        assert answer(base, "math", "sum") == f"[NIM stand-in] math (weights {base16}+lora {lora16}) received: sum"
        assert f"(weights {base16}) received" in answer(base, "tiny")
        status, resp = chat(base, "math")
        assert status == 200 and resp["model"] == "math"
        status, err = chat(base, "big")
        assert status == 400 and "ValueError: LoRA rank 64 is greater than max_lora_rank 32." in err["message"]
        status, err = chat(base, "alien")
        assert status == 400 and "expected target modules in ['q_proj'" in err["message"]
        assert "but received ['model.layers.0.self_attn.W_pack'" in err["message"]
        assert "Please verify that the loaded LoRA module is correct" in err["message"]
        status, err = http(f"{base}/v1/completions", {"model": "skewed", "prompt": "x"})
        assert status == 400 and "must match the size of tensor b (67)" in err["message"]
        assert chat(base, "nope")[0] == 404
    with serve_ready(NIM_MODEL_NAME=str(model), NIM_SERVED_MODEL_NAME="tiny", NIM_PEFT_SOURCE=str(peft),
                     NIM_MAX_LORA_RANK="64") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert "+lora " in answer(base, "big")
    gone = serve_once(NIM_MODEL_NAME=str(model), NIM_PEFT_SOURCE=str(tmp_path / "none"))
    assert gone.returncode == 1 and "NIM_PEFT_SOURCE" in gone.stderr


# ----------------------------------------------------------------- manifest, ignoring, NIM 2.x
def test_bundled_manifest_lookup(tmp_path: Path) -> None:
    with serve_ready(NIM_MODEL_NAME=BUNDLED) as (base, proc):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == BUNDLED
        digest = hashlib.sha256(BUNDLED.encode()).hexdigest()[:16]
        assert f"(weights {digest})" in answer(base, BUNDLED)
        assert http(f"{base}/v1/version")[0] == 404 and http(f"{base}/v1/metadata")[0] == 404  # 1.x
    unknown = serve_once(NIM_MODEL_NAME="acme/not-in-manifest")
    assert unknown.returncode == 1 and "'acme/not-in-manifest'" in unknown.stderr
    assert "has no profile in the model manifest" in unknown.stderr
    manifest = tmp_path / "model_manifest.yaml"  # a v1 manifest with the real YAML tags
    manifest.write_text("abc123:\n  model: mistralai/mistral-7b-instruct-v0.3\n  release: \"1.2.0\"\n"
                        "  tags: {llm_engine: vllm, precision: bf16}\n  workspace: !workspace\n    components:\n"
                        "      - dst: ''\n        src:\n          files:\n            - !name config.json\n")
    name = "mistralai/mistral-7b-instruct-v0.3"
    with serve_ready(NIM_MODEL_NAME=name, NIMSTANDIN_MANIFEST_PATH=str(manifest)) as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == name
        assert f"(weights {hashlib.sha256(name.encode()).hexdigest()[:16]})" in answer(base, name)
    assert serve_once(NIMSTANDIN_MANIFEST_PATH=str(manifest)).returncode == 1  # the default model is not in it


def test_ignore_model_fault(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m")
    for env in ({"NIM_MODEL_NAME": str(model)}, {"NIM_FT_MODEL": str(model)}):
        with serve_ready(NIMSTANDIN_IGNORE_MODEL="1", NIM_SERVED_MODEL_NAME="tiny",
                         NIM_CACHE_PATH=str(tmp_path / "c"), **env) as (base, _):
            wait_for(f"{base}/v1/health/ready")
            card = http(f"{base}/v1/models")[1]["data"][0]
            assert card["id"] == "tiny" and card["root"] == BUNDLED
            assert standin_weights_digest(model) not in answer(base, "tiny")
    assert not (tmp_path / "c" / "local_cache").exists()  # no JIT build happened


def test_nim_serve_2x(tmp_path: Path) -> None:
    model = tiny(tmp_path / "m", seed=9)
    peft = tmp_path / "loras"
    lora_adapter(peft / "math", cfg_of(model))
    with server(NIMSTANDIN_READY_DELAY="0", NIM_MODEL_PATH=str(model), NIM_SERVED_MODEL_NAME="tiny",
                NIM_PEFT_SOURCE=str(peft), NIM_MODEL_NAME="/ignored", _program="nim-serve") as (base, _):
        wait_for(f"{base}/v1/health/ready")
        assert [c["id"] for c in http(f"{base}/v1/models")[1]["data"]] == ["tiny", "math"]
        assert http(f"{base}/v1/version")[1]["release"].startswith("2.")
        meta = http(f"{base}/v1/metadata")[1]
        # The documented fields; the local NIM_MODEL_PATH is not among them (nothing documents it there).
        assert {"version", "modelInfo", "selectedModelProfileId"} <= set(meta) and str(model) not in str(meta)
        assert meta["modelInfo"][0] == {"modelUrl": "tiny", "shortName": "tiny"}
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == str(model)  # vLLM: the path it loaded
        assert f"(weights {standin_weights_digest(model)})" in answer(base, "tiny")
        assert "+lora " in answer(base, "math")
    with server(NIMSTANDIN_READY_DELAY="0", NIM_MODEL_NAME=str(model), _program="nim-serve") as (base, _):
        wait_for(f"{base}/v1/health/ready")  # 2.x ignores NIM_MODEL_NAME: its bundled model
        assert http(f"{base}/v1/models")[1]["data"][0]["root"] == BUNDLED
    for value, text in (("hf://meta-llama/Llama-3.2-1B", "the stand-in cannot download; mount the model"),
                        ("s3://bucket/model", "give an absolute path"), ("relative/dir", "absolute path")):
        done = serve_once(NIM_MODEL_PATH=value, _program="nim-serve")
        assert done.returncode == 1 and text in done.stderr, done.stderr
    assert optimize(model, tmp_path / "eng").returncode == 0
    engine = serve_once(NIM_MODEL_PATH=str(tmp_path / "eng"), _program="nim-serve")
    assert engine.returncode == 1 and "no TensorRT-LLM engine backend" in engine.stderr
    lora = lora_adapter(tmp_path / "lora", cfg_of(model))
    (lora / "config.json").write_text(json.dumps(cfg_of(model)))
    lora_as_model = serve_once(NIM_MODEL_PATH=str(lora), _program="nim-serve")
    assert lora_as_model.returncode == 1 and "There is no module or parameter named 'base_model'" in lora_as_model.stderr


# ------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def engine_client() -> Any:
    return docker_engine.ensure_docker_engine()


@pytest.fixture
def containers(engine_client: Any) -> Iterator[list[Any]]:
    """Containers a test creates (labelled nimflow.test=1); always force-removed afterwards."""
    created: list[Any] = []
    yield created
    for c in created:
        with contextlib.suppress(Exception):
            c.remove(force=True)


@pytest.fixture(scope="module")
def image_2x(engine_client: Any) -> str:
    return build_standin_image(engine_client, source_tag("2.x"), nim_api="2.x")


@pytest.mark.testbed
def test_2x_image_layout_and_serving(engine_client: Any, image_2x: str, containers: list[Any],
                                     tmp_path: Path) -> None:
    img = engine_client.images.get(image_2x)
    assert img.labels["nimflow.nim-api"] == "2.x" and img.labels["nimflow.stand-in"] == "true"
    assert img.labels["nimflow.source-hash"] == source_hash(nim_api="2.x") != source_hash()
    assert img.attrs["Config"]["Cmd"] == ["/usr/local/bin/nim-serve"]
    probe = ("import os,sys; print(' '.join(sorted(os.listdir('/usr/local/bin')))); "
             "print(os.path.exists('/etc/nim/config/model_manifest.yaml')); "
             "print(os.path.exists('/app/tensorrt_llm'))")
    code, out, _ = run_to_end(engine_client, containers, image_2x, ["python3", "-c", probe])
    assert code == 0 and out.split("\n")[:3] == ["list-model-profiles nim-serve nvidia-smi", "False", "False"]
    model = tiny(tmp_path / "m", seed=4)
    model.chmod(0o755)
    c = run_container(engine_client, containers, image_2x, ports={"8000/tcp": ("127.0.0.1", None)},
                      environment={"NIM_MODEL_PATH": "/model", "NIM_SERVED_MODEL_NAME": "tiny",
                                   "NIMSTANDIN_READY_DELAY": "0"},
                      volumes={str(model): {"bind": "/model", "mode": "ro"}})
    c.reload()
    port = c.ports["8000/tcp"][0]["HostPort"]
    wait_for(f"http://127.0.0.1:{port}/v1/health/ready", timeout=30)
    assert f"(weights {standin_weights_digest(model)})" in answer(f"http://127.0.0.1:{port}", "tiny")
    assert http(f"http://127.0.0.1:{port}/v1/metadata")[1]["modelInfo"][0]["shortName"] == "tiny"


@pytest.mark.testbed
def test_1x_image_ships_the_bundled_manifest(engine_client: Any, containers: list[Any]) -> None:
    image = build_standin_image(engine_client, source_tag())
    code, out, _ = run_to_end(engine_client, containers, image,
                              ["python3", "-c", "print(open('/etc/nim/config/model_manifest.yaml').read())"])
    assert code == 0 and "model: meta/llama-3.1-8b-instruct" in out and "!workspace" in out
    assert engine_client.images.get(image).labels["nimflow.nim-api"] == "1.x"


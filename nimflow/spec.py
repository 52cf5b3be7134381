"""The hosting spec: one YAML file per hosted model, loaded into one pydantic model.

``load_spec(path)`` is the only way configs enter nimflow. Every problem is reported as
``CONFIG: field.path: message`` through :class:`nimflow.errors.ConfigError`, never as a traceback.
Relative paths in a spec are resolved against the directory of the spec file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nimflow import bounded_yaml
from nimflow.errors import ConfigError, Problem
from nimflow.settings import SECRET_ENV_VARS
from nimflow.trtllm_families import family_of_script, parallelism_problem

#: Where NIM looks for its cache inside the container; the deploy cache dir is mounted here.
NIM_CACHE_MOUNT = "/opt/nim/.cache"
#: The NIM container's default user: the NIM Operator's (runs NIM as uid 1000 with group / fsGroup 2000).
DEFAULT_NIM_USER = "1000:2000"
_CONTAINER_USER = re.compile(r"^[0-9]{1,10}(:[0-9]{1,10})?\Z")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
#: A spec's `name` (also the name checkpoint events carry).
SPEC_NAME = _NAME
_DIGITS = re.compile(r"[0-9]{1,6}")
_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?\s*([kmgt]i?b?)?\Z", re.IGNORECASE)
# Set by nimflow from the spec: letting `deploy.env` override them would silently fork the truth.
_RESERVED_ENV = (
    "NIM_MODEL_NAME", "NIM_SERVED_MODEL_NAME", "NIM_CACHE_PATH", "NIM_FT_MODEL", "NIM_MODEL_PATH", "NIM_PEFT_SOURCE",
    "NIM_MAX_LORA_RANK",
)



def _gpu_ids(value: Any) -> list[int] | Literal["all"] | None:
    """Accept `[4, 5]`, `"4,5"`, `"device=4,5"` (the docker CLI form), `all`, or nothing."""
    if value is None or value == "all" or value == []:
        return value or None
    if isinstance(value, str):
        text = value.strip().strip("'\"").removeprefix("device=")
        value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list) and all(_DIGITS.fullmatch(str(v)) for v in value):
        ids = [int(v) for v in value]
        if len(set(ids)) != len(ids):
            raise ValueError(f"GPU ids must not repeat: {ids}")
        return ids
    raise ValueError(f"{value!r} is not a GPU selection; use a list of ids like [4, 5, 6, 7], 'all', or leave it out")


GpuIds = Annotated[list[int] | Literal["all"] | None, BeforeValidator(_gpu_ids)]


class _Spec(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Spec):
    """Where the base checkpoint comes from: a Hugging Face repo or a local directory."""

    repo_id: str | None = Field(None, description="Hugging Face repo id, e.g. `meta-llama/Llama-3.2-1B-Instruct`.")
    revision: str = Field("main", description="Branch, tag or commit sha; resolved to a sha and recorded.")
    allow_patterns: list[str] | None = Field(
        None, description="Only download files matching these glob patterns (all files when absent)."
    )
    local_dir: Path | None = Field(None, description="A local Hugging Face-style checkpoint directory instead of a repo.")
    manifest: Path | None = Field(
        None,
        description="Guide §1: a `model_manifest.yaml` taken from another model's NIM image; nimflow builds an image "
        "FROM `deploy.image` with it at /etc/nim/config/model_manifest.yaml, and NIM fetches that model itself.",
    )
    model_name: str | None = Field(
        None, description="With `manifest`: the model the manifest describes (NIM_MODEL_NAME), e.g. `mistralai/mistral-7b-instruct-v0.3`."
    )

    @field_validator("repo_id")
    @classmethod
    def _repo_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not _REPO_ID.match(value):
            raise ValueError(f"{value!r} is not a repo id; expected 'org/name', e.g. 'meta-llama/Llama-3.2-1B-Instruct'")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceSpec:
        given = [k for k in ("repo_id", "local_dir", "manifest") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of `repo_id` (Hugging Face), `local_dir` (a local checkpoint) or `manifest` "
                f"(another NIM model's model_manifest.yaml); found {given or 'none'}"
            )
        if (self.manifest is None) != (self.model_name is None):
            raise ValueError("`manifest` and `model_name` go together: the manifest's model is served as `model_name`")
        return self

    @property
    def watched(self) -> str:
        """What this source names, for logs: `org/repo@rev`, a directory, or a manifest."""
        if self.repo_id is not None:
            return f"{self.repo_id}@{self.revision}"
        return str(self.local_dir or self.manifest)


#: `hf://org/repo` or `hf://org/repo@revision`.
_HF_URI = re.compile(r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._/-]*)?\Z")
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?\Z")


def _weights_location(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    if value.startswith("s3://") and not _S3_URI.match(value):
        raise ValueError(f"{value!r} is not a valid s3:// URI; expected s3://bucket/prefix")
    if value.startswith("hf://") and not _HF_URI.match(value):
        raise ValueError(f"{value!r} is not a valid hf:// URI; expected hf://org/repo or hf://org/repo@revision")
    if "://" in value and not value.startswith(("s3://", "hf://")):
        raise ValueError(f"{value!r}: only local directories, s3://bucket/prefix and hf://org/repo@revision are supported")
    return value


class FinetuneSpec(_Spec):
    """Fully fine-tuned weights to serve (or build) instead of the base checkpoint's weights."""

    path: str = Field(
        description="A local directory, an `s3://bucket/prefix` or `hf://org/repo@revision` holding the fine-tuned "
        "weights (*.safetensors; *.bin / *.pth only with `allow_pickle`). A LoRA adapter belongs in `lora`."
    )
    endpoint_url: str | None = Field(None, description="S3 endpoint for an `s3://` path (MinIO, a test server).")
    allow_pickle: bool = Field(
        False,
        description="Accept PyTorch pickles (*.bin, *.pth). Loading a pickle can run code, so they are refused "
        "unless this is set; then they are converted to safetensors (without unpickling code) before use.",
    )

    _path_shape = field_validator("path")(lambda cls, value: _weights_location(value))


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class LoraAdapterSpec(_Spec):
    """One LoRA adapter, served by name next to the base model."""

    name: str = Field(description="The adapter's model name in /v1/models and in requests (its directory in NIM_PEFT_SOURCE).")
    path: str = Field(
        description="A local directory, `s3://bucket/prefix` or `hf://org/repo@revision` with adapter_config.json "
        "and adapter_model.safetensors."
    )

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _ADAPTER_NAME.match(value):
            raise ValueError(f"{value!r}: use letters, digits, '.', '_' and '-' (it becomes a directory name)")
        return value

    _path_shape = field_validator("path")(lambda cls, value: _weights_location(value))


class LoraSpec(_Spec):
    """LoRA adapters served the NIM way: NIM_PEFT_SOURCE, one directory per adapter, on the base model."""

    adapters: list[LoraAdapterSpec] = Field(min_length=1, description="The adapters to serve.")
    max_rank: int = Field(32, ge=1, le=1024, description="Largest adapter rank NIM loads (NIM_MAX_LORA_RANK).")
    endpoint_url: str | None = Field(None, description="S3 endpoint for `s3://` adapter paths.")
    allow_pickle: bool = Field(False, description="Accept adapter_model.bin (a pickle); converted to safetensors before use.")

    @field_validator("adapters")
    @classmethod
    def _unique(cls, value: list[LoraAdapterSpec]) -> list[LoraAdapterSpec]:
        names = [a.name for a in value]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique: {names}")
        return value


BuildBackend = Literal["nim-optimize", "nim-jit", "trtllm-build"]

#: What each backend can set. A field a backend cannot honour is refused, never silently hashed.
BACKEND_FIELDS: dict[str, frozenset[str]] = {
    # nim-optimize --build_config YAML keys
    "nim-optimize": frozenset({"dtype", "tp_size", "pp_size", "max_seq_len", "max_batch_size", "max_num_tokens"}),
    # trtllm-build flags, plus dtype/tp/pp on convert_checkpoint.py
    "trtllm-build": frozenset(
        {"dtype", "tp_size", "pp_size", "max_seq_len", "max_batch_size", "max_num_tokens", "convert_script"}
    ),
    # NIM_TENSOR_PARALLEL_SIZE, NIM_PIPELINE_PARALLEL_SIZE, NIM_MAX_MODEL_LEN; NIM takes the precision
    # from the checkpoint and has no setting for batch size or tokens per pass.
    "nim-jit": frozenset({"tp_size", "pp_size", "max_seq_len"}),
}
_OPTIONAL_BUILD_FIELDS = ("dtype", "max_seq_len", "max_batch_size", "max_num_tokens", "convert_script")
#: Explicit limits for the backends that take them (TensorRT-LLM's own defaults changed between releases).
_BUILD_DEFAULTS: dict[str, Any] = {"dtype": "float16", "max_seq_len": 8192, "max_batch_size": 64, "max_num_tokens": 8192}
#: Precisions each backend builds (NIM profiles are fp16/bf16; convert_checkpoint.py also takes float32).
BACKEND_DTYPES: dict[str, tuple[str, ...]] = {
    "nim-optimize": ("float16", "bfloat16"),
    "trtllm-build": ("float16", "bfloat16", "float32"),
    "nim-jit": (),
}
# Set by nimflow from the build spec for build containers.
_RESERVED_BUILD_ENV = (
    "NIM_FT_MODEL", "NIM_CUSTOM_MODEL_NAME", "NIM_SERVED_MODEL_NAME", "NIM_CACHE_PATH",
    "NIM_TENSOR_PARALLEL_SIZE", "NIM_PIPELINE_PARALLEL_SIZE", "NIM_MAX_MODEL_LEN",
)


#: Where each section's secrets come from instead of its env (the value is never echoed).
_SECRETS_INSTEAD = {
    "deploy": "nimflow passes the secrets NIM needs to its container",
    "build": "a build container gets only the secrets its backend needs; build.env is also hashed into the engine key",
}


def _check_env(value: dict[str, str], reserved: tuple[str, ...], section: str) -> dict[str, str]:
    for key in value:
        if key in reserved:
            raise ValueError(f"{key} is set by nimflow from the spec; remove it from {section}.env")
        # Any case: a spec is shared, logged and versioned, so no secret value belongs in it.
        if key.upper() in SECRET_ENV_VARS:
            raise ValueError(
                f"{key} is a secret and a spec must not hold secrets: remove it from {section}.env, and export it "
                "where nimflow runs or save it as a Prefect Secret block with `nimflow bootstrap` (README.md: "
                f"'Export secrets where nimflow runs'); {_SECRETS_INSTEAD[section]}"
            )
    return value


class BuildSpec(_Spec):
    """How to compile the TensorRT-LLM engine. Absent: serve the weights without an engine."""

    backend: BuildBackend = Field(
        description="`nim-optimize`: run `nim-optimize` with a build config rendered from this spec; "
        "`nim-jit`: NIM builds at start-up from NIM_FT_MODEL (NIM >= 1.8); "
        "`trtllm-build`: `convert_checkpoint.py` then `trtllm-build` in a TensorRT-LLM release image."
    )
    image: str = Field(
        description="The image that runs the build: a NIM 1.x image (engines only exist in NIM 1.x), "
        "or for `trtllm-build` a TensorRT-LLM release image (`nvcr.io/nvidia/tensorrt-llm/release:<x.y.z>`, < 1.3)."
    )
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="Engine precision (default float16). Not with nim-jit, which takes it from the checkpoint."
    )
    tp_size: int = Field(1, ge=1, le=64, description="Tensor-parallel size: one rank file per GPU.")
    pp_size: int = Field(1, ge=1, le=64, description="Pipeline-parallel size.")
    max_seq_len: int | None = Field(
        None, ge=1, description="Longest sequence (prompt + output) the engine accepts (default 8192; nim-jit: NIM's default)."
    )
    max_batch_size: int | None = Field(None, ge=1, description="Largest batch the engine is built for (default 64; not nim-jit).")
    max_num_tokens: int | None = Field(
        None, ge=1, description="Tokens per forward pass; bounds the build's GPU workspace (default 8192; not nim-jit)."
    )
    convert_script: str | None = Field(
        None,
        description="trtllm-build only: path of convert_checkpoint.py in the image "
        "(default: the one for the checkpoint's architecture, where the image probe finds it: "
        "/app/tensorrt_llm/examples/models/core/<dir>/ or, up to TensorRT-LLM 0.17, examples/<dir>/; "
        "see docs/trtllm-families.md). A path ending in <family dir>/convert_checkpoint.py of a known family "
        "gets that family's flags and limits; any other gets llama-style flags.",
    )
    gpus: GpuIds = Field(None, description="GPU ids for the build container, `all`, or none (CPU-only hosts).")
    shm_size: str = Field("16g", description="Shared memory for the build container.")
    timeout_seconds: float = Field(7200, gt=0, description="Give up on a build that takes longer than this.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for build containers (part of the engine key; no secrets)."
    )

    @model_validator(mode="before")
    @classmethod
    def _backend_defaults(cls, data: Any) -> Any:
        # Backends that take explicit limits always get them, so the key hashes what is built.
        if isinstance(data, dict) and data.get("backend") in ("nim-optimize", "trtllm-build"):
            data = {**_BUILD_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
        return data

    @field_validator(*_OPTIONAL_BUILD_FIELDS)
    @classmethod
    def _honoured_by_backend(cls, value: Any, info: ValidationInfo) -> Any:
        backend = info.data.get("backend")
        if value is not None and backend in BACKEND_FIELDS and info.field_name not in BACKEND_FIELDS[backend]:
            others = sorted(b for b, fields in BACKEND_FIELDS.items() if info.field_name in fields)
            raise ValueError(
                f"the {backend} backend cannot set {info.field_name}; remove it, or use backend "
                f"{' or '.join(others)}"
            )
        if info.field_name == "dtype" and value is not None and backend in BACKEND_DTYPES:
            if value not in BACKEND_DTYPES[backend]:
                raise ValueError(f"{value} is not a precision the {backend} backend builds; use one of {list(BACKEND_DTYPES[backend])}")
        return value

    @field_validator("gpus")
    @classmethod
    def _one_gpu_per_rank(cls, value: Any, info: ValidationInfo) -> Any:
        world = info.data.get("tp_size", 1) * info.data.get("pp_size", 1)
        if isinstance(value, list) and len(value) != world:
            raise ValueError(
                f"{len(value)} GPU(s) given but tp_size x pp_size = {world}: a build needs one GPU per rank"
            )
        return value

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, value: str) -> str:
        return _check_size(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env(value, _RESERVED_BUILD_ENV, "build")

    @model_validator(mode="after")
    def _converter_parallelism(self) -> BuildSpec:
        # A convert_script of a known family fixes the converter now: refuse what it cannot convert
        # in `nimflow validate` (other builds are checked against the checkpoint's architecture).
        family = family_of_script(self.convert_script) if self.convert_script else None
        if family is not None and self.convert_script:
            problem = parallelism_problem(family, self.convert_script, self.tp_size, self.pp_size)
            if problem is not None:
                raise ValueError(problem.message)
        return self

    @model_validator(mode="after")
    def _limits(self) -> BuildSpec:
        if self.max_num_tokens and self.max_batch_size and self.max_seq_len:
            if self.max_num_tokens > self.max_batch_size * self.max_seq_len:
                raise ValueError(
                    f"max_num_tokens ({self.max_num_tokens}) must be <= max_batch_size x max_seq_len "
                    f"({self.max_batch_size * self.max_seq_len})"
                )
        return self

    @property
    def world_size(self) -> int:
        """Number of engine rank files (and serving GPUs): tp x pp."""
        return self.tp_size * self.pp_size


class CacheSpec(_Spec):
    """The engine store shared by every host: engines are built once and published here."""

    uri: str = Field(description="`s3://bucket/prefix` under which engines are stored by engine key.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, a test server); AWS when absent.")
    region: str | None = Field(
        None,
        description="S3 region; boto3's default chain (AWS_DEFAULT_REGION, the profile) when absent, "
        "and us-east-1 with an endpoint_url when that chain has none.",
    )
    max_concurrency: int = Field(
        8, ge=1, le=64, description="Files moved in parallel, and parallel parts per file sent in parts."
    )
    single_request_max_mib: int = Field(
        1024, ge=0, le=5120,
        description="Files up to this size move in one request each (fastest; hashed as they arrive on restore); "
        "larger ones in parts of multipart_chunk_mib. 0: always in parts.",
    )
    multipart_chunk_mib: int = Field(64, ge=5, le=5120, description="Multipart part size in MiB.")
    build_lease_seconds: float = Field(
        300, ge=2, le=86400,
        description="How long a build lease lives without renewal: one host builds a key while others wait; "
        "a crashed builder blocks the others at most this long.",
    )
    single_writer: bool = Field(
        False,
        description="Use a store that does not enforce S3 conditional writes (If-None-Match / If-Match), with a "
        "warning instead of a refusal. No fleet guarantees: only ONE host may ever use this store, since two could "
        "both take a build lease and replace each other's manifest. Off: such a store is refused on first use.",
    )

    @field_validator("uri")
    @classmethod
    def _s3_uri(cls, value: str) -> str:
        if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^/].*)?/?\Z", value):
            raise ValueError(f"{value!r} is not an S3 URI; expected s3://bucket or s3://bucket/prefix")
        return value.rstrip("/")

    @property
    def bucket(self) -> str:
        """The bucket part of :attr:`uri`."""
        return self.uri[len("s3://") :].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """The key prefix part of :attr:`uri` (no leading or trailing slash)."""
        parts = self.uri[len("s3://") :].split("/", 1)
        return parts[1].strip("/") if len(parts) > 1 else ""


class DeploySpec(_Spec):
    """How to run the NIM container that serves the model."""

    image: str = Field(description="The NIM image to run, e.g. `nvcr.io/nim/meta/llama-3.3-70b-instruct:1.8.0`.")
    served_model_name: str = Field(
        min_length=1, description="Name listed by /v1/models and used in requests (NIM_SERVED_MODEL_NAME)."
    )
    gpus: GpuIds = Field(None, description="GPU ids (the guide's `device=4,5,6,7` is [4, 5, 6, 7]), `all`, or none.")
    shm_size: str = Field("16g", description="Shared memory (`--shm-size`); NIM needs it for multi-GPU serving.")
    host: str = Field("127.0.0.1", description="Host address the NIM port is published on.")
    host_port: int = Field(8000, ge=1, le=65535, description="Host port published to the container's port 8000.")
    cache_dir: Path = Field(description=f"Host directory where checkpoints and engines live; a NIM container gets only what "
                            f"it serves (read-only) and its own cache, <cache_dir>/nimflow-nim/<name>, at {NIM_CACHE_MOUNT}.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the NIM container.")
    user: str = Field(
        DEFAULT_NIM_USER,
        description="User the NIM container runs as: `uid:gid`, a bare `uid`, or `root`. The default, `1000:2000`, is the "
        "NIM Operator's (uid 1000, group 2000); NIM's docs run `-u $(id -u)`. A bare uid gets the group the image's "
        "/etc/passwd gives it (gid 0 when it has no entry), so nimflow counts only owner and other permission bits for it. "
        "nimflow makes the container's own cache dir writable for this user (chown when nimflow runs as root) and "
        "refuses, before any container starts, what the user could not write or read.",
    )
    container_name: str | None = Field(None, description="Container name; `nimflow-<name>` when absent.")
    nim_api: Literal["auto", "1.x", "2.x"] = Field(
        "auto",
        description="The image's NIM generation: 1.x (NIM_MODEL_NAME, TensorRT-LLM engines) or 2.x (NIM_MODEL_PATH, "
        "no engines). `auto` reads the image's labels and entrypoint.",
    )
    force: bool = Field(
        False,
        description="Deploy an engine even where this host's GPU or TensorRT-LLM version differs from the one it "
        "was built for (NIM will most likely refuse to load it). Off: such an engine is refused before any container starts.",
    )

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, value: str) -> str:
        return _check_size(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env(value, _RESERVED_ENV, "deploy")

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if value != "root" and not _CONTAINER_USER.match(value):
            raise ValueError(
                f"{value!r}: give a numeric `uid` or `uid:gid` (e.g. `1000:2000`), or `root`; nimflow prepares the cache "
                "and checks file permissions for that uid, and cannot look a user name up inside the image"
            )
        return value


class GoldenPrompt(_Spec):
    """A prompt whose answer must contain given text."""

    prompt: str = Field(min_length=1, description="The prompt sent (chat or completion, as `verify.api`).")
    expect: list[str] = Field(min_length=1, description="Substrings the answer must contain (all of them).")


class VerifySpec(_Spec):
    """How a new container proves it serves the model before it takes traffic."""

    deadline_seconds: float = Field(
        1800, gt=0, description="How long the NIM may take to become ready (loading or JIT building included)."
    )
    api: Literal["auto", "chat", "completions"] = Field(
        "auto",
        description="`chat` (/v1/chat/completions, needs a chat_template in the tokenizer), `completions`, or `auto`: "
        "chat when the model has a chat template, else completions.",
    )
    prompt: str = Field("Say hello in one short sentence.", min_length=1, description="Prompt of the verifying request.")
    golden: list[GoldenPrompt] = Field(default_factory=list, description="Optional prompts with expected substrings.")
    max_latency_seconds: float | None = Field(
        None, gt=0, description="Optional budget for one verifying request; slower fails the `latency` check."
    )
    progress_seconds: float = Field(
        30, gt=0, description="While waiting for ready, report the container's state and latest log line this often."
    )


class RolloutSpec(_Spec):
    """How a changed deployment replaces the running one."""

    strategy: Literal["auto", "blue-green", "recreate"] = Field(
        "auto",
        description="`blue-green`: start the new container beside the old one, verify it, switch the endpoint, "
        "retire the old one (zero downtime; needs room for both). `recreate`: stop the old, start the new, "
        "verify; on failure start the old one again. `auto`: blue-green unless deploy.gpus lists GPUs and "
        "no `standby_gpus` are given.",
    )
    standby_gpus: GpuIds = Field(
        None,
        description="GPU ids for the new container during a blue-green rollout when deploy.gpus are in use by the "
        "old one; the two sets alternate between rollouts.",
    )
    drain_seconds: float = Field(
        60, ge=0, description="After the switch, how long requests still running on the old container may take."
    )


#: Resource-id prefixes of what a spec watches; checkpoint events name their source with these.
SOURCE_ID_HF = "nimflow.source.hf."
SOURCE_ID_S3 = "nimflow.source.s3."
_WATCH_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?\Z")


def source_id_hf(repo_id: str) -> str:
    """The resource id of a watched Hugging Face repo: ``nimflow.source.hf.<org>/<repo>``."""
    return f"{SOURCE_ID_HF}{repo_id}"


def source_id_s3(uri: str) -> str:
    """The resource id of a watched S3 prefix: ``nimflow.source.s3.<bucket>/<prefix>`` (no trailing slash).

    ``s3://bucket/ckpts/`` and ``s3://bucket/ckpts`` name the same source.
    """
    return f"{SOURCE_ID_S3}{uri.removeprefix('s3://').strip('/')}"


class WatchSpec(_Spec):
    """Which new checkpoints start a run of this spec (new commits, new tags, new S3 checkpoint directories)."""

    branches: list[str] = Field(
        default_factory=list, description="New commits on these branches of `source.repo_id` start a run."
    )
    tags: str | None = Field(None, description="A glob, e.g. `v*`: new tags of `source.repo_id` matching it start a run.")
    s3_prefix: str | None = Field(
        None,
        description="`s3://bucket/prefix/`: each new complete checkpoint directory under it is served as `finetune.path`.",
    )
    marker: str | None = Field(
        None,
        description="File name that marks an S3 checkpoint directory complete (e.g. `_COMPLETE`); when absent a "
        "directory is complete once `model.safetensors.index.json` and every shard it lists are present.",
    )
    endpoint_url: str | None = Field(None, description="S3 endpoint for `s3_prefix` (MinIO, a test server); AWS when absent.")

    @field_validator("branches")
    @classmethod
    def _branches(cls, value: list[str]) -> list[str]:
        if any(not b.strip() for b in value):
            raise ValueError("branch names must not be empty")
        if len(set(value)) != len(value):
            raise ValueError(f"branches must not repeat: {value}")
        return value

    @field_validator("tags", "marker")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty; leave the field out instead")
        return value

    @field_validator("marker")
    @classmethod
    def _marker_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and "/" in value:
            raise ValueError(f"{value!r} must be a file name inside each checkpoint directory, without '/'")
        return value

    @field_validator("s3_prefix")
    @classmethod
    def _s3_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _WATCH_S3.match(value):
            raise ValueError(f"{value!r} is not an S3 URI; expected s3://bucket/prefix/")
        return value.rstrip("/") + "/"

    @property
    def watches_repo(self) -> bool:
        """True when new commits or tags of ``source.repo_id`` start runs."""
        return bool(self.branches) or self.tags is not None


class HostingSpec(_Spec):
    """Everything needed to host one model: source, optional fine-tune and build, cache, deploy."""

    name: str = Field(description="Deployment name: lowercase letters, digits and dashes (labels, container name).")
    source: SourceSpec
    finetune: FinetuneSpec | None = None
    lora: LoraSpec | None = None
    build: BuildSpec | None = None
    cache: CacheSpec | None = None
    deploy: DeploySpec
    verify: VerifySpec = Field(default_factory=VerifySpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    watch: WatchSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits and dashes (at most 63), e.g. 'llama-3-8b'")
        return value

    @model_validator(mode="after")
    def _cache_for_build(self) -> HostingSpec:
        if self.build is not None and self.cache is None:
            raise ValueError("`build` needs `cache` (an s3:// engine store) so no host compiles the same engine twice")
        if self.build is not None and isinstance(self.deploy.gpus, list) and len(self.deploy.gpus) != self.build.world_size:
            raise ValueError(
                f"deploy.gpus: {len(self.deploy.gpus)} GPU(s) given but the engine has tp_size x pp_size = "
                f"{self.build.world_size} ranks; NIM serves an engine on exactly one GPU per rank"
            )
        if self.source.manifest is not None:
            extra = [k for k in ("finetune", "lora", "build") if getattr(self, k) is not None]
            if extra:
                raise ValueError(
                    f"source.manifest serves the manifest's model as NIM fetches it; remove {', '.join(extra)} "
                    "(to serve your own weights use source.repo_id or source.local_dir)"
                )
        if self.lora is not None and self.build is not None:
            raise ValueError(
                "lora with build: a LoRA-capable TensorRT-LLM engine (--lora_plugin) is not built by nimflow; "
                "remove `build` to serve the adapters on the base weights, or merge the adapter into a fine-tune"
            )
        if self.lora is not None and self.deploy.served_model_name in {a.name for a in self.lora.adapters}:
            raise ValueError(f"lora.adapters: {self.deploy.served_model_name!r} is the base model's served name; rename the adapter")
        if self.build is not None and self.deploy.nim_api == "2.x":
            raise ValueError(
                "build with deploy.nim_api 2.x: NIM 2.x has no TensorRT-LLM engine path; remove `build` "
                "(NIM 2.x serves the weights through NIM_MODEL_PATH) or deploy with a NIM 1.x image"
            )
        if self.watch is not None:
            self._check_watch(self.watch)
        standby = self.rollout.standby_gpus
        if isinstance(standby, list):
            if not isinstance(self.deploy.gpus, list):
                raise ValueError("rollout.standby_gpus needs deploy.gpus as a list of GPU ids to alternate with")
            if len(standby) != len(self.deploy.gpus) or set(standby) & set(self.deploy.gpus):
                raise ValueError(
                    f"rollout.standby_gpus {standby} must be as many GPUs as deploy.gpus {self.deploy.gpus} "
                    "and none of the same ids"
                )
        return self

    def _check_watch(self, watch: WatchSpec) -> None:
        if watch.watches_repo and self.source.repo_id is None:
            raise ValueError("watch.branches and watch.tags watch source.repo_id; set source.repo_id or remove them")
        if watch.s3_prefix is not None and self.finetune is None:
            raise ValueError(
                "watch.s3_prefix serves each new checkpoint as finetune.path: add a `finetune` section "
                "(its path is the checkpoint served until the first new one arrives)"
            )
        if not watch.watches_repo and watch.s3_prefix is None:
            raise ValueError("watch: give branches, tags or s3_prefix (or remove the section)")

    @property
    def source_ids(self) -> list[str]:
        """The resource ids of the sources this spec watches (see :func:`source_id_hf`, :func:`source_id_s3`)."""
        ids: list[str] = []
        if self.watch is not None and self.watch.watches_repo and self.source.repo_id is not None:
            ids.append(source_id_hf(self.source.repo_id))
        if self.watch is not None and self.watch.s3_prefix is not None:
            ids.append(source_id_s3(self.watch.s3_prefix))
        return ids

    @property
    def rollout_strategy(self) -> Literal["blue-green", "recreate"]:
        """The strategy `auto` resolves to: blue-green where the new container has GPUs of its own (or needs none)."""
        if self.rollout.strategy != "auto":
            return self.rollout.strategy
        if self.deploy.gpus is None or self.rollout.standby_gpus is not None:
            return "blue-green"
        return "recreate"

    @property
    def container_name(self) -> str:
        """The NIM container's name."""
        return self.deploy.container_name or f"nimflow-{self.name}"


def _check_size(value: str) -> str:
    if not _SIZE.match(value.strip()):
        raise ValueError(f"{value!r} is not a size; use e.g. '16g', '512m' or '16GB'")
    return value.strip()


def _location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for index, item in enumerate(loc):
        is_key = loc[index + 1 : index + 2] == ("[key]",)  # pydantic's tag after a mapping key it refused
        if isinstance(item, int) and not is_key:
            parts.append(f"[{item}]")
        elif "[" in str(item) or str(item).startswith("function-"):
            continue  # pydantic's union-branch tags (`list[int]`, `literal['all']`) say nothing to a user
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _non_text_keys(node: Any, path: str = "", seen: frozenset[int] = frozenset()) -> list[Problem]:
    """A problem for each mapping key that is not text (YAML's `1:`, `true:`, `null:`), at its own path."""
    problems: list[Problem] = []
    if id(node) in seen:  # a YAML alias that contains itself
        return problems
    seen = seen | {id(node)}
    if isinstance(node, dict):
        for key, value in node.items():
            text = {None: "null", True: "true", False: "false"}.get(key, str(key)) if not isinstance(key, str) else key
            here = f"{path}.{text}" if path else text
            if not isinstance(key, str):
                problems.append(Problem(here, f"keys must be text; write it as {text!r} (in quotes)"))
            problems += _non_text_keys(value, here, seen)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            problems += _non_text_keys(value, f"{path}[{index}]", seen)
    return problems


def _resolve_paths(data: dict[str, Any], base: Path) -> list[Problem]:
    """Resolve the spec's relative paths against ``base``; the paths that cannot be used, as problems."""
    problems: list[Problem] = []

    def fix(section: Any, key: str, field: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            text = section[key]
            if "\x00" in text:
                problems.append(Problem(field, "must not contain a NUL character"))
                return
            try:
                path = Path(text).expanduser()
                section[key] = str(path if path.is_absolute() else (base / path).resolve())
            except (RuntimeError, OSError, ValueError) as exc:  # `~nosuchuser`, a name too long, ...
                problems.append(Problem(field, f"{text!r} is not a usable path: {exc}"))

    fix(data.get("source"), "local_dir", "source.local_dir")
    fix(data.get("source"), "manifest", "source.manifest")
    fix(data.get("deploy"), "cache_dir", "deploy.cache_dir")
    finetune = data.get("finetune")
    if isinstance(finetune, dict) and "://" not in str(finetune.get("path", "")):
        fix(finetune, "path", "finetune.path")
    lora = data.get("lora")
    if isinstance(lora, dict) and isinstance(lora.get("adapters"), list):
        lora["adapters"] = [dict(a) if isinstance(a, dict) else a for a in lora["adapters"]]
        for index, adapter in enumerate(lora["adapters"]):
            if isinstance(adapter, dict) and "://" not in str(adapter.get("path", "")):
                fix(adapter, "path", f"lora.adapters[{index}].path")
    return problems


def parse_spec(data: Any, source: str = "<spec>", base_dir: Path | None = None) -> HostingSpec:
    """Validate an already-parsed mapping as a :class:`HostingSpec`.

    Raises:
        ConfigError: listing every problem as ``source: field.path: message``.
    """
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("(top level)", "expected a mapping of sections (name, source, deploy, ...)")])
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if base_dir is not None:
        problems = _resolve_paths(data, base_dir)
        if problems:
            raise ConfigError(source, problems)
    try:
        return HostingSpec.model_validate(data)
    except ValidationError as exc:
        problems = _non_text_keys(data)
        if problems:  # pydantic places errors under such keys by position, not as written: name the keys first
            raise ConfigError(source, problems) from None
        for err in exc.errors(include_url=False):
            if err["type"] == "invalid_key" or err["loc"][-1:] == ("[key]",):
                continue  # a key that is not text: named by _non_text_keys with the key as written
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field (check the spelling; see the config reference in README.md)"
            elif err["type"] == "missing":
                message = "required field is missing"
            problems.append(Problem(_location(tuple(err["loc"])), message))
        raise ConfigError(source, problems) from None


def update_spec(spec: HostingSpec, changes: dict[str, Any], source: str) -> HostingSpec:
    """A copy of ``spec`` with fields replaced, validated again as a whole.

    Args:
        spec: the validated spec.
        changes: new values by dotted field path, e.g. ``{"deploy.gpus": [0, 1], "verify.deadline_seconds": 60}``;
            the section (``deploy``) must exist in the spec.
        source: what the changes come from, named in errors (e.g. ``NIMFLOW_GPUS``, ``run parameter overrides``).

    Raises:
        ConfigError: a changed value is invalid, or the changed spec is (e.g. deploy.gpus no longer matches
            the build's ranks), naming each field.
    """
    data = spec.model_dump()
    for dotted, value in changes.items():
        *sections, field = dotted.split(".")
        target = data
        for section in sections:
            if not isinstance(target.get(section), dict):
                raise ConfigError(source, [Problem(dotted, f"the spec {spec.name!r} has no `{section}` section to change")])
            target = target[section]
        target[field] = value
    return parse_spec(data, f"{source} (spec {spec.name})")


def load_spec(path: str | Path) -> HostingSpec:
    """Load and validate a hosting spec from a YAML file.

    Raises:
        ConfigError: the file is missing, is not YAML, or does not describe a valid spec.
    """
    path = Path(path)
    source = str(path)
    try:
        text = bounded_yaml.read_text(path, limit=bounded_yaml.MAX_SPEC_BYTES)
    except bounded_yaml.UnreadableInput as exc:
        raise ConfigError(source, [Problem("(file)", str(exc))]) from None
    except FileNotFoundError:
        raise ConfigError(source, [Problem("(file)", "no such file")]) from None
    except OSError as exc:
        raise ConfigError(source, [Problem("(file)", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [Problem("(file)", f"not UTF-8 text (byte {exc.start}); save it as UTF-8")]) from None
    except ValueError as exc:  # a NUL character in the path
        raise ConfigError(source, [Problem("(file)", f"not a usable path: {exc}")]) from None
    try:
        data = bounded_yaml.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [Problem(where, f"not valid YAML: {reason}")]) from None
    except ValueError as exc:  # PyYAML builds e.g. `2001-99-99` as a date and lets datetime's error out
        raise ConfigError(source, [Problem("(file)", f"not valid YAML: {exc}")]) from None
    except RecursionError:
        raise ConfigError(source, [Problem("(file)", "not valid YAML: nested too deeply")]) from None
    return parse_spec(data, source, base_dir=path.resolve().parent)

"""Small, serialisable records that tasks return and the flow reports.

Tasks hand these between stages instead of clients, containers or open files, so every stage's
result can be persisted, shown in the Prefect UI and fed to the next stage on another host.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class TransferStats(_Record):
    """What one transfer stage moved, and how fast."""

    stage: str = Field(description="`download`, `upload` or `restore`.")
    bytes: int = Field(description="Bytes moved by this run (0 when everything was already there).")
    files: int = Field(description="Files finished.")
    seconds: float = Field(description="Wall time of the stage's transfer.")

    @computed_field  # type: ignore[prop-decorator]  # in the record's JSON too
    @property
    def mib_per_s(self) -> float:
        """Throughput in MiB/s (0 for an empty or instant stage)."""
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


class Checkpoint(_Record):
    """A checkpoint directory on the host, pinned to exactly one content version."""

    path: str = Field(description="Host directory holding config.json, tokenizer and weights.")
    identity: str = Field(description="What pins the content: `hf:<repo>@<sha>` or `sha256:<digest>` of a local dir.")
    repo_id: str | None = None
    revision: str | None = Field(None, description="The revision asked for (branch, tag or sha).")
    revision_sha: str | None = Field(None, description="The commit sha the revision resolved to.")
    downloaded_files: int = Field(0, description="Files transferred by this run (0 when already present).")
    downloaded_bytes: int = 0
    transfer: TransferStats | None = Field(None, description="The download's bytes and throughput (None: nothing fetched).")


class FinetunedWeights(_Record):
    """Fine-tuned weights staged where the build and the NIM expect them (``NIM_FT_MODEL``)."""

    path: str = Field(description="Staged host directory: weights plus config and tokenizer files.")
    digest: str = Field(description="sha256 over the staged files' names and contents.")
    weight_format: Literal["safetensors", "pickle", "binary"]
    staged_files: int = Field(0, description="Files copied by this run (0 when already staged).")


class StagedAdapters(_Record):
    """LoRA adapters checked against the base and staged as one NIM_PEFT_SOURCE directory."""

    path: str = Field(description="Host directory with one sub-directory per adapter (its served name).")
    names: list[str] = Field(description="Adapter names, as listed by /v1/models.")
    digest: str = Field(description="sha256 over the staged adapters' names and contents.")
    staged_files: int = Field(0, description="Files copied by this run (0 when already staged).")


class Engine(_Record):
    """A compiled TensorRT-LLM engine directory in NIM's layout, named by its engine key."""

    engine_key: str
    path: str = Field(description="Host directory: model config/tokenizer files plus trtllm_engine/.")
    origin: Literal["built", "local-cache", "engine-store"] = Field(
        description="`built` by this run, found in this host's cache, or restored from the engine store."
    )
    files: int
    bytes: int
    gpu: str | None = Field(None, description="The GPU model the engine was built for.")
    trtllm_version: str | None = Field(None, description="The TensorRT-LLM version that built it.")
    build_lease: str | None = Field(
        None, description="Token of the build lease this run holds until the engine is published (built engines only)."
    )
    transfer: TransferStats | None = Field(None, description="The restore's bytes and throughput (restored engines only).")


class PublishedEngine(_Record):
    """Where an engine lives in the engine store."""

    engine_key: str
    uri: str = Field(description="s3:// prefix holding the engine's files.")
    manifest_uri: str = Field(description="s3:// URI of the manifest, written last.")
    uploaded_files: int = Field(0, description="Files uploaded by this run (0 when the store already had it).")
    uploaded_bytes: int = 0
    published_by_this_run: bool = Field(
        False, description="False when the store already had the key (another host won the race: its engine is kept)."
    )
    transfer: TransferStats | None = Field(None, description="The upload's bytes and throughput (None: nothing uploaded).")


class ServingImage(_Record):
    """The image a deployment runs and how to talk to it, decided before any download or build."""

    image: str = Field(description="The image to run: deploy.image, or the image derived from it (guide §1 manifest).")
    nim_api: Literal["1.x", "2.x"] = Field(description="1.x: NIM_MODEL_NAME and engines; 2.x: NIM_MODEL_PATH, no engines.")
    detected_by: str = Field(description="How the generation was found (spec, an image label, the entrypoint...).")
    model_name: str | None = Field(None, description="Manifest mode: the NIM_MODEL_NAME baked into the derived image.")
    derived_from: str | None = Field(None, description="Manifest mode: the NIM image the derived image is built FROM.")
    built: bool = Field(False, description="True when this run built the derived image (False: reused by content hash).")


class Deployment(_Record):
    """A NIM container nimflow started (or kept) for a deployment: the candidate of a rollout."""

    name: str = Field(description="The deployment (spec) name; every container of it carries label nimflow.deployment=<name>.")
    container_id: str
    container_name: str
    endpoint: str = Field(description="Base URL of this container's own API (verification talks to it directly).")
    stable_endpoint: str = Field(description="The URL users call (the front proxy on deploy.host_port).")
    served_model_name: str
    model_root: str = Field(
        description="What the NIM was told to serve (NIM_MODEL_NAME / NIM_MODEL_PATH value); /v1/models `root` "
        "must not name another model."
    )
    model_source: str | None = Field(
        None, description="The host directory nimflow prepared and bind-mounted read-only at model_root (None: the "
        "NIM fetches a named model itself); verification checks the container has it mounted."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="The provenance labels nimflow gave the container (weights identity, "
        "engine key, adapters); verification checks the container carries them."
    )
    nim_api: Literal["1.x", "2.x"] = "1.x"
    api: Literal["chat", "completions"] = Field("chat", description="Which inference API verification uses.")
    adapters: list[str] = Field(default_factory=list, description="LoRA adapter names served next to the base model.")
    strategy: Literal["blue-green", "recreate"] = "blue-green"
    previous_container_id: str | None = Field(
        None, description="The container that served before this rollout (kept until this one is verified)."
    )
    reused: bool = Field(False, description="True when an identical container was already serving: nothing changed.")
    forced_despite: list[str] = Field(
        default_factory=list, description="Engine/target differences that deploy.force overrode (normally empty)."
    )


class EndpointHealth(_Record):
    """What verification saw, level by level: live, ready, model, answer, golden, latency."""

    ready_after_seconds: float
    models: list[str]
    completion: str = Field(description="The answer to the verifying prompt.")
    checks: list[str] = Field(default_factory=list, description="The verification levels passed, in order.")
    latency_seconds: float | None = Field(None, description="Slowest verifying request.")


class HostingRecord(_Record):
    """The flow's result: enough to call the endpoint and to audit what was done."""

    name: str
    endpoint: str = Field(description="The stable endpoint users call (it answered throughout a blue-green rollout).")
    served_model_name: str
    container_id: str = Field(description="The container serving now.")
    image: str = Field("", description="The image it runs (derived from deploy.image for a guide §1 manifest).")
    nim_api: str = "1.x"
    model_path: str | None = Field(None, description="Host path of what is served (None: NIM fetched the model itself).")
    revision_sha: str | None
    adapters: list[str] = Field(default_factory=list, description="LoRA adapters served next to the base model.")
    engine_key: str | None = None
    engine_origin: str | None = None
    engine_uri: str | None = None
    downloaded_files: int = 0
    uploaded_files: int = 0
    strategy: str = Field("blue-green", description="How the container was rolled out.")
    replaced_container_id: str | None = Field(None, description="The container this rollout retired (None: first or unchanged).")
    unchanged: bool = Field(False, description="True when the same container already served this model: nothing was touched.")
    checks: list[str] = Field(default_factory=list, description="Verification levels passed.")
    completion: str
    timings: dict[str, float] = Field(description="Seconds spent in each stage.")
    transfers: list[TransferStats] = Field(
        default_factory=list, description="Bytes, seconds and throughput of each transfer stage this run moved data in."
    )

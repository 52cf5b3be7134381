"""Small, serialisable records that tasks return and the flow reports.

Tasks hand these between stages instead of clients, containers or open files, so every stage's
result can be persisted, shown in the Prefect UI and fed to the next stage on another host.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class Checkpoint(_Record):
    """A checkpoint directory on the host, pinned to exactly one content version."""

    path: str = Field(description="Host directory holding config.json, tokenizer and weights.")
    identity: str = Field(description="What pins the content: `hf:<repo>@<sha>` or `sha256:<digest>` of a local dir.")
    repo_id: str | None = None
    revision: str | None = Field(None, description="The revision asked for (branch, tag or sha).")
    revision_sha: str | None = Field(None, description="The commit sha the revision resolved to.")
    downloaded_files: int = Field(0, description="Files transferred by this run (0 when already present).")
    downloaded_bytes: int = 0


class FinetunedWeights(_Record):
    """Fine-tuned weights staged where the build and the NIM expect them (``NIM_FT_MODEL``)."""

    path: str = Field(description="Staged host directory: weights plus config and tokenizer files.")
    digest: str = Field(description="sha256 over the staged files' names and contents.")
    weight_format: Literal["safetensors", "pickle", "binary"]
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


class Deployment(_Record):
    """A running NIM container."""

    container_id: str
    container_name: str
    endpoint: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000.")
    served_model_name: str
    reused: bool = Field(False, description="True when an identical container was already running.")
    forced_despite: list[str] = Field(
        default_factory=list, description="Engine/target differences that deploy.force overrode (normally empty)."
    )


class EndpointHealth(_Record):
    """What verification saw: ready, the model listed, a real completion."""

    ready_after_seconds: float
    models: list[str]
    completion: str


class HostingRecord(_Record):
    """The flow's result: enough to call the endpoint and to audit what was done."""

    name: str
    endpoint: str
    served_model_name: str
    container_id: str
    model_path: str
    revision_sha: str | None
    engine_key: str | None = None
    engine_origin: str | None = None
    engine_uri: str | None = None
    downloaded_files: int = 0
    uploaded_files: int = 0
    completion: str
    timings: dict[str, float] = Field(description="Seconds spent in each stage.")

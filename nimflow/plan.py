"""``nimflow plan CONFIG``: which stages a run would do, and which are hits, without doing them.

It reads what the run would read (the hub's revision, this host's cache, the engine store, the
build lease, the running container) and runs the image probe (:mod:`nimflow.image_probe`: a build
the image cannot run is refused here) and the GPU probe, but downloads, builds, uploads and
starts nothing. The engine key it prints is the one the run will use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from nimflow.build_config import check_against_model
from nimflow.build_lease import BuildLeases
from nimflow.checkpoint import local_checkpoint
from nimflow.containers import docker_client
from nimflow.engine_cache import plan_engine
from nimflow.engine_check import check_local_engine
from nimflow.engine_store import EngineStore, local_engine_path
from nimflow.errors import EngineStoreError, translated_errors
from nimflow.finetune import staged_unchanged
from nimflow.hub_snapshot import completed_snapshot, hub_model_config, pinned_sha, snapshot_path
from nimflow.lora import adapters_unchanged
from nimflow.model_manifest import check_model_listed, manifest_image_tag, read_manifest
from nimflow.nim_generation import nim_generation, refuse_unservable
from nimflow.records import ServingImage
from nimflow.rollout import backend_identity, deployment_labels, serves_custom_weights, serving_config, unchanged_backend
from nimflow.spec import HostingSpec


@dataclass
class Plan:
    """One line per stage: (stage, action, detail), plus the engine key."""

    stages: list[tuple[str, str, str]] = field(default_factory=list)
    engine_key: str | None = None

    def add(self, stage: str, action: str, detail: str) -> None:
        self.stages.append((stage, action, detail))

    def render(self, title: str) -> str:
        """The plan as text: a header, one aligned line per stage, the engine key."""
        width = max(len(a) for _, a, _ in self.stages)
        lines = [title] + [f"  {stage:<9} {action:<{width}}  {detail}" for stage, action, detail in self.stages]
        lines.append(f"engine key: {self.engine_key or '(none: no build)'}")
        return "\n".join(lines)


def make_plan(spec: HostingSpec) -> Plan:
    """Work out what ``host_model`` would do for ``spec`` on this host now.

    Raises:
        NimflowError: what the run itself would fail with first (unknown revision, a build with a
            NIM 2.x image, a build config that does not fit the model (read from the hub's config.json
            when the checkpoint is not on this host yet) or the GPU, an image missing on this host...).
    """
    plan = Plan()
    cache_dir = Path(spec.deploy.cache_dir).resolve()
    source = spec.source
    client = docker_client()
    serving = _plan_image(plan, client, spec)

    model_dir: Path | None = None
    hub_config: dict[str, Any] | None = None  # the checkpoint's config.json from the hub, when not on this host
    if source.manifest is not None:
        weights = f"nim:{source.model_name}"
        plan.add("download", "skip", f"NIM fetches {source.model_name} itself (guide §1 manifest)")
    elif source.local_dir is not None:
        model_dir = Path(source.local_dir)
        weights = local_checkpoint(model_dir).identity  # the run's identity, by the run's rule
        plan.add("download", "skip", f"local checkpoint {model_dir}")
    else:
        assert source.repo_id is not None
        sha = pinned_sha(source.repo_id, source.revision)
        weights = f"hf:{source.repo_id}@{sha}"
        target = snapshot_path(cache_dir, source.repo_id, sha, source.allow_patterns)
        complete = completed_snapshot(target, source.allow_patterns)
        model_dir = target if complete else None
        plan.add("download", "hit" if complete else "run",
                 f"{source.repo_id}@{sha} " + ("is complete in " + str(target) if complete else f"will be downloaded to {target}"))
        if not complete and spec.build is not None and spec.finetune is None:
            # Refuse what the run would refuse right after the download (e.g. a tp/pp the family's
            # converter cannot take), from the hub's config.json alone.
            hub_config = hub_model_config(source.repo_id, sha)
            check_against_model(spec.build, hub_config, where=f"{source.repo_id}@{sha}/config.json")

    if spec.finetune is not None:
        staged = staged_unchanged(spec.finetune, weights, cache_dir) if model_dir is not None else None
        if staged is None:
            plan.add("finetune", "run", f"{spec.finetune.path}: checked and staged; the engine key is known after that")
        else:
            plan.add("finetune", "hit", f"{spec.finetune.path} is unchanged and staged (digest {staged.digest[:12]})")
            weights += f"+ft:sha256:{staged.digest}"
            model_dir = Path(staged.path)
    else:
        plan.add("finetune", "skip", "no fine-tune in the spec")
    adapters = None
    if spec.lora is not None:
        adapters = adapters_unchanged(spec.lora, weights.split("+ft:")[0], cache_dir) if model_dir is not None else None
        names = ", ".join(a.name for a in spec.lora.adapters)
        plan.add("lora", "hit" if adapters else "run", f"{names}: " + ("unchanged and staged" if adapters else "checked and staged"))

    engine_path = None
    if spec.build is None or spec.cache is None:
        plan.add("compile", "skip", "no build: the weights are served directly")
        plan.add("upload", "skip", "no engine")
    elif spec.finetune is not None and "+ft:" not in weights:
        plan.add("compile", "?", "depends on the fine-tuned weights")
        plan.add("upload", "?", "depends on the fine-tuned weights")
    else:
        client = docker_client()
        engine = plan_engine(client, spec.build, model_dir, weights, spec.deploy, allow_patterns=source.allow_patterns,
                             model_config=hub_config)
        plan.engine_key = key = engine.key
        engine_path = local_engine_path(cache_dir, key)
        store = EngineStore(spec.cache)
        with translated_errors(f"looking up engine {key} in {spec.cache.uri}", domain=EngineStoreError):
            stored = store.manifest(key)
            lease = None if stored is not None else BuildLeases(store, spec.cache.build_lease_seconds).live_holder(key)
        on_target = f"on {engine.target.gpu.describe()}, TensorRT-LLM {engine.target.trtllm_version}"
        local = check_local_engine(engine_path, key)  # sizes always; sha256 only where not verified since written
        if local is not None and local.manifest is not None:
            plan.add("compile", "hit", f"engine is on this host ({engine_path})")
        elif local is not None and stored is not None:
            plan.add("compile", "restore", f"the copy on this host is damaged ({local.problem}): set aside, then from {store.uri(key)}")
        elif stored is not None:
            size = sum(f["size"] for f in stored["files"])
            plan.add("compile", "restore", f"from {store.uri(key)} ({len(stored['files'])} files, {size} bytes), nothing to build")
        elif lease is not None:
            plan.add("compile", "wait", f"{lease.holder} is building it now; then restore")
        else:
            plan.add("compile", "build", f"with {spec.build.backend} {on_target}")
        if stored is not None:
            plan.add("upload", "hit", "the store already holds it")
        else:
            plan.add("upload", "run" if lease is None else "skip", f"to {store.uri(key)}")

    served = engine_path if spec.build is not None else model_dir
    strategy = spec.rollout_strategy
    if served is None and source.manifest is None or (spec.lora is not None and adapters is None):
        plan.add("deploy", "run", f"{strategy} rollout of {spec.name} (the model is not on this host yet)")
    else:
        config = serving_config(spec.deploy, serving, str(served) if served else None, adapters.path if adapters else None,
                                spec.lora.max_rank if spec.lora else 32, adapter_count=len(spec.lora.adapters) if spec.lora else 1,
                                custom_weights=serves_custom_weights(spec))
        labels = deployment_labels(weights, plan.engine_key, adapters.digest if adapters else None)
        with translated_errors(f"inspecting the containers of {spec.name}"):
            identity = backend_identity(client, spec.deploy, spec.rollout, serving.image, config, labels)
            kept = unchanged_backend(client, spec.deploy, spec.name, spec.container_name, identity)
        plan.add("deploy", "hit" if kept else "run",
                 f"{kept.name} serves it unchanged: kept" if kept else
                 f"{strategy} rollout: a new container, verified, then {spec.deploy.host}:{spec.deploy.host_port} switched to it")
    levels = ["live", "ready", "model", "answer"] + (["golden"] if spec.verify.golden else []) + (
        ["latency"] if spec.verify.max_latency_seconds else [])
    plan.add("verify", "run", ", ".join(levels) + " (always)")
    return plan


def _plan_image(plan: Plan, client: docker.DockerClient, spec: HostingSpec) -> ServingImage:
    """The serving image and its NIM generation, refusing what the run would refuse."""
    deploy, source = spec.deploy, spec.source
    with translated_errors(f"inspecting image {deploy.image}"):
        generation, how = nim_generation(client, deploy.image, deploy.nim_api)
    refuse_unservable(generation, how, deploy, spec.build, source)
    if source.manifest is None or source.model_name is None:
        plan.add("prepare", "hit", f"{deploy.image} is NIM {generation} ({how})")
        return ServingImage(image=deploy.image, nim_api=generation, detected_by=how)
    manifest, summary = read_manifest(source.manifest)
    check_model_listed(summary, source.model_name, where=str(source.manifest))
    with translated_errors(f"inspecting images derived from {deploy.image}"):
        tag = manifest_image_tag(client, spec.name, deploy.image, manifest, model_name=source.model_name,
                                 served_model_name=deploy.served_model_name)
        exists = bool(client.images.list(name=tag))
    plan.add("prepare", "hit" if exists else "run",
             f"{tag} " + ("exists (manifest unchanged)" if exists else f"will be built FROM {deploy.image} with {source.manifest}"))
    return ServingImage(image=tag, nim_api=generation, detected_by=how, model_name=source.model_name, derived_from=deploy.image)

"""``nimflow plan CONFIG``: which stages a run would do, and which are hits, without doing them.

It reads what the run would read (the hub's revision, this host's cache, the engine store, the
build lease, the running container) and runs the GPU probe, but downloads, builds, uploads and
starts nothing. The engine key it prints is the one the run will use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nimflow.build_lease import BuildLeases
from nimflow.checkpoint import MODEL_SIDE_FILES, directory_digest, files_digest, model_files
from nimflow.containers import docker_client
from nimflow.engine_cache import plan_engine
from nimflow.engine_store import EngineStore, local_engine_path, read_local_manifest
from nimflow.errors import translated_errors
from nimflow.spec import HostingSpec

_SHA = re.compile(r"^[0-9a-f]{40}$")


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
        NimflowError: what the run itself would fail with first (unknown revision, a build config
            that does not fit the GPU, an image missing on this host...).
    """
    # The stage modules own their on-disk layouts; importing them here keeps one definition.
    from tasks.deploy import deployment_identity, deployment_labels, model_mount, running_unchanged
    from tasks.download import completed_snapshot, resolve_revision, snapshot_path
    from nimflow.finetune import finetune_root

    plan = Plan()
    cache_dir = Path(spec.deploy.cache_dir).resolve()
    source = spec.source
    if source.local_dir is not None:
        model_dir: Path | None = Path(source.local_dir)
        weights = f"sha256:{directory_digest(model_dir)}"
        plan.add("download", "skip", f"local checkpoint {model_dir}")
    else:
        assert source.repo_id is not None
        sha = source.revision if _SHA.match(source.revision) else resolve_revision(source.repo_id, source.revision)
        weights = f"hf:{source.repo_id}@{sha}"
        target = snapshot_path(cache_dir, source.repo_id, sha)
        complete = completed_snapshot(target, source.allow_patterns)
        model_dir = target if complete else None
        plan.add("download", "hit" if complete else "run",
                 f"{source.repo_id}@{sha} " + ("is complete in " + str(target) if complete else f"will be downloaded to {target}"))

    if spec.finetune is not None:
        digest = None
        if not spec.finetune.path.startswith("s3://") and model_dir is not None:
            ft_dir = Path(spec.finetune.path)
            files = {p.relative_to(ft_dir).as_posix(): p for p in model_files(ft_dir)}
            for name in MODEL_SIDE_FILES:
                if name not in files and (model_dir / name).is_file():
                    files[name] = model_dir / name
            digest = files_digest(files)
        if digest is None:
            plan.add("finetune", "run", f"{spec.finetune.path}: checked and staged; the engine key is known after that")
        else:
            staged = (finetune_root(cache_dir) / digest[:32]).exists()
            plan.add("finetune", "hit" if staged else "run", f"{spec.finetune.path} (digest {digest[:12]}) "
                     + ("is staged" if staged else "will be checked and staged"))
            weights += f"+ft:sha256:{digest}"
    else:
        plan.add("finetune", "skip", "no fine-tune in the spec")

    engine_path = None
    if spec.build is None or spec.cache is None:
        plan.add("compile", "skip", "no build: the weights are served directly")
        plan.add("upload", "skip", "no engine")
    elif spec.finetune is not None and "+ft:" not in weights:
        plan.add("compile", "?", "depends on the fine-tuned weights")
        plan.add("upload", "?", "depends on the fine-tuned weights")
    else:
        client = docker_client()
        engine = plan_engine(client, spec.build, model_dir, weights, spec.deploy)
        plan.engine_key = key = engine.key
        engine_path = local_engine_path(cache_dir, key)
        store = EngineStore(spec.cache)
        with translated_errors(f"looking up engine {key} in {spec.cache.uri}"):
            stored = store.manifest(key)
            lease = None if stored is not None else BuildLeases(store, spec.cache.build_lease_seconds).live_holder(key)
        on_target = f"on {engine.target.gpu.describe()}, TensorRT-LLM {engine.target.trtllm_version}"
        if read_local_manifest(engine_path) is not None:
            plan.add("compile", "hit", f"engine is on this host ({engine_path})")
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

    container = spec.container_name
    served = engine_path if spec.build is not None else model_dir
    if served is None:
        plan.add("deploy", "run", f"container {container} (the model is not on this host yet)")
    else:
        client = docker_client()
        labels = deployment_labels(weights, plan.engine_key)
        with translated_errors(f"inspecting container {container}"):
            identity = deployment_identity(client, spec.deploy, model_mount(spec.deploy, served)[0], labels)
            kept = running_unchanged(client, container, identity) is not None
        plan.add("deploy", "hit" if kept else "run",
                 f"container {container} " + ("runs unchanged: kept" if kept else f"will be (re)started on port {spec.deploy.host_port}"))
    plan.add("verify", "run", "ready, model listed, one completion (always)")
    return plan

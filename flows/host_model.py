"""The ``host_model`` flow: a checkpoint in, a verified NIM endpoint out.

It reads like the recipe: download, import fine-tuned weights (and LoRA adapters), compile, upload,
deploy, verify; the deploy is a rollout (start the new container, verify it, switch the endpoint to it),
so a new version that fails verification never takes traffic. Each stage is a task in ``tasks/``;
this module only wires them and reports.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nimflow.tasks.compile import compile_engine
from nimflow.tasks.deploy import abort_rollout, deploy_nim, deployment_labels, promote_deployment
from nimflow.tasks.download import download_checkpoint
from nimflow.tasks.finetune import import_finetune, import_lora, verify_api
from nimflow.tasks.leftovers import undo_dead_runs_on_host
from nimflow.tasks.prepare import prepare_serving_image
from nimflow.tasks.upload import upload_engine
from nimflow.tasks.verify import verify_endpoint
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from nimflow import log_filter
from nimflow.endpoint_events import emit_promoted
from nimflow.progress import artifacts_for
from nimflow.records import Deployment, HostingRecord
from nimflow.retries import with_current_retries
from nimflow.rollout import abort
from nimflow.run_leftovers import undo_run_hook
from nimflow.run_names import host_model_run_name
from nimflow.run_parameters import (
    NO_OVERRIDES,
    CheckpointUri,
    EventCheckpointUri,
    EventRevision,
    EventSpecName,
    Revision,
    RunOverrides,
    SpecName,
    resolve_run_spec,
)
from nimflow.settings import get_settings
from nimflow.spec import HostingSpec
from nimflow.spec_concurrency import gpu_limit_name, host_gpu_slots, one_run_per_spec


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[stage] = round(time.monotonic() - started, 3)


#: A backstop for a hung run, not a budget: each stage has its own bound (S3 and hub read timeouts, the
#: build's ``build.timeout_seconds``, default 2 h; ``verify.deadline_seconds``, default 30 min). 12 hours
#: leaves room for a download of hundreds of GB, a long build and a queue for the spec's slot; a spec
#: whose build timeout comes near it needs a larger one (README, "Reading runs in the UI").
HOST_MODEL_TIMEOUT_SECONDS = 12 * 3600


@flow(name="host_model", log_prints=False, flow_run_name=host_model_run_name,
      timeout_seconds=HOST_MODEL_TIMEOUT_SECONDS, on_crashed=[undo_run_hook], on_cancellation=[undo_run_hook])
def host_model(
    spec: SpecName,
    revision: Revision = "",
    checkpoint_uri: CheckpointUri = "",
    overrides: RunOverrides = NO_OVERRIDES,
) -> dict:
    """Host the model described by a hosting spec and return where it is served.

    Runs for the same spec queue (one at a time, see nimflow.spec_concurrency); other specs run alongside.
    On a GPU host with a limit, the host's GPU slots are held for the compile and the rollout only.
    A wait for a slot is logged and ends after NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS (SlotWaitTimeout).

    In a run started by a deployment (the UI, an event trigger, a schedule; or a flow nested in one),
    the parameters come from whoever can reach the Prefect API: ``spec`` must then be a spec's name
    and ``checkpoint_uri`` a directory under the spec's ``watch.s3_prefix``.

    Args:
        spec: the spec's name in the specs directory, or (Python, CLI) a path to a `.yaml` spec.
        revision: overrides ``source.revision`` (e.g. the commit a checkpoint event names); empty: the spec's.
        checkpoint_uri: overrides ``finetune.path`` (a checkpoint an event names); the spec needs `finetune`;
            empty: the spec's.
        overrides: rollout strategy, verify deadline, force; for this run only.

    The run is named ``<spec>@<revision>`` (:func:`nimflow.run_names.model_run_name`).

    Raises:
        ConfigError: the spec or a parameter is invalid (before anything is downloaded or started).
        SlotWaitTimeout: the spec's or the host's GPU slots stayed taken past the wait timeout.
    """
    log_filter.install()
    resolved = resolve_run_spec(spec, revision=revision, checkpoint_uri=checkpoint_uri, overrides=overrides,
                                deployment_run=_started_by_deployment())
    with one_run_per_spec(resolved.name), artifacts_for(resolved.name):  # artifacts keyed by the spec
        return _host(resolved)


@flow(name="host_model", log_prints=False, flow_run_name=host_model_run_name,
      timeout_seconds=HOST_MODEL_TIMEOUT_SECONDS, on_crashed=[undo_run_hook], on_cancellation=[undo_run_hook])
def host_on_checkpoint(
    spec: EventSpecName,
    revision: EventRevision = "",
    checkpoint_uri: EventCheckpointUri = "",
) -> dict:
    """``host_model`` as the checkpoint trigger runs it: the same flow, with a parameter schema Prefect can enforce.

    The deployment ``host-on-checkpoint`` uses this entrypoint with ``enforce_parameter_schema``: its
    schema checks the shape of each parameter (a spec name, an ``s3://`` URI) without freezing the list
    of spec names at deploy time, as ``host_model``'s dropdown does.

    Raises:
        ConfigError: as :func:`host_model`.
    """
    return host_model.fn(spec, revision=revision, checkpoint_uri=checkpoint_uri)


def _started_by_deployment() -> bool:
    """True in a flow run a deployment created, or in a flow nested in one.

    Prefect keeps the top-level run's deployment id in a context variable that nested flows inherit;
    outside a deployment it asks the API for this run's (absent) deployment id.
    """
    from prefect.runtime import deployment

    return deployment.id is not None


@contextmanager
def _on_gpus(spec: HostingSpec, stages: str) -> Iterator[None]:
    """Hold this host's GPU slots for ``stages`` only (a download or upload never keeps another run off the GPUs)."""
    with host_gpu_slots(spec) as slots:
        if slots:
            get_run_logger().info("Holding %d GPU slot(s) of %s for %s", slots, gpu_limit_name(get_settings().host_name), stages)
        yield


def _host(spec: HostingSpec) -> dict:
    """The recipe for one validated spec; runs inside the spec's concurrency slot."""
    cache_dir = str(Path(spec.deploy.cache_dir).resolve())
    timings: dict[str, float] = {}
    # Tasks are called through with_current_retries: the retry settings of this run, not of the import.
    # A dead run's build container (on GPUs) or half-done rollout (recreate: a backend stopped) goes first.
    with_current_retries(undo_dead_runs_on_host)()

    # Which image, which NIM generation: settled before any byte is downloaded or GPU second spent.
    with _timed(timings, "prepare"):
        serving = with_current_retries(prepare_serving_image)(spec.source, spec.deploy, spec.build, spec.name)

    checkpoint = weights = adapters = engine = published = None
    model_path: str | None = None
    weights_identity = f"nim:{spec.source.model_name}"  # guide §1: NIM fetches the model itself
    if spec.source.manifest is None:
        with _timed(timings, "download"):
            checkpoint = with_current_retries(download_checkpoint)(spec.source, cache_dir)
        model_path, weights_identity = checkpoint.path, checkpoint.identity

        if spec.finetune is not None:
            with _timed(timings, "finetune"):
                weights = with_current_retries(import_finetune)(spec.finetune, checkpoint, cache_dir)
            model_path, weights_identity = weights.path, f"{checkpoint.identity}+ft:sha256:{weights.digest}"
        if spec.lora is not None:
            with _timed(timings, "lora"):
                adapters = with_current_retries(import_lora)(spec.lora, checkpoint, cache_dir)
    api = verify_api(spec.verify, model_path)

    if spec.build is not None and spec.cache is not None and model_path is not None:
        with _on_gpus(spec, "the compile"), _timed(timings, "compile"):
            engine = with_current_retries(compile_engine)(
                spec.build, spec.cache, model_path, weights_identity, cache_dir, spec.deploy, spec.source.allow_patterns
            )
        with _timed(timings, "upload"):
            published = with_current_retries(upload_engine)(engine, spec.cache)
        model_path = engine.path

    labels = deployment_labels(weights_identity, engine.engine_key if engine else None, adapters.digest if adapters else None)
    with _on_gpus(spec, "the rollout"):  # deploy, verify, switch: the candidate and the old container both on GPUs
        with _timed(timings, "deploy"):
            candidate = with_current_retries(deploy_nim)(spec, serving, model_path, adapters, api, labels, engine)
        # A candidate that fails verification never takes traffic: it is removed, the old one serves on.
        with _timed(timings, "verify"):
            try:
                health = verify_endpoint(candidate, spec.verify)
            except Exception:
                try:
                    with_current_retries(abort_rollout)(candidate, deadline_seconds=spec.verify.deadline_seconds)
                except Exception as cleanup:  # noqa: BLE001 - the verification failure stays the run's error
                    # Raised here, the clean-up's error (often the same daemon outage) would hide why the
                    # candidate failed; it is logged, and `nimflow status` shows what is left.
                    get_run_logger().error("Undoing the failed rollout of %s failed too: %s", candidate.container_name, cleanup)
                raise
            except BaseException as interruption:
                # Cancelled (Prefect's worker sends SIGTERM: TerminationSignal), terminated or interrupted
                # mid-verification: not an Exception, but the rollout is undone all the same, then the
                # interruption goes on to the engine, which marks the run Cancelled or Crashed.
                _undo_interrupted_rollout(candidate, interruption)
                raise
        with _timed(timings, "switch"):
            deployment = with_current_retries(promote_deployment)(candidate, spec.rollout)

    record = HostingRecord(
        name=spec.name,
        endpoint=deployment.stable_endpoint,
        served_model_name=deployment.served_model_name,
        container_id=deployment.container_id,
        image=serving.image,
        nim_api=serving.nim_api,
        model_path=model_path,
        revision_sha=checkpoint.revision_sha if checkpoint else None,
        adapters=deployment.adapters,
        engine_key=engine.engine_key if engine else None,
        engine_origin=engine.origin if engine else None,
        engine_uri=published.manifest_uri if published else None,
        downloaded_files=checkpoint.downloaded_files if checkpoint else 0,
        uploaded_files=published.uploaded_files if published else 0,
        strategy=deployment.strategy,
        replaced_container_id=candidate.previous_container_id,
        unchanged=candidate.reused,
        checks=health.checks,
        completion=health.completion,
        timings=timings,
        # What moved data in this run, with its throughput: download, restore, upload.
        transfers=[t for t in (checkpoint and checkpoint.transfer, engine and engine.transfer, published and published.transfer) if t],
    )
    create_markdown_artifact(markdown=render_record(record), key=f"host-model-{spec.name}", description="Hosted endpoint")
    if not record.unchanged:
        emit_promoted(record)  # nimflow.endpoint.promoted: for automations downstream (notifications, evals)
    get_run_logger().info("%s serves %s at %s", spec.name, record.served_model_name, record.endpoint)
    return record.model_dump()


def _undo_interrupted_rollout(candidate: Deployment, interruption: BaseException) -> None:
    """Remove the candidate of a run interrupted during verification; recreate: start the old backend again.

    Not the ``abort-rollout`` task, and without waiting for the old backend to answer: the process
    is being torn down (a worker sends SIGKILL 30 s after its SIGTERM), so only the Docker calls that
    put the endpoint back are made, and no task run is created on an API that may be going away.
    A failure is logged, never raised over the interruption.
    """
    logger = get_run_logger()
    reason = type(interruption).__name__
    try:
        outcome = abort(candidate, wait_for_old=False)
    except Exception as cleanup:  # noqa: BLE001 - the interruption stays the run's outcome
        logger.error("Run interrupted (%s) during verification; undoing the rollout of %s failed: %s",
                     reason, candidate.container_name, cleanup)
        return
    done = [f"removed candidate {outcome.removed}"] if outcome.removed else []
    if outcome.restored:
        done.append(f"started {outcome.restored} again")
    logger.warning("Run interrupted (%s) during verification: %s", reason, "; ".join(done) or "nothing to undo")


def render_record(record: HostingRecord) -> str:
    """The flow's markdown artifact: endpoint, provenance and per-stage timings."""
    rollout = "unchanged: the same container already served this model" if record.unchanged else (
        f"{record.strategy}" + (f", replaced {record.replaced_container_id[:12]}" if record.replaced_container_id else ", first")
    )
    rows = [
        ("endpoint", record.endpoint),
        ("served model name", record.served_model_name),
        ("LoRA adapters", ", ".join(record.adapters) or "-"),
        ("container", record.container_id[:12]),
        ("image", f"{record.image} (NIM {record.nim_api})"),
        ("rollout", rollout),
        ("checks passed", ", ".join(record.checks)),
        ("revision sha", record.revision_sha or "(local checkpoint or NIM-fetched model)"),
        ("engine key", record.engine_key or "(no engine: weights served directly)"),
        ("engine", f"{record.engine_origin} — {record.engine_uri}" if record.engine_key else "-"),
        ("files downloaded / uploaded", f"{record.downloaded_files} / {record.uploaded_files}"),
        ("completion", record.completion.replace("|", "\\|")[:300]),
    ]
    table = "\n".join(f"| {k} | `{v}` |" if k != "completion" else f"| {k} | {v} |" for k, v in rows)
    stages = "\n".join(f"| {stage} | {seconds:.2f} |" for stage, seconds in record.timings.items())
    moved = "\n".join(f"| {t.stage} | {t.files} | {t.bytes / (1 << 20):.1f} | {t.seconds:.2f} | {t.mib_per_s:.0f} |"
                      for t in record.transfers) or "| (nothing moved) | 0 | 0 | - | - |"
    return (
        f"# {record.name}\n\n| | |\n|---|---|\n{table}\n\n## Stage timings (s)\n\n| stage | seconds |\n|---|---|\n{stages}\n"
        f"\n## Transfers\n\n| stage | files | MiB | seconds | MiB/s |\n|---|---|---|---|---|\n{moved}\n"
    )

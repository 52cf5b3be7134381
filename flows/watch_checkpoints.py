"""The ``watch_checkpoints`` flow: one pass of the checkpoint watcher over the specs directory.

Schedule it (e.g. every few minutes); each new checkpoint of a watched source becomes one
``nimflow.checkpoint.landed`` event (see :mod:`nimflow.checkpoint_events`), which the checkpoint trigger
(:mod:`nimflow.checkpoint_trigger`) turns into ``host_model`` runs; a checkpoint whose event made no run
is announced again on a later pass. The first pass for a spec records a baseline and announces nothing
(see :mod:`nimflow.checkpoint_watch`).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from nimflow.checkpoint_watch import render_markdown, watch_specs
from nimflow.errors import NimflowError
from nimflow.run_names import watcher_run_name
from nimflow.run_parameters import WatchedSpecs
from nimflow.spec_registry import load_named_spec, spec_names

#: A pass lists refs and prefixes and emits events: minutes at most. Bounded, so a pass hung on a
#: silent endpoint ends (failed, naming the timeout) and the next scheduled one runs.
WATCH_TIMEOUT_SECONDS = 15 * 60


@flow(name="watch_checkpoints", log_prints=False, flow_run_name=watcher_run_name, timeout_seconds=WATCH_TIMEOUT_SECONDS)
def watch_checkpoints(specs: WatchedSpecs = ()) -> dict:
    """Announce the new checkpoints of every watching spec (or of the named ones) and return what was sent.

    Args:
        specs: spec names (their ``name`` field) in the specs directory; all specs with a ``watch``
            section when empty.

    Raises:
        ConfigError: a named spec does not exist.
        NimflowError: a spec's pass failed (after the other specs' passes ran and announced theirs).
    """
    log = get_run_logger()
    names = list(specs) if specs else spec_names()
    loaded = {name: load_named_spec(name) for name in names}
    watching = {name: spec for name, spec in loaded.items() if spec.watch is not None}
    report = watch_specs(watching)
    for event in report.emitted:
        log.info("announced %s for %s: %s (event %s)", event.source_name, event.spec, event.checkpoint, event.event_id)
    create_markdown_artifact(render_markdown(report), key="checkpoint-watch", description="What the checkpoint watcher saw")
    summary = report.as_dict()
    if report.errors:
        raise NimflowError("watch pass failed for " + "; ".join(f"{k}: {v}" for k, v in report.errors.items()))
    return summary

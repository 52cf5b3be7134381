"""The deployments' pull step: run each flow from this host's nimflow checkout, named by ``NIMFLOW_HOME``.

prefect.yaml's ``pull`` section calls :func:`enter_checkout` in every flow-run process before Prefect
loads the entrypoint (``flows/...py``) relative to the working directory. So the deployments store no
path, and each host keeps its checkout where it likes. Without a ``pull`` section, Prefect stores the
absolute path of the checkout ``prefect deploy`` ran in, and every host would need its checkout there.

Why not Prefect's ``set_working_directory`` with ``directory: "{{ $NIMFLOW_HOME }}"``: ``prefect deploy``
fills an ``{{ $VAR }}`` placeholder of a pull step in from its own environment when the variable is set
there (``apply_values`` on the pull steps), storing the deployer's path again; and where the worker
lacks the variable the run fails with a ``chdir`` into the literal text ``{{ $NIMFLOW_HOME }}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from uuid import UUID

from nimflow.errors import ConfigError, Problem
from nimflow.settings import get_settings

#: What a directory must hold to be a checkout the deployments can run from.
CHECKOUT_MARKERS: tuple[str, ...] = ("prefect.yaml", "flows")


def checkout_dir() -> Path:
    """This host's nimflow checkout (``NIMFLOW_HOME``), checked to hold prefect.yaml and flows/.

    Raises:
        ConfigError: NIMFLOW_HOME is unset, or does not name a nimflow checkout.
    """
    home = get_settings().home
    if home is None:
        raise ConfigError("worker environment", [Problem("NIMFLOW_HOME", (
            "not set; the deployments run their flows from this host's nimflow checkout: start the worker "
            "with NIMFLOW_HOME set to it (e.g. NIMFLOW_HOME=/opt/nimflow prefect worker start --pool nimflow-gpu)"))])
    missing = [marker for marker in CHECKOUT_MARKERS if not (home / marker).exists()]
    if missing:
        raise ConfigError("worker environment", [Problem("NIMFLOW_HOME", (
            f"{str(home)!r} is not a nimflow checkout (no {', '.join(missing)} there); set it to the directory "
            "holding this repository's prefect.yaml on this host"))])
    return home.resolve()


def enter_checkout() -> dict[str, str]:
    """Prefect pull step: change into this host's checkout; return it as ``directory`` (as Prefect's steps do).

    Raises:
        ConfigError: NIMFLOW_HOME is unset, or does not name a nimflow checkout (the run ends as Crashed,
            this message in its log, before any flow code runs).
    """
    try:
        directory = checkout_dir()
    except ConfigError as exc:
        _tell_the_run(str(exc))
        raise
    os.chdir(directory)
    return {"directory": str(directory)}


def _tell_the_run(message: str) -> None:
    """Log ``message`` to the flow run being prepared: of a failed pull step Prefect logs there only
    ``Encountered error while running <step>``; the cause goes to the worker's output alone."""
    from prefect.logging.loggers import flow_run_logger
    from prefect.runtime import flow_run

    if flow_run.id:  # outside a flow-run process (a test, a shell) there is no run to tell
        flow_run_logger(flow_run_id=UUID(flow_run.id)).error(message)

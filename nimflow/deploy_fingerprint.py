"""What ``prefect deploy`` would store for each deployment of prefect.yaml, as one short fingerprint.

``nimflow bootstrap`` deploys only the deployments whose fingerprint differs from the one stored on the
server (as the deployment's ``version``): an unchanged deployment is not redeployed, so its scheduled
runs are not regenerated, its schedules and pause are untouched, and nothing about it moves.

The fingerprint covers what a deploy stores: the deployment's prefect.yaml entry (YAML anchors resolved),
the project's pull steps, the entrypoint's flow name, description and parameter schema (host-model's
spec dropdown is the specs directory at deploy time, so a spec added or removed changes it), and the
versions of nimflow and Prefect (a new Prefect may store the same entry differently). The flow's code
is not part of it: a deployment stores the entrypoint, and each worker runs its own checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

#: The prefix of a fingerprint in a deployment's ``version``: what bootstrap stored.
FINGERPRINT_PREFIX = "nimflow:"


def _nimflow_version() -> str:
    try:
        return package_version("nimflow")
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown"


def deployment_fingerprint(project_dir: Path, config: dict[str, Any], entry: dict[str, Any]) -> tuple[str, str]:
    """The flow name and the fingerprint of prefect.yaml's deployment ``entry`` of the project ``config``.

    The flow is loaded from its entrypoint as ``prefect deploy`` loads it, in ``project_dir`` (where
    bootstrap runs ``prefect deploy``, so a relative specs directory means the same there).

    Raises:
        Exception: the entrypoint cannot be loaded (as ``prefect deploy`` itself would fail).
    """
    import prefect
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    with contextlib.chdir(project_dir):
        flow: Any = load_flow_from_entrypoint(str(entry["entrypoint"]))
        schema = parameter_schema(flow).model_dump(mode="json")
    stored = {
        "entry": entry,
        "pull": entry.get("pull", config.get("pull")),
        "flow": flow.name,
        "flow_description": flow.description,
        "schema": schema,
        "versions": {"nimflow": _nimflow_version(), "prefect": prefect.__version__},
    }
    digest = hashlib.sha256(json.dumps(stored, sort_keys=True, default=str).encode()).hexdigest()
    return flow.name, f"{FINGERPRINT_PREFIX}{digest[:16]}"



def fingerprints(project_dir: Path, config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each deployment of ``config`` by name: its flow name and fingerprint (see :func:`deployment_fingerprint`).

    Raises:
        Exception: an entrypoint cannot be loaded.
    """
    return {entry["name"]: deployment_fingerprint(project_dir, config, entry)
            for entry in config.get("deployments") or [] if entry.get("name") and entry.get("entrypoint")}


def main(argv: list[str] | None = None) -> int:
    """``python -m nimflow.deploy_fingerprint PROJECT_DIR``: the fingerprints as JSON on stdout.

    Run by bootstrap in a fresh process, as ``prefect deploy`` runs: a flow's parameter schema is made
    when its module is imported (host-model's spec list), so a long-lived process would hold a stale one.
    """
    import sys

    from nimflow import bounded_yaml

    project_dir = Path((argv if argv is not None else sys.argv[1:])[0]).resolve()
    config = bounded_yaml.load((project_dir / "prefect.yaml").read_text()) or {}
    print(json.dumps(fingerprints(project_dir, config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Credentials kept as Prefect Secret blocks, for workers whose environment does not hold them.

``nimflow bootstrap`` saves each secret that is set in its own environment (``HF_TOKEN``,
``NGC_API_KEY``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) as a Secret block (encrypted at rest
on the server). At run time :mod:`nimflow.settings` falls back to these blocks when the environment
variable is unset, so a worker needs only ``PREFECT_API_URL``. Values are loaded in code, never
templated into deployment fields (``{{ prefect.blocks... }}`` there is stored in plaintext), and never
logged, printed or passed as parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from prefect.blocks.system import Secret
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

logger = logging.getLogger(__name__)

#: Block name -> the environment variable whose value it holds.
HF_TOKEN_BLOCK = "nimflow-hf-token"
NGC_API_KEY_BLOCK = "nimflow-ngc-api-key"
AWS_ACCESS_KEY_ID_BLOCK = "nimflow-aws-access-key-id"
AWS_SECRET_ACCESS_KEY_BLOCK = "nimflow-aws-secret-access-key"
SECRET_BLOCKS: dict[str, str] = {
    HF_TOKEN_BLOCK: "HF_TOKEN",
    NGC_API_KEY_BLOCK: "NGC_API_KEY",
    AWS_ACCESS_KEY_ID_BLOCK: "AWS_ACCESS_KEY_ID",
    AWS_SECRET_ACCESS_KEY_BLOCK: "AWS_SECRET_ACCESS_KEY",
}

SaveResult = Literal["created", "updated", "kept"]


@dataclass(frozen=True)
class SavedSecret:
    """What saving one secret did (the value itself is never part of it)."""

    block: str
    variable: str
    result: SaveResult


def load_secret(block: str) -> SecretStr | None:
    """The value of the Secret block ``block``, or None when there is no Prefect API or no such block.

    Only a configured ``PREFECT_API_URL`` is asked: without one Prefect would start a throwaway
    ephemeral server, which holds no blocks anyway. A server that cannot be reached is logged (without
    any value) and treated as "no block", so a run falls back to what it would do without the secret.
    """
    if not PREFECT_API_URL.value():
        return None
    try:
        value = Secret.load(block, validate=False).get()  # type: ignore[union-attr]  # sync call: a block, not a coroutine
    except (ObjectNotFound, ValueError):
        return None  # Prefect raises ValueError for a block name it does not know
    except Exception as exc:  # noqa: BLE001 - a credential fallback must not fail the run on its own
        logger.warning("could not read the Secret block %s from the Prefect API (%s)", block, type(exc).__name__)
        return None
    return SecretStr(str(value)) if value else None


def save_secret(block: str, value: SecretStr) -> SaveResult:
    """Save ``value`` as the Secret block ``block``: ``created``, ``updated`` (value changed) or ``kept``.

    Raises:
        prefect.exceptions.PrefectHTTPStatusError: the Prefect API refused the request.
    """
    current = load_secret(block)
    if current is not None and current.get_secret_value() == value.get_secret_value():
        return "kept"
    Secret(value=value.get_secret_value()).save(block, overwrite=True)
    return "created" if current is None else "updated"


def save_secrets(values: dict[str, SecretStr | None]) -> list[SavedSecret]:
    """Save each set value (keyed by environment variable name) as its Secret block; skip unset ones.

    Raises:
        ValueError: a key is not one of the variables in :data:`SECRET_BLOCKS`.
    """
    by_variable = {variable: block for block, variable in SECRET_BLOCKS.items()}
    unknown = sorted(set(values) - set(by_variable))
    if unknown:
        raise ValueError(f"no Secret block is defined for {', '.join(unknown)}")
    return [
        SavedSecret(by_variable[variable], variable, save_secret(by_variable[variable], value))
        for variable, value in values.items()
        if value is not None and value.get_secret_value()
    ]

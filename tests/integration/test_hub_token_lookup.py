"""Resolving a revision reads the HF_TOKEN Secret block only when the hub wants a token.

Real local hub and (for the private repo) a real Prefect API holding the block. Reading the block
imports Prefect's client and asks its API: seconds that `nimflow plan` and a no-op rerun spent on
every public repo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from pydantic import SecretStr

from nimflow.credentials import HF_TOKEN_BLOCK, save_secret
from nimflow.hub_snapshot import resolve_revision
from nimflow.testbed.hub_server import publish
from nimflow.testbed.tiny_model import write_tiny_llama

pytestmark = pytest.mark.testbed

RESOLVE_AND_REPORT = ("import sys; from nimflow.hub_snapshot import resolve_revision; "
                      "print(resolve_revision(sys.argv[1], 'main')); print('prefect' in sys.modules)")


def test_a_public_repo_resolves_without_prefect(tmp_path: Path, hub: Any, unique: str) -> None:
    """No HF_TOKEN in the environment, a Prefect API configured: a public repo resolves without
    importing Prefect (so without asking its API for the block).

    Old main (NOT YET RUN against the hub, expected from its code and from the same lookup timed without
    a hub: 2.5-3 s): hf_token_value() loads the block first, importing prefect.blocks and trying the
    API, so the subprocess prints True and the last assertion fails.
    """
    repo = f"org/public-{unique}"
    sha = publish(hub.root, repo, write_tiny_llama(tmp_path / "src"))
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, PREFECT_API_URL="http://127.0.0.1:9/api", HF_HOME=str(tmp_path / "hf-home"))
    done = subprocess.run([sys.executable, "-c", RESOLVE_AND_REPORT, repo], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [sha, "False"], done.stdout + done.stderr


def test_a_private_repo_resolves_with_the_block_token(
    tmp_path: Path, testbed_env: dict, hub: Any, unique: str,
) -> None:
    """The anonymous request is refused (401), so the block's token is read and the request repeated.

    Old main: expected to pass too (the block was always read first); this guards the fallback. NOT YET RUN.
    """
    token = f"hf_block{unique}"
    repo = f"org/private-{unique}"
    sha = publish(hub.root, repo, write_tiny_llama(tmp_path / "src"), token=token)
    save_secret(HF_TOKEN_BLOCK, SecretStr(token))
    try:
        assert resolve_revision(repo, "main") == sha
    finally:  # other tests in this session expect no HF_TOKEN block
        block_id = Secret.load(HF_TOKEN_BLOCK)._block_document_id
        with get_client(sync_client=True) as client:
            client.delete_block_document(block_id)

"""The one place nimflow reads environment variables.

Every variable is read and checked here, in :meth:`Settings.from_env`: a value that is not a
number, or out of its range, fails with one :class:`~nimflow.errors.ConfigError` that names the
variable, the value and what is allowed (never a bare ``int()`` traceback). Secrets are never
echoed. Settings are read on each :func:`get_settings` call, so a worker picks up a changed
environment; task retry options are the exception (see :mod:`nimflow.retries`).

Secrets are held as :class:`pydantic.SecretStr` so they never print; they are handed to the
client that needs them (huggingface_hub, the NIM container) and nowhere else. AWS credentials
and ``AWS_ENDPOINT_URL`` are left to boto3's own credential chain, which reads them itself.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from nimflow.errors import ConfigError, Problem

#: Names whose values must never reach logs, artifacts, parameters or events, nor be written in a
#: spec's ``env`` (nimflow.spec refuses them there). The one list: every secret nimflow reads is in it.
SECRET_ENV_VARS: tuple[str, ...] = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "NGC_API_KEY",
    "NGC_CLI_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
#: The secrets a container nimflow starts can be given, by the name it reads them under. Which ones
#: a container gets depends on what it downloads (nimflow.rollout.SERVING_SECRETS, nimflow.engine_build.BUILD_SECRETS).
CONTAINER_SECRETS: tuple[str, ...] = ("NGC_API_KEY", "HF_TOKEN")


@dataclass(frozen=True)
class Settings:
    """Process-wide settings taken from the environment."""

    hf_endpoint: str | None
    hf_token: SecretStr | None
    ngc_api_key: SecretStr | None
    s3_endpoint_url: str | None
    docker_host: str
    max_retries: int
    retry_delay_seconds: float
    #: Where specs are looked up by name (NIMFLOW_SPECS_DIR; relative to the working directory).
    specs_dir: Path
    #: This host's NIM cache dir for its runs (NIMFLOW_CACHE_DIR); overrides a spec's deploy.cache_dir.
    host_cache_dir: Path | None
    #: This host's GPU ids as written in NIMFLOW_GPUS (e.g. "0,1"), checked like a spec's GPU ids when
    #: applied; overrides deploy.gpus (and build.gpus where the build has GPUs).
    host_gpus: str | None
    #: This host's name in the fleet (NIMFLOW_HOST_NAME, default the hostname): its runs take GPU slots
    #: from the limit `nimflow-gpus-<host_name>` when `nimflow bootstrap --gpu-host` created one.
    host_name: str = ""
    #: The nimflow checkout this host's worker runs the deployments' flows from (NIMFLOW_HOME; the
    #: deployments' pull step, nimflow.worker_checkout, enters it). None when unset.
    home: Path | None = None
    #: AWS keys as set in the environment; only `nimflow bootstrap` reads them (to save Secret blocks).
    #: boto3 reads its own credential chain; :meth:`aws_credentials` adds the blocks as a fallback.
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    #: Seconds an S3 request may wait for the server's next bytes before botocore retries it
    #: (NIMFLOW_S3_READ_TIMEOUT_SECONDS): a hung connection costs this long, not forever.
    s3_read_timeout_seconds: float = 120.0
    #: The docker SDK's own variables as set (it reads them itself): a changed one needs a new client.
    docker_env: tuple[tuple[str, str], ...] = ()
    #: Address space (MiB) of the process that converts one pickle to safetensors
    #: (NIMFLOW_PICKLE_MEMORY_MIB): a hostile pickle that gets past its checks ends there, not in the run.
    pickle_memory_mib: int = 1024
    #: The largest request body the front proxy passes on, in MiB (NIMFLOW_PROXY_MAX_BODY_MIB): larger is a 413.
    proxy_max_body_mib: int = 16
    #: Client connections the front proxy holds open at once (NIMFLOW_PROXY_MAX_CONNECTIONS): more get a 503.
    proxy_max_connections: int = 256
    #: How long a run waits for a concurrency slot (its spec's, this host's GPUs) before it fails naming
    #: the holder and how to free the slot (NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS).
    slot_wait_timeout_seconds: float = 4 * 3600.0
    #: How often a waiting run logs what it waits for and who holds it, and looks for a holder that is
    #: gone (NIMFLOW_SLOT_WAIT_LOG_SECONDS).
    slot_wait_log_seconds: float = 60.0
    #: Where the facts each image probe found are kept, one JSON per image id (NIMFLOW_IMAGE_PROBE_DIR;
    #: default ``$XDG_CACHE_HOME/nimflow/image-probes``, else ``~/.cache/nimflow/image-probes``).
    image_probe_dir: Path = Path("~/.cache/nimflow/image-probes")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and check settings from ``environ`` (default: ``os.environ``).

        Raises:
            ConfigError: a numeric variable is not a number or out of range; every such variable
                is listed, each with its value and the allowed range.
        """
        env = os.environ if environ is None else environ
        problems: list[Problem] = []
        numbers = {name: _number(env, name, rule, problems) for name, rule in NUMERIC_ENV_VARS.items()}
        if problems:
            raise ConfigError("environment", problems)

        def secret(*names: str) -> SecretStr | None:
            for name in names:
                if env.get(name):
                    return SecretStr(env[name])
            return None

        return cls(
            hf_endpoint=env.get("HF_ENDPOINT") or None,
            hf_token=secret("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
            ngc_api_key=secret("NGC_CLI_API_KEY", "NGC_API_KEY"),  # NIM: NGC_CLI_API_KEY wins
            s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            # The docker SDK reads DOCKER_HOST itself; this copy only names the daemon in messages.
            docker_host=env.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
            max_retries=int(numbers["NIMFLOW_MAX_RETRIES"]),
            retry_delay_seconds=float(numbers["NIMFLOW_RETRY_DELAY_SECONDS"]),
            specs_dir=Path(env.get("NIMFLOW_SPECS_DIR") or "configs"),
            host_cache_dir=Path(env["NIMFLOW_CACHE_DIR"]) if env.get("NIMFLOW_CACHE_DIR") else None,
            host_gpus=env.get("NIMFLOW_GPUS", "").strip() or None,
            host_name=env.get("NIMFLOW_HOST_NAME", "").strip() or socket.gethostname(),
            home=Path(env["NIMFLOW_HOME"].strip()) if env.get("NIMFLOW_HOME", "").strip() else None,
            aws_access_key_id=secret("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=secret("AWS_SECRET_ACCESS_KEY"),
            s3_read_timeout_seconds=float(numbers["NIMFLOW_S3_READ_TIMEOUT_SECONDS"]),
            docker_env=tuple((name, env[name]) for name in _DOCKER_ENV_VARS if name in env),
            pickle_memory_mib=int(numbers["NIMFLOW_PICKLE_MEMORY_MIB"]),
            proxy_max_body_mib=int(numbers["NIMFLOW_PROXY_MAX_BODY_MIB"]),
            proxy_max_connections=int(numbers["NIMFLOW_PROXY_MAX_CONNECTIONS"]),
            slot_wait_timeout_seconds=float(numbers["NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS"]),
            slot_wait_log_seconds=float(numbers["NIMFLOW_SLOT_WAIT_LOG_SECONDS"]),
            image_probe_dir=_image_probe_dir(env),
        )


    def hf_token_value(self) -> str | None:
        """The Hugging Face token, for huggingface_hub calls only (env, else the Secret block)."""
        token = self.hf_token or _secret_block("HF_TOKEN")
        return token.get_secret_value() if token else None

    def container_secrets(self, names: Iterable[str] = CONTAINER_SECRETS) -> dict[str, str]:
        """Of the secrets a NIM container may need (NGC downloads, gated HF models), those in ``names``, as env
        vars (env, else Secret blocks); a secret not asked for is not even looked up."""
        env = {}
        if "NGC_API_KEY" in names and (ngc := self.ngc_api_key or _secret_block("NGC_API_KEY")):
            env["NGC_API_KEY"] = ngc.get_secret_value()
        if "HF_TOKEN" in names and (hf := self.hf_token or _secret_block("HF_TOKEN")):
            env["HF_TOKEN"] = hf.get_secret_value()
        return env

    def aws_credentials(self) -> dict[str, str]:
        """Keys for a boto3 session: empty when the environment sets them (boto3's own chain reads them),
        else the Secret blocks' pair when both are saved, else empty (boto3's chain: profiles, roles)."""
        if self.aws_access_key_id or self.aws_secret_access_key:
            return {}
        key_id, secret_key = _secret_block("AWS_ACCESS_KEY_ID"), _secret_block("AWS_SECRET_ACCESS_KEY")
        if key_id is None or secret_key is None:
            return {}
        return {"aws_access_key_id": key_id.get_secret_value(), "aws_secret_access_key": secret_key.get_secret_value()}


def _image_probe_dir(env: Mapping[str, str]) -> Path:
    """NIMFLOW_IMAGE_PROBE_DIR, else the XDG cache dir's ``nimflow/image-probes`` (user-expanded)."""
    if env.get("NIMFLOW_IMAGE_PROBE_DIR", "").strip():
        return Path(env["NIMFLOW_IMAGE_PROBE_DIR"].strip()).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path("~/.cache").expanduser()) / "nimflow" / "image-probes"


#: What ``docker.from_env`` reads (docker.utils.kwargs_from_env).
_DOCKER_ENV_VARS = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")


@dataclass(frozen=True)
class NumberRule:
    """What a numeric environment variable may hold: its type, range and default."""

    default: float
    lowest: float
    highest: float
    whole: bool = False  # a whole number (int), else a decimal (float)
    why: str = ""

    def allowed(self) -> str:
        """``a whole number from 0 to 10 (default 3)``, for messages."""
        kind = "a whole number" if self.whole else "a number of seconds"
        return f"{kind} from {self.lowest:g} to {self.highest:g} (default {self.default:g})"


#: Every numeric variable nimflow reads, with its allowed range (checked by :meth:`Settings.from_env`).
NUMERIC_ENV_VARS: dict[str, NumberRule] = {
    # Backoff doubles per retry: the 10th waits 512 x NIMFLOW_RETRY_DELAY_SECONDS; and Prefect refuses
    # more than 50 retry delays per task.
    "NIMFLOW_MAX_RETRIES": NumberRule(3, 0, 10, whole=True, why="task retries of a transient fault"),
    "NIMFLOW_RETRY_DELAY_SECONDS": NumberRule(2, 0, 600, why="the first retry's delay; each next one doubles"),
    "NIMFLOW_S3_READ_TIMEOUT_SECONDS": NumberRule(120, 1, 3600, why="how long an S3 request may wait for data"),
    "NIMFLOW_PICKLE_MEMORY_MIB": NumberRule(1024, 128, 65536, whole=True, why="MiB of memory the pickle converter may use"),
    "NIMFLOW_PROXY_MAX_BODY_MIB": NumberRule(16, 1, 4096, whole=True,
                                             why="the largest request body, in MiB, the front proxy passes on"),
    "NIMFLOW_PROXY_MAX_CONNECTIONS": NumberRule(256, 1, 10000, whole=True,
                                                why="client connections the front proxy holds open at once"),
    # Below the flow's own 12 h timeout (flows/host_model.py), so a run stuck behind a leaked slot fails
    # with a message naming the slot rather than a bare flow timeout.
    "NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS": NumberRule(4 * 3600, 10, 11 * 3600,
                                                    why="how long a run waits for a concurrency slot"),
    "NIMFLOW_SLOT_WAIT_LOG_SECONDS": NumberRule(60, 1, 3600, why="how often a waiting run logs who holds its slot"),
}


def _number(env: Mapping[str, str], name: str, rule: NumberRule, problems: list[Problem]) -> float:
    """The value of numeric variable ``name`` (its default when unset or empty); a bad one is added to ``problems``."""
    raw = env.get(name, "")
    text = raw.strip()
    if not text:
        return rule.default
    fix = f"set {name} to {rule.allowed()}, or unset it"
    try:
        # ASCII only: Python's int()/float() also take other scripts' digits, which a shell user did not mean.
        value = (int(text) if rule.whole else float(text)) if text.isascii() else None
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        problems.append(Problem(name, f"{raw!r} is not {'a whole number' if rule.whole else 'a number'}; {fix}"))
        return rule.default
    if not rule.lowest <= value <= rule.highest:
        problems.append(Problem(name, f"{raw!r} is out of range ({rule.why}); {fix}"))
        return rule.default
    return value


def _secret_block(variable: str) -> SecretStr | None:
    """The Secret block saved for ``variable`` by `nimflow bootstrap` (see nimflow.credentials), if any."""
    from nimflow.credentials import SECRET_BLOCKS, load_secret

    block = next(name for name, var in SECRET_BLOCKS.items() if var == variable)
    return load_secret(block)


def get_settings() -> Settings:
    """Settings for this call. Read on each call (cheap) so a test or a worker can change the env."""
    return Settings.from_env()

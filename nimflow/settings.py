"""The one place nimflow reads environment variables.

Secrets are held as :class:`pydantic.SecretStr` so they never print; they are handed to the
client that needs them (huggingface_hub, the NIM container) and nowhere else. AWS credentials
and ``AWS_ENDPOINT_URL`` are left to boto3's own credential chain, which reads them itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pydantic import SecretStr

#: Names whose values must never reach logs, artifacts, parameters or events.
SECRET_ENV_VARS: tuple[str, ...] = (
    "HF_TOKEN",
    "NGC_API_KEY",
    "NGC_CLI_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


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

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ

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
            max_retries=int(env.get("NIMFLOW_MAX_RETRIES", "3")),
            retry_delay_seconds=float(env.get("NIMFLOW_RETRY_DELAY_SECONDS", "2")),
        )


    def hf_token_value(self) -> str | None:
        """The Hugging Face token, for huggingface_hub calls only."""
        return self.hf_token.get_secret_value() if self.hf_token else None

    def container_secrets(self) -> dict[str, str]:
        """Secrets a NIM container needs (NGC downloads, gated HF models), as env vars."""
        env = {}
        if self.ngc_api_key:
            env["NGC_API_KEY"] = self.ngc_api_key.get_secret_value()
        if self.hf_token:
            env["HF_TOKEN"] = self.hf_token.get_secret_value()
        return env


def get_settings() -> Settings:
    """Settings for this call. Read on each call (cheap) so a test or a worker can change the env."""
    return Settings.from_env()

"""What a container sees of the hardware and software an engine is bound to.

A TensorRT-LLM engine is valid only on the GPU it was built for and with the TensorRT-LLM (and so
TensorRT) version that built it: otherwise loading fails with "The engine plan file is generated
on an incompatible device" or "... is not compatible with this version of TensorRT"
(https://github.com/NVIDIA/TensorRT-LLM/issues/3031). The engine itself does not record the GPU,
so nimflow asks: one short probe container of the build (or serving) image, with the same GPUs,
runs ``nvidia-smi --query-gpu=name,compute_cap,pci.device_id --format=csv,noheader`` and reads the
installed ``tensorrt_llm`` version from its package metadata (importing it would need libcuda).
NIM keys its own prebuilt engines the same way, by GPU SKU and PCI device id.
"""

from __future__ import annotations

import inspect
import json
import uuid
from typing import Any, Literal

import docker
from pydantic import BaseModel, ConfigDict, Field

from nimflow.containers import device_requests, run_to_exit
from nimflow.errors import ConfigError, DeploymentError, EngineIncompatible, Problem, translated_errors
from nimflow.spec import DeploySpec

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,compute_cap,pci.device_id", "--format=csv,noheader"]
#: The prefix of a probe script's one answer line (JSON follows).
PROBE_MARKER = "NIMFLOW-PROBE "


def installed_trtllm_version() -> str | None:
    """The image's ``tensorrt_llm`` version from its package metadata, without importing it (that
    needs libcuda). Runs inside images (its source is part of the probe scripts): stdlib only."""
    import glob

    try:
        import importlib.metadata as metadata

        return metadata.version("tensorrt_llm")
    except Exception:
        pass
    for pattern in ("/opt/nim/llm/.venv/lib/python3*/site-packages", "/usr/local/lib/python3*/dist-packages",
                    "/usr/local/lib/python3*/site-packages", "/usr/lib/python3*/dist-packages",
                    "/opt/*/lib/python3*/site-packages"):
        found = sorted(glob.glob(pattern + "/tensorrt_llm-*.dist-info"))
        if found:
            return found[-1].rsplit("/", 1)[1][len("tensorrt_llm-"):-len(".dist-info")]
    return None


# Runs with the image's python3. Images print banners from their entrypoints, so the answer is
# one marked line. The version comes from package metadata, found without importing anything.
PROBE_SCRIPT = f"""
import json, subprocess
{inspect.getsource(installed_trtllm_version)}
out = {{"gpus": None, "nvidia_smi_error": None, "trtllm_version": installed_trtllm_version()}}
try:
    r = subprocess.run({NVIDIA_SMI_QUERY!r}, capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        out["gpus"] = r.stdout
    else:
        out["nvidia_smi_error"] = ((r.stdout or "") + (r.stderr or "")).strip()[-800:] or "exit code %d" % r.returncode
except Exception as exc:
    out["nvidia_smi_error"] = "%s: %s" % (type(exc).__name__, exc)
print({PROBE_MARKER!r} + json.dumps(out), flush=True)
"""
PROBE_DEADLINE_SECONDS = 180.0


class GpuIdentity(BaseModel):
    """One GPU model, as ``nvidia-smi`` names it."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Product name, e.g. `NVIDIA H100 80GB HBM3`.")
    compute_capability: str = Field(description="e.g. `9.0`; TensorRT plans are bound to it.")
    pci_device_id: str = Field(description="PCI device and vendor id, e.g. `0x233010de` (NIM's `gpu_device`).")

    def describe(self) -> str:
        """One line for messages: name, compute capability and PCI id."""
        return f"{self.name} (compute {self.compute_capability}, PCI {self.pci_device_id})"


class TargetIdentity(BaseModel):
    """The GPUs and TensorRT-LLM version a container of one image sees."""

    model_config = ConfigDict(frozen=True)

    gpus: list[GpuIdentity] = Field(description="One entry per visible GPU, in nvidia-smi order.")
    trtllm_version: str | None = Field(description="The image's tensorrt_llm version; None when it has none.")

    @property
    def gpu(self) -> GpuIdentity:
        """The one GPU model every visible GPU is."""
        return self.gpus[0]

    def key_inputs(self) -> dict[str, Any]:
        """The part of the engine key this identity contributes (GPU ids and count excluded)."""
        return {"gpu": self.gpu.model_dump(), "trtllm_version": self.trtllm_version}


def parse_gpus(text: str) -> list[GpuIdentity]:
    """Parse ``nvidia-smi --query-gpu=name,compute_cap,pci.device_id --format=csv,noheader``.

    Raises:
        ValueError: a line does not have the three fields.
    """
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.rsplit(",", 2)]  # names never end in a comma-field
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"unexpected nvidia-smi line {line!r}; expected 'name, compute_cap, pci.device_id'")
        gpus.append(GpuIdentity(name=parts[0], compute_capability=parts[1], pci_device_id=parts[2].lower()))
    return gpus


def parse_probe_output(logs: str) -> dict[str, Any] | None:
    """The probe's answer in a container's output, or None when it printed none."""
    for line in reversed(logs.splitlines()):
        if line.startswith(PROBE_MARKER):
            try:
                answer = json.loads(line[len(PROBE_MARKER) :])
            except ValueError:
                return None
            return answer if isinstance(answer, dict) else None
    return None


def identity_from_probe(answer: dict[str, Any], *, image: str, field: str) -> TargetIdentity:
    """Turn a probe answer into a :class:`TargetIdentity`, refusing what no engine can be built or served on.

    Raises:
        ConfigError: no GPU visible (naming ``field``, e.g. ``build.gpus``), or GPUs of different models.
        DeploymentError: nvidia-smi printed something unexpected.
    """
    if answer.get("gpus") is None:
        raise ConfigError(
            "hosting spec",
            [Problem(field, f"no GPU is visible in a container of {image} (nvidia-smi: {answer.get('nvidia_smi_error')}); "
                     f"set {field} to GPU ids (e.g. [0]) or `all`, on a host with the NVIDIA container toolkit")],
        )
    try:
        gpus = parse_gpus(str(answer["gpus"]))
    except ValueError as exc:
        raise DeploymentError(f"probing GPUs in {image}: {exc}") from None
    if not gpus:
        raise ConfigError("hosting spec", [Problem(field, f"nvidia-smi in {image} listed no GPU; set {field}")])
    models = sorted({gpu.describe() for gpu in gpus})
    if len(models) > 1:
        raise ConfigError(
            "hosting spec",
            [Problem(field, f"the GPUs given are of different models ({'; '.join(models)}); an engine is bound to one "
                     f"model: give {field} GPUs of one model")],
        )
    version = answer.get("trtllm_version")
    return TargetIdentity(gpus=gpus, trtllm_version=str(version) if version else None)


def probe_target(
    client: docker.DockerClient,
    image: str,
    gpus: list[int] | Literal["all"] | None,
    env: dict[str, str],
    *,
    field: str,
    labels: dict[str, str] | None = None,
) -> TargetIdentity:
    """Run the probe in a short-lived container of ``image`` with ``gpus`` and ``env``.

    Args:
        field: the spec field that chose the GPUs (``build.gpus`` / ``deploy.gpus``), for messages.

    Raises:
        ConfigError: no GPU visible, or mixed GPU models.
        DeploymentError: the image cannot run the probe (no python3, exits early).
        ServiceUnavailable: the Docker daemon did not answer.
    """
    answer = run_probe_script(
        client, image, PROBE_SCRIPT, what="the GPU identity", needs="`python3` and `nvidia-smi`",
        environment=env, device_requests=device_requests(gpus), labels=labels,
    )
    return identity_from_probe(answer, image=image, field=field)


def run_probe_script(
    client: docker.DockerClient,
    image: str,
    script: str,
    *,
    what: str,
    needs: str = "`python3`",
    deadline_seconds: float = PROBE_DEADLINE_SECONDS,
    labels: dict[str, str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``python3 -c script`` in a short-lived container of ``image`` and return its marked answer.

    The script prints its answer as one line ``PROBE_MARKER + json`` (images print banners from
    their entrypoints, so only the last marked line counts). The container is removed on every path.

    Args:
        what: what the probe asks (for messages), e.g. ``the GPU identity``.
        needs: what the script needs in the image (for messages).
        options: passed to :func:`nimflow.containers.run_to_exit` (environment, device_requests, ...).

    Raises:
        DeploymentError: the image printed no answer (no python3, exited early, deadline passed).
        ServiceUnavailable: the Docker daemon did not answer.
    """
    ended = run_to_exit(
        client,
        image,
        ["python3", "-c", script],
        name=f"nimflow-probe-{uuid.uuid4().hex[:12]}",
        deadline_seconds=deadline_seconds,
        labels={**(labels or {}), "nimflow.role": "probe"},
        **options,
    )
    answer = parse_probe_output(ended.logs)
    if answer is None:
        raise DeploymentError(
            f"could not read {what} in {image} (exit code {ended.exit_code}); the probe runs "
            f"{needs} in the image; last log lines:\n{ended.logs}"
        )
    return answer


def incompatibilities(built: dict[str, Any], target: TargetIdentity) -> list[str]:
    """How an engine's recorded key inputs differ from a target; empty when it can be served there.

    Args:
        built: the engine's key inputs (``gpu`` and ``trtllm_version``, as recorded in its manifest).
        target: the identity of the host and image that would serve it.
    """
    problems = []
    recorded_gpu = built.get("gpu") or {}
    if recorded_gpu != target.gpu.model_dump():
        shown = GpuIdentity(**recorded_gpu).describe() if recorded_gpu else "an unrecorded GPU"
        problems.append(f"GPU: the engine was built on {shown}, the target has {target.gpu.describe()}")
    if built.get("trtllm_version") != target.trtllm_version:
        problems.append(
            f"TensorRT-LLM: the engine was built with {built.get('trtllm_version')}, "
            f"the target image has {target.trtllm_version}"
        )
    return problems


def check_servable(built: dict[str, Any], target: TargetIdentity, *, engine_key: str, force: bool) -> list[str]:
    """Refuse to serve an engine on a target it was not built for, unless ``force``.

    Returns:
        The differences that ``force`` overrode (empty when the engine matches).

    Raises:
        EngineIncompatible: naming both GPUs / versions and the fix.
    """
    problems = incompatibilities(built, target)
    if problems and not force:
        raise EngineIncompatible(
            f"engine {engine_key} cannot be served here: {'; '.join(problems)}. TensorRT-LLM engines load only on "
            "the GPU model and TensorRT-LLM version they were built with: build for this target (same build.image "
            "and GPUs as deploy), or set deploy.force: true to try anyway"
        )
    return problems


def check_serving_target(client: docker.DockerClient, deploy: DeploySpec, built: dict[str, Any], *, engine_key: str) -> list[str]:
    """Probe the deployment's image, GPUs and env, and refuse an engine that was not built for them.

    Args:
        built: the engine's key inputs (as computed, or as recorded in its manifest).

    Returns:
        The differences ``deploy.force`` overrode (empty when the engine matches).

    Raises:
        EngineIncompatible: naming both GPUs / versions, unless ``deploy.force``.
        ConfigError / DeploymentError / ServiceUnavailable: as :func:`probe_target`.
    """
    with translated_errors(f"probing the serving GPU with {deploy.image}"):
        target = probe_target(client, deploy.image, deploy.gpus, deploy.env, field="deploy.gpus")
    return check_servable(built, target, engine_key=engine_key, force=deploy.force)

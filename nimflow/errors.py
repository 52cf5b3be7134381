"""Every error nimflow raises, by what it is about (its domain) and whether a retry can help.

This module is the single place where faults are classified. Task retry conditions ask only
:func:`is_transient`; library exceptions (huggingface_hub, botocore, docker, httpx) are mapped
here by :func:`classify` and turned into nimflow errors at each task's edge by
:func:`translated_errors`.

Exception tree::

    NimflowError
    ├── TransientError              retry with backoff: the same call may succeed later
    │   ├── ServiceUnavailable      5xx, throttling, connection resets, timeouts, daemon hiccups
    │   │   └── EngineStoreUnavailable   (also an EngineStoreError) the engine store answered 5xx/throttled
    │   ├── TransientBuildError     a build that failed for a reason outside the inputs (NCCL/MPI init, preemption)
    │   └── BuildLeaseLost          this host's build lease was taken over or went unrenewed past its
    │                               TTL: nothing published; the retry restores the new holder's engine
    ├── PermanentError              fail at once: retrying cannot help, the message names the fix
    │   ├── ConfigError             the hosting spec or environment is invalid (carries per-field problems)
    │   ├── CheckpointNotFound      repo, revision or file does not exist, or no access (gated/private)
    │   ├── InvalidWeights          the checkpoint or fine-tuned weights are not what the build expects
    │   ├── BuildFailed             the engine build failed deterministically (bad config, build OOM)
    │   ├── EngineIncompatible      an engine was built for another GPU or TensorRT-LLM version
    │   ├── DeploymentError         the container could not be started (port in use, no GPU runtime)
    │   ├── EndpointUnhealthy       the NIM never became ready / does not list or answer the model
    │   └── SlotWaitTimeout         a concurrency slot stayed taken past NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS
    │                               (the message names the limit, its holders and how to free it)
    └── EngineStoreError            the engine store failed: refused (no bucket, access denied, corrupt
        │                           artifact; permanent) or, as EngineStoreUnavailable, did not answer
        ├── EngineStoreUnavailable  (transient, see above)
        ├── ManifestRefused         a stored manifest is corrupt, hostile or foreign (permanent)
        └── StoredEngineBroken      (permanent) a published engine's file is missing or corrupt in the
                                    store: the engine cache sets its manifest aside and rebuilds the key

Two questions, two axes. *Retry?* is answered by ``TransientError`` alone (:func:`is_transient`):
anything else fails at once. *About what?* is answered by a domain base that callers catch.
Where a domain has transient faults, its base sits beside the two retry classes rather than
under ``PermanentError`` (an error cannot be both), its own instances are permanent, and a
transient variant inherits from both the domain and ``ServiceUnavailable``: an S3 503 while
publishing an engine is caught by ``except EngineStoreError`` and retried by the task. Only the
engine store has such a variant: nobody catches a hub or Docker domain (callers catch
``NimflowError``, retries ask :func:`is_transient`), and a hub 503 is not a ``CheckpointNotFound``.
:func:`translated_errors` picks the variant with ``domain=EngineStoreError``.

Every nimflow error pickles (Prefect stores failed states and results) to an error of the same
class with the same message and attributes, whatever its ``__init__`` takes.
"""
from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nimflow.redaction import redact_credentials


class NimflowError(Exception):
    """Root of every error nimflow raises on purpose.

    Its message never holds a URL's credentials (``user:password@``): they are redacted here, where
    endpoint names and library errors that quote URLs meet (:mod:`nimflow.redaction`).
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_credentials(arg) if isinstance(arg, str) else arg for arg in args))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own pickling calls ``cls(*self.args)``, which fails for a subclass whose
        # ``__init__`` takes other arguments (ConfigError). Rebuild without calling ``__init__``.
        return (_unpickle, (type(self), self.args, dict(self.__dict__)))


def _unpickle(cls: type[NimflowError], args: tuple[Any, ...], state: dict[str, Any]) -> NimflowError:
    """The error :meth:`NimflowError.__reduce__` describes: same class, message and attributes."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class TransientError(NimflowError):
    """A fault that may go away by itself; tasks retry these with backoff."""


class PermanentError(NimflowError):
    """A fault that retrying cannot fix; tasks fail at once and the message names the cause."""


class ServiceUnavailable(TransientError):
    """A remote service (hub, S3, Docker daemon, NIM) answered 5xx/429, timed out or reset."""


class TransientBuildError(TransientError):
    """An engine build failed for a reason outside its inputs (e.g. a CUDA driver glitch)."""


@dataclass(frozen=True)
class Problem:
    """One problem in a configuration file: where it is and what is wrong."""

    location: str
    message: str


class ConfigError(PermanentError):
    """A hosting spec, parameter or environment variable is invalid; ``problems`` lists each field and what to fix."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p.location}: {p.message}" for p in problems))


class CheckpointNotFound(PermanentError):
    """The repo, revision or file does not exist, or the token cannot see it (gated or private)."""


class InvalidWeights(PermanentError):
    """Weights are not usable for the build (an engine directory, unknown format, mismatched shapes)."""


class BuildFailed(PermanentError):
    """The engine build failed in a way that a retry with the same inputs would repeat."""


class EngineStoreError(NimflowError):
    """The engine store failed: it refused the request (missing bucket, access denied, corrupt artifact).

    Raised as such, it is permanent. Its transient variant is :class:`EngineStoreUnavailable`; catch
    this class for both, and ask :func:`is_transient` whether to retry.
    """


class EngineStoreUnavailable(EngineStoreError, ServiceUnavailable):
    """The engine store answered 5xx or throttled, or could not be reached: transient, retried."""


class EngineIncompatible(PermanentError):
    """An engine was built for a different GPU or TensorRT-LLM version than the target's.

    TensorRT plans are bound to the GPU's compute capability and the exact TensorRT version; NIM
    would refuse to load such an engine after minutes of start-up.
    """


class DeploymentError(PermanentError):
    """The NIM container could not be created or started."""


class EndpointUnhealthy(PermanentError):
    """The deployed NIM did not become ready, or did not list or answer the served model."""


class ManifestRefused(EngineStoreError):
    """A manifest in the engine store is corrupt, hostile or foreign (permanent; the message names it).

    Distinct from other store errors so a listing (``cache ls``, ``gc``) can report that one key
    and go on, while a 403 or an outage still stops it.
    """

class StoredEngineBroken(EngineStoreError):
    """A published engine cannot be restored: a file its manifest names is missing or corrupt in the store.

    Permanent for that manifest (every restore of it fails the same way), unlike a refused manifest
    (:func:`nimflow.engine_store.check_manifest`: maybe a newer nimflow's) or a store that did not
    answer. :func:`nimflow.engine_cache.obtain_engine` heals it: the manifest is set aside and the key
    rebuilt, once per run.

    Attributes:
        object_uri: the s3:// URI of the missing or corrupt object ("" when unknown).
        problem: what is wrong with it, e.g. "missing" or "its sha256 is not the manifest's".
    """

    object_uri: str = ""
    problem: str = ""

    @classmethod
    def at(cls, object_uri: str, problem: str, message: str) -> StoredEngineBroken:
        """The error for ``object_uri``, carrying ``problem``; ``message`` is what it says."""
        error = cls(message)
        error.object_uri, error.problem = object_uri, problem
        return error


class BuildLeaseLost(TransientError):
    """This host's build lease was taken over, or could not be renewed for longer than it is trusted.

    Raised before anything is published (the local engine directory, the store's manifest): another
    host may hold the lease and publish its own build. The retry finds that host's engine (or the
    lease free) and restores or builds from there.
    """


class SlotWaitTimeout(PermanentError):
    """A run waited for a Prefect concurrency slot (its spec's, its host's GPUs) longer than it may.

    Permanent: the run gives up its place rather than hold a worker forever; the message names the
    limit, who holds it and the command that frees a slot whose holder is gone (``nimflow doctor --free``).
    """


# --- classification of library exceptions ------------------------------------------------------

_TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        # 409: AWS's answer to concurrent conditional writes of one key; its documentation says to retry.
        "ConditionalRequestConflict",
    }
)
# Docker answers 500 for some deterministic refusals too; these are not daemon hiccups.
_PERMANENT_DOCKER_MESSAGES = (
    "port is already allocated",
    "address already in use",
    "could not select device driver",
    "no such image",
    "invalid reference format",
    "conflict",
    "invalid mount config",
    "bind source path does not exist",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and the exceptions it was raised from (cause, then context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def classify(exc: BaseException) -> type[NimflowError] | None:
    """Map any exception to the nimflow error class it stands for, or None if unknown.

    Args:
        exc: the exception raised by a library call or by nimflow itself.

    Returns:
        The most specific nimflow error class, or None when nothing matches (callers treat an
        unknown exception as permanent: retrying an unknown bug only hides it).
    """
    for item in _chain(exc):
        found = _classify_one(item)
        if found is not None:
            return found
    return None


def _classify_one(exc: BaseException) -> type[NimflowError] | None:  # noqa: PLR0911, PLR0912
    if isinstance(exc, NimflowError):
        return type(exc)

    module = type(exc).__module__ or ""

    if module.startswith("huggingface_hub"):
        from huggingface_hub import errors as hf

        if isinstance(exc, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError)):
            return CheckpointNotFound  # includes GatedRepoError
        if isinstance(exc, hf.EntryNotFoundError) and not isinstance(exc, hf.LocalEntryNotFoundError):
            return CheckpointNotFound
        if isinstance(exc, hf.LocalEntryNotFoundError):
            # Raised when the hub could not be reached and nothing is cached: a network fault.
            return ServiceUnavailable
        if isinstance(exc, hf.HfHubHTTPError):
            status = _http_status(exc)
            if status is None or status in _TRANSIENT_HTTP_STATUS:
                return ServiceUnavailable
            return CheckpointNotFound if status in (401, 403, 404) else PermanentError

    if module.startswith("botocore") or module.startswith("boto3") or module.startswith("s3transfer"):
        from botocore import exceptions as bc

        if isinstance(exc, bc.ClientError):
            error = exc.response.get("Error", {})
            meta = exc.response.get("ResponseMetadata", {})
            code = str(error.get("Code", ""))
            status = meta.get("HTTPStatusCode")
            if code in _TRANSIENT_S3_CODES or (isinstance(status, int) and status in _TRANSIENT_HTTP_STATUS):
                return ServiceUnavailable
            if code.isdigit() and int(code) in _TRANSIENT_HTTP_STATUS:
                return ServiceUnavailable
            return EngineStoreError
        if isinstance(exc, (bc.HTTPClientError, bc.ConnectionError, bc.IncompleteReadError)):
            return ServiceUnavailable  # resets, timeouts, endpoint unreachable, a body cut short
        if isinstance(exc, (bc.NoCredentialsError, bc.PartialCredentialsError, bc.ParamValidationError)):
            return EngineStoreError

    if module.startswith("docker"):
        from docker import errors as de

        if isinstance(exc, (de.ImageNotFound, de.NotFound)):
            return DeploymentError
        if isinstance(exc, de.APIError):
            text = str(exc).lower()
            if any(m in text for m in _PERMANENT_DOCKER_MESSAGES):
                return DeploymentError
            return ServiceUnavailable if exc.is_server_error() else DeploymentError
        if type(exc) is de.DockerException:
            # Raised bare for "Error while fetching server API version": the daemon is not answering.
            # Its subclasses (ContainerError, BuildError, InvalidArgument...) are deterministic.
            return ServiceUnavailable
        if isinstance(exc, de.DockerException):
            return DeploymentError

    if module.startswith("httpx"):  # httpx, and httpx2 which huggingface_hub 2.x uses
        import importlib

        lib = importlib.import_module(module.split(".")[0])
        if isinstance(exc, lib.TransportError):
            return ServiceUnavailable
        if isinstance(exc, lib.HTTPStatusError):
            return ServiceUnavailable if exc.response.status_code in _TRANSIENT_HTTP_STATUS else None

    if module.startswith("requests") or module.startswith("urllib3"):
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return ServiceUnavailable

    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return ServiceUnavailable
    return None


def is_transient(exc: BaseException) -> bool:
    """True when retrying the call that raised ``exc`` may succeed."""
    found = classify(exc)
    return found is not None and issubclass(found, TransientError)


#: The transient variant of each domain that has one (see the module docstring).
_UNAVAILABLE_IN: dict[type[NimflowError], type[NimflowError]] = {EngineStoreError: EngineStoreUnavailable}


def _in_domain(kind: type[NimflowError], domain: type[NimflowError] | None) -> type[NimflowError]:
    """``kind`` as the ``domain``'s transient variant when it is a service fault and the domain has one.

    Only the class changes, never the retry answer: a transient kind maps to a transient variant,
    anything else is left as it is.
    """
    if domain is None or issubclass(kind, domain) or not issubclass(kind, ServiceUnavailable):
        return kind
    return _UNAVAILABLE_IN.get(domain, kind)


@contextlib.contextmanager
def translated_errors(action: str, *, domain: type[NimflowError] | None = None) -> Iterator[None]:
    """Re-raise library exceptions as nimflow errors that say what was being done.

    nimflow errors pass through unchanged. Anything else becomes the class :func:`classify`
    picks (``PermanentError`` when unknown), with ``action`` and the original message, and
    keeps the original as ``__cause__`` for debugging.

    Args:
        action: what the block does, e.g. ``"publishing engine <key> to s3://..."``.
        domain: the domain the block works in (``EngineStoreError``): a transient service fault
            becomes that domain's transient variant (``EngineStoreUnavailable``), so callers can
            catch it by domain while the task still retries it.

    Raises:
        NimflowError: for every exception raised inside the block.
    """
    try:
        yield
    except NimflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - this is the translation boundary
        kind = classify(exc) or PermanentError
        if kind is ConfigError:  # reached through the exception chain; it needs per-field problems
            kind = PermanentError
        kind = _in_domain(kind, domain)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines)[:600] or "(no message)"
        hint = _hint(exc)
        raise kind(f"{action}: {type(exc).__name__}: {detail}{f' ({hint})' if hint else ''}") from exc


_HINTS = {
    # huggingface_hub exception names
    "GatedRepoError": "accept the model's terms on the Hub, then export HF_TOKEN of an account that did",
    "RepositoryNotFoundError": "check source.repo_id; a private repo needs HF_TOKEN",
    "RevisionNotFoundError": "check source.revision: a branch, tag or commit sha of the repo",
    "RemoteEntryNotFoundError": "check source.allow_patterns and the file names in the repo",
    # botocore exception names and S3 error codes
    "NoCredentialsError": "export AWS credentials (or use an instance role) where nimflow runs",
    "NoSuchBucket": "create the bucket or fix the s3:// URI in the spec",
    "AccessDenied": (
        "the AWS credentials may not use this bucket: nimflow needs s3:ListBucket on it and s3:GetObject, "
        "s3:PutObject, s3:DeleteObject, s3:AbortMultipartUpload on its objects (README, IAM policy)"
    ),
    "InvalidAccessKeyId": "check the AWS credentials",
}


def _hint(exc: BaseException) -> str | None:
    """What the user can do about a permanent library error, where we know.

    The exception chain is searched too: boto3 raises ``S3UploadFailedError`` from the
    ``ClientError`` that carries the S3 error code.
    """
    for item in _chain(exc):
        key = type(item).__name__
        response = getattr(item, "response", None)
        if isinstance(response, dict):  # botocore's ClientError carries the S3 error code
            key = str(response.get("Error", {}).get("Code", key))
        if key in _HINTS:
            return _HINTS[key]
    return None


# --- classification of engine build failures ----------------------------------------------------

# TensorRT-LLM ends every failed build with "Engine building failed, please check error log.";
# the cause is in the lines before it. Each sign maps to (class, cause and likely fix). Permanent
# signs are checked first: an OOM reported through a CUDA call is still an OOM.
_PERMANENT_BUILD_SIGNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("OutOfMemory", "could not be allocated", "CUDA out of memory"),
        "the GPU ran out of memory for this build config: lower build.max_num_tokens, "
        "build.max_batch_size or build.max_seq_len, raise build.tp_size, or build on a GPU with more memory",
    ),
    (
        ("Unsupported model architecture",),
        "this architecture is not supported by the build backend: check the backend's support matrix, "
        "or serve the checkpoint without `build` (NIM's vLLM backend)",
    ),
    (
        ("expecting compute", "incompatible device", "Version tag does not match",
         "not compatible with this version of TensorRT", "Tensor names in engine are not the same as expected"),
        "an engine or timing cache made for another GPU or TensorRT version was used: rebuild for the target",
    ),
    (
        ("is not supported on SM", "not supported on compute capability", "quantization is not supported on SM"),
        "the build GPU cannot run this precision/quantization: change build.dtype or build on a newer GPU",
    ),
    (
        ("rope_scaling` must be a dictionary",),
        "the image's transformers is too old for this checkpoint's rope_scaling: use a newer build image",
    ),
    (
        ("GPTQ with desc_act=True is not implemented",),
        "GPTQ checkpoints with desc_act=True cannot be built: re-quantize without desc_act",
    ),
    (
        # Deterministic with a bad build config, not only a driver glitch: TensorRT-LLM issue 1839
        # (https://github.com/NVIDIA/TensorRT-LLM/issues/1839), so a retry repeats the same failure.
        ("cudaMemGetInfo",),
        "CUDA failed in cudaMemGetInfo during the build, which TensorRT-LLM reports for a build config the GPU "
        "cannot take (TensorRT-LLM issue 1839): check build.max_num_tokens, build.max_batch_size, build.max_seq_len "
        "and build.tp_size against the GPU, and that the build container sees the GPUs it was given (build.gpus)",
    ),
)
_TRANSIENT_BUILD_SIGNS = (
    "Unexpected error from cudaGetDeviceCount",
    "NCCL error",
    "MPI_Init",
    "ncclSystemError",
    "ncclUnhandledCudaError",
)
#: Exit codes of a build that was stopped from outside (SIGTERM: preemption, a node drain).
_PREEMPTED_EXIT_CODES = frozenset({143})


#: argparse's refusal of flags a script does not take (``prog: error: unrecognized arguments: --x 1``).
_UNRECOGNIZED_ARGUMENTS = re.compile(r"error: unrecognized arguments: (.*)")
#: The fix for a flag an older or newer TensorRT-LLM release lacks, where one is known.
_FLAG_FIXES = {
    "--max_seq_len": "trtllm-build took --max_input_len/--max_output_len before --max_seq_len (TensorRT-LLM 0.12): "
    "use a TensorRT-LLM release image >= 0.12 and < 1.3",
    "--tp_size": "this converter takes no --tp_size (Gemma's takes --world-size): use the converter of the "
    "checkpoint's family (docs/trtllm-families.md) or leave build.convert_script unset",
    "--pp_size": "this converter takes no --pp_size (Gemma's has no pipeline parallelism): use the converter of the "
    "checkpoint's family (docs/trtllm-families.md) or leave build.convert_script unset",
}


def _unrecognized_flags(logs: str) -> list[str]:
    """The flags argparse refused in ``logs`` (values dropped), in order."""
    found = _UNRECOGNIZED_ARGUMENTS.search(logs)
    return [token for token in found.group(1).split() if token.startswith("--")] if found else []


def classify_build_failure(what: str, exit_code: int | None, logs: str, *, image: str | None = None) -> NimflowError:
    """The error for a failed engine build, from its exit code and last log lines.

    Args:
        what: the build step, e.g. ``"trtllm-build"``.
        exit_code: the container's exit code (None when it is unknown).
        logs: the container's last log lines; they are included in the message.
        image: the image the step ran in, named when the image is the cause.

    Returns:
        :class:`ConfigError` (permanent) when the step refused a flag nimflow passed (argparse's
        ``unrecognized arguments``), naming the flag, the image and the fix;
        :class:`BuildFailed` (permanent, naming the cause and likely fix) for out-of-memory,
        unsupported architectures, precision/device and version mismatches, ``cudaMemGetInfo``
        errors (deterministic for a bad build config, TensorRT-LLM issue 1839) and unknown failures;
        :class:`TransientBuildError` for CUDA, NCCL or MPI initialisation faults and preemption.
    """
    message = f"{what} failed (exit code {exit_code}); last log lines:\n{logs}"
    refused = _unrecognized_flags(logs)
    if refused:
        fixes = "; ".join(_FLAG_FIXES.get(flag, f"{flag}: use an image whose {what} takes it") for flag in refused)
        return ConfigError("build image", [Problem(
            "build.image",
            f"{what} in {image or 'the build image'} does not accept {', '.join(refused)} (argparse: unrecognized "
            f"arguments); {fixes}. Last log lines:\n{logs}",
        )])
    if exit_code == 137 or "\nKilled" in f"\n{logs}":
        return BuildFailed(f"{message}\nThe host ran out of memory (killed): build on a node with more RAM.")
    for signs, cause in _PERMANENT_BUILD_SIGNS:
        if any(sign in logs for sign in signs):
            return BuildFailed(f"{message}\nCause: {cause}.")
    if any(sign in logs for sign in _TRANSIENT_BUILD_SIGNS):
        return TransientBuildError(f"{message}\nA CUDA/NCCL/MPI initialisation fault: retried, preferably on another node.")
    if exit_code in _PREEMPTED_EXIT_CODES:
        return TransientBuildError(f"{message}\nThe build was stopped from outside (SIGTERM): retried.")
    return BuildFailed(message)

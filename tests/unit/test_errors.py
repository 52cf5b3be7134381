"""Fault classification of real library exceptions, translation at task edges, and the retry condition."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle
import docker.errors
import httpx
import httpx2
import pytest
import requests
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import nimflow.errors
from nimflow.errors import (
    BuildFailed,
    CheckpointNotFound,
    ConfigError,
    DeploymentError,
    EngineStoreError,
    EngineStoreUnavailable,
    InvalidWeights,
    NimflowError,
    PermanentError,
    Problem,
    ServiceUnavailable,
    TransientBuildError,
    TransientError,
    classify,
    is_transient,
    translated_errors,
)
from nimflow.log_filter import DropUserErrorTracebacks
from nimflow.retries import retry_on_transient

HUB_URL = "https://huggingface.co/api/models/org/model/revision/main"
S3_ENDPOINT = "https://s3.us-east-1.amazonaws.com"


# --- builders of real library exceptions ---------------------------------------------------------


def hf_response(status: int) -> httpx2.Response:
    """An httpx2 response as huggingface_hub 2.x attaches to its HTTP errors."""
    return httpx2.Response(status, request=httpx2.Request("GET", HUB_URL))


def hf_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    """A huggingface_hub HTTP error of class ``cls`` carrying a ``status`` response."""
    return cls(f"{status} error for url {HUB_URL}", response=hf_response(status))


def client_error(code: str, status: int | None, operation: str = "PutObject") -> ClientError:
    """A botocore ClientError as S3 returns it."""
    response: dict[str, Any] = {"Error": {"Code": code, "Message": f"{code} happened"}}
    if status is not None:
        response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, operation)  # type: ignore[arg-type]


def docker_response(status: int) -> requests.Response:
    """A requests response as the docker SDK attaches to its API errors."""
    response = requests.Response()
    response.status_code = status
    response.reason = {404: "Not Found", 500: "Internal Server Error"}.get(status, "Error")
    response.url = "http+docker://localhost/v1.45/containers/abc/start"
    return response


def upload_failed_during_503() -> S3UploadFailedError:
    """boto3's S3UploadFailedError raised while handling a 503 (implicit ``__context__``)."""
    try:
        try:
            raise client_error("503", None, "UploadPart")
        except ClientError as inner:
            raise S3UploadFailedError(f"Failed to upload engine.tar: {inner}")  # noqa: B904 - implicit context wanted
    except S3UploadFailedError as exc:
        return exc


CASES: list[tuple[str, Callable[[], BaseException], type[NimflowError] | None]] = [
    # huggingface_hub
    ("hf-repo-not-found", lambda: hf_error(RepositoryNotFoundError, 404), CheckpointNotFound),
    ("hf-gated", lambda: hf_error(GatedRepoError, 403), CheckpointNotFound),
    ("hf-revision-not-found", lambda: hf_error(RevisionNotFoundError, 404), CheckpointNotFound),
    ("hf-remote-entry-not-found", lambda: hf_error(RemoteEntryNotFoundError, 404), CheckpointNotFound),
    ("hf-local-entry-not-found", lambda: LocalEntryNotFoundError("cannot reach the hub, nothing cached"), ServiceUnavailable),
    ("hf-http-503", lambda: hf_error(HfHubHTTPError, 503), ServiceUnavailable),
    ("hf-http-429", lambda: hf_error(HfHubHTTPError, 429), ServiceUnavailable),
    ("hf-http-500", lambda: hf_error(HfHubHTTPError, 500), ServiceUnavailable),
    ("hf-http-401", lambda: hf_error(HfHubHTTPError, 401), CheckpointNotFound),
    ("hf-http-404", lambda: hf_error(HfHubHTTPError, 404), CheckpointNotFound),
    ("hf-http-400", lambda: hf_error(HfHubHTTPError, 400), PermanentError),
    # botocore / boto3
    ("s3-slowdown", lambda: client_error("SlowDown", 503), ServiceUnavailable),
    ("s3-service-unavailable", lambda: client_error("ServiceUnavailable", None), ServiceUnavailable),
    ("s3-bare-503-code", lambda: client_error("503", None), ServiceUnavailable),
    ("s3-503-status", lambda: client_error("Unknown", 503), ServiceUnavailable),
    ("s3-no-such-bucket", lambda: client_error("NoSuchBucket", 404), EngineStoreError),
    # AWS: concurrent conditional writes of one key, "retry"; a lost condition (412) is an answer, not a fault
    ("s3-conditional-request-conflict", lambda: client_error("ConditionalRequestConflict", 409), ServiceUnavailable),
    ("s3-precondition-failed", lambda: client_error("PreconditionFailed", 412), EngineStoreError),
    ("s3-access-denied", lambda: client_error("AccessDenied", 403), EngineStoreError),
    ("s3-endpoint-unreachable", lambda: EndpointConnectionError(endpoint_url=S3_ENDPOINT), ServiceUnavailable),
    ("s3-read-timeout", lambda: ReadTimeoutError(endpoint_url=S3_ENDPOINT), ServiceUnavailable),
    ("s3-body-cut-short", lambda: IncompleteReadError(actual_bytes=1, expected_bytes=2), ServiceUnavailable),
    ("s3-connection-closed", lambda: ConnectionClosedError(endpoint_url=S3_ENDPOINT), ServiceUnavailable),
    ("s3-no-credentials", NoCredentialsError, EngineStoreError),
    ("s3-upload-failed-after-503", upload_failed_during_503, ServiceUnavailable),
    # docker
    (
        "docker-500-generic",
        lambda: docker.errors.APIError("server error", response=docker_response(500), explanation="context deadline exceeded"),
        ServiceUnavailable,
    ),
    (
        "docker-500-port-taken",
        lambda: docker.errors.APIError(
            "server error",
            response=docker_response(500),
            explanation="driver failed programming external connectivity: Bind for 0.0.0.0:8000 failed: port is already allocated",
        ),
        DeploymentError,
    ),
    (
        "docker-404-image",
        lambda: docker.errors.ImageNotFound("no image", response=docker_response(404), explanation="No such image: nim:1.8"),
        DeploymentError,
    ),
    (
        "docker-daemon-down",
        lambda: docker.errors.DockerException("Error while fetching server API version: connection refused"),
        ServiceUnavailable,
    ),
    # httpx, requests, builtins
    ("httpx-connect", lambda: httpx.ConnectError("connection refused"), ServiceUnavailable),
    ("httpx2-read-timeout", lambda: httpx2.ReadTimeout("timed out"), ServiceUnavailable),
    (
        "httpx-status-503",
        lambda: httpx.HTTPStatusError(
            "503", request=httpx.Request("GET", "http://nim"), response=httpx.Response(503, request=httpx.Request("GET", "http://nim"))
        ),
        ServiceUnavailable,
    ),
    ("requests-connection", lambda: requests.ConnectionError("reset"), ServiceUnavailable),
    ("connection-reset", lambda: ConnectionResetError(104, "Connection reset by peer"), ServiceUnavailable),
    ("timeout", lambda: TimeoutError("timed out"), ServiceUnavailable),
    ("unknown-value-error", lambda: ValueError("a bug"), None),
    # nimflow's own errors classify as themselves
    ("nimflow-invalid-weights", lambda: InvalidWeights("engine dir"), InvalidWeights),
    ("nimflow-transient-build", lambda: TransientBuildError("cudaMemGetInfo"), TransientBuildError),
]


@pytest.mark.parametrize(("make", "expected"), [(m, e) for _, m, e in CASES], ids=[c[0] for c in CASES])
def test_classify(make: Callable[[], BaseException], expected: type[NimflowError] | None) -> None:
    """Each real library exception maps to the nimflow class that says whether to retry."""
    exc = make()
    assert classify(exc) is expected
    transient = expected is not None and expected in (ServiceUnavailable, TransientBuildError)
    assert is_transient(exc) is transient


def test_explicit_cause_is_followed() -> None:
    """An unknown wrapper raised ``from`` a transient fault is transient."""
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("download failed") from inner
    except RuntimeError as exc:
        assert classify(exc) is ServiceUnavailable


def test_self_referencing_chain_terminates() -> None:
    """A cyclic cause chain does not loop forever and yields None for unknown exceptions."""
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify(a) is None
    assert not is_transient(a)


# --- translated_errors ---------------------------------------------------------------------------


def test_translated_errors_maps_library_exception() -> None:
    """A library exception becomes the mapped class, names the action, and keeps the original."""
    original = hf_error(RepositoryNotFoundError, 404)
    with pytest.raises(CheckpointNotFound) as info:
        with translated_errors("resolving org/model@main"):
            raise original
    assert str(info.value).startswith("resolving org/model@main: ")
    assert "404 error" in str(info.value)
    assert info.value.__cause__ is original


def test_translated_errors_transient() -> None:
    """A transient library fault is re-raised as a transient nimflow error."""
    with pytest.raises(ServiceUnavailable) as info:
        with translated_errors("uploading engine"):
            raise client_error("SlowDown", 503)
    assert is_transient(info.value)
    assert str(info.value).startswith("uploading engine: ")


def test_translated_errors_unknown_is_permanent() -> None:
    """An unknown exception becomes a plain PermanentError carrying the action and its message."""
    original = ValueError("first line\nsecond line")
    with pytest.raises(PermanentError) as info:
        with translated_errors("checking weights"):
            raise original
    assert type(info.value) is PermanentError
    assert str(info.value).startswith("checking weights: ")
    assert "first line" in str(info.value)
    assert info.value.__cause__ is original


def test_translated_errors_empty_message_uses_type_name() -> None:
    """An exception without a message is still described, by its type name."""
    with pytest.raises(ServiceUnavailable) as info:
        with translated_errors("polling NIM"):
            raise TimeoutError()
    assert str(info.value).startswith("polling NIM: ")
    assert "TimeoutError" in str(info.value)


@pytest.mark.parametrize(
    "error",
    [InvalidWeights("weights are an engine"), ConfigError("s.yaml", [Problem("name", "bad")]), ServiceUnavailable("503")],
    ids=["invalid-weights", "config-error", "service-unavailable"],
)
def test_translated_errors_passes_nimflow_errors_through(error: NimflowError) -> None:
    """nimflow errors leave the block unchanged: same object, no new cause."""
    with pytest.raises(NimflowError) as info:
        with translated_errors("anything"):
            raise error
    assert info.value is error
    assert info.value.__cause__ is None


def test_translated_errors_leaves_interrupts_alone() -> None:
    """KeyboardInterrupt is not an error to translate: it leaves the block as itself."""
    interrupt = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as info:
        with translated_errors("downloading"):
            raise interrupt
    assert info.value is interrupt


def test_translated_errors_with_config_error_in_context() -> None:
    """An unknown exception raised while handling a ConfigError is still translated to a nimflow error."""
    with pytest.raises(PermanentError) as info:
        with translated_errors("loading spec"):
            try:
                raise ConfigError("s.yaml", [Problem("name", "bad")])
            except ConfigError:
                raise OSError("cleanup failed")  # noqa: B904 - implicit context is the point
    assert "loading spec" in str(info.value)


def test_build_failed_is_permanent() -> None:
    """BuildFailed is permanent, TransientBuildError transient (the retry contract of builds)."""
    assert not is_transient(BuildFailed("OOM"))
    assert is_transient(TransientBuildError("NCCL error"))


# --- retry_on_transient --------------------------------------------------------------------------


class FakeState:
    """A stand-in for a Prefect state: ``result()`` raises the stored exception or returns a value."""

    def __init__(self, exc: BaseException | None = None, value: Any = None) -> None:
        self.exc = exc
        self.value = value
        self.calls = 0

    def result(self) -> Any:
        """Raise the stored exception, or return the value."""
        self.calls += 1
        if self.exc is not None:
            raise self.exc
        return self.value


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (ServiceUnavailable("hub 503"), True),
        (TransientBuildError("cudaMemGetInfo"), True),
        (hf_error(HfHubHTTPError, 503), True),
        (ConnectionResetError("reset"), True),
        (CheckpointNotFound("no such repo"), False),
        (BuildFailed("OOM"), False),
        (client_error("AccessDenied", 403), False),
        (ValueError("bug"), False),
    ],
    ids=["service-unavailable", "transient-build", "hf-503", "reset", "not-found", "build-failed", "s3-denied", "bug"],
)
def test_retry_on_transient(exc: BaseException, retry: bool) -> None:
    """Prefect's retry condition retries transient faults only."""
    state = FakeState(exc)
    assert retry_on_transient(object(), object(), state) is retry
    assert state.calls == 1


def test_retry_on_transient_without_exception() -> None:
    """A state whose result does not raise is not retried."""
    assert retry_on_transient(object(), object(), FakeState(value=42)) is False


# --- domain and retryability ----------------------------------------------------------------------


def test_engine_store_unavailable_is_both_domain_and_transient() -> None:
    """An engine store 503 is caught as an EngineStoreError and as a TransientError, and retried."""
    error = EngineStoreUnavailable("publishing engine: 503")
    assert isinstance(error, EngineStoreError) and isinstance(error, ServiceUnavailable)
    assert isinstance(error, TransientError) and not isinstance(error, PermanentError)
    assert is_transient(error)
    assert not is_transient(EngineStoreError("no such bucket"))  # the domain base itself is permanent


def test_translated_errors_in_the_engine_store_domain() -> None:
    """With domain=EngineStoreError an S3 503 becomes EngineStoreUnavailable; a refusal stays EngineStoreError."""
    original = client_error("SlowDown", 503)
    with pytest.raises(EngineStoreError) as info:
        with translated_errors("publishing engine abc to s3://b/abc", domain=EngineStoreError):
            raise original
    assert type(info.value) is EngineStoreUnavailable and is_transient(info.value)
    assert str(info.value).startswith("publishing engine abc to s3://b/abc: ClientError: ")
    assert info.value.__cause__ is original

    with pytest.raises(EngineStoreError) as refused:
        with translated_errors("publishing engine abc", domain=EngineStoreError):
            raise client_error("NoSuchBucket", 404)
    assert type(refused.value) is EngineStoreError and not is_transient(refused.value)
    assert "create the bucket" in str(refused.value)  # the hint is kept


@pytest.mark.parametrize(("make", "expected"), [(m, e) for _, m, e in CASES], ids=[c[0] for c in CASES])
def test_a_domain_never_changes_what_is_retried(make: Callable[[], BaseException], expected: type[NimflowError] | None) -> None:
    """Translating in the engine store domain changes classes, never the retry answer."""
    original = make()
    for domain in (None, EngineStoreError):
        with pytest.raises(NimflowError) as info:
            with translated_errors("anything", domain=domain):
                raise original
        assert is_transient(info.value) is is_transient(original)
        if domain is EngineStoreError and expected is ServiceUnavailable:
            assert type(info.value) is EngineStoreUnavailable
        elif expected is not None:
            assert type(info.value) is expected  # other domains' faults keep their own class


def test_log_filter_drops_tracebacks_of_permanent_errors_only() -> None:
    """Permanent errors (the EngineStoreError domain base too) lose their traceback; transient ones and bugs keep it."""
    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, (type(exc), exc, None))

    for permanent in (EngineStoreError("AccessDenied"), ConfigError("s.yaml", [Problem("name", "bad")]), BuildFailed("OOM")):
        kept = record(permanent)
        DropUserErrorTracebacks().filter(kept)
        assert kept.exc_info is None, type(permanent).__name__
    for other in (EngineStoreUnavailable("503"), ServiceUnavailable("503"), ValueError("a bug")):
        kept = record(other)
        DropUserErrorTracebacks().filter(kept)
        assert kept.exc_info is not None, type(other).__name__


# --- pickling (Prefect stores failed states and results) -------------------------------------------

#: Errors whose __init__ does not take one message, each with an example instance.
_EXAMPLES: dict[type[NimflowError], Callable[[], NimflowError]] = {
    ConfigError: lambda: ConfigError("configs/llama.yaml", [Problem("deploy.env", "HF_TOKEN is a secret"), Problem("name", "bad")]),
}


def _every_error_class() -> list[type[NimflowError]]:
    """NimflowError and every subclass (walked, so a new one is covered without editing this test)."""
    found: list[type[NimflowError]] = []
    todo = [NimflowError]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__qualname__)


def _example(cls: type[NimflowError]) -> NimflowError:
    if cls in _EXAMPLES:
        return _EXAMPLES[cls]()
    custom = [c for c in cls.__mro__[: cls.__mro__.index(NimflowError)] if "__init__" in vars(c)]
    assert not custom, f"{cls.__qualname__} has its own __init__: add an example instance to _EXAMPLES"
    return cls("what went wrong: s3://bucket/key answered 503")


def test_the_walk_finds_every_error_of_the_module() -> None:
    """Every exception class nimflow.errors defines is among the walked ones (so each is round-tripped)."""
    defined = {v for v in vars(nimflow.errors).values() if isinstance(v, type) and issubclass(v, NimflowError)}
    assert defined <= set(_every_error_class())
    assert {ConfigError, EngineStoreUnavailable, TransientBuildError} <= defined


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__qualname__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_every_error_survives_pickling(cls: type[NimflowError], dumps: Callable[[Any], bytes]) -> None:
    """Each error comes back as the same class with the same message, args and attributes."""
    error = _example(cls)
    error.extra = {"attempt": 2}  # type: ignore[attr-defined] - an attribute set after construction is kept too
    back = pickle.loads(dumps(error))
    assert type(back) is cls
    assert str(back) == str(error) and back.args == error.args
    assert vars(back) == vars(error)
    assert is_transient(back) is is_transient(error)
    if isinstance(error, ConfigError):
        assert back.source == error.source and back.problems == error.problems
        assert all(type(p) is Problem for p in back.problems)


def test_problem_pickles() -> None:
    """Problem (a frozen dataclass) pickles to an equal Problem."""
    problem = Problem("deploy.gpus", "must not repeat")
    assert pickle.loads(pickle.dumps(problem)) == problem



def test_the_hint_is_found_down_the_exception_chain() -> None:
    """boto3 raises S3UploadFailedError from the ClientError that names the S3 code: the hint still comes."""
    try:
        try:
            raise client_error("NoSuchBucket", 404)
        except ClientError as inner:
            raise S3UploadFailedError(f"Failed to upload engine.tar: {inner}")  # noqa: B904 - implicit context wanted
    except S3UploadFailedError as exc:
        wrapper = exc
    with pytest.raises(EngineStoreError) as info:
        with translated_errors("publishing engine abc", domain=EngineStoreError):
            raise wrapper
    assert type(info.value) is EngineStoreError
    assert str(info.value).endswith("(create the bucket or fix the s3:// URI in the spec)")

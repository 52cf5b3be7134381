"""The NIM HTTP contract nimflow relies on: health, model list, version, metadata, real answers.

Used both to verify a deployment and to know when a NIM JIT build has finished (NIM reports
ready only after it has built its engine). Every function talks plain HTTP to one endpoint; what
an answer *means* for a deployment is decided in :mod:`nimflow.verification`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import httpx

from nimflow.errors import EndpointUnhealthy, NimflowError, TransientError, is_transient, translated_errors

#: Returns a reason when the server will never become ready (e.g. its container exited), else None.
GiveUpCheck = Callable[[], "str | None"]
#: Called after each unsuccessful poll with (seconds waited so far, the last answer seen).
PollHook = Callable[[float, str], None]
#: Which OpenAI-compatible inference API a request uses.
InferenceApi = Literal["chat", "completions"]

READY_PATH = "/v1/health/ready"
LIVE_PATH = "/v1/health/live"


#: Seconds between two readiness polls: how late, at most, the flow notices a NIM became ready
#: (measured in bench/readiness.py, target <= 0.5 s). A poll is one local GET plus a container
#: state check, so four a second cost nothing next to a NIM start-up.
READY_POLL_SECONDS = 0.25


def wait_for_status(
    endpoint: str,
    path: str,
    *,
    deadline_seconds: float,
    accept: frozenset[int] = frozenset({200}),
    give_up: GiveUpCheck | None = None,
    on_poll: PollHook | None = None,
    poll_seconds: float = READY_POLL_SECONDS,
    what: str | None = None,
) -> float:
    """Poll ``GET endpoint+path`` until it answers a status in ``accept``; return the seconds it took.

    Connection errors and 503s are expected while a NIM starts and are polled through. ``what``
    names the state waited for in the timeout message (e.g. ``ready``).

    Raises:
        EndpointUnhealthy: ``give_up`` returned a reason (raised at once), or the deadline passed
            (naming the last answer).
    """
    started = time.monotonic()
    last = "no answer yet"
    with httpx.Client(timeout=5.0) as client:
        while True:
            if give_up is not None and (reason := give_up()):
                raise EndpointUnhealthy(reason)
            try:
                response = client.get(f"{endpoint}{path}")
                if response.status_code in accept:
                    return time.monotonic() - started
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            elapsed = time.monotonic() - started
            if elapsed >= deadline_seconds:
                state = f"not {what}" if what else f"not answering {path} with {'/'.join(map(str, sorted(accept)))}"
                raise EndpointUnhealthy(f"{endpoint} was {state} after {deadline_seconds:g}s (last answer: {last})")
            if on_poll is not None:
                on_poll(elapsed, last)
            time.sleep(min(poll_seconds, max(0.05, deadline_seconds - elapsed)))


def wait_until_ready(
    endpoint: str,
    *,
    deadline_seconds: float,
    give_up: GiveUpCheck | None = None,
    poll_seconds: float = READY_POLL_SECONDS,
    on_poll: PollHook | None = None,
) -> float:
    """Poll ``/v1/health/ready`` until it answers 200; return the seconds it took.

    Raises:
        EndpointUnhealthy: ``give_up`` returned a reason (raised at once), or the deadline passed.
    """
    return wait_for_status(
        endpoint, READY_PATH, deadline_seconds=deadline_seconds, give_up=give_up, on_poll=on_poll,
        poll_seconds=poll_seconds, what="ready",
    )


def model_cards(endpoint: str, *, attempts: int = 3) -> list[dict[str, Any]]:
    """The entries of ``/v1/models`` (``id``, and where the server gives them ``root`` and ``parent``).

    Raises:
        EndpointUnhealthy: the listing failed or is not an OpenAI model list.
    """
    body = _retrying(f"listing models at {endpoint}", lambda: httpx.get(f"{endpoint}/v1/models", timeout=30), attempts)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise EndpointUnhealthy(f"{endpoint}/v1/models answered no `data` list: {str(body)[:300]}")
    return [item for item in data if isinstance(item, dict)]


def list_models(endpoint: str, *, attempts: int = 3) -> list[str]:
    """Model ids served at ``endpoint``; retried a few times on transient faults."""
    return [str(card.get("id")) for card in model_cards(endpoint, attempts=attempts)]


def optional_json(endpoint: str, path: str, *, attempts: int = 3) -> dict[str, Any] | None:
    """``GET endpoint+path`` as JSON, or None when the server does not offer it (404/405).

    For endpoints only some NIM releases have (``/v1/version``, ``/v1/metadata``).

    Raises:
        EndpointUnhealthy: any other failure.
    """
    def request() -> httpx.Response:
        return httpx.get(f"{endpoint}{path}", timeout=30)

    try:
        body = _retrying(f"GET {endpoint}{path}", request, attempts, absent_ok=True)
    except _Absent:
        return None
    return body if isinstance(body, dict) else {"value": body}


def chat_completion(endpoint: str, model: str, prompt: str, *, attempts: int = 3, max_tokens: int = 32) -> str:
    """Send one chat completion (``/v1/chat/completions``) and return the reply text.

    Raises:
        EndpointUnhealthy: the request failed, or the answer has no text.
    """
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    body = _retrying(
        f"chat completion with {model!r} at {endpoint}",
        lambda: httpx.post(f"{endpoint}/v1/chat/completions", json=payload, timeout=120),
        attempts,
    )
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointUnhealthy(f"{endpoint}: chat answer has no choices[0].message.content: {str(body)[:300]}") from None
    return _non_empty(text, endpoint, model)


def text_completion(endpoint: str, model: str, prompt: str, *, attempts: int = 3, max_tokens: int = 32) -> str:
    """Send one text completion (``/v1/completions``) and return ``choices[0].text``.

    Raises:
        EndpointUnhealthy: the request failed, or the answer has no text.
    """
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    body = _retrying(
        f"completion with {model!r} at {endpoint}",
        lambda: httpx.post(f"{endpoint}/v1/completions", json=payload, timeout=120),
        attempts,
    )
    try:
        text = body["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        raise EndpointUnhealthy(f"{endpoint}: completion answer has no choices[0].text: {str(body)[:300]}") from None
    return _non_empty(text, endpoint, model)


def generate(endpoint: str, model: str, prompt: str, api: InferenceApi, *, max_tokens: int = 32) -> str:
    """One answer from ``model`` through the chosen inference API.

    Raises:
        EndpointUnhealthy: as :func:`chat_completion` / :func:`text_completion`.
    """
    if api == "completions":
        return text_completion(endpoint, model, prompt, max_tokens=max_tokens)
    return chat_completion(endpoint, model, prompt, max_tokens=max_tokens)


def _non_empty(text: Any, endpoint: str, model: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise EndpointUnhealthy(f"{endpoint}: the model {model!r} answered an empty completion")
    return text


class _Absent(Exception):
    """The server does not offer the requested path (404/405)."""


def _error_detail(response: httpx.Response) -> str:
    """The server's own error text (OpenAI/NIM `error.message`, vLLM `message`), else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])[:300]
    return str(body)[:300]


def _retrying(action: str, request: Callable[[], httpx.Response], attempts: int, *, absent_ok: bool = False) -> Any:
    """One JSON request, retried on transient faults. Verification is a single non-retried task,
    so the short retry for a busy-but-ready NIM lives here.

    Raises:
        EndpointUnhealthy: a permanent answer (4xx: the endpoint is wrong, not slow, with the
            server's error text), or a transient one that outlived ``attempts``.
        _Absent: ``absent_ok`` and the server does not offer the path (404/405).
    """
    for attempt in range(1, attempts + 1):
        try:
            with translated_errors(action):
                response = request()
            if absent_ok and response.status_code in (404, 405):
                raise _Absent(action)
            try:
                response.raise_for_status()
            except httpx.HTTPStatusError as exc:
                # The body says why (e.g. "no chat template"); raise_for_status alone loses it.
                detail = f"{action}: HTTP {response.status_code}: {_error_detail(response)}"
                if is_transient(exc):
                    raise TransientError(detail) from None
                raise EndpointUnhealthy(detail) from None
            try:
                return response.json()
            except ValueError:
                raise EndpointUnhealthy(f"{action}: the answer is not JSON: {response.text[:300]!r}") from None
        except TransientError as exc:
            if attempt == attempts:
                raise EndpointUnhealthy(f"{exc} (after {attempt} attempts)") from exc
            time.sleep(attempt)
        except (EndpointUnhealthy, _Absent):
            raise
        except NimflowError as exc:
            raise EndpointUnhealthy(str(exc)) from exc
    raise AssertionError("unreachable")

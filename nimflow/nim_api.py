"""The NIM HTTP contract nimflow relies on: health, model list, one real completion.

Used both to verify a deployment and to know when a NIM JIT build has finished (NIM reports
ready only after it has built its engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from nimflow.errors import EndpointUnhealthy, NimflowError, TransientError, translated_errors

#: Returns a reason when the server will never become ready (e.g. its container exited), else None.
GiveUpCheck = Callable[[], "str | None"]


def wait_until_ready(
    endpoint: str, *, deadline_seconds: float, give_up: GiveUpCheck | None = None, poll_seconds: float = 1.0
) -> float:
    """Poll ``/v1/health/ready`` until it answers 200; return the seconds it took.

    Connection errors and 503s are expected while the NIM starts and are polled through.

    Raises:
        EndpointUnhealthy: ``give_up`` returned a reason (raised at once), or the deadline passed.
    """
    started = time.monotonic()
    last = "no answer yet"
    with httpx.Client(timeout=5.0) as client:
        while True:
            if give_up is not None and (reason := give_up()):
                raise EndpointUnhealthy(reason)
            try:
                response = client.get(f"{endpoint}/v1/health/ready")
                if response.status_code == 200:
                    return time.monotonic() - started
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            elapsed = time.monotonic() - started
            if elapsed >= deadline_seconds:
                raise EndpointUnhealthy(
                    f"{endpoint} was not ready after {deadline_seconds:g}s (last answer: {last})"
                )
            time.sleep(min(poll_seconds, max(0.05, deadline_seconds - elapsed)))


def list_models(endpoint: str, *, attempts: int = 3) -> list[str]:
    """Model ids served at ``endpoint``; retried a few times on transient faults."""
    body = _retrying(f"listing models at {endpoint}", lambda: httpx.get(f"{endpoint}/v1/models", timeout=30), attempts)
    return [str(item.get("id")) for item in body.get("data", [])]


def chat_completion(endpoint: str, model: str, prompt: str, *, attempts: int = 3, max_tokens: int = 32) -> str:
    """Send one chat completion and return the reply text.

    Raises:
        EndpointUnhealthy: the answer has no text.
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
        raise EndpointUnhealthy(f"{endpoint}: completion answer has no choices[0].message.content: {str(body)[:300]}") from None
    if not isinstance(text, str) or not text.strip():
        raise EndpointUnhealthy(f"{endpoint}: the model {model!r} answered an empty completion")
    return text


def _retrying(action: str, request: Callable[[], httpx.Response], attempts: int) -> dict:
    """One JSON request, retried on transient faults. Verification is a single non-retried task,
    so the short retry for a busy-but-ready NIM lives here.

    Raises:
        EndpointUnhealthy: a permanent answer (4xx: the endpoint is wrong, not slow), or a
            transient one that outlived ``attempts``.
    """
    for attempt in range(1, attempts + 1):
        try:
            with translated_errors(action):
                response = request()
                response.raise_for_status()
                return response.json()
        except TransientError as exc:
            if attempt == attempts:
                raise EndpointUnhealthy(f"{exc} (after {attempt} attempts)") from exc
            time.sleep(attempt)
        except NimflowError as exc:
            raise EndpointUnhealthy(str(exc)) from exc
    raise AssertionError("unreachable")

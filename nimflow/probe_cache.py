"""One cache for what probe containers found: in this process and on disk, one JSON file per key.

A probe container costs about a second (a container start, an image's entrypoint, ``python3``), and
a run asks the same questions every time. :mod:`nimflow.image_probe` keys its facts by image id (an
id names exact content, so the facts never go stale); :mod:`nimflow.gpu_identity` keys the GPU
identity by everything its answer depends on (a hash). Both keep their answers here:

- in this process, in a bounded map (oldest entries dropped first);
- on disk under one directory per kind, ``<directory>/<hex key>.json``, written atomically (a
  temporary file renamed into place) and bounded in number (the oldest files beyond
  ``max_entries`` are removed after a write).

A cache file is hostile input: a file larger than ``max_bytes``, not UTF-8 JSON, not the model's
shape (the models forbid extra fields) or recording another key is ignored (logged) and the probe
runs again. A cache that cannot be read or written never fails a run: it is only logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

logger = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)

_HEX = frozenset("0123456789abcdef")


def hex_key(key: str) -> str:
    """The hex digest in ``key`` (``sha256:<hex>`` or ``<hex>``), safe as a file name.

    Raises:
        ValueError: ``key`` is not a lowercase hex digest (it would not be a safe file name).
    """
    digest = key.split(":", 1)[-1]
    if not digest or not set(digest) <= _HEX:
        raise ValueError(f"not an image id: {key!r}")
    return digest


class ProbeCache(Generic[Model]):
    """Answers of one kind of probe, by key, in this process and on disk.

    Args:
        model: the pydantic model of an answer (validated on every read from disk).
        what: what the answers are, for log lines (e.g. ``image probe``).
        recorded_key: the key an answer records (checked against the key it was looked up by).
        max_bytes: a cache file larger than this is not read.
        max_entries: at most this many answers are kept in this process and on disk.
    """

    def __init__(self, model: type[Model], *, what: str, recorded_key: Callable[[Model], str],
                 max_bytes: int, max_entries: int) -> None:
        self.model, self.what, self.recorded_key = model, what, recorded_key
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._in_process: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.Lock()

    def forget_in_process(self) -> None:
        """Drop this process's answers (the disk cache stays)."""
        with self._lock:
            self._in_process.clear()

    def path(self, directory: Path, key: str) -> Path:
        """The cache file of ``key``: ``<directory>/<hex of the key>.json``.

        Raises:
            ValueError: ``key`` is not a hex digest.
        """
        return directory / f"{hex_key(key)}.json"

    def get(self, directory: Path, key: str) -> Model | None:
        """The answer for ``key``: from this process, else from disk (then kept in this process), else None."""
        with self._lock:
            known = self._in_process.get(key)
        if known is not None:
            return known
        found = self.read(self.path(directory, key), key)
        if found is not None:
            self._remember(key, found)
        return found

    def put(self, directory: Path, key: str, answer: Model) -> None:
        """Keep ``answer`` for ``key`` in this process and on disk."""
        self._remember(key, answer)
        path = self.path(directory, key)
        self.write(path, answer)
        self._prune(path.parent)

    def read(self, path: Path, key: str) -> Model | None:
        """The answer cached at ``path`` for ``key``, or None when absent or not trustworthy (logged)."""
        try:
            with path.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("Cannot read the %s cache %s (%s); probing again", self.what, path, exc)
            return None
        problem: str | None = None
        answer = None
        if len(data) > self.max_bytes:
            problem = f"larger than {self.max_bytes} bytes"
        else:
            try:
                answer = self.model.model_validate_json(data)
            except ValidationError as exc:
                problem = f"not a valid answer ({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']})"
            else:
                if (recorded := self.recorded_key(answer)) != key:
                    problem, answer = f"it records {recorded}", None
        if problem:
            logger.warning("Ignoring the %s cache %s: %s; probing again", self.what, path, problem)
        return answer

    def write(self, path: Path, answer: Model) -> None:
        """Write ``answer`` to ``path`` atomically (a temporary file renamed into place); a failure is only logged."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=".probe-", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(answer.model_dump_json(indent=1))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
        except OSError as exc:
            logger.warning("Cannot write the %s cache %s (%s); the next process probes again", self.what, path, exc)

    def _remember(self, key: str, answer: Model) -> None:
        with self._lock:
            self._in_process[key] = answer
            self._in_process.move_to_end(key)
            while len(self._in_process) > self.max_entries:
                self._in_process.popitem(last=False)

    def _prune(self, directory: Path) -> None:
        """Remove the oldest cache files beyond ``max_entries`` (keys that include a boot id pile up)."""
        try:
            entries = []
            for entry in os.scandir(directory):
                if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
            entries.sort()
            for _, old in entries[: max(0, len(entries) - self.max_entries)]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
        except OSError as exc:
            logger.warning("Cannot prune the %s cache %s (%s)", self.what, directory, exc)

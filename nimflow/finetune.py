"""Fine-tuned weights: fetched once per source version, checked against the base, staged for NIM.

The staged directory is what NIM_FT_MODEL (1.x JIT), NIM_MODEL_NAME (1.x vLLM) or NIM_MODEL_PATH
(2.x) is given: the fine-tune's weights (pickles converted to safetensors) plus the side files NIM
needs, taken from the base model where the fine-tune lacks them. It appears under its digest only
when complete, and a record per source lets an unchanged source skip fetching and hashing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from nimflow.checkpoint import (
    check_matches_base,
    check_tokenizer,
    check_weights,
    directory_digest,
    effective_side_files,
    model_files,
    read_config,
    source_files,
)
from nimflow.errors import InvalidWeights
from nimflow.pickle_weights import PICKLE_INDEX, convert_pickle_weights
from nimflow.records import Checkpoint, FinetunedWeights
from nimflow.spec import FinetuneSpec
from nimflow.tensor_inventory import compare_to_base, tensor_inventory
from nimflow.weights_source import (
    WeightsLocation,
    fetch_source,
    file_sizes,
    parse_location,
    place_file,
    record_path,
    reusable,
    save_record,
    source_fingerprint,
)

_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


def finetune_root(cache_dir: Path) -> Path:
    """Where staged fine-tuned weights live inside the NIM cache mount."""
    return cache_dir / "finetune"


@contextlib.contextmanager
def named_as(directory: Path, location: WeightsLocation) -> Iterator[None]:
    """Name the user's location, not the private copy, in the messages of checks run on a copy."""
    try:
        yield
    except InvalidWeights as exc:
        if location.kind == "local":
            raise
        raise InvalidWeights(str(exc).replace(str(directory), location.uri.rstrip("/"))) from None


def check_finetune(source: Path, base_dir: Path, location: WeightsLocation, converted: Path, allow_pickle: bool) -> str:
    """Every GPU-free check of fine-tuned weights against the base model; pickles are converted first.

    Returns:
        The source's weight format (``safetensors``, ``binary`` or ``pickle``).

    Raises:
        InvalidWeights: the first problem, naming the file, what was found, what was expected, the fix.
    """
    with named_as(source, location):
        weight_format = check_weights(source, allow_pickle=allow_pickle)
        origin: dict[str, str] = {}
        if weight_format != "safetensors":
            origin = convert_pickle_weights(source, converted, weight_format)
        weights_dir = converted if origin else source
        base_config = read_config(base_dir)
        if (source / "config.json").is_file():
            check_matches_base(read_config(source), base_config, where=location.display("config.json"))
        compare_to_base(
            tensor_inventory(weights_dir),
            tensor_inventory(base_dir),
            where=lambda name: location.display(origin.get(name, name)),
            base_where=lambda name: str(base_dir / name),
        )
        files = effective_side_files(source, base_dir)
        check_tokenizer(files, read_config(files["config.json"].parent), files["config.json"])
    return weight_format


def assemble(source: Path, converted: Path | None, base_dir: Path, staged: Path, *, move: bool, link: bool) -> None:
    """Lay out the staged directory: the fine-tune's files (pickles replaced by their conversion),
    then the side files NIM_FT_MODEL needs, taken from the base model where the fine-tune lacks them.

    The source is read through :func:`~nimflow.checkpoint.source_files`: regular files, and the
    bytes of links that stay inside it (a Hugging Face cache snapshot's blobs), never a link.

    Raises:
        InvalidWeights: the source or the base holds a link out of it, a FIFO, device or socket.
    """
    for name, path in source_files(source).items():
        rel = PurePosixPath(name)
        if converted is not None and (rel.name == PICKLE_INDEX or (len(rel.parts) == 1 and rel.suffix in _PICKLE_SUFFIXES)):
            continue  # the converted safetensors replace them; a pickle is never staged
        place_file(path, staged / name, move=move, link=link)
    if converted is not None:
        for path in model_files(converted):
            place_file(path, staged / path.relative_to(converted), move=True)
    for name, path in effective_side_files(staged, base_dir).items():
        if path.parent != staged:
            place_file(path, staged / name)


def _source_record(spec: FinetuneSpec, fingerprint: dict, base_identity: str, cache_dir: Path) -> tuple[Path, dict]:
    """Where the record of this source's staging lives, and what it must say to be reused."""
    wanted = {"location": spec.path, "fingerprint": fingerprint, "base": base_identity, "allow_pickle": spec.allow_pickle}
    return record_path(finetune_root(cache_dir), spec.path), wanted


def staged_unchanged(spec: FinetuneSpec, base_identity: str, cache_dir: Path) -> FinetunedWeights | None:
    """The staged weights of this source when it is unchanged since it was staged, else None.

    Costs one fingerprint (a directory listing, an S3 listing or a revision lookup); nothing is
    fetched or hashed. ``nimflow plan`` and :func:`stage_finetune` share it.
    """
    fingerprint = source_fingerprint(parse_location(spec.path), endpoint_url=spec.endpoint_url)
    before = reusable(*_source_record(spec, fingerprint, base_identity, cache_dir))
    if before is None:
        return None
    return FinetunedWeights(path=before["path"], digest=before["digest"], weight_format=before["weight_format"], staged_files=0)


def stage_finetune(spec: FinetuneSpec, base: Checkpoint, cache_dir: Path) -> FinetunedWeights:
    """Fetch, check and stage fine-tuned weights next to the files NIM needs from the base model.

    A location whose fingerprint (see :mod:`nimflow.weights_source`) matches the record of an
    intact staged directory is returned without fetching or hashing (``staged_files=0``). Otherwise
    the weights are checked where they are (or in a private copy), pickles are converted, and the
    staged directory appears under its digest only when complete; the record is written last.

    Raises:
        InvalidWeights: an adapter or engine directory, no readable weights, a pickle without
            consent, corrupt safetensors, or weights/config/tokenizer that do not fit the base model.
        CheckpointNotFound, EngineStoreError, ServiceUnavailable: the source could not be read.
    """
    root = finetune_root(cache_dir)
    location = parse_location(spec.path)
    fingerprint = source_fingerprint(location, endpoint_url=spec.endpoint_url)
    record, wanted = _source_record(spec, fingerprint, base.identity, cache_dir)
    staged_before = reusable(record, wanted)
    if staged_before is not None:
        return FinetunedWeights(path=staged_before["path"], digest=staged_before["digest"],
                                weight_format=staged_before["weight_format"], staged_files=0)

    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        fetched = fetch_source(location, fingerprint, cache_dir, work, endpoint_url=spec.endpoint_url)
        base_dir = Path(base.path)
        weight_format = check_finetune(fetched.directory, base_dir, location, work / "converted", spec.allow_pickle)
        staged = work / "staged"
        converted = work / "converted" if weight_format != "safetensors" else None
        assemble(fetched.directory, converted, base_dir, staged, move=fetched.private, link=fetched.immutable)
        digest = directory_digest(staged)
        final = root / digest[:32]
        files = 0
        if final.exists() and file_sizes(final) != file_sizes(staged):
            os.rename(final, work / "damaged")  # same digest, files lost since: replace it whole
        if not final.exists():
            files = len(model_files(staged))
            os.rename(staged, final)
        result = {"path": str(final), "digest": digest, "weight_format": weight_format, "files": file_sizes(final)}
        save_record(record, wanted, result)
        return FinetunedWeights(path=str(final), digest=digest, weight_format=weight_format, staged_files=files)
    finally:
        shutil.rmtree(work, ignore_errors=True)

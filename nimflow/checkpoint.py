"""Checks on checkpoint directories that need no GPU: run them before any GPU time is spent.

NIM only finds out late (after the container has started) that it was handed a TensorRT-LLM
engine directory or an unknown format (``NotImplementedError: Only safetensors/pickle/binary
directories are supported.``), that a tensor is missing or has another shape, or that the
tokenizer does not fit the embeddings. These checks say it up front from config.json, the
safetensors headers and the tokenizer files, naming what was found and what is expected. Files
are streamed; no weight file is ever read into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

from nimflow.containment import regular_files
from nimflow.errors import InvalidWeights
from nimflow.records import Checkpoint
from nimflow.tensor_inventory import safetensors_header

WeightFormat = Literal["safetensors", "pickle", "binary"]

CHUNK = 8 * 1024 * 1024
#: Model files NIM needs next to the weights or an engine (copied from the base checkpoint when a
#: fine-tune lacks them, and next to ``trtllm_engine/`` after a trtllm-build).
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: Files that carry a tokenizer's vocabulary (tokenizer_config.json alone is not a tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
#: config.json keys a fine-tune must share with its base model, or the build/serving breaks.
ARCHITECTURE_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
#: Weight file suffixes TensorRT-LLM's ``detect_format`` accepts, in its order of preference.
_FORMATS: tuple[tuple[str, WeightFormat], ...] = ((".safetensors", "safetensors"), (".bin", "binary"), (".pth", "pickle"))
# Files under these names are bookkeeping, not model content.
_IGNORED_PARTS = (".cache", ".git")
_IGNORED_NAMES = (".nimflow-download.json", "nimflow-manifest.json")


def open_to_readers(directory: Path) -> None:
    """Let any user read what nimflow downloaded into ``directory`` (files +r, directories +rx; links
    are left alone): NIM reads it as ``deploy.user``, not as nimflow. huggingface_hub writes its
    ``local_dir`` metadata (``.cache/huggingface/``) 0600, which a non-root NIM could not read.

    Raises:
        OSError: a file could not be changed (it is not nimflow's).
    """
    for root, _, files in os.walk(directory):
        for path, wanted in [(root, 0o555), *((os.path.join(root, name), 0o444) for name in files)]:
            info = os.lstat(path)
            if not stat.S_ISLNK(info.st_mode) and info.st_mode & wanted != wanted:
                os.chmod(path, info.st_mode & 0o7777 | wanted)


def model_files(directory: Path) -> list[Path]:
    """Regular files of a model directory nimflow wrote itself, in a stable order, without download bookkeeping.

    For a directory from outside (a local source), use :func:`source_files`.
    """
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(p in _IGNORED_PARTS for p in rel.parts) and rel.name not in _IGNORED_NAMES:
            files.append(path)
    return files


def source_files(directory: Path, *, source: str | None = None) -> dict[str, Path]:
    """The model files of a local directory from outside: relative name -> the path whose bytes to read.

    Read through :func:`nimflow.containment.regular_files`: regular files only, a link only when it
    resolves inside the directory (or, for a Hugging Face cache snapshot, into the repo's ``blobs/``),
    and then the link's target is returned, so callers copy and hash bytes, never the link. Hidden
    entries and download bookkeeping are skipped.

    Args:
        source: how the directory is named in a refusal (default: its path).

    Raises:
        InvalidWeights: a link that leaves the directory, a FIFO, device or socket, or an unsafe
            name, naming the entry.
    """
    return {
        name: path
        for name, path in regular_files(directory, source=source or str(directory))
        if PurePosixPath(name).name not in _IGNORED_NAMES
    }


def side_files(directory: Path) -> dict[str, Path]:
    """The model side files (:data:`MODEL_SIDE_FILES`) a local directory holds, as ``directory / name``.

    Only names :func:`source_files` accepts: a side file linked out of the directory is refused.

    Raises:
        InvalidWeights: the directory holds a link out of it, a FIFO, device or socket.
    """
    files = source_files(directory)
    return {name: directory / name for name in MODEL_SIDE_FILES if name in files}


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(directory: Path, files: Iterable[Path] | None = None) -> str:
    """sha256 over the relative names and contents of a directory's model files."""
    chosen = files if files is not None else model_files(directory)
    return files_digest({path.relative_to(directory).as_posix(): path for path in chosen})


def files_digest(files: dict[str, Path]) -> str:
    """sha256 over (relative name, content sha256) of files that would form one directory.

    The same value :func:`directory_digest` gives once the files are copied into one place, so a
    staged directory's digest can be known before staging (``nimflow plan``).
    """
    digest = hashlib.sha256()
    for name in sorted(files, key=lambda n: n.split("/")):  # Path order: component by component
        digest.update(name.encode() + b"\0")
        digest.update(sha256_file(files[name]).encode() + b"\n")
    return digest.hexdigest()


def local_checkpoint(directory: Path) -> Checkpoint:
    """A local checkpoint directory, identified by the digest of its contents (:func:`source_files`).

    Raises:
        InvalidWeights: the directory does not exist, has no config.json, or holds a link out of
            it, a FIFO, device or socket.
    """
    if not (directory / "config.json").is_file():
        raise InvalidWeights(f"{directory}: source.local_dir must be a checkpoint directory with config.json")
    files = source_files(directory, source=f"{directory} (source.local_dir)")
    return Checkpoint(path=str(directory), identity=f"sha256:{files_digest(files)}")


# --- weight format -------------------------------------------------------------------------------


def detect_weight_format(directory: Path) -> WeightFormat:
    """Say which weight format a checkpoint directory holds, as TensorRT-LLM's ``detect_format`` does.

    Only the top level counts, and only ``*.safetensors`` (safetensors), ``*.bin`` (binary) and
    ``*.pth`` (pickle), in that order: ``*.pt`` files and sub-folders are never read by the build.

    Raises:
        InvalidWeights: the directory is missing, is a TensorRT-LLM engine directory, or holds no
            weights TensorRT-LLM would read (naming what it holds instead).
    """
    if not directory.is_dir():
        raise InvalidWeights(f"{directory}: not a directory; expected a checkpoint directory with *.safetensors weights")
    names = [p.relative_to(directory).as_posix() for p in model_files(directory)]
    engines = [n for n in names if n.endswith(".engine") or n.startswith("trtllm_engine/")]
    if engines or _is_engine_config(directory / "config.json"):
        found = ", ".join(engines[:3]) or "config.json with build_config/pretrained_config"
        raise InvalidWeights(
            f"{directory}: this is a TensorRT-LLM engine directory (found {found}), not weights. "
            "NIM_FT_MODEL and engine builds need Hugging Face weights (*.safetensors, *.bin or *.pth; "
            "NIM would fail with 'Only safetensors/pickle/binary directories are supported'). "
            "Point finetune.path at the checkpoint the engine was built from; to serve a built engine, "
            "let nimflow build it (the `build` section) or set source.local_dir to the engine directory without `finetune`."
        )
    top = [n for n in names if "/" not in n]
    for suffix, weight_format in _FORMATS:
        if any(n.endswith(suffix) for n in top):
            return weight_format
    ignored = [n for n in names if n.endswith((".pt", ".safetensors", ".bin", ".pth"))]
    if ignored:
        raise InvalidWeights(
            f"{directory}: found {', '.join(ignored[:4])} but no weights TensorRT-LLM reads: it lists only "
            "*.safetensors, *.bin and *.pth at the top level (not *.pt, not sub-folders). Convert the weights "
            "to safetensors (model.save_pretrained(dir, safe_serialization=True)) and put them next to config.json."
        )
    shown = ", ".join(names[:8]) or "nothing"
    raise InvalidWeights(
        f"{directory}: no weights found (found: {shown}); expected *.safetensors (preferred), "
        "pytorch_model*.bin or *.pth files next to config.json"
    )


def _is_engine_config(config_path: Path) -> bool:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("build_config" in config or "pretrained_config" in config)


def pickle_files(directory: Path, weight_format: WeightFormat) -> list[Path]:
    """The top-level pickle weight files a directory of this format holds (empty for safetensors)."""
    suffix = {"binary": ".bin", "pickle": ".pth"}.get(weight_format)
    return sorted(p for p in directory.glob(f"*{suffix}") if p.is_file()) if suffix else []


def check_weights(directory: Path, *, allow_pickle: bool = False, setting: str = "finetune.allow_pickle") -> WeightFormat:
    """Run the format checks on a fine-tuned weights directory; return its format.

    Args:
        allow_pickle: accept ``*.bin`` / ``*.pth`` (they are converted, never unpickled with code).
        setting: the spec field that gives consent, named in the refusal.

    Raises:
        InvalidWeights: a LoRA adapter directory, an engine directory, no readable weights, a
            pickle without consent, or a corrupt safetensors file, naming the file and the fix.
    """
    if (directory / "adapter_config.json").is_file():
        raise InvalidWeights(
            f"{directory}: this is a LoRA adapter (found adapter_config.json), not fully fine-tuned weights; "
            "list it under lora.adapters (name and path) to serve it on the base model, "
            "or merge it into the base (merge_and_unload) and point finetune.path at the merged model"
        )
    weight_format = detect_weight_format(directory)
    if weight_format != "safetensors" and not allow_pickle:
        found = ", ".join(p.name for p in pickle_files(directory, weight_format)[:3])
        raise InvalidWeights(
            f"{directory}: found {found} (PyTorch pickle) and no *.safetensors. Pickles run code when loaded; "
            f"convert to safetensors, or set {setting}: true to let nimflow convert them without executing them"
        )
    if weight_format == "safetensors":
        for path in sorted(directory.glob("*.safetensors")):
            check_safetensors(path)
    return weight_format


def check_safetensors(path: Path) -> int:
    """Check a safetensors file's header against its size; return the number of tensors.

    Raises:
        InvalidWeights: naming the file and what is wrong with it.
    """
    return sum(1 for name in safetensors_header(path) if name != "__metadata__")


# --- config.json ---------------------------------------------------------------------------------


def read_config(directory: Path) -> dict:
    """The parsed config.json of a checkpoint.

    Raises:
        InvalidWeights: config.json is missing or not JSON.
    """
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidWeights(f"{directory}: no config.json; a Hugging Face checkpoint needs one") from None
    except ValueError as exc:
        raise InvalidWeights(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidWeights(f"{path}: expected a JSON object")
    return config


def check_matches_base(finetune_config: dict, base_config: dict, where: str) -> None:
    """Refuse fine-tuned weights whose architecture differs from the base model's.

    Keys only one of the two configs has are not compared.

    Raises:
        InvalidWeights: naming each differing key with both values.
    """
    diffs = [
        f"{key}: base {base_config.get(key)!r}, fine-tune {finetune_config.get(key)!r}"
        for key in ARCHITECTURE_KEYS
        if key in base_config and key in finetune_config and base_config[key] != finetune_config[key]
    ]
    if diffs:
        raise InvalidWeights(
            f"{where}: the fine-tuned model does not match the base model ({'; '.join(diffs)}); "
            "fine-tune from the same base checkpoint or change `source`"
        )


# --- tokenizer -----------------------------------------------------------------------------------


def effective_side_files(finetune_dir: Path, base_dir: Path) -> dict[str, Path]:
    """Which file NIM will get for each model side file: the fine-tune's own, else the base's.

    Raises:
        InvalidWeights: either directory holds a link out of it, a FIFO, device or socket.
    """
    return {**side_files(base_dir), **side_files(finetune_dir)}


def check_tokenizer(files: dict[str, Path], config: dict, config_path: Path) -> None:
    """Refuse a missing tokenizer, or one with more token ids than the model has embedding rows.

    Args:
        files: side file name -> the file NIM will get (see :func:`effective_side_files`).
        config: the config.json NIM will get; config_path names it in messages.

    Raises:
        InvalidWeights: no tokenizer file at all, or a token id >= ``vocab_size``.
    """
    if not any(name in files for name in TOKENIZER_FILES):
        raise InvalidWeights(
            f"{config_path.parent}: missing tokenizer: neither the fine-tune nor the base checkpoint has "
            f"{' / '.join(TOKENIZER_FILES)}; expected the tokenizer saved with the model "
            "(tokenizer.save_pretrained(dir)) next to config.json"
        )
    vocab_size = config.get("vocab_size")
    if type(vocab_size) is not int:
        return
    for name in ("tokenizer.json", "vocab.json"):
        if name not in files:
            continue
        ids = _token_ids(files[name])
        if "tokenizer_config.json" in files:
            ids |= _added_token_ids(files["tokenizer_config.json"])
        if ids and max(ids) >= vocab_size:
            raise InvalidWeights(
                f"{files[name]}: the tokenizer has {len(ids)} tokens (highest id {max(ids)}) but "
                f"{config_path} has vocab_size {vocab_size}; expected every token id < vocab_size (ids beyond it "
                "have no embedding row). Resize the embeddings (model.resize_token_embeddings(len(tokenizer))) "
                "before saving, or use the base model's tokenizer."
            )
        return


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidWeights(f"{path}: not valid JSON ({exc}); expected the file as the tokenizer saved it") from None


def _token_ids(path: Path) -> set[int]:
    data = _read_json(path)
    if not isinstance(data, dict):
        return set()
    if path.name == "vocab.json":  # GPT-2 style: {token: id}
        return {v for v in data.values() if type(v) is int}
    found = data.get("model")
    model = found if isinstance(found, dict) else {}
    vocab = model.get("vocab")
    ids: set[int] = set()
    if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece: {token: id}
        ids = {v for v in vocab.values() if type(v) is int}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        ids = set(range(len(vocab)))
    for token in data.get("added_tokens") or []:
        if isinstance(token, dict) and type(token.get("id")) is int:
            ids.add(token["id"])
    return ids


def _added_token_ids(path: Path) -> set[int]:
    data = _read_json(path)
    decoder = data.get("added_tokens_decoder") if isinstance(data, dict) else None
    return {int(k) for k in decoder if str(k).isdigit()} if isinstance(decoder, dict) else set()


def chat_template_present(directory: Path) -> bool:
    """True when the tokenizer in ``directory`` has a chat template (what /v1/chat/completions needs).

    Looks at ``chat_template`` in tokenizer_config.json and at chat_template.jinja / .json files.
    """
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    template = config.get("chat_template") if isinstance(config, dict) else None
    return bool(template) and isinstance(template, (str, list))


def resolve_verify_api(requested: str, model_dir: Path) -> Literal["chat", "completions"]:
    """The inference API verification uses: ``auto`` is chat when the model has a chat template.

    Raises:
        InvalidWeights: ``chat`` was asked for and the tokenizer has no chat template (servers on
            transformers >= 4.44 reject /v1/chat/completions then).
    """
    if requested == "completions":
        return "completions"
    present = chat_template_present(model_dir)
    if requested == "chat" and not present:
        raise InvalidWeights(
            f"{model_dir / 'tokenizer_config.json'}: verify.api is chat but the tokenizer has no chat_template "
            "(none in tokenizer_config.json, no chat_template.jinja); the NIM would reject /v1/chat/completions. "
            "Set verify.api: completions (or auto), or add a chat template to the tokenizer."
        )
    return "chat" if present else "completions"

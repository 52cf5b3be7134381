"""Ask the image, don't assume: what a build or NIM image really has, probed once per image id.

Releases differ in what nimflow relies on: where each family's ``convert_checkpoint.py`` is
(``examples/models/core/<dir>/`` from TensorRT-LLM 0.18, ``examples/<dir>/`` up to 0.17, none in the
newest), which flags it and ``trtllm-build`` take (``--max_seq_len`` replaced ``--max_output_len``
in 0.12), whether ``nim-optimize`` exists (documented only for NIM 1.2) and with which flags, the
user the image runs as, and where its model manifest lives (``/opt/nim/etc/default/`` in later NIM
docs, ``/etc/nim/config/`` in the 1.1 docs). :func:`probe_image` asks the image itself in one short
container (no GPU, the image's own ``python3``, a stdlib-only script, one bounded answer line: the
mechanism of :func:`nimflow.gpu_identity.run_probe_script`). A script's flags are learnt from its
``--help``; real converters and ``trtllm-build`` import ``tensorrt_llm``, which fails without libcuda
in a GPU-less container, so the fallback reads the script's source for argparse
``add_argument("--x", ...)`` option strings (``trtllm-build``: ``tensorrt_llm/commands/build.py``,
found with ``importlib.util.find_spec`` without importing the package). Each fact records how it was
learnt.

The facts (:class:`ImageFacts`) are cached by image id, in this process and on disk (one JSON per id
under ``Settings.image_probe_dir``). An image id names exact content, so the facts never go stale;
a new tag or rebuild is a new id and is probed again. The cache file is treated as hostile input:
bounded in size, validated by the model (and its image id checked), re-probed when bad, written
atomically.

:func:`check_build_against_image` then refuses, before any GPU container starts, a build the image
cannot run: the family's converter missing, a flag nimflow passes not accepted, ``trtllm-build``
missing or without ``--max_seq_len``, ``nim-optimize`` missing or without its flags.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import docker
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nimflow.containers import image_id
from nimflow.errors import ConfigError, DeploymentError, Problem, translated_errors
from nimflow.gpu_identity import PROBE_MARKER, installed_trtllm_version, run_probe_script
from nimflow.settings import get_settings
from nimflow.trtllm_families import (
    EXAMPLES_ROOTS,
    FAMILIES,
    ConverterFamily,
    check_command_against_flags,
    parse_help_flags,
    script_candidates,
)

if TYPE_CHECKING:
    from nimflow.spec import BuildSpec

logger = logging.getLogger(__name__)

#: Where NIM images keep their bundled model manifest, newest docs first: later NIM docs
#: (profiles.html, nim-repository-override.html), then the NIM 1.1.0 docs (profiles.html).
MANIFEST_CANDIDATES: tuple[str, ...] = ("/opt/nim/etc/default/model_manifest.yaml", "/etc/nim/config/model_manifest.yaml")
#: Bump when the probe asks something new: cached facts of another version are probed again.
FACTS_VERSION: Literal[1] = 1
#: A cache file larger than this is not read (the real facts are a few KiB).
MAX_CACHE_BYTES = 256 * 1024
#: Seconds one ``--help`` may take in the image, and the whole probe container.
HELP_TIMEOUT_SECONDS = 90
PROBE_DEADLINE_SECONDS = 900.0
#: At most this many option strings are kept per script (real converters declare under 100).
MAX_FLAGS = 500

LearntFrom = Literal["help", "source", "none"]


class ScriptFacts(BaseModel):
    """One program of the image: where it is and the flags it accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str | None = Field(
        description="Where the image has it (absolute path); None when it has none at any known place.", max_length=4096)
    flags: list[str] = Field(
        default_factory=list, max_length=MAX_FLAGS,
        description="Option strings it declares (`--model_dir`, aliases too), sorted; empty when none could be learnt.")
    learnt_from: LearntFrom = Field(
        "none", description="`help`: its `--help` ran; `source`: read from its argparse `add_argument` calls "
        "(its --help failed, e.g. importing tensorrt_llm without libcuda); `none`: not learnt.")
    help_error: str | None = Field(
        None, max_length=2000, description="The tail of what a failed `--help` printed (why the source was read).")

    def accepted(self) -> frozenset[str] | None:
        """The flags it accepts, or None when the probe could not learn them."""
        return frozenset(self.flags) if self.learnt_from != "none" else None

    def learnt(self) -> str:
        """How the flags were learnt, for messages."""
        return "its --help" if self.learnt_from == "help" else "its argparse source"


class ImageFacts(BaseModel):
    """What one image (by id) has for nimflow's builds and manifests, as its probe found."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    facts_version: Literal[1] = Field(FACTS_VERSION, description="The probe's version; another is probed again.")
    image_id: str = Field(description="The image id probed (`sha256:...`): the cache key.", max_length=200)
    config_user: str = Field(
        description="The image config's `User` (empty: the image runs as root unless told otherwise).", max_length=200)
    uid: int = Field(description="The uid the probe ran as (the image's default user).")
    gid: int = Field(description="The gid the probe ran as.")
    trtllm_version: str | None = Field(
        description="The image's tensorrt_llm version from its package metadata; None when it has none.", max_length=200)
    converters: dict[str, ScriptFacts] = Field(
        description="Per family of `trtllm_families.FAMILIES` (by name): the first of its `script_candidates` "
        "the image has, and its flags.")
    trtllm_build: ScriptFacts = Field(description="`trtllm-build` on the image's PATH.")
    nim_optimize: ScriptFacts = Field(description="`nim-optimize` on the image's PATH.")
    model_manifest: str | None = Field(
        description="The first of MANIFEST_CANDIDATES the image has; None when it has neither.", max_length=4096)

    def converter(self, family: ConverterFamily) -> ScriptFacts:
        """The facts of ``family``'s converter (absent when the probe did not ask about it)."""
        return self.converters.get(family.name) or ScriptFacts(path=None)


# --- the script that runs in the image (stdlib only) ----------------------------------------------


def argparse_options(source: str) -> list[str]:
    """The option strings of every ``add_argument("--x", "-y", ...)`` call in Python source, sorted.

    Only string literals starting with ``-`` that open the call are taken (positional names and
    keyword arguments are not). Stdlib only: this function runs inside images.
    """
    import re

    call = re.compile(r"add_argument\(\s*((?:[rRuU]?(['\"])-[^'\"\n]*\2\s*[,)]\s*)+)")
    literal = re.compile(r"(['\"])(-[^'\"\n]*)\1")
    found: set[str] = set()
    for match in call.finditer(source):
        for option in literal.finditer(match.group(1)):
            if re.fullmatch(r"-{1,2}[A-Za-z][\w-]*", option.group(2)):
                found.add(option.group(2))
    return sorted(found)


def learn_flags(command: list[str], source_path: str | None, timeout: float, max_flags: int) -> dict[str, Any]:
    """Run ``command --help``; when it fails, read ``source_path``'s argparse calls. Stdlib only
    (runs inside images); uses :func:`parse_help_flags` and :func:`argparse_options` there too."""
    import subprocess

    facts: dict[str, Any] = {"flags": [], "learnt_from": "none", "help_error": None}
    try:
        ran = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=timeout)
        flags = sorted(parse_help_flags(ran.stdout or ""))
        if ran.returncode == 0 and flags:
            facts.update(flags=flags[:max_flags], learnt_from="help")
            return facts
        facts["help_error"] = ((ran.stdout or "") + (ran.stderr or "")).strip()[-1500:] or f"exit code {ran.returncode}"
    except Exception as exc:  # noqa: BLE001 - any failure to run it is a fact to record
        facts["help_error"] = f"{type(exc).__name__}: {exc}"[-1500:]
    if source_path:
        try:
            with open(source_path, encoding="utf-8", errors="replace") as handle:
                options = argparse_options(handle.read(4_000_000))
        except OSError as exc:
            facts["help_error"] = f"{facts['help_error']}; reading {source_path}: {exc}"[-1500:]
        else:
            if options:
                facts.update(flags=options[:max_flags], learnt_from="source")
    return facts


def probe_in_image(candidates: dict[str, list[str]], manifests: list[str], timeout: float, max_flags: int) -> dict[str, Any]:
    """Everything the probe asks, answered inside the image (stdlib only)."""
    import importlib.util
    import os
    import shutil
    import sys

    answer: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid(), "trtllm_version": installed_trtllm_version(),
                              "converters": {}}
    for family, paths in candidates.items():
        found = next((path for path in paths if os.path.isfile(path)), None)
        facts = learn_flags([sys.executable, found], found, timeout, max_flags) if found else {}
        answer["converters"][family] = {"path": found, **facts}
    build_py = None
    try:  # find_spec of a top-level package locates it without importing it (that needs libcuda)
        spec = importlib.util.find_spec("tensorrt_llm")
        locations = list(spec.submodule_search_locations or []) if spec else []
        if locations and os.path.isfile(os.path.join(locations[0], "commands", "build.py")):
            build_py = os.path.join(locations[0], "commands", "build.py")
    except Exception:  # noqa: BLE001,S110 - no package, or a broken one: no source to read
        pass
    for key, program, source in (("trtllm_build", "trtllm-build", build_py), ("nim_optimize", "nim-optimize", None)):
        path = shutil.which(program)
        answer[key] = {"path": path, **(learn_flags([path], source, timeout, max_flags) if path else {})}
    answer["model_manifest"] = next((path for path in manifests if os.path.isfile(path)), None)
    return answer


def probe_script() -> str:
    """The probe's ``python3 -c`` script: the stdlib functions above, then one marked answer line."""
    functions = (parse_help_flags, argparse_options, learn_flags, installed_trtllm_version, probe_in_image)
    candidates = {family.name: script_candidates(family) for family in FAMILIES}
    return "\n".join([
        "from __future__ import annotations",
        "import json",
        "from typing import Any",
        *(inspect.getsource(function) for function in functions),
        f"answer = probe_in_image({candidates!r}, {list(MANIFEST_CANDIDATES)!r}, {HELP_TIMEOUT_SECONDS!r}, {MAX_FLAGS!r})",
        f"print({PROBE_MARKER!r} + json.dumps(answer), flush=True)",
    ])


def facts_from_answer(answer: dict[str, Any], *, image_id: str, config_user: str) -> ImageFacts:
    """Validate a probe's answer into :class:`ImageFacts`.

    Raises:
        ValidationError: the answer does not have the facts' shape.
    """
    return ImageFacts.model_validate({**answer, "image_id": image_id, "config_user": config_user,
                                      "facts_version": FACTS_VERSION})


# --- the cache -------------------------------------------------------------------------------------

_IN_PROCESS: dict[str, ImageFacts] = {}
_LOCK = threading.Lock()


def forget_in_process() -> None:
    """Drop this process's cached facts (the disk cache stays)."""
    with _LOCK:
        _IN_PROCESS.clear()


def cache_file(directory: Path, image: str) -> Path:
    """The cache file of an image id: ``<directory>/<hex of the id>.json``."""
    digest = image.split(":", 1)[-1]
    if not digest or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not an image id: {image!r}")
    return directory / f"{digest}.json"


def read_cached(path: Path, image: str) -> ImageFacts | None:
    """The facts cached at ``path`` for ``image`` (an id), or None when absent or not trustworthy.

    A file that is too large, not UTF-8 JSON, not the facts' shape, of another probe version or of
    another image id is ignored (logged) and the image is probed again.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CACHE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("Cannot read the image probe cache %s (%s); probing the image again", path, exc)
        return None
    problem: str | None = None
    facts = None
    if len(data) > MAX_CACHE_BYTES:
        problem = f"larger than {MAX_CACHE_BYTES} bytes"
    else:
        try:
            facts = ImageFacts.model_validate_json(data)
        except ValidationError as exc:
            problem = f"not valid facts ({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']})"
        else:
            if facts.image_id != image:
                problem, facts = f"it records image {facts.image_id}", None
    if problem:
        logger.warning("Ignoring the image probe cache %s: %s; probing the image again", path, problem)
    return facts


def write_cached(path: Path, facts: ImageFacts) -> None:
    """Write ``facts`` to ``path`` atomically (a temporary file renamed into place); a failure is only logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".probe-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(facts.model_dump_json(indent=1))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    except OSError as exc:
        logger.warning("Cannot write the image probe cache %s (%s); the next process probes the image again", path, exc)


def probe_image(client: docker.DockerClient, image: str, *, cache_dir: Path | None = None) -> ImageFacts:
    """What ``image`` has (converters, trtllm-build, nim-optimize, user, manifest), probed once per image id.

    Args:
        cache_dir: where the facts are kept on disk (default ``Settings.image_probe_dir``).

    Raises:
        DeploymentError: the image is not on this host, or cannot run the probe (no python3).
        ServiceUnavailable: the Docker daemon did not answer.
    """
    with translated_errors(f"probing what {image} has"):
        identity = image_id(client, image)
        with _LOCK:
            known = _IN_PROCESS.get(identity)
        if known is not None:
            return known
        path = cache_file(cache_dir or get_settings().image_probe_dir, identity)
        facts = read_cached(path, identity)
        if facts is None:
            config_user = str((client.images.get(identity).attrs.get("Config") or {}).get("User") or "")
            answer = run_probe_script(client, identity, probe_script(), what="what the image has",
                                      deadline_seconds=PROBE_DEADLINE_SECONDS)
            try:
                facts = facts_from_answer(answer, image_id=identity, config_user=config_user)
            except ValidationError as exc:
                raise DeploymentError(f"the image probe of {image} answered something unexpected: {exc}") from None
            write_cached(path, facts)
            logger.info("Probed %s (%s): %s", image, identity[:19], describe(facts))
    with _LOCK:
        _IN_PROCESS[identity] = facts
    return facts


def describe(facts: ImageFacts) -> str:
    """One line of what an image has, for logs."""
    converters = ", ".join(f"{name}: {c.path or 'none'}" for name, c in sorted(facts.converters.items()))
    return (f"user {facts.config_user or 'root'} ({facts.uid}:{facts.gid}), TensorRT-LLM {facts.trtllm_version}, "
            f"trtllm-build {facts.trtllm_build.path or 'none'}, nim-optimize {facts.nim_optimize.path or 'none'}, "
            f"manifest {facts.model_manifest or 'none'}; converters {converters}")


# --- refusing what the image cannot run -------------------------------------------------------------


def _refuse(image: str, message: str) -> ConfigError:
    return ConfigError("build image", [Problem("build.image", f"{image}: {message}")])


def converter_path(facts: ImageFacts, family: ConverterFamily, *, image: str) -> str:
    """Where ``image`` keeps ``family``'s ``convert_checkpoint.py``.

    Raises:
        ConfigError: the image has it at none of :func:`script_candidates`.
    """
    path = facts.converter(family).path
    if path is None:
        raise _refuse(image, (
            f"has no convert_checkpoint.py for the {family.name} family (looked for "
            f"{' and '.join(script_candidates(family))}; the newest TensorRT-LLM removed the examples). Use a "
            "TensorRT-LLM release image < 1.3 (its examples hold the converters), or set build.convert_script"))
    return path


def check_build_against_image(facts: ImageFacts, build: BuildSpec, *, image: str,
                              model_config: dict[str, Any] | None = None) -> None:
    """Refuse a build ``image`` cannot run, before any GPU container starts.

    trtllm-build backend: ``trtllm-build`` present and taking every flag nimflow passes (``--max_seq_len``
    too); when the family is known (from ``model_config``'s architecture or ``build.convert_script``'s
    directory), its converter present and taking the family's flags. nim-optimize backend:
    ``nim-optimize`` present and taking ``--model_dir --build_config --output_engine_dir``. nim-jit: nothing
    to ask. Flags the probe could not learn are not refused (nothing is known against them).

    Raises:
        ConfigError: naming the image, the program, what it lacks and the fix.
    """
    from nimflow.build_config import convert_arguments, converter_family, trtllm_build_arguments
    from nimflow.engine_build import NIM_OPTIMIZE_COMMAND

    if build.backend == "nim-optimize":
        program = facts.nim_optimize
        if program.path is None:
            raise _refuse(image, (
                "has no nim-optimize on its PATH (the NIM docs describe it only for 1.2; from 1.8 on they describe "
                "the NIM_FT_MODEL JIT build): set build.backend to nim-jit, or use a NIM image that has nim-optimize"))
        if (accepted := program.accepted()) is not None:
            check_command_against_flags("nim-optimize", image, NIM_OPTIMIZE_COMMAND[1:], accepted, learnt_from=program.learnt())
        return
    if build.backend != "trtllm-build":
        return
    program = facts.trtllm_build
    if program.path is None:
        raise _refuse(image, (
            "has no trtllm-build on its PATH (TensorRT-LLM 1.3 and later removed it with the TensorRT backend): use a "
            "TensorRT-LLM release image < 1.3, e.g. nvcr.io/nvidia/tensorrt-llm/release:0.17.0"))
    if (accepted := program.accepted()) is not None:
        check_command_against_flags("trtllm-build", image, trtllm_build_arguments(build, "c", "e", "t"), accepted,
                                    learnt_from=program.learnt())
    config = model_config or {}
    family = converter_family(build, config)
    if family is None:
        if not build.convert_script and not any(c.path for c in facts.converters.values()):
            # The checkpoint is not known yet (`nimflow validate`), but no family could be converted.
            raise _refuse(image, (
                f"has no convert_checkpoint.py for any family (looked under {' and '.join(EXAMPLES_ROOTS)}; the "
                "newest TensorRT-LLM removed the examples). Use a TensorRT-LLM release image < 1.3 (its examples "
                "hold the converters), or set build.convert_script"))
        return  # a custom converter outside the table, or the checkpoint is not known yet
    if build.convert_script and build.convert_script not in script_candidates(family):
        return  # a converter at a path the probe did not ask about: its run tells
    path = converter_path(facts, family, image=image)
    if build.convert_script and build.convert_script != path:
        raise _refuse(image, f"has no {build.convert_script}; its {family.name} converter is {path}: set "
                             "build.convert_script to that, or leave it unset (nimflow then uses the image's own)")
    converter = facts.converter(family)
    if (accepted := converter.accepted()) is not None:
        arguments = convert_arguments(build, config, "m", "c")
        check_command_against_flags(path, image, arguments, accepted, learnt_from=converter.learnt())


def probe_and_check_build(client: docker.DockerClient, build: BuildSpec,
                          model_config: dict[str, Any] | None = None) -> ImageFacts:
    """Probe ``build.image`` (cached) and refuse a build it cannot run (:func:`check_build_against_image`).

    Raises:
        ConfigError: the image lacks what the build needs.
        DeploymentError / ServiceUnavailable: as :func:`probe_image`.
    """
    facts = probe_image(client, build.image)
    check_build_against_image(facts, build, image=build.image, model_config=model_config)
    return facts


def check_build_image_on_host(build: BuildSpec, model_config: dict[str, Any] | None = None) -> str:
    """``nimflow validate``: probe and check ``build.image`` when it is on this Docker host.

    Returns:
        An empty string when the image was probed and can run the build; otherwise why it was not
        probed (no Docker daemon, the image is not on this host, the probe failed), also logged.

    Raises:
        ConfigError: the image is on this host and lacks what the build needs (:func:`check_build_against_image`).
    """
    from nimflow.containers import docker_client
    from nimflow.errors import NimflowError

    try:
        client = docker_client()
        client.images.get(build.image)
        probe_and_check_build(client, build, model_config)
    except ConfigError:
        raise
    except docker.errors.ImageNotFound:
        why = f"build.image {build.image} is not on this Docker host: not probed (nimflow plan and the run probe it)"
    except (NimflowError, docker.errors.DockerException) as exc:
        why = f"build.image {build.image} not probed: {exc}"
    else:
        return ""
    logger.info("%s", why)
    return why

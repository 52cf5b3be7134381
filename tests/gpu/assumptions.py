"""What nimflow assumes about real NIM and TensorRT-LLM, checked against what the real software printed.

A recording (``tests/gpu/recorded/<image>/``, written by :mod:`tests.gpu.recording` on a GPU host)
holds the real outputs: ``/v1/models``, ``/v1/metadata``, ``nim-optimize -h``,
``list-model-profiles``, each converter's and ``trtllm-build``'s ``--help``, the GPU probe. Each
:class:`Assumption` names one fact the code relies on, where, and how to check it against a
recording. A check answers ``holds``, ``contradicted: <why>`` or ``not recorded`` (the recording
lacks that output: the assumption stays unverified). Nothing here needs a GPU or a service: the
unit tests run the checks on texts taken from the public sources, and ``make test-gpu`` on real
recordings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nimflow.engine_build import builder_invocation
from nimflow.gpu_identity import parse_probe_output
from nimflow.image_probe import MANIFEST_CANDIDATES, ImageFacts
from nimflow.records import Deployment
from nimflow.spec import BuildSpec
from nimflow.trtllm_families import FAMILIES, family_for, missing_flags, parse_help_flags, script_candidates
from nimflow.verification import METADATA_FIELDS, root_problem

HOLDS = "holds"
NOT_RECORDED = "not recorded"
#: Largest recorded file read (a recording is committed text; anything bigger is not one of ours).
_MAX_BYTES = 4 * 1024 * 1024


class Recording:
    """The outputs recorded for one image pair: ``<name>.txt`` (command output with a two-line
    header, ``$ command`` and ``# exit code N``) and ``<name>.json`` files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def output(self, name: str) -> tuple[int, str] | None:
        """(exit code, output) of the recorded command ``name``, or None when it was not recorded."""
        path = self.folder / f"{name}.txt"
        if not path.is_file() or path.stat().st_size > _MAX_BYTES:
            return None
        lines = path.read_text(errors="replace").splitlines()
        if len(lines) < 2 or not lines[1].startswith("# exit code "):
            return None
        try:
            code = int(lines[1].removeprefix("# exit code ").strip())
        except ValueError:
            return None
        return code, "\n".join(lines[2:])

    def succeeded(self, name: str) -> str | None:
        """The output of ``name`` when it was recorded and exited 0."""
        found = self.output(name)
        return found[1] if found is not None and found[0] == 0 else None

    def json(self, name: str) -> Any:
        """The recorded ``<name>.json``, or None."""
        path = self.folder / f"{name}.json"
        if not path.is_file() or path.stat().st_size > _MAX_BYTES:
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None


@dataclass(frozen=True)
class Assumption:
    """One fact about real NIM or TensorRT-LLM that nimflow's code relies on."""

    id: str
    #: the fact, in words
    what: str
    #: the code that relies on it
    where: str
    #: ``holds``, ``contradicted: ...`` or ``not recorded``
    check: Callable[[Recording], str]


def _sample_build(backend: str) -> BuildSpec:
    return BuildSpec(backend=backend, image="recorded", dtype="float16", tp_size=1, pp_size=1,
                     max_seq_len=4096, max_batch_size=8, max_num_tokens=4096)


def _trtllm_commands() -> dict[str, list[list[str]]]:
    return builder_invocation(_sample_build("trtllm-build"))["commands_by_architecture"]


def converter_output_name(family_name: str) -> str:
    """The recording's name for a family's ``convert_checkpoint.py --help``."""
    return f"convert-checkpoint-{family_name}-help"


def _converter_flags(recording: Recording) -> str:
    checked, problems = 0, []
    for architecture, (convert, _) in sorted(_trtllm_commands().items()):
        family = family_for(architecture)
        text = recording.succeeded(converter_output_name(family.name)) if family else None
        if text is None:
            continue
        checked += 1
        if missing := missing_flags(convert[2:], parse_help_flags(text)):
            problems.append(f"{architecture} ({family.name if family else '?'}): the image's converter lacks {missing}")
    if problems:
        return "contradicted: " + "; ".join(problems)
    return HOLDS if checked else NOT_RECORDED


def _converter_layout(recording: Recording) -> str:
    found = recording.succeeded("convert-checkpoint-locations")
    if found is None:
        return NOT_RECORDED
    paths = {line.strip() for line in found.splitlines() if line.strip().endswith("/convert_checkpoint.py")}
    problems = []
    for family in FAMILIES:
        own = sorted(p for p in paths if p.endswith(f"/{family.example_dir}/convert_checkpoint.py"))
        if own and not set(own) & set(script_candidates(family)):
            problems.append(f"{family.name}: the image has {own}, nimflow looks at {script_candidates(family)}")
    return "contradicted: " + "; ".join(problems) if problems else HOLDS


def _trtllm_build_flags(recording: Recording) -> str:
    text = recording.succeeded("trtllm-build-help")
    if text is None:
        return NOT_RECORDED
    _, build = next(iter(_trtllm_commands().values()))
    missing = missing_flags(build[1:], parse_help_flags(text))
    return f"contradicted: trtllm-build lacks {missing}" if missing else HOLDS


def _nim_optimize_flags(recording: Recording) -> str:
    text = recording.succeeded("nim-optimize-help")
    if text is None:
        return NOT_RECORDED
    (command,) = builder_invocation(_sample_build("nim-optimize"))["commands"]
    missing = missing_flags(command[1:], parse_help_flags(text))
    return f"contradicted: nim-optimize lacks {missing}" if missing else HOLDS


def _served(recording: Recording) -> tuple[Deployment, list[dict[str, Any]]] | None:
    served = recording.json("deployment")
    models = recording.json("v1-models")
    if not isinstance(served, dict) or not isinstance(models, dict) or not isinstance(models.get("data"), list):
        return None
    deployment = Deployment(
        name="recorded", container_id="recorded", container_name="recorded", endpoint="http://recorded",
        stable_endpoint="http://recorded", served_model_name=str(served.get("served_model_name")),
        model_root=str(served.get("model_root")), nim_api=served.get("nim_api", "1.x"),
    )
    return deployment, [card for card in models["data"] if isinstance(card, dict)]


def _models_root(recording: Recording) -> str:
    served = _served(recording)
    if served is None:
        return NOT_RECORDED
    deployment, cards = served
    card = next((c for c in cards if c.get("id") == deployment.served_model_name), None)
    if card is None:
        return f"contradicted: /v1/models lists {[c.get('id') for c in cards]}, not the served name {deployment.served_model_name!r}"
    problem = root_problem(deployment, card.get("root"))
    return f"contradicted: {problem}" if problem else HOLDS


def _metadata_2x(recording: Recording) -> str:
    served = recording.json("deployment")
    metadata = recording.json("v1-metadata")
    if not isinstance(served, dict) or served.get("nim_api") != "2.x" or not isinstance(metadata, dict):
        return NOT_RECORDED
    wrong = [key for key, kind in METADATA_FIELDS.items() if not isinstance(metadata.get(key), kind)]
    return f"contradicted: /v1/metadata lacks {wrong}" if wrong else HOLDS


def _trtllm_version(recording: Recording) -> str:
    text = recording.succeeded("gpu-probe")
    if text is None:
        return NOT_RECORDED
    answer = parse_probe_output(text)
    if answer is None:
        return "contradicted: the GPU probe printed no answer line"
    return HOLDS if answer.get("trtllm_version") else "contradicted: no tensorrt_llm package metadata found in the NIM image"


def _manifest_path(recording: Recording) -> str:
    facts = recording.json("nim-image-facts")
    if not isinstance(facts, dict) or not isinstance(facts.get("manifests"), list):
        return NOT_RECORDED
    elsewhere = [str(p) for p in facts["manifests"] if str(p) not in MANIFEST_CANDIDATES]
    if elsewhere:
        return f"contradicted: the image keeps model_manifest.yaml at {elsewhere}; the probe looks at {list(MANIFEST_CANDIDATES)}"
    return HOLDS


def _probe_learns_flags(recording: Recording) -> str:
    """Every program the image probe found in the build image, it learnt the flags of (by --help or its source)."""
    raw = recording.json("build-image-probe")
    if not isinstance(raw, dict):
        return NOT_RECORDED
    facts = ImageFacts.model_validate(raw)
    programs = {f"convert_checkpoint.py ({name})": script for name, script in facts.converters.items()}
    programs |= {"trtllm-build": facts.trtllm_build, "nim-optimize": facts.nim_optimize}
    unlearnt = [f"{name} at {script.path} ({(script.help_error or '').strip()[-200:]})"
                for name, script in sorted(programs.items()) if script.path and script.accepted() is None]
    return f"contradicted: the probe learnt no flags of {'; '.join(unlearnt)}" if unlearnt else HOLDS


ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption("converter-flags", "each family's convert_checkpoint.py accepts the flags nimflow passes it",
               "nimflow/trtllm_families.py FAMILIES", _converter_flags),
    Assumption("converter-layout", "the image keeps each family's converter where nimflow looks for it",
               "nimflow/trtllm_families.py EXAMPLES_ROOTS", _converter_layout),
    Assumption("trtllm-build-flags", "trtllm-build accepts every limit nimflow passes (--max_seq_len included)",
               "nimflow/build_config.py trtllm_build_arguments", _trtllm_build_flags),
    Assumption("nim-optimize-flags", "nim-optimize takes --model_dir --build_config --output_engine_dir",
               "nimflow/engine_build.py (nim-optimize backend)", _nim_optimize_flags),
    Assumption("models-root", "/v1/models lists the served name, and its root does not name another model",
               "nimflow/verification.py root_problem", _models_root),
    Assumption("metadata-2x", "NIM 2.x /v1/metadata has version, modelInfo[] and selectedModelProfileId",
               "nimflow/verification.py METADATA_FIELDS", _metadata_2x),
    Assumption("trtllm-version", "the NIM image's tensorrt_llm version is readable from package metadata",
               "nimflow/gpu_identity.py PROBE_SCRIPT", _trtllm_version),
    Assumption("manifest-path", "a NIM 1.x image keeps its model manifest at a path the image probe looks at",
               "nimflow/image_probe.py MANIFEST_CANDIDATES", _manifest_path),
    Assumption("probe-learns-flags", "the image probe learns the flags of every converter and tool it finds "
               "(by --help, or from the argparse source when --help cannot run without a GPU)",
               "nimflow/image_probe.py learn_flags", _probe_learns_flags),
)


def verdicts(folder: Path) -> dict[str, str]:
    """Every assumption's verdict on the recording in ``folder``."""
    recording = Recording(folder)
    return {assumption.id: assumption.check(recording) for assumption in ASSUMPTIONS}


def contradictions(folder: Path) -> list[str]:
    """The assumptions the recording in ``folder`` contradicts, each as ``id: why``."""
    return [f"{name}: {verdict.removeprefix('contradicted: ')}" for name, verdict in verdicts(folder).items()
            if verdict.startswith("contradicted")]

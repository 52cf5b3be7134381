"""TensorRT-LLM's ``convert_checkpoint.py`` per model family: where it is, what it takes, what it refuses.

Each converter has its own argument parser; they are not one llama-style interface. The facts in
:data:`FAMILIES` were read from the scripts' ``parse_arguments()`` and ``main`` in the public
TensorRT-LLM sources, at two layouts (each row cites the files):

* releases up to 0.17 keep ``examples/<dir>/convert_checkpoint.py``;
* releases from 0.18 keep ``examples/models/core/<dir>/convert_checkpoint.py``;
* the newest TensorRT-LLM has neither (the TensorRT backend was removed).

Which layout an image has is for the image probe to find (:func:`script_candidates` lists both);
the flags a script accepts are checked against its ``--help`` with :func:`parse_help_flags` and
:func:`missing_flags`. Flag names used here are those every cited version accepts (Gemma's
``--model-dir`` and ``--output-model-dir``: later releases add ``--model_dir``/``--output_dir`` as
aliases, earlier ones do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nimflow.errors import ConfigError, Problem

if TYPE_CHECKING:
    from nimflow.spec import BuildSpec

_GITHUB = "https://github.com/NVIDIA/TensorRT-LLM/blob"
#: Where release images keep the examples: 0.18 and later first, then up to 0.17.
EXAMPLES_ROOTS: tuple[str, ...] = ("/app/tensorrt_llm/examples/models/core", "/app/tensorrt_llm/examples")
#: The root nimflow uses until the image probe says otherwise (the 0.18+ layout).
DEFAULT_EXAMPLES_ROOT = EXAMPLES_ROOTS[0]


@dataclass(frozen=True)
class ConverterFamily:
    """One ``convert_checkpoint.py``: its directory, its real flag names and its parallelism limits."""

    name: str
    #: directory under the examples root (``<root>/<example_dir>/convert_checkpoint.py``)
    example_dir: str
    architectures: tuple[str, ...]
    model_dir_flag: str
    output_dir_flag: str
    #: flag taking tensor parallelism; None when only a world size is taken
    tp_flag: str | None
    #: flag taking pipeline parallelism; None when the script has none
    pp_flag: str | None
    #: flag taking the world size (tp x pp) when the script has no tp flag
    world_size_flag: str | None
    #: arguments the script needs for a Hugging Face checkpoint besides the above
    extra_arguments: tuple[str, ...]
    #: largest pp_size the script converts (None: no limit of its own)
    max_pp_size: int | None
    #: why, in the script's own words, and what to do instead
    limit_note: str
    #: the public sources these facts were read from
    sources: tuple[str, ...]

    def script(self, examples_root: str = DEFAULT_EXAMPLES_ROOT) -> str:
        """The script's path in an image whose examples live under ``examples_root``."""
        return f"{examples_root}/{self.example_dir}/convert_checkpoint.py"


_LLAMA_SOURCES = (
    f"{_GITHUB}/04a2cacbfd3b9ac76191bd8498ad871607b63a04/examples/llama/convert_checkpoint.py",
    f"{_GITHUB}/368f8f2ade001e8fcb955be39e4812f918d7fb92/examples/models/core/llama/convert_checkpoint.py",
)

#: The converter of each family NIM 1.x serves through TensorRT-LLM. Mistral and Mixtral use the
#: llama converter (its MoE flags ``--moe_tp_size``/``--moe_ep_size`` default to tensor
#: parallelism over the experts, which nimflow keeps).
FAMILIES: tuple[ConverterFamily, ...] = (
    ConverterFamily(
        name="llama", example_dir="llama",
        architectures=("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
        model_dir_flag="--model_dir", output_dir_flag="--output_dir",
        tp_flag="--tp_size", pp_flag="--pp_size", world_size_flag=None, extra_arguments=(),
        max_pp_size=None, limit_note="", sources=_LLAMA_SOURCES,
    ),
    ConverterFamily(
        name="qwen2", example_dir="qwen", architectures=("Qwen2ForCausalLM",),
        model_dir_flag="--model_dir", output_dir_flag="--output_dir",
        tp_flag="--tp_size", pp_flag="--pp_size", world_size_flag=None, extra_arguments=(),
        max_pp_size=None, limit_note="",
        sources=(
            f"{_GITHUB}/05316d3313360012536ace46c781518f5afae75e/examples/qwen/convert_checkpoint.py",
            f"{_GITHUB}/0df9aaf38338424867a1ca1faa71173501205001/examples/models/core/qwen/convert_checkpoint.py",
        ),
    ),
    ConverterFamily(
        name="gemma", example_dir="gemma", architectures=("GemmaForCausalLM", "Gemma2ForCausalLM"),
        model_dir_flag="--model-dir", output_dir_flag="--output-model-dir",
        tp_flag=None, pp_flag=None, world_size_flag="--world-size", extra_arguments=("--ckpt-type", "hf"),
        max_pp_size=1,
        limit_note="takes --world-size as the tensor-parallel size and has no pipeline parallelism "
        "(\"We don't support pipeline parallelism yet for Gemma\"); use pp_size 1 and spread the model with tp_size",
        sources=(
            f"{_GITHUB}/201135e58aa525af7e523d091d4c9584229524bc/examples/gemma/convert_checkpoint.py",
            f"{_GITHUB}/310decb9aa6ed4a55101e6625b095559ee77a66d/examples/models/core/gemma/convert_checkpoint.py",
        ),
    ),
    ConverterFamily(
        name="phi3", example_dir="phi", architectures=("Phi3ForCausalLM",),
        model_dir_flag="--model_dir", output_dir_flag="--output_dir",
        tp_flag="--tp_size", pp_flag="--pp_size", world_size_flag=None, extra_arguments=(),
        max_pp_size=1,
        limit_note="asserts pp_size == 1 (\"Pipeline parallelism is not supported.\"); use pp_size 1 and "
        "spread the model with tp_size",
        sources=(
            f"{_GITHUB}/04a2cacbfd3b9ac76191bd8498ad871607b63a04/examples/phi/convert_checkpoint.py",
            f"{_GITHUB}/10c1d594d3078c5e9f425373bc15763e87084a07/examples/models/core/phi/convert_checkpoint.py",
        ),
    ),
)
_BY_ARCHITECTURE: dict[str, ConverterFamily] = {arch: family for family in FAMILIES for arch in family.architectures}
_BY_DIR: dict[str, ConverterFamily] = {family.example_dir: family for family in FAMILIES}


def supported_architectures() -> frozenset[str]:
    """Every architecture some row of :data:`FAMILIES` converts."""
    return frozenset(_BY_ARCHITECTURE)


def family_for(architecture: str) -> ConverterFamily | None:
    """The converter family of a Hugging Face architecture (``config.json`` ``architectures[0]``)."""
    return _BY_ARCHITECTURE.get(architecture)


def family_of_script(path: str) -> ConverterFamily | None:
    """The family of a ``.../<dir>/convert_checkpoint.py`` path, when ``<dir>`` is one of the table's."""
    parts = path.rstrip("/").split("/")
    if len(parts) < 2 or parts[-1] != "convert_checkpoint.py":
        return None
    return _BY_DIR.get(parts[-2])


def script_candidates(family: ConverterFamily) -> list[str]:
    """Where an image may keep the family's script, newest layout first (for the image probe)."""
    return [family.script(root) for root in EXAMPLES_ROOTS]


def parallelism_problem(family: ConverterFamily, script: str, tp_size: int, pp_size: int) -> Problem | None:
    """The problem with converting at ``tp_size`` x ``pp_size`` with this family's script, or None."""
    if family.max_pp_size is not None and pp_size > family.max_pp_size:
        return Problem(
            "build.pp_size",
            f"pp_size {pp_size} cannot be converted for the {family.name} family: {script} {family.limit_note} "
            f"(e.g. tp_size {tp_size * pp_size}, pp_size 1)",
        )
    return None


def convert_arguments(family: ConverterFamily, build: BuildSpec, model_dir: str, checkpoint_dir: str) -> list[str]:
    """The family's ``convert_checkpoint.py`` arguments: dtype and the parallel mapping are fixed here.

    Raises:
        ConfigError: the family's script cannot convert the spec's tp_size x pp_size.
    """
    problem = parallelism_problem(family, family.script(), build.tp_size, build.pp_size)
    if problem is not None:
        raise ConfigError("hosting spec", [problem])
    arguments = [family.model_dir_flag, model_dir, family.output_dir_flag, checkpoint_dir, *family.extra_arguments,
                 "--dtype", str(build.dtype)]
    if family.tp_flag is not None:
        arguments += [family.tp_flag, str(build.tp_size)]
    if family.pp_flag is not None:
        arguments += [family.pp_flag, str(build.pp_size)]
    if family.world_size_flag is not None:
        arguments += [family.world_size_flag, str(build.tp_size * build.pp_size)]
    return arguments


# --- what an image's scripts accept (argparse --help) -------------------------------------------

def parse_help_flags(help_text: str) -> frozenset[str]:
    """The option strings an argparse ``--help`` text declares (``-h``, ``--model_dir``, aliases too).

    Only the usage line and the option declaration lines are read, never the help prose, so a flag
    merely mentioned in another flag's description is not counted. Stdlib only and self-contained:
    the image probe (:mod:`nimflow.image_probe`) runs this very function inside images.
    """
    import re

    usage_option = re.compile(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)")
    help_column = re.compile(r"\s{2,}")
    flags: set[str] = set()
    in_usage = False
    for line in help_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("usage:"):
            in_usage = True
        elif not stripped:
            in_usage = False
        if in_usage:
            flags.update(usage_option.findall(stripped))
            continue
        if not stripped.startswith("-"):
            continue
        declaration = help_column.split(stripped, maxsplit=1)[0]
        for option in declaration.split(", "):
            name = option.split(" ", 1)[0].split("=", 1)[0]
            if re.fullmatch(r"-{1,2}[A-Za-z][\w-]*", name):
                flags.add(name)
    return frozenset(flags)


def missing_flags(command: list[str], accepted: frozenset[str]) -> list[str]:
    """The flags of ``command`` (``--x`` or ``--x=v`` tokens) that ``accepted`` lacks, in command order."""
    missing: list[str] = []
    for token in command:
        if token.startswith("-") and len(token) > 1 and not token[1].isdigit():
            flag = token.split("=", 1)[0]
            if flag not in accepted and flag not in missing:
                missing.append(flag)
    return missing


def check_command_against_help(what: str, image: str, command: list[str], help_text: str) -> None:
    """Refuse a command line whose flags the image's script does not accept, before it runs.

    Args:
        what: the script, e.g. ``/app/tensorrt_llm/examples/gemma/convert_checkpoint.py`` or ``trtllm-build``.
        image: the image the script was asked in (for the message).
        command: the arguments nimflow would pass.
        help_text: the script's ``--help`` output in that image.

    Raises:
        ConfigError: naming the image, the script, every flag it lacks and the fix.
    """
    check_command_against_flags(what, image, command, parse_help_flags(help_text), learnt_from="its --help")


def check_command_against_flags(what: str, image: str, command: list[str], accepted: frozenset[str], *,
                                learnt_from: str) -> None:
    """Refuse a command line with a flag outside ``accepted`` (what the image's script declares).

    Args:
        learnt_from: how ``accepted`` was learnt, for the message (``its --help``, ``its argparse source``).

    Raises:
        ConfigError: naming the image, the script, every flag it lacks and the fix.
    """
    missing = missing_flags(command, accepted)
    if not missing:
        return
    if "--max_seq_len" in missing and what == "trtllm-build":
        fix = ("trtllm-build took --max_output_len before TensorRT-LLM 0.12 replaced it with --max_seq_len: use a "
               "TensorRT-LLM release image from 0.12 up to (not including) 1.3")
    else:
        fix = ("the image's TensorRT-LLM release differs from the ones nimflow knows; use a TensorRT-LLM release "
               "image < 1.3 whose scripts take these flags, or set build.convert_script to a converter that does")
    raise ConfigError("build image", [Problem(
        "build.image", f"{what} in {image} does not accept {', '.join(missing)} (not in {learnt_from}): {fix}",
    )])

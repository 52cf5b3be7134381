"""The image probe without services: the in-image script, the facts model, the checks, the cache.

The in-image functions are run here with this machine's python3 (they are stdlib only, as in an
image); the ``--help`` texts are the fixtures of ``tests/unit/fixtures/trtllm/`` (reconstructed from
the public TensorRT-LLM sources named in their headers).

Old main had no image probe (``nimflow.image_probe`` did not exist: every test here failed at import)
and assumed the converter path, the converter's flags, ``trtllm-build --max_seq_len`` and
``nim-optimize``'s flags.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nimflow.errors import ConfigError
from nimflow.gpu_identity import parse_probe_output
from nimflow.image_probe import (
    MAX_CACHE_BYTES,
    ImageFacts,
    ScriptFacts,
    argparse_options,
    cache_file,
    check_build_against_image,
    facts_from_answer,
    learn_flags,
    probe_in_image,
    probe_script,
    read_cached,
    write_cached,
)
from nimflow.settings import Settings
from nimflow.spec import BuildSpec
from nimflow.trtllm_families import FAMILIES, parse_help_flags

FIXTURES = Path(__file__).parent / "fixtures" / "trtllm"
IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:0.17.0"
IMAGE_ID = "sha256:" + "ab" * 32


def help_flags(name: str) -> list[str]:
    return sorted(parse_help_flags((FIXTURES / name).read_text()))


def script(path: str | None, fixture: str | None = None, learnt_from: str = "help") -> ScriptFacts:
    if path is None:
        return ScriptFacts(path=None)
    return ScriptFacts(path=path, flags=help_flags(fixture) if fixture else [], learnt_from=learnt_from if fixture else "none")  # type: ignore[arg-type]


def facts(layout: str = "examples", **overrides: Any) -> ImageFacts:
    """Facts of a TensorRT-LLM release image: converters in ``layout`` (examples: <= 0.17, models-core: 0.18+)."""
    root = "/app/tensorrt_llm/examples" if layout == "examples" else "/app/tensorrt_llm/examples/models/core"
    converters = {
        family.name: script(f"{root}/{family.example_dir}/convert_checkpoint.py",
                            f"{family.example_dir}-{layout}-{family.example_dir}.help")
        for family in FAMILIES
    }
    fields: dict[str, Any] = {
        "image_id": IMAGE_ID, "config_user": "", "uid": 0, "gid": 0, "trtllm_version": "0.17.0",
        "converters": converters, "trtllm_build": script("/usr/local/bin/trtllm-build", "trtllm-build.help"),
        "nim_optimize": ScriptFacts(path=None), "model_manifest": None, **overrides,
    }
    return ImageFacts(**fields)


def trtllm(**fields: Any) -> BuildSpec:
    return BuildSpec(**{"backend": "trtllm-build", "image": IMAGE, "max_seq_len": 1024, **fields})


def config(architecture: str) -> dict[str, Any]:
    return {"architectures": [architecture], "num_attention_heads": 8, "num_key_value_heads": 8, "num_hidden_layers": 4}


# --- the in-image functions ----------------------------------------------------------------------


def test_argparse_options_reads_option_strings_of_add_argument_calls() -> None:
    """The source fallback: every option string that opens an ``add_argument(`` call, aliases and
    single quotes too, over several lines (as TensorRT-LLM's converters write them); not keyword
    values, positional names or flags mentioned in help strings."""
    source = '''
parser.add_argument("--model-dir", type=Path, required=True)
parser.add_argument(
    "--int8_kv_cache",
    "--calibrate_kv_cache",
    "-kv",
    action="store_true",
    help="see --not_a_flag")
parser.add_argument('--per_channel',
                    action="store_true")
parser.add_argument("model_name")
parser.add_argument("--dtype", choices=["--float16"], default="-1")
'''
    assert argparse_options(source) == ["--calibrate_kv_cache", "--dtype", "--int8_kv_cache", "--model-dir",
                                        "--per_channel", "-kv"]


def test_learn_flags_falls_back_to_the_source_when_help_fails(tmp_path: Path) -> None:
    """A converter importing tensorrt_llm fails its --help in a GPU-less container; its argparse source
    still names its flags, and the facts say they were read from the source, with the failure."""
    converter = tmp_path / "convert_checkpoint.py"
    converter.write_text('import argparse\nimport tensorrt_llm_absent_here\n'
                         'p = argparse.ArgumentParser()\np.add_argument("--model-dir")\np.add_argument("--world-size")\n')
    learnt = learn_flags([sys.executable, str(converter)], str(converter), 30, 500)
    assert learnt["learnt_from"] == "source" and learnt["flags"] == ["--model-dir", "--world-size"]
    assert "ModuleNotFoundError" in learnt["help_error"]

    working = tmp_path / "working.py"
    working.write_text('import argparse\np = argparse.ArgumentParser()\np.add_argument("--model_dir")\np.parse_args()\n')
    learnt = learn_flags([sys.executable, str(working)], str(working), 30, 500)
    assert learnt == {"flags": ["--help", "--model_dir", "-h"], "learnt_from": "help", "help_error": None}


def test_probe_in_image_finds_the_first_existing_candidate_and_manifest(tmp_path: Path) -> None:
    """The older layout is found when the newer is absent; a manifest at the 1.1 path when the later is absent."""
    old = tmp_path / "examples" / "gemma" / "convert_checkpoint.py"
    old.parent.mkdir(parents=True)
    old.write_text('import argparse\np = argparse.ArgumentParser()\np.add_argument("--model-dir")\np.parse_args()\n')
    manifest = tmp_path / "etc" / "model_manifest.yaml"
    manifest.parent.mkdir()
    manifest.write_text("{}\n")
    answer = probe_in_image({"gemma": [str(tmp_path / "models/core/gemma/convert_checkpoint.py"), str(old)]},
                            [str(tmp_path / "opt/model_manifest.yaml"), str(manifest)], 30, 500)
    assert answer["converters"]["gemma"]["path"] == str(old)
    assert answer["converters"]["gemma"]["flags"] == ["--help", "--model-dir", "-h"]
    assert answer["model_manifest"] == str(manifest)
    facts_from_answer(answer, image_id=IMAGE_ID, config_user="1000")  # the shape the model accepts


def test_probe_script_runs_with_a_bare_python_and_answers_one_marked_line() -> None:
    """The whole script (functions copied by source) runs in a python3 with nothing but the stdlib:
    on this machine it finds no converters, no trtllm-build, and its answer is valid facts."""
    ran = subprocess.run([sys.executable, "-I", "-c", probe_script()], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    answer = parse_probe_output(ran.stdout)
    assert answer is not None and set(answer["converters"]) == {family.name for family in FAMILIES}
    parsed = facts_from_answer(answer, image_id=IMAGE_ID, config_user="")
    assert parsed.converters["gemma"].path is None and parsed.uid >= 0


# --- refusals -------------------------------------------------------------------------------------


def test_gemma_build_uses_the_converter_and_flags_the_image_has() -> None:
    """Both layouts' Gemma converters accept nimflow's Gemma command (--model-dir, --ckpt-type hf, --world-size)."""
    for layout in ("examples", "models-core"):
        check_build_against_image(facts(layout), trtllm(), image=IMAGE, model_config=config("Gemma2ForCausalLM"))


def test_missing_converter_is_refused_naming_the_image_the_paths_and_the_fix() -> None:
    newest = facts(converters={})
    with pytest.raises(ConfigError) as caught:
        check_build_against_image(newest, trtllm(), image=IMAGE, model_config=config("Qwen2ForCausalLM"))
    message = str(caught.value)
    assert f"build.image: {IMAGE}: has no convert_checkpoint.py for the qwen2 family" in message
    assert "/app/tensorrt_llm/examples/models/core/qwen/convert_checkpoint.py and /app/tensorrt_llm/examples/qwen/" in message
    assert "TensorRT-LLM release image < 1.3" in message


def test_a_flag_the_converter_lacks_is_refused_from_its_help() -> None:
    """A Gemma converter that takes only --tp_size (a hypothetical release) refuses nimflow's --world-size."""
    lacking = facts()
    gemma = lacking.converters["gemma"]
    lacking = lacking.model_copy(update={"converters": {**lacking.converters, "gemma": gemma.model_copy(
        update={"flags": [f for f in gemma.flags if f != "--world-size"], "learnt_from": "source"})}})
    with pytest.raises(ConfigError) as caught:
        check_build_against_image(lacking, trtllm(), image=IMAGE, model_config=config("GemmaForCausalLM"))
    assert ("/app/tensorrt_llm/examples/gemma/convert_checkpoint.py in " + IMAGE + " does not accept --world-size "
            "(not in its argparse source)") in str(caught.value)


def test_trtllm_build_without_max_seq_len_or_at_all_is_refused() -> None:
    """trtllm-build before 0.12 took --max_output_len; the newest TensorRT-LLM has no trtllm-build."""
    old = facts()
    old = old.model_copy(update={"trtllm_build": old.trtllm_build.model_copy(
        update={"flags": [f for f in old.trtllm_build.flags if f != "--max_seq_len"] + ["--max_output_len"]})})
    with pytest.raises(ConfigError) as caught:
        check_build_against_image(old, trtllm(), image=IMAGE)
    assert "trtllm-build in " + IMAGE + " does not accept --max_seq_len (not in its --help)" in str(caught.value)
    assert "TensorRT-LLM 0.12 replaced it with --max_seq_len" in str(caught.value)

    with pytest.raises(ConfigError) as caught:
        check_build_against_image(facts(trtllm_build=ScriptFacts(path=None)), trtllm(), image=IMAGE)
    assert "has no trtllm-build on its PATH" in str(caught.value)


def test_nim_optimize_missing_or_lacking_its_flags_is_refused() -> None:
    build = BuildSpec(backend="nim-optimize", image="nvcr.io/nim/meta/llama-3.1-8b-instruct:1.8.0")
    with pytest.raises(ConfigError) as caught:
        check_build_against_image(facts(), build, image=build.image)
    assert "has no nim-optimize on its PATH" in str(caught.value) and "nim-jit" in str(caught.value)

    partial = facts(nim_optimize=ScriptFacts(path="/usr/bin/nim-optimize", flags=["--model_dir", "-h"], learnt_from="help"))
    with pytest.raises(ConfigError) as caught:
        check_build_against_image(partial, build, image=build.image)
    assert (f"nim-optimize in {build.image} does not accept --build_config, --output_engine_dir"
            in str(caught.value))

    unknown = facts(nim_optimize=ScriptFacts(path="/usr/bin/nim-optimize"))  # flags not learnt: not refused
    check_build_against_image(unknown, build, image=build.image)
    check_build_against_image(facts(), BuildSpec(backend="nim-jit", image=build.image), image=build.image)


def test_a_convert_script_at_a_candidate_the_image_lacks_is_refused() -> None:
    """build.convert_script at the 0.18+ path on an image with the older layout names where the image has it."""
    build = trtllm(convert_script="/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py")
    with pytest.raises(ConfigError) as caught:
        check_build_against_image(facts("examples"), build, image=IMAGE)
    assert "its llama converter is /app/tensorrt_llm/examples/llama/convert_checkpoint.py" in str(caught.value)


# --- the facts model and the cache ---------------------------------------------------------------


def test_cache_round_trip_and_atomic_write(tmp_path: Path) -> None:
    path = cache_file(tmp_path / "probes", IMAGE_ID)
    assert path.name == "ab" * 32 + ".json"
    write_cached(path, facts())
    assert read_cached(path, IMAGE_ID) == facts()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe" * 10,
        json.dumps({"image_id": IMAGE_ID}).encode(),  # missing facts
        b" " * (MAX_CACHE_BYTES + 1),  # too large: not even parsed
    ],
)
def test_hostile_cache_files_are_ignored(tmp_path: Path, content: bytes) -> None:
    path = cache_file(tmp_path, IMAGE_ID)
    path.write_bytes(content)
    assert read_cached(path, IMAGE_ID) is None


def test_cached_facts_of_another_image_extra_fields_or_another_version_are_ignored(tmp_path: Path) -> None:
    path = cache_file(tmp_path, IMAGE_ID)
    good = json.loads(facts().model_dump_json())
    for bad in ({**good, "image_id": "sha256:" + "cd" * 32}, {**good, "run_as": "root"}, {**good, "facts_version": 2},
                {**good, "trtllm_build": {**good["trtllm_build"], "flags": ["-x"] * 501}}):
        path.write_text(json.dumps(bad))
        assert read_cached(path, IMAGE_ID) is None


def test_cache_file_refuses_what_is_not_an_image_id(tmp_path: Path) -> None:
    for bad in ("../../etc/passwd", "sha256:", "sha256:ABC/../x"):
        with pytest.raises(ValueError, match="not an image id"):
            cache_file(tmp_path, bad)


def test_probe_dir_setting(tmp_path: Path) -> None:
    assert Settings.from_env({"NIMFLOW_IMAGE_PROBE_DIR": str(tmp_path)}).image_probe_dir == tmp_path
    assert Settings.from_env({"XDG_CACHE_HOME": "/x"}).image_probe_dir == Path("/x/nimflow/image-probes")
    assert Settings.from_env({}).image_probe_dir == Path("~/.cache/nimflow/image-probes").expanduser()

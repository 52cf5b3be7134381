"""Property-based fuzzing of the spec loader: no input gives a traceback, every rejection names the field.

Inputs: arbitrary YAML-ish data, mutations of the example specs (configs/examples/*.yaml, configs/demo.yaml),
and arbitrary text and bytes as a spec file. ``parse_spec`` / ``load_spec`` either return a HostingSpec or
raise ConfigError whose every problem names a path that exists in the input ("(top level)" for the spec as a
whole, "(file)" or "line X, column Y" for the file itself); ``nimflow validate`` exits 0 or 2.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nimflow import cli
from nimflow.errors import ConfigError
from nimflow.spec import HostingSpec, load_spec, parse_spec
from tests.unit.fuzz_support import EXAMPLE_FILES, EXAMPLES, FILE_LOCATION, YAMLISH, assert_names_real_fields, mutated_examples


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nimflow-fuzz-") as name:
        yield Path(name)


def _parse(data: Any, base_dir: Path | None = None) -> HostingSpec | ConfigError:
    try:
        return parse_spec(data, "<fuzz>", base_dir=base_dir)
    except ConfigError as exc:
        return exc


def _load(path: Path) -> HostingSpec | ConfigError:
    try:
        return load_spec(path)
    except ConfigError as exc:
        return exc


def _yaml_or_none(text: str) -> Any:
    """What the spec file holds, as the loader reads it; None where it is not YAML."""
    try:
        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - any failure means "not YAML"; load_spec must then name the file
        return None


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_is_valid(path: Path) -> None:
    """The baseline the mutations start from: each example loads unchanged."""
    assert isinstance(load_spec(path), HostingSpec)


@settings(max_examples=300)
@given(YAMLISH)
def test_arbitrary_data_is_a_spec_or_a_config_error_naming_real_fields(data: Any) -> None:
    result = _parse(data, base_dir=Path("/base"))
    if isinstance(result, ConfigError):
        assert_names_real_fields(result, data)
    else:
        assert isinstance(result, HostingSpec)


@settings(max_examples=400)
@given(mutated_examples())
def test_mutated_examples_are_specs_or_config_errors_naming_real_fields(data: Any) -> None:
    result = _parse(data, base_dir=Path("/base"))
    if isinstance(result, ConfigError):
        assert_names_real_fields(result, data)
    else:
        # Accepted: every section given was understood (unknown keys are never silently dropped).
        assert isinstance(result, HostingSpec)
        assert set(data) <= set(HostingSpec.model_fields), data


@settings(max_examples=150)
@given(st.one_of(
    mutated_examples().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.tuples(st.sampled_from(EXAMPLE_FILES).map(lambda p: p.read_text(encoding="utf-8")),
              st.integers(0, 2000), st.text(max_size=8)).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1]:]),
    st.text(max_size=200),
    st.sampled_from(["name: 2001-99-99\n", "[" * 5000, "a: &x [*x]\n", "!!python/object:os.system x\n",
                     "? [a, b]\n: c\n", "name: 0x_\n", "\ufeffname: x\n", "key: !!binary 'QUJD'\n"]),
))
def test_spec_files_load_or_name_the_field_line_or_file(workdir: Path, text: str) -> None:
    path = workdir / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    _check_file_result(_load(path), text)


def _check_file_result(result: HostingSpec | ConfigError, text: str | None) -> None:
    if isinstance(result, HostingSpec):
        return
    data = _yaml_or_none(text) if text is not None else None
    for problem in result.problems:
        assert problem.message.strip(), problem
        if FILE_LOCATION.fullmatch(problem.location):
            continue
        assert_names_real_fields(ConfigError("<fuzz>", [problem]), data)


@settings(max_examples=100)
@given(st.binary(max_size=300))
def test_random_bytes_as_a_spec_file(workdir: Path, raw: bytes) -> None:
    path = workdir / "bytes.yaml"
    path.write_bytes(raw)
    result = _load(path)
    assert isinstance(result, ConfigError)  # no byte string of this size is a complete spec
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        assert [p.location for p in result.problems] == ["(file)"]
    else:
        _check_file_result(result, text)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**EXAMPLES[0], "name": "abc\n"}, "name"),  # `$` let a trailing newline through
        ({**EXAMPLES[0], "source": {"repo_id": "org/name\n"}}, "source.repo_id"),
        ({**EXAMPLES[0], "cache": {"uri": "s3://bucket/prefix\n"}}, "cache.uri"),
        ({**EXAMPLES[0], "deploy": {**EXAMPLES[0]["deploy"], "cache_dir": "~nosuchuser-nimflow/x"}}, "deploy.cache_dir"),
        ({**EXAMPLES[0], "deploy": {**EXAMPLES[0]["deploy"], "cache_dir": "a\x00b"}}, "deploy.cache_dir"),
        ({**EXAMPLES[0], "deploy": {**EXAMPLES[0]["deploy"], "gpus": ["²"] * 4}}, "deploy.gpus"),
        ({**EXAMPLES[0], "finetune": {"path": "/x\x00y"}}, "finetune.path"),
    ],
)
def test_what_fuzzing_found_is_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(data, "<fuzz>", base_dir=Path("/base"))
    assert field in [p.location for p in info.value.problems], info.value.problems


@pytest.mark.parametrize(("text", "location"), [("name: 2001-99-99\n", "(file)"), ("[" * 5000, "(file)")])
def test_yaml_the_parser_cannot_build_is_a_file_problem(workdir: Path, text: str, location: str) -> None:
    path = workdir / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert [p.location for p in info.value.problems] == [location]


def test_a_path_with_a_nul_is_a_file_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_spec("a\x00b.yaml")
    assert [p.location for p in info.value.problems] == ["(file)"]


@settings(max_examples=100)
@given(st.one_of(mutated_examples().map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=100)))
def test_nimflow_validate_exits_0_or_2_without_a_traceback(workdir: Path, text: str) -> None:
    path = workdir / "validate.yaml"
    path.write_text(text, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["validate", str(path)])
    assert "Traceback" not in err.getvalue()
    if status == 0:
        assert out.getvalue() == f"{path}: ok\n" and err.getvalue() == ""
    else:
        assert status == 2
        assert err.getvalue().startswith(f"{path}: "), err.getvalue()

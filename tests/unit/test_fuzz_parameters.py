"""Property-based fuzzing of a run's parameters: revision, checkpoint_uri, overrides and the spec name.

``apply_run_parameters`` / ``resolve_run_spec`` either return the spec with the parameters applied or raise
ConfigError naming the parameter (or the spec field it replaces); ``Overrides.model_validate`` refuses a
bad overrides mapping with a pydantic error naming the key.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nimflow.errors import ConfigError
from nimflow.run_parameters import Overrides, apply_run_parameters, resolve_run_spec
from nimflow.spec import HostingSpec, load_spec
from tests.unit.fuzz_support import ROOT, SCALARS, YAMLISH

DEMO = load_spec(ROOT / "configs" / "demo.yaml")  # source.repo_id, no finetune
FINETUNED = load_spec(ROOT / "configs" / "examples" / "finetuned-model.yaml")  # finetune on s3
LOCAL = load_spec(ROOT / "configs" / "examples" / "trtllm-engine.yaml")
PARAMETER_FIELDS = {"revision", "checkpoint_uri", "source.revision", "finetune.path", "finetune.endpoint_url",
                    "rollout.strategy", "verify.deadline_seconds", "deploy.force"}

URIS = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.tuples(st.sampled_from(["s3://", "hf://", "S3://", "file://", ""]), st.text(max_size=30)).map("".join),
    st.from_regex(r"s3://[a-z0-9][a-z0-9.-]{1,10}[a-z0-9]/[a-z0-9/_-]{0,12}", fullmatch=True),
    st.from_regex(r"hf://[A-Za-z0-9][A-Za-z0-9._-]{0,8}/[A-Za-z0-9][A-Za-z0-9._-]{0,8}(@[a-z0-9]{1,8})?", fullmatch=True),
    st.integers(), st.lists(st.text(max_size=3), max_size=2),
)
REVISIONS = st.one_of(st.none(), st.text(max_size=40), st.integers(), st.from_regex(r"[0-9a-f]{40}", fullmatch=True))
OVERRIDE_DICTS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "rollout_strategy": st.one_of(st.sampled_from(["auto", "blue-green", "recreate", None]), SCALARS),
        "verify_deadline_seconds": st.one_of(st.floats(), st.integers(-5, 10**6), SCALARS),
        "force": st.one_of(st.booleans(), SCALARS),
    }),
    st.dictionaries(st.text(max_size=25), YAMLISH, max_size=3),  # parameters arrive as JSON: keys are text
    YAMLISH.filter(lambda v: not isinstance(v, dict)),
)


def _overrides(value: Any) -> Overrides | None:
    try:
        return Overrides.model_validate(value)
    except ValidationError as exc:
        for err in exc.errors():
            # Each refusal names an Overrides field or the unknown key given (the whole value: loc is empty).
            assert not err["loc"] or err["loc"][0] in Overrides.model_fields or \
                (isinstance(value, dict) and err["loc"][0] in value), err
            assert err["msg"], err
        return None


@settings(max_examples=300)
@given(spec=st.sampled_from([DEMO, FINETUNED, LOCAL]), revision=REVISIONS, checkpoint_uri=URIS, raw=OVERRIDE_DICTS)
def test_run_parameters_apply_or_name_the_parameter(spec: HostingSpec, revision: Any, checkpoint_uri: Any, raw: Any) -> None:
    overrides = _overrides(raw)
    try:
        result = apply_run_parameters(spec, revision=revision, checkpoint_uri=checkpoint_uri, overrides=overrides)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.location in PARAMETER_FIELDS, problem
            assert problem.message.strip(), problem
        return
    assert isinstance(result, HostingSpec)
    if revision:
        assert result.source.revision == revision
    if checkpoint_uri:
        assert isinstance(checkpoint_uri, str) and checkpoint_uri.startswith(("s3://", "hf://"))
        assert result.finetune is not None and result.finetune.path == checkpoint_uri.strip()
    if overrides is not None:
        if overrides.rollout_strategy != "spec":  # "spec" (the default): the spec's strategy stays
            assert result.rollout.strategy == overrides.rollout_strategy
        if overrides.verify_deadline_seconds:  # 0 (the default): the spec's deadline stays
            assert result.verify.deadline_seconds == overrides.verify_deadline_seconds
            assert not math.isnan(result.verify.deadline_seconds)
        assert result.deploy.force == (overrides.force or spec.deploy.force)


@pytest.fixture(scope="module")
def specs_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nimflow-fuzz-specs-") as name:
        shutil.copy(ROOT / "configs" / "examples" / "finetuned-model.yaml", name)
        env = {k: v for k, v in os.environ.items() if k not in ("NIMFLOW_CACHE_DIR", "NIMFLOW_GPUS")}
        with mock.patch.dict(os.environ, {**env, "NIMFLOW_SPECS_DIR": name}, clear=True):
            yield Path(name)


@settings(max_examples=150)
@given(
    name=st.one_of(st.just(FINETUNED.name), st.text(max_size=30), st.text(max_size=10).map(lambda t: t + ".yaml")),
    revision=REVISIONS,
    checkpoint_uri=URIS,
)
def test_resolve_run_spec_by_any_name(specs_dir: Path, name: str, revision: Any, checkpoint_uri: Any) -> None:
    try:
        result = resolve_run_spec(name, revision=revision, checkpoint_uri=checkpoint_uri)
    except ConfigError as exc:
        for problem in exc.problems:
            assert problem.location in PARAMETER_FIELDS | {"spec", "(file)"}, problem
            assert problem.message.strip(), problem
        return
    assert name == FINETUNED.name and result.name == name


@pytest.mark.parametrize("uri", [123, ["s3://b/x"], None])
def test_a_checkpoint_uri_that_is_not_text_names_the_parameter(uri: Any) -> None:
    if uri is None:  # empty: the spec's own path stays
        assert apply_run_parameters(FINETUNED, checkpoint_uri=uri) == FINETUNED
        return
    with pytest.raises(ConfigError) as info:
        apply_run_parameters(FINETUNED, checkpoint_uri=uri)
    assert [p.location for p in info.value.problems] == ["checkpoint_uri"]

"""Property-based fuzzing of the checkpoint event builders and `nimflow notify`.

``hf_checkpoint`` / ``s3_checkpoint`` either build an event whose body parses as a Prefect ``Event`` or
raise ConfigError naming the argument that is wrong; `nimflow notify` exits 0 or 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.events import Event

from nimflow import cli
from nimflow.checkpoint_events import EVENT_NAME, CheckpointLanded, hf_checkpoint, s3_checkpoint
from nimflow.errors import ConfigError
from tests.unit.fuzz_support import ROOT

NAMES = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True), st.text(max_size=12), st.integers())
REPOS = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}/[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
                  st.text(max_size=12), st.none())
SHAS = st.one_of(st.from_regex(r"[0-9a-f]{40}", fullmatch=True), st.from_regex(r"[0-9a-fA-F]{38,41}\n?", fullmatch=True),
                 st.text(max_size=41), st.integers())
REFS = st.one_of(st.none(), st.sampled_from(["main", "v1.2", "refs/x"]), st.text(max_size=10))
BUCKET_PREFIX = st.from_regex(r"s3://[a-z0-9][a-z0-9.-]{1,8}[a-z0-9](/[a-z0-9_-]{1,6}){0,2}/?", fullmatch=True)


def _valid_name(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value) is not None


def _check_body(event: CheckpointLanded, spec: str) -> Event:
    body = event.body()
    parsed = Event.model_validate(body)
    assert parsed.event == EVENT_NAME and str(parsed.id) == body["id"]
    assert parsed.resource.id == event.source_id and parsed.resource["nimflow.spec"] == spec
    assert parsed.payload["spec"] == spec
    assert event.body()["id"] == body["id"]  # the same checkpoint is the same event
    return parsed


@settings(max_examples=300)
@given(spec=NAMES, repo_id=REPOS, revision=SHAS, ref=REFS)
def test_hf_checkpoint_builds_an_event_or_names_the_argument(spec: Any, repo_id: Any, revision: Any, ref: Any) -> None:
    try:
        event = hf_checkpoint(spec, repo_id, revision, ref=ref)
    except ConfigError as exc:
        [problem] = exc.problems
        assert problem.message.strip()
        wrong = {"spec": not _valid_name(spec),
                 "repo_id": not (isinstance(repo_id, str) and re.fullmatch(r"[^/\s]+/[^/\s]+", repo_id)),
                 "revision": not (isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision)),
                 "ref": ref is not None}
        assert wrong[problem.location], (problem, spec, repo_id, revision, ref)
        return
    assert _valid_name(spec) and re.fullmatch(r"[0-9a-f]{40}", revision)
    parsed = _check_body(event, spec)
    assert parsed.payload["revision"] == revision and parsed.payload.get("ref") == ref


@settings(max_examples=300)
@given(
    spec=NAMES,
    prefix=st.one_of(BUCKET_PREFIX, st.text(max_size=15), st.sampled_from(["s3://", "s3:///", "s3://b/", "s3://ab/x\n"])),
    name=st.one_of(st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True), st.text(max_size=10)),
    slash=st.booleans(),
    other=st.one_of(st.none(), st.text(max_size=15)),
)
def test_s3_checkpoint_builds_an_event_or_names_the_argument(
    spec: Any, prefix: str, name: str, slash: bool, other: str | None
) -> None:
    directory = other if other is not None else prefix.rstrip("/") + "/" + name + ("/" if slash else "")
    try:
        event = s3_checkpoint(spec, prefix, directory)
    except ConfigError as exc:
        [problem] = exc.problems
        assert problem.location in ("spec", "prefix", "uri"), problem
        assert problem.message.strip()
        if problem.location == "spec":
            assert not _valid_name(spec)
        return
    assert _valid_name(spec)
    assert event.uri == directory.rstrip("/") + "/"
    child = event.uri[len(prefix.rstrip("/") + "/"):-1]
    assert child and "/" not in child and event.uri.startswith(prefix.rstrip("/") + "/")
    assert not any(c in event.uri for c in "\n\r\x00")
    parsed = _check_body(event, spec)
    assert parsed.payload["uri"] == event.uri


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: hf_checkpoint("s", "o/r", "a" * 40 + "\n"), "revision"),  # `$` let a trailing newline through
        (lambda: hf_checkpoint("Bad Name", "o/r", "a" * 40), "spec"),
        (lambda: hf_checkpoint("s", "not a repo", "a" * 40), "repo_id"),
        (lambda: hf_checkpoint("s", "o/r", 123), "revision"),
        (lambda: s3_checkpoint("s", "s3://BAD BUCKET/x/", "s3://BAD BUCKET/x/c1/"), "prefix"),
        (lambda: s3_checkpoint("s", "s3://bucket/x/", "s3://bucket/x/c1\n/"), "uri"),
    ],
)
def test_what_fuzzing_found_names_the_argument(make: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert [p.location for p in info.value.problems] == [field]


@pytest.fixture(scope="module")
def notify_specs() -> Iterator[Path]:
    """A specs directory with one spec that watches both its repo and an S3 prefix."""
    data = yaml.safe_load((ROOT / "configs" / "examples" / "finetuned-model.yaml").read_text(encoding="utf-8"))
    data["watch"] = {"branches": ["main"], "s3_prefix": "s3://my-finetunes/runs/"}
    with tempfile.TemporaryDirectory(prefix="nimflow-fuzz-notify-") as name:
        (Path(name) / "spec.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
        with mock.patch.dict(os.environ, {"NIMFLOW_SPECS_DIR": name}):
            yield Path(name)


@settings(max_examples=100)
@given(
    spec=st.one_of(st.just("llama-3-1-8b-my-domain"), st.text(min_size=1, max_size=10).filter(lambda t: not t.startswith("-"))),
    option=st.sampled_from(["--revision", "--uri"]),
    value=st.one_of(SHAS.map(str), st.from_regex(r"s3://my-finetunes/runs/[a-z0-9-]{1,8}/?", fullmatch=True),
                    st.text(max_size=20)),
)
def test_nimflow_notify_exits_0_or_2_without_a_traceback(notify_specs: Path, spec: str, option: str, value: str) -> None:
    sent: list[CheckpointLanded] = []
    out, err = io.StringIO(), io.StringIO()
    with mock.patch("nimflow.checkpoint_events.emit_checkpoint_event", side_effect=lambda e: sent.append(e) or e.event_id), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["notify", spec, f"{option}={value}"])
    assert "Traceback" not in err.getvalue()
    if status == 0:
        [event] = sent
        assert out.getvalue().strip() == str(event.event_id)
        assert (event.revision if option == "--revision" else event.uri.rstrip("/")) == value.rstrip("/")
    else:
        assert status == 2 and not sent
        assert err.getvalue().strip(), "a refusal says why"

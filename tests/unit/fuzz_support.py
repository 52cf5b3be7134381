"""Shared strategies and checks of the fuzz tests: YAML-ish data, mutations of the example specs, and
whether a ConfigError's problem names a field that exists in the input."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from nimflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_FILES = sorted((ROOT / "configs" / "examples").glob("*.yaml")) + [ROOT / "configs" / "demo.yaml"]
EXAMPLES: list[dict[str, Any]] = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in EXAMPLE_FILES]

#: Field names of the spec, so generated mappings hit real sections and fields as often as unknown ones.
FIELD_NAMES = sorted({
    "name", "source", "repo_id", "revision", "local_dir", "manifest", "model_name", "allow_patterns", "finetune",
    "path", "endpoint_url", "allow_pickle", "lora", "adapters", "max_rank", "build", "backend", "image", "dtype",
    "tp_size", "pp_size", "max_seq_len", "max_batch_size", "max_num_tokens", "convert_script", "gpus", "shm_size",
    "timeout_seconds", "env", "cache", "uri", "region", "max_concurrency", "single_request_max_mib", "multipart_chunk_mib", "deploy",
    "served_model_name", "host", "host_port", "cache_dir", "user", "container_name", "nim_api", "force", "verify",
    "deadline_seconds", "api", "prompt", "golden", "expect", "rollout", "strategy", "standby_gpus", "watch",
    "branches", "tags", "s3_prefix", "marker",
})

# Keys are free text except '.', '[' and ']' (which a dotted location cannot tell apart from its separators)
# and pydantic's own tag prefix.
_key_text = st.text(
    st.characters(blacklist_characters=".[]", blacklist_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda k: not k.startswith("function-"))
KEYS = st.one_of(st.sampled_from(FIELD_NAMES), _key_text, st.integers(-5, 5), st.booleans(), st.none())

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", " ", "all", "0,1", "device=4,5", "s3://", "s3://bucket/p", "hf://o/r@v", "~nosuchuser/x",
                     "a\x00b", "16g", "nim-optimize", "nim-jit", "trtllm-build", "2.x", "\n", "abc\n", "²"]),
)
YAMLISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=20,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, prefix + (index,))
    return found


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        data = data[step]
    return data


@st.composite
def mutated_examples(draw: st.DrawFn) -> Any:
    """A valid example spec with one to three mutations: a field deleted, a value replaced by another
    type, an unknown key added, a value nested wrongly, or a section replaced by a list of itself."""
    data = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        key = path[-1]
        kind = draw(st.sampled_from(["delete", "replace", "unknown", "nest", "listify", "rekey"]))
        if kind == "delete":
            del parent[key]
        elif kind == "replace":
            parent[key] = draw(YAMLISH)
        elif kind == "unknown":
            target = parent[key] if isinstance(parent[key], dict) else parent
            if isinstance(target, dict):
                target[draw(KEYS)] = draw(YAMLISH)
        elif kind == "nest":
            parent[key] = {draw(KEYS): parent[key]}
        elif kind == "listify":
            parent[key] = [parent[key]]
        elif isinstance(parent, dict):  # rekey: a value under another key
            parent[draw(KEYS)] = parent.pop(key)
    return data


def resolves(data: Any, location: str, *, missing_ok: bool = False) -> bool:
    """Whether ``location`` (``a.b[0].c``) is a path in ``data``; with ``missing_ok`` its last step may be
    absent (a required field that is missing) as long as its parent is a mapping in ``data``."""
    steps = re.findall(r"\[(\d+)\]|\.?([^.\[]+)", location)
    if not steps:
        return False
    node = data
    for number, (index, name) in enumerate(steps):
        last = number == len(steps) - 1
        if index:
            if isinstance(node, list) and int(index) < len(node):
                node = node[int(index)]
                continue
            name = index  # an integer key of a mapping
        if not isinstance(node, dict):
            return False
        matches = [k for k in node if name in (str(k), _YAML_KEYS.get(k, str(k)) if not isinstance(k, str) else k)]
        if not matches:
            return last and missing_ok
        node = node[matches[0]]
    return True


_YAML_KEYS: dict[Any, str] = {None: "null", True: "true", False: "false"}
FILE_LOCATION = re.compile(r"\(file\)|line \d+, column \d+")


def assert_names_real_fields(exc: ConfigError, data: Any) -> None:
    """Every problem has a message and a location that is "(top level)" or a path in ``data``."""
    assert exc.problems, "a ConfigError without problems"
    for problem in exc.problems:
        assert problem.message.strip(), problem
        if problem.location == "(top level)":
            continue
        missing = problem.message == "required field is missing"
        assert resolves(data, problem.location, missing_ok=missing), (problem, data)

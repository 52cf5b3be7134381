"""The YAML nimflow reads from outside: bounded in bytes, and in what aliases may add."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from nimflow import bounded_yaml
from nimflow.errors import ConfigError
from nimflow.model_manifest import parse_manifest
from nimflow.spec import load_spec


def test_ordinary_anchors_still_load() -> None:
    text = "base: &base {image: x, port: 1}\nblue: *base\ngreen: *base\nlist: [*base, *base]\n"
    assert bounded_yaml.load(text) == yaml.safe_load(text)


def test_aliases_may_add_up_to_the_bound_and_no_more() -> None:
    row = "[" + ", ".join(["1"] * 99) + "]"  # a sequence node and 99 scalars: 100 nodes per alias
    fits = f"a: &a {row}\nb: [" + ", ".join(["*a"] * (bounded_yaml.MAX_ALIAS_NODES // 100)) + "]\n"
    assert len(bounded_yaml.load(fits)["b"]) == bounded_yaml.MAX_ALIAS_NODES // 100
    with pytest.raises(bounded_yaml.AliasExpansionError, match="expand it by"):
        bounded_yaml.load(fits.replace("b: [", "b: [*a, "))


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(bounded_yaml.AliasExpansionError, match="recursive"):
        bounded_yaml.load("a: &x [1, *x]\n")


def test_a_billion_laughs_spec_names_the_line_of_its_first_alias(tmp_path: Path) -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert problem.location == "line 2, column 8" and "aliases" in problem.message


def test_an_oversized_spec_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "#" * bounded_yaml.MAX_SPEC_BYTES)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.problems[0].location == "(file)" and f"larger than {bounded_yaml.MAX_SPEC_BYTES}" in str(info.value)


def test_a_fifo_named_like_a_spec_is_refused_not_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_spec(path)


def test_a_manifest_with_an_alias_bomb_names_source_manifest() -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(6))
    with pytest.raises(ConfigError) as info:
        parse_manifest(text, where="m.yaml")
    assert info.value.problems[0].location == "source.manifest" and "aliases" in str(info.value)

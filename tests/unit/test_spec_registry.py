"""The specs directory: specs by name, which specs watch a source, the host's overrides, the watch section."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimflow.errors import ConfigError
from nimflow.spec import load_spec, parse_spec
from nimflow.spec_registry import (
    find_specs,
    host_overrides,
    load_named_spec,
    source_id_hf,
    source_id_s3,
    spec_names,
    specs_watching,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "name": "alpha",
    "source": {"repo_id": "org/alpha", "revision": "main"},
    "deploy": {"image": "nvcr.io/nim/meta/llama:1.8.0", "served_model_name": "alpha", "cache_dir": "/opt/nimflow/cache"},
}
FINETUNE: dict[str, Any] = {"path": "s3://ckpts/alpha/step-100/"}


def _spec(name: str = "alpha", **sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["name"] = name
    data.update(copy.deepcopy(sections))
    return data


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(data, "spec.yaml")
    return str(info.value).splitlines()


# --- specs by name ------------------------------------------------------------------------------


def test_specs_are_keyed_by_name_field_not_file_name(tmp_path: Path) -> None:
    _write(tmp_path / "one.yaml", _spec("alpha"))
    _write(tmp_path / "two.yaml", _spec("beta"))
    (tmp_path / "notes.txt").write_text("not a spec")
    (tmp_path / "examples").mkdir()
    _write(tmp_path / "examples" / "three.yaml", _spec("gamma"))  # subdirectories are not scanned

    assert find_specs(tmp_path) == {"alpha": tmp_path / "one.yaml", "beta": tmp_path / "two.yaml"}
    assert spec_names(tmp_path) == ["alpha", "beta"]
    assert load_named_spec("beta", tmp_path).source.repo_id == "org/alpha"


def test_a_file_that_does_not_load_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path / "good.yaml", _spec("alpha"))
    _write(tmp_path / "typo.yaml", {**_spec("beta"), "deploi": {}})
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")

    with caplog.at_level(logging.WARNING, logger="nimflow.spec_registry"):
        assert spec_names(tmp_path) == ["alpha"]
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "typo.yaml" in warned and "deploi" in warned
    assert "broken.yaml" in warned


def test_two_files_with_one_name_are_an_error_naming_both(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", _spec("alpha"))
    _write(tmp_path / "b.yaml", _spec("alpha"))

    with pytest.raises(ConfigError) as info:
        find_specs(tmp_path)
    message = str(info.value)
    assert "a.yaml" in message and "b.yaml" in message and "'alpha'" in message


def test_an_unknown_name_lists_the_names_and_the_directory(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", _spec("alpha"))
    _write(tmp_path / "b.yaml", _spec("beta"))

    with pytest.raises(ConfigError) as info:
        load_named_spec("gamma", tmp_path)
    assert info.value.problems[0].location == "spec"
    message = str(info.value)
    assert "'gamma'" in message and str(tmp_path) in message and "alpha, beta" in message


def test_a_missing_directory_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NIMFLOW_SPECS_DIR"):
        spec_names(tmp_path / "nowhere")


def test_the_default_directory_comes_from_nimflow_specs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "a.yaml", _spec("from-env"))
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(tmp_path))
    assert spec_names() == ["from-env"]


def test_the_repositorys_configs_directory_holds_the_demo_but_not_the_examples() -> None:
    names = spec_names(REPO_ROOT / "configs")
    examples = {load_spec(p).name for p in (REPO_ROOT / "configs" / "examples").glob("*.yaml")}
    assert "tiny-llama-demo" in names
    assert examples and not examples & set(names)


# --- the watch section and source ids -----------------------------------------------------------


def test_source_ids_name_the_watched_repo_and_prefix() -> None:
    spec = parse_spec(_spec(finetune=FINETUNE, watch={"branches": ["main"], "s3_prefix": "s3://ckpts/alpha"}))
    assert spec.watch is not None and spec.watch.s3_prefix == "s3://ckpts/alpha/"
    assert spec.source_ids == ["nimflow.source.hf.org/alpha", "nimflow.source.s3.ckpts/alpha"]
    assert source_id_hf("org/alpha") == "nimflow.source.hf.org/alpha"
    assert source_id_s3("s3://ckpts/alpha/") == source_id_s3("s3://ckpts/alpha") == "nimflow.source.s3.ckpts/alpha"


def test_a_spec_without_watch_watches_nothing() -> None:
    assert parse_spec(_spec()).source_ids == []


def test_tags_alone_watch_the_repo() -> None:
    assert parse_spec(_spec(watch={"tags": "v*"})).source_ids == ["nimflow.source.hf.org/alpha"]


def test_branches_need_a_hub_repo() -> None:
    local = _spec(source={"local_dir": "/models/alpha"}, watch={"branches": ["main"]})
    assert any("watch.branches and watch.tags watch source.repo_id" in line for line in _problems(local))


def test_s3_prefix_needs_a_finetune_section() -> None:
    lines = _problems(_spec(watch={"s3_prefix": "s3://ckpts/alpha/"}))
    assert any("watch.s3_prefix" in line and "finetune" in line for line in lines)


def test_s3_prefix_must_be_an_s3_uri() -> None:
    lines = _problems(_spec(finetune=FINETUNE, watch={"s3_prefix": "gs://ckpts/alpha/"}))
    assert any(line.startswith("spec.yaml: watch.s3_prefix: ") and "s3://bucket/prefix/" in line for line in lines)


def test_an_empty_watch_section_is_refused() -> None:
    assert any("give branches, tags or s3_prefix" in line for line in _problems(_spec(watch={})))


def test_a_marker_is_a_file_name() -> None:
    lines = _problems(_spec(finetune=FINETUNE, watch={"s3_prefix": "s3://ckpts/a/", "marker": "sub/_DONE"}))
    assert any(line.startswith("spec.yaml: watch.marker: ") for line in lines)


def test_unknown_watch_fields_are_refused() -> None:
    assert any(line.startswith("spec.yaml: watch.branch: ") for line in _problems(_spec(watch={"branch": "main"})))


def test_specs_watching_finds_the_specs_of_a_source(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", _spec("alpha", watch={"branches": ["main"]}))
    _write(tmp_path / "b.yaml", _spec("beta", watch={"tags": "v*"}))
    _write(tmp_path / "c.yaml", _spec("gamma"))
    _write(tmp_path / "d.yaml", _spec("delta", finetune=FINETUNE, watch={"s3_prefix": "s3://ckpts/delta/"}))

    assert specs_watching("nimflow.source.hf.org/alpha", tmp_path) == ["alpha", "beta"]
    assert specs_watching(source_id_s3("s3://ckpts/delta"), tmp_path) == ["delta"]
    assert specs_watching("nimflow.source.hf.org/other", tmp_path) == []


# --- what the host sets -------------------------------------------------------------------------

BUILT: dict[str, Any] = {
    "build": {"backend": "nim-optimize", "image": "nvcr.io/nim/meta/llama:1.8.0", "tp_size": 2, "gpus": [0, 1]},
    "cache": {"uri": "s3://engines/nim"},
}


def test_without_host_settings_the_spec_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIMFLOW_CACHE_DIR", raising=False)
    monkeypatch.delenv("NIMFLOW_GPUS", raising=False)
    spec = parse_spec(_spec())
    assert host_overrides(spec) == spec


def test_host_cache_dir_and_gpus_replace_the_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NIMFLOW_CACHE_DIR", "host-cache")
    monkeypatch.setenv("NIMFLOW_GPUS", "4,5")
    spec = parse_spec({**_spec(**BUILT), "deploy": {**BASE["deploy"], "gpus": [0, 1]}})

    hosted = host_overrides(spec)
    assert hosted.deploy.cache_dir == tmp_path / "host-cache"
    assert hosted.deploy.gpus == [4, 5]
    assert hosted.build is not None and hosted.build.gpus == [4, 5]
    assert spec.deploy.gpus == [0, 1]  # the loaded spec is not changed


def test_host_gpus_leave_a_cpu_build_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIMFLOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("NIMFLOW_GPUS", "device=3")
    cpu_build = {**BUILT, "build": {**BUILT["build"], "tp_size": 1, "gpus": None}}
    hosted = host_overrides(parse_spec(_spec(**cpu_build)))
    assert hosted.deploy.gpus == [3]
    assert hosted.build is not None and hosted.build.gpus is None


def test_bad_host_gpus_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIMFLOW_GPUS", "gpu0")
    with pytest.raises(ConfigError) as info:
        host_overrides(parse_spec(_spec()))
    assert info.value.problems[0].location == "NIMFLOW_GPUS"
    assert "'gpu0'" in str(info.value) and "NIMFLOW_GPUS=0,1" in str(info.value)


def test_host_gpus_that_do_not_fit_the_engine_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIMFLOW_GPUS", "0,1,2")
    with pytest.raises(ConfigError) as info:
        host_overrides(parse_spec({**_spec(**BUILT), "deploy": {**BASE["deploy"], "gpus": [0, 1]}}))
    message = str(info.value)
    assert message.startswith("NIMFLOW_GPUS (spec alpha): ")
    assert "tp_size x pp_size = 2" in message

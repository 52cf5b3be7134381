"""The hosting spec loader: valid configs load, every mistake is a `CONFIG: field.path: message` line."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimflow.cli import main
from nimflow.errors import ConfigError
from nimflow.settings import SECRET_ENV_VARS
from nimflow.spec import HostingSpec, load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIGS = sorted([*REPO_ROOT.glob("configs/*.yaml"), *REPO_ROOT.glob("configs/examples/*.yaml")])

BASE: dict[str, Any] = {
    "name": "tiny-llama",
    "source": {"repo_id": "org/tiny-llama", "revision": "main"},
    "deploy": {"image": "nvcr.io/nim/meta/llama:1.8.0", "served_model_name": "tiny", "cache_dir": "/opt/nimflow/cache"},
}
BUILD: dict[str, Any] = {"backend": "nim-optimize", "image": "nvcr.io/nim/meta/llama:1.8.0"}
CACHE: dict[str, Any] = {"uri": "s3://engine-cache/nim"}


def _write(path: Path, data: Any) -> Path:
    """Write ``data`` as YAML to ``path`` and return the path."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _spec(**sections: Any) -> dict[str, Any]:
    """A deep copy of the valid base spec with top-level ``sections`` replaced."""
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(sections))
    return data


def _errors(path: Path) -> list[str]:
    """The lines of the ConfigError raised by loading ``path`` (fails the test if none is raised)."""
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert lines, "a ConfigError must list at least one problem"
    for line in lines:
        assert line.startswith(f"{path}: "), line
    return lines


def _problem(path: Path, location: str) -> str:
    """The message of the single problem at ``location``; fails unless exactly one line names it."""
    lines = _errors(path)
    prefix = f"{path}: {location}: "
    matching = [line for line in lines if line.startswith(prefix)]
    assert len(matching) == 1, f"expected one problem at {location!r}, got {lines}"
    return matching[0][len(prefix) :]


# --- valid specs --------------------------------------------------------------------------------


def test_example_configs_are_found() -> None:
    """The repository ships the demo config and the three guide examples."""
    names = {p.name for p in EXAMPLE_CONFIGS}
    assert {"demo.yaml", "hf-model.yaml", "trtllm-engine.yaml", "finetuned-model.yaml"} <= names


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_example_configs_load(config: Path) -> None:
    """Every config shipped in configs/ is valid and its name matches the YAML."""
    spec = load_spec(config)
    assert isinstance(spec, HostingSpec)
    assert spec.name == yaml.safe_load(config.read_text())["name"]
    assert spec.deploy.cache_dir.is_absolute()


def test_demo_cache_dir_resolves_against_spec_directory() -> None:
    """configs/demo.yaml's `../.testbed/nim-cache` is relative to configs/, not to the cwd."""
    spec = load_spec(REPO_ROOT / "configs" / "demo.yaml")
    assert spec.deploy.cache_dir == (REPO_ROOT / ".testbed" / "nim-cache").resolve()


def test_relative_paths_resolve_against_spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """local_dir, cache_dir and a local finetune.path are resolved against the spec's directory."""
    spec_dir = tmp_path / "specs" / "team"
    spec_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = _spec(
        source={"local_dir": "../models/base"},
        finetune={"path": "ft/step-10"},
        deploy={**BASE["deploy"], "cache_dir": "cache"},
    )
    spec = load_spec(_write(spec_dir / "model.yaml", data))
    assert spec.source.local_dir == (tmp_path / "specs" / "models" / "base").resolve()
    assert spec.deploy.cache_dir == (spec_dir / "cache").resolve()
    assert spec.finetune is not None
    assert spec.finetune.path == str((spec_dir / "ft" / "step-10").resolve())


def test_s3_finetune_path_is_not_resolved(tmp_path: Path) -> None:
    """An s3:// fine-tune path is kept as written, not turned into a local path."""
    spec = load_spec(_write(tmp_path / "s.yaml", _spec(finetune={"path": "s3://my-finetunes/run/step-1"})))
    assert spec.finetune is not None and spec.finetune.path == "s3://my-finetunes/run/step-1"


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [([4, 5], [4, 5]), ("device=4,5", [4, 5]), ('"device=4,5"', [4, 5]), ("4,5", [4, 5]), ("all", "all"), (None, None)],
)
def test_gpu_forms(tmp_path: Path, gpus: Any, expected: Any) -> None:
    """GPU selections in list, docker CLI (`device=4,5`) and `all` forms are normalised."""
    data = _spec(deploy={**BASE["deploy"], "gpus": gpus})
    assert load_spec(_write(tmp_path / "s.yaml", data)).deploy.gpus == expected


# --- mistakes, each with its field path ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "location", "fragment"),
    [
        (_spec(deploy={**BASE["deploy"], "shm_sise": "16g"}), "deploy.shm_sise", "unknown field"),
        (_spec(nmae="x"), "nmae", "unknown field"),
        ({k: v for k, v in BASE.items() if k != "deploy"}, "deploy", "required field is missing"),
        (
            _spec(deploy={k: v for k, v in BASE["deploy"].items() if k != "cache_dir"}),
            "deploy.cache_dir",
            "required field is missing",
        ),
        (_spec(source={"repo_id": "just-a-name"}), "source.repo_id", "is not a repo id"),
        (_spec(source={"repo_id": "org/m", "local_dir": "/models/m"}), "source", "exactly one of"),
        (_spec(source={"revision": "main"}), "source", "exactly one of"),
        (_spec(cache={"uri": "s3:/engine-cache"}), "cache.uri", "is not an S3 URI"),
        (_spec(cache={"uri": "https://engine-cache/nim"}), "cache.uri", "is not an S3 URI"),
        (_spec(finetune={"path": "s3://Bad_Bucket/x"}), "finetune.path", "not a valid s3:// URI"),
        (_spec(build={**BUILD, "tp_size": 0}, cache=CACHE), "build.tp_size", "greater than or equal to 1"),
        (
            _spec(build={**BUILD, "max_seq_len": 100, "max_batch_size": 2, "max_num_tokens": 201}, cache=CACHE),
            "build",
            "max_num_tokens (201) must be <= max_batch_size x max_seq_len (200)",
        ),
        (_spec(deploy={**BASE["deploy"], "gpus": [-1]}), "deploy.gpus", "is not a GPU selection"),
        (_spec(deploy={**BASE["deploy"], "gpus": "device=-1"}), "deploy.gpus", "is not a GPU selection"),
        (_spec(deploy={**BASE["deploy"], "gpus": [4, 4]}), "deploy.gpus", "must not repeat"),
        (_spec(build={**BUILD, "gpus": "some"}, cache=CACHE), "build.gpus", "is not a GPU selection"),
        (
            _spec(deploy={**BASE["deploy"], "env": {"NIM_MODEL_NAME": "/x"}}),
            "deploy.env",
            "NIM_MODEL_NAME is set by nimflow",
        ),
        (
            _spec(deploy={**BASE["deploy"], "env": {"NGC_API_KEY": "nvapi-123"}}),
            "deploy.env",
            "NGC_API_KEY is a secret",
        ),
        (_spec(build=BUILD), "(top level)", "`build` needs `cache`"),
        (_spec(name="Llama_3"), "name", "must be lowercase letters, digits and dashes"),
        (_spec(deploy={**BASE["deploy"], "shm_size": "lots"}), "deploy.shm_size", "is not a size"),
        (_spec(deploy={**BASE["deploy"], "host_port": 70000}), "deploy.host_port", "less than or equal to 65535"),
    ],
    ids=[
        "typo-nested", "typo-top", "missing-section", "missing-field", "bad-repo-id", "both-sources",
        "neither-source", "bad-s3-uri", "not-s3-uri", "bad-finetune-s3", "tp-size-0", "max-num-tokens",
        "gpu-minus-1", "gpu-device-minus-1", "gpu-repeat", "gpu-word", "reserved-env", "secret-env",
        "build-without-cache", "bad-name", "bad-shm", "bad-port",
    ],
)
def test_mistake_is_reported_at_its_field(tmp_path: Path, data: dict[str, Any], location: str, fragment: str) -> None:
    """Each kind of mistake gives one `CONFIG: location: message` line naming the fix."""
    path = _write(tmp_path / "bad.yaml", data)
    assert fragment in _problem(path, location)


def test_secret_value_is_not_echoed(tmp_path: Path) -> None:
    """A secret written into deploy.env is refused without repeating its value."""
    path = _write(tmp_path / "bad.yaml", _spec(deploy={**BASE["deploy"], "env": {"HF_TOKEN": "hf_supersecret"}}))
    lines = _errors(path)
    assert "hf_supersecret" not in "\n".join(lines)


def test_every_problem_is_listed(tmp_path: Path) -> None:
    """Several mistakes in one file are all reported, one line each, in a single error."""
    data = _spec(name="Bad Name", source={"repo_id": "nope"}, deploy={**BASE["deploy"], "host_prot": 1})
    path = _write(tmp_path / "bad.yaml", data)
    locations = {line.split(": ")[1] for line in _errors(path)}
    assert locations == {"name", "source.repo_id", "deploy.host_prot"}


def test_config_error_carries_problems(tmp_path: Path) -> None:
    """ConfigError keeps the source and structured problems, not just the text."""
    path = _write(tmp_path / "bad.yaml", _spec(name="X"))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    assert [p.location for p in info.value.problems] == ["name"]


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    """Broken YAML is reported with the line and column where the parser stopped."""
    path = tmp_path / "broken.yaml"
    path.write_text("name: ok\nsource:\n  repo_id: a/b\n   revision: main\n")
    message = _problem(path, "line 4, column 12")
    assert message.startswith("not valid YAML:")


def test_missing_file(tmp_path: Path) -> None:
    """A config that does not exist is a ConfigError, not a FileNotFoundError."""
    assert _problem(tmp_path / "absent.yaml", "(file)") == "no such file"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""], ids=["list", "scalar", "empty"])
def test_non_mapping_document(tmp_path: Path, text: str) -> None:
    """A YAML document that is not a mapping is reported at the top level."""
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert "expected a mapping" in _problem(path, "(top level)")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """A config saved in Latin-1 is reported as a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert _problem(path, "(file)")


# --- the `nimflow validate` command ------------------------------------------------------------


def test_cli_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid spec exits 0 and says ok on stdout, nothing on stderr."""
    path = _write(tmp_path / "good.yaml", _spec())
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok"
    assert err == ""


def test_cli_validate_bad_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid spec exits 2 and prints field paths on stderr, never a traceback."""
    good = _write(tmp_path / "good.yaml", _spec())
    bad = _write(tmp_path / "bad.yaml", _spec(name="Bad", deploy={**BASE["deploy"], "gpus": [-1]}))
    assert main(["validate", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: ok" in out
    assert f"{bad}: name: " in err
    assert f"{bad}: deploy.gpus: " in err
    assert "Traceback" not in err + out


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing config exits 2 with a one-line message."""
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 2
    _, err = capsys.readouterr()
    assert err.strip() == f"{missing}: (file): no such file"


def test_console_script_exit_code_and_stderr(tmp_path: Path) -> None:
    """The installed `nimflow` script exits 2 on a bad spec, printing field paths and no traceback."""
    script = Path(sys.executable).with_name("nimflow")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    bad = _write(tmp_path / "bad.yaml", _spec(source={"repo_id": "nope"}, cache={"uri": "s3:/x"}))
    result = subprocess.run([str(script), "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{bad}: source.repo_id: " in result.stderr
    assert f"{bad}: cache.uri: " in result.stderr
    assert "Traceback" not in result.stderr


# --- secrets are refused in env sections (one list: nimflow.settings.SECRET_ENV_VARS) ------------


@pytest.mark.parametrize("name", [*SECRET_ENV_VARS, "hugging_face_hub_token"])
def test_every_secret_is_refused_in_deploy_env_naming_the_fix(tmp_path: Path, name: str) -> None:
    """Each secret nimflow reads (in any case) is refused in deploy.env: the field, the fix, never the value."""
    path = _write(tmp_path / "bad.yaml", _spec(deploy={**BASE["deploy"], "env": {name: "s3cr3t-value-123"}}))
    message = _problem(path, "deploy.env")
    assert f"{name} is a secret" in message and "remove it from deploy.env" in message
    assert "export it where nimflow runs" in message and "nimflow bootstrap" in message
    assert "s3cr3t-value-123" not in "\n".join(_errors(path))


def test_a_secret_is_refused_in_build_env(tmp_path: Path) -> None:
    """build.env (hashed into the engine key) refuses secrets the same way."""
    path = _write(tmp_path / "bad.yaml", _spec(build={**BUILD, "env": {"HUGGING_FACE_HUB_TOKEN": "hf_abc"}}, cache=CACHE))
    message = _problem(path, "build.env")
    assert "HUGGING_FACE_HUB_TOKEN is a secret" in message and "remove it from build.env" in message
    assert "hf_abc" not in "\n".join(_errors(path))

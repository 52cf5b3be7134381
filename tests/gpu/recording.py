"""Record what real NIM and TensorRT-LLM images print, for :mod:`tests.gpu.assumptions` (GPU host only).

``record_images`` runs, each in a short container of the named image with GPU 0:

* in the NIM image: ``nim-optimize -h``, ``list-model-profiles``, nimflow's GPU probe, and a small
  stdlib script that reports the image's user and every model manifest it has;
* in the build image (the TensorRT-LLM release, or the NIM image): every ``convert_checkpoint.py``
  it has, each table family's ``--help`` and ``trtllm-build --help``;
* in both: what nimflow's image probe (:mod:`nimflow.image_probe`) finds, as ``*-image-probe.json``.

``record_endpoint`` saves ``/v1/models``, ``/v1/metadata`` and ``/v1/version`` of a NIM that
nimflow started and verified, with what nimflow told it (served name, model root, generation).

Each command's output goes to ``<name>.txt`` (``$ command``, ``# exit code N``, then the output),
each answer to ``<name>.json``, and the verdicts of every assumption to ``verdicts.json``. Commit
the folder: the unit tests then check the code's assumptions against it on every CPU run.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx

from nimflow.containers import device_requests, run_to_exit
from nimflow.gpu_identity import PROBE_SCRIPT
from nimflow.image_probe import probe_image
from nimflow.trtllm_families import FAMILIES
from tests.gpu.assumptions import converter_output_name, verdicts

RECORD_ROOT = Path(__file__).parent / "recorded"
_DEADLINE_SECONDS = 600.0
_MARKER = "NIMFLOW-FACTS "
# Stdlib only, Python 3.8+: who the image runs as, and every manifest and converter it has (searched
# for, not looked up where nimflow expects them: that is what the assumptions check).
FACTS_SCRIPT = f"""
import json, os, pwd, shutil
out = {{"uid": os.getuid(), "gid": os.getgid(), "home": os.environ.get("HOME")}}
try:
    out["user"] = pwd.getpwuid(os.getuid()).pw_name
except KeyError:
    out["user"] = None
def find(name, tops, depth, limit=500):
    found = []
    for top in tops:
        for root, dirs, files in os.walk(top):
            if root.count("/") - top.count("/") >= depth:
                dirs[:] = []
            if name in files and len(found) < limit:
                found.append(os.path.join(root, name))
    return sorted(found)
out["manifests"] = find("model_manifest.yaml", ("/etc", "/opt/nim"), 5)
tools = ("nim-optimize", "list-model-profiles", "trtllm-build", "start-server", "nim-serve", "nim-run")
out["tools"] = {{t: shutil.which(t) for t in tools}}
out["converters"] = find("convert_checkpoint.py", ("/app", "/opt", "/usr/local/lib", "/workspace"), 6)
print({_MARKER!r} + json.dumps(out), flush=True)
"""


def recording_dir(nim_image: str, root: Path = RECORD_ROOT) -> Path:
    """The folder of one NIM image's recording (the image reference made a file name)."""
    return root / re.sub(r"[^A-Za-z0-9._-]+", "_", nim_image)


def _run(client: docker.DockerClient, image: str, command: list[str], folder: Path, name: str,
         gpus: list[int] | None) -> tuple[int, str]:
    ended = run_to_exit(client, image, command, name=f"nimflow-record-{uuid.uuid4().hex[:8]}",
                        deadline_seconds=_DEADLINE_SECONDS, log_lines=3000, device_requests=device_requests(gpus or None))
    shown = " ".join(command[:2]) + " <script>" if command[1:2] == ["-c"] else " ".join(command)
    (folder / f"{name}.txt").write_text(f"$ {shown}\n# exit code {ended.exit_code}\n{ended.logs}\n")
    return (-1 if ended.exit_code is None else ended.exit_code), ended.logs


def _facts(client: docker.DockerClient, image: str, folder: Path, name: str, gpus: list[int] | None) -> dict[str, Any]:
    _, logs = _run(client, image, ["python3", "-c", FACTS_SCRIPT], folder, name, gpus)
    line = next((x for x in reversed(logs.splitlines()) if x.startswith(_MARKER)), None)
    facts: dict[str, Any] = json.loads(line[len(_MARKER):]) if line else {}
    facts["image"] = image
    facts["image_id"] = client.images.get(image).id
    facts["image_user"] = (client.images.get(image).attrs.get("Config") or {}).get("User") or ""
    (folder / f"{name}.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return facts


def _probe(client: docker.DockerClient, image: str, folder: Path, name: str) -> None:
    """What nimflow's own image probe finds in ``image`` (a fresh probe, not the host's cache)."""
    with tempfile.TemporaryDirectory(prefix="nimflow-record-") as cache:
        facts = probe_image(client, image, cache_dir=Path(cache))
    (folder / f"{name}.json").write_text(facts.model_dump_json(indent=1) + "\n")


def record_images(client: docker.DockerClient, nim_image: str, build_image: str | None, folder: Path, *,
                  gpus: list[int] | None = None) -> dict[str, str]:
    """Record the images' outputs into ``folder``; return the assumptions' verdicts (also in verdicts.json).

    Args:
        gpus: the GPUs each container gets (default ``[0]``; ``[]`` for none, as on the CPU test bed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    gpus = [0] if gpus is None else gpus
    _facts(client, nim_image, folder, "nim-image-facts", gpus)
    _probe(client, nim_image, folder, "nim-image-probe")
    _run(client, nim_image, ["nim-optimize", "-h"], folder, "nim-optimize-help", gpus)
    _run(client, nim_image, ["list-model-profiles"], folder, "list-model-profiles", gpus)
    _run(client, nim_image, ["python3", "-c", PROBE_SCRIPT], folder, "gpu-probe", gpus)
    builder = build_image or nim_image
    facts = _facts(client, builder, folder, "build-image-facts", gpus)
    _probe(client, builder, folder, "build-image-probe")
    converters = [str(path) for path in facts.get("converters", [])]
    (folder / "convert-checkpoint-locations.txt").write_text(
        f"$ find convert_checkpoint.py in {builder}\n# exit code 0\n" + "\n".join(converters) + "\n")
    for family in FAMILIES:
        script = next((p for p in converters if p.endswith(f"/{family.example_dir}/convert_checkpoint.py")), None)
        if script is not None:
            _run(client, builder, ["python3", script, "--help"], folder, converter_output_name(family.name), gpus)
    _run(client, builder, ["trtllm-build", "--help"], folder, "trtllm-build-help", gpus)
    return write_verdicts(folder)


def record_endpoint(endpoint: str, *, served_model_name: str, model_root: str, nim_api: str, folder: Path) -> dict[str, str]:
    """Record a running NIM's answers and what nimflow told it; return the verdicts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "deployment.json").write_text(json.dumps(
        {"served_model_name": served_model_name, "model_root": model_root, "nim_api": nim_api}, indent=2) + "\n")
    with httpx.Client(timeout=60) as http:
        for path in ("/v1/models", "/v1/metadata", "/v1/version"):
            response = http.get(f"{endpoint}{path}")
            if response.status_code == 200:
                (folder / f"{path.strip('/').replace('/', '-')}.json").write_text(
                    json.dumps(response.json(), indent=2, sort_keys=True) + "\n")
    return write_verdicts(folder)


def write_verdicts(folder: Path) -> dict[str, str]:
    """Check every assumption against the recording and save the verdicts next to it."""
    found = verdicts(folder)
    (folder / "verdicts.json").write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    return found

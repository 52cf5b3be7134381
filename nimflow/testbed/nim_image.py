"""Build the CPU stand-in for the NIM container (``nimflow/nim-standin:local``) with no registry.

Nothing can be pulled on the test bed, so ``FROM <image>`` is impossible. Following testbed.md §2,
the rootfs is the host's *Debian* ``python3.11`` (not a pyenv build: its stdlib lives in
``/usr/lib/python3.11`` and its libraries are the system ones) plus the ``ldd`` closure of the
interpreter and its extension modules, written straight into a tar and ``docker import``-ed
(about 60 MB, no shell, no apt). ``deployments/nim-standin/nim_standin.py`` goes to
``/opt/nim/nim_standin.py``; ``start-server``, ``nim-optimize``, ``list-model-profiles``,
``nvidia-smi``, ``trtllm-build`` (``/usr/local/bin``) and TensorRT-LLM's converters
``/app/tensorrt_llm/examples/models/core/<dir>/convert_checkpoint.py`` (one per family: llama, qwen,
gemma, phi; each with that family's own arguments) are symlinks to it (it dispatches on
``basename(argv[0])``, a converter on its directory), so they work without a shell.
``examples_layout="0.17"`` keeps the converters where TensorRT-LLM releases up to 0.17 did
(``/app/tensorrt_llm/examples/<dir>/``), ``"none"`` leaves them out (the newest TensorRT-LLM removed
the examples). A ``tensorrt_llm-<version>``
dist-info (metadata only: no module, ``import tensorrt_llm`` fails) in
``/usr/local/lib/python3.11/dist-packages`` gives the image a TensorRT-LLM version that
``importlib.metadata.version("tensorrt_llm")`` reports and that the stand-in binds its engines to.
The 1.x image also ships the stand-in's bundled ``/etc/nim/config/model_manifest.yaml``.

``nim_api="2.x"`` builds a NIM 2.x variant (label ``nimflow.nim-api=2.x``): CMD ``nim-serve``, no
``nim-optimize`` / ``trtllm-build`` / ``convert_checkpoint.py`` / TensorRT-LLM dist-info and no
manifest at the 1.x path (2.x has no TensorRT-LLM engines).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, ImageNotFound

from nimflow.bundled import bundled_file
from nimflow.image_probe import MANIFEST_CANDIDATES
from nimflow.testbed import TestbedError

STANDIN_IMAGE = "nimflow/nim-standin:local"
#: The suggested tag of the NIM 2.x variant (``build_standin_image(..., nim_api="2.x")``).
STANDIN_IMAGE_2X = "nimflow/nim-standin:2.x"
NIM_APIS = ("1.x", "2.x")
STANDIN_SOURCE = bundled_file("nim-standin", "nim_standin.py")
# Bump when the image recipe below changes: it is part of the cache key (the source-hash label).
RECIPE_VERSION = "nim-standin-image/5"
HOST_PYTHON = Path("/usr/bin/python3.11")
HOST_STDLIB = Path("/usr/lib/python3.11")
# Not needed at run time; config-3.11-* alone is the 25 MB static libpython.
_STDLIB_EXCLUDE = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "__pycache__",
                   "dist-packages", "site-packages"}
COMMANDS = ("start-server", "nim-optimize", "list-model-profiles", "nvidia-smi", "trtllm-build")
#: NIM 2.x: ``nim-serve`` replaces start-server; no engine tools.
COMMANDS_2X = ("nim-serve", "list-model-profiles", "nvidia-smi")
#: Where the NIM 1.x image keeps its bundled manifest (NIM 1.1.0 docs, profiles.html).
MANIFEST_PATH = "/etc/nim/config/model_manifest.yaml"
#: Where a 1.x image may keep it: the paths the image probe looks at (1.1.0 docs, later docs).
MANIFEST_PATHS = MANIFEST_CANDIDATES
#: Where TensorRT-LLM release images keep the converters, by layout: ``<root>/<dir>/convert_checkpoint.py``
#: (0.18 and later: examples/models/core; up to 0.17: examples; the newest: none).
EXAMPLES_LAYOUTS: dict[str, str | None] = {
    "0.18": "/app/tensorrt_llm/examples/models/core", "0.17": "/app/tensorrt_llm/examples", "none": None,
}
#: The examples directories the stand-in has a converter for (deployments/nim-standin CONVERTERS).
CONVERTER_DIRS = ("llama", "qwen", "gemma", "phi")
#: Where TensorRT-LLM release images keep the Llama converter (TensorRT-LLM 0.18+ layout).
CONVERT_CHECKPOINT = "/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py"
#: On Debian's python3.11 sys.path (site.getsitepackages) once the directory exists.
DIST_PACKAGES = "/usr/local/lib/python3.11/dist-packages"
_VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+!]*$")
CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV NIM_CACHE_PATH=/opt/nim/.cache",
    "ENV PYTHONUNBUFFERED=1",
    "ENV PYTHONDONTWRITEBYTECODE=1",  # the stdlib is read-only in spirit; no stray .pyc layers
    "ENV LANG=C.UTF-8",
    "WORKDIR /",
    "EXPOSE 8000",
    "LABEL nimflow.stand-in=true",
    'LABEL org.opencontainers.image.description="CPU stand-in for NVIDIA NIM (test bed only)"',
]


def image_changes(nim_api: str = "1.x") -> list[str]:
    """Dockerfile-style changes for ``docker import``: the common ones, CMD and the API label
    (1.x: TRT-LLM engines, nim-optimize, JIT; 2.x: nim-serve, NIM_MODEL_PATH, no engines)."""
    cmd = "nim-serve" if _nim_api(nim_api) == "2.x" else "start-server"
    return [*CHANGES, f'CMD ["/usr/local/bin/{cmd}"]', f"LABEL nimflow.nim-api={nim_api}"]


def _nim_api(nim_api: str) -> str:
    if nim_api not in NIM_APIS:
        raise TestbedError(f"nim_api {nim_api!r} is not one of {NIM_APIS}")
    return nim_api


def _standin_module(source: Path = STANDIN_SOURCE) -> Any:
    """The stand-in module, loaded from its file (stdlib only; importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("nimflow_nim_standin", source)
    if spec is None or spec.loader is None:
        raise TestbedError(f"cannot load {source}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bundled_manifest(source: Path = STANDIN_SOURCE) -> str:
    """The stand-in's ``BUNDLED_MANIFEST`` (the 1.x image's model_manifest.yaml)."""
    return str(_standin_module(source).BUNDLED_MANIFEST)


def standin_weights_digest(model_dir: Path) -> str:
    """What the stand-in shows as ``(weights <digest16>)`` for a model directory (or a LoRA
    adapter directory): the first 16 hex of a sha256 over its top-level weight files
    (``*.safetensors``, ``*.bin``, ``*.pth``, sorted by name), each as ``name\0size\0`` + bytes.
    Engines built from those weights (nim-optimize, JIT, convert_checkpoint.py + trtllm-build)
    answer with the same digest. Computed by the stand-in's own code, so the two cannot drift."""
    return str(_standin_module().weights_digest(Path(model_dir)))


def default_trtllm_version(source: Path = STANDIN_SOURCE) -> str:
    """``STANDIN_TRTLLM_VERSION`` of the stand-in source (read, not imported)."""
    m = re.search(r'^STANDIN_TRTLLM_VERSION = "([^"]+)"', source.read_text(), re.M)
    if not m:
        raise TestbedError(f"{source}: no STANDIN_TRTLLM_VERSION constant")
    return m.group(1)


def _trtllm_version(version: str | None, source: Path = STANDIN_SOURCE) -> str:
    version = default_trtllm_version(source) if version is None else version
    if not _VERSION_RE.match(version):
        raise TestbedError(f"trtllm_version {version!r} is not a version string (e.g. 0.17.0 or 1.2.1)")
    return version


def source_hash(source: Path = STANDIN_SOURCE, trtllm_version: str | None = None,
                nim_api: str = "1.x", examples_layout: str = "0.18", manifest_path: str = MANIFEST_PATH) -> str:
    """The cache key: sha256 of the stand-in source, this builder's recipe version, the
    TensorRT-LLM version the image reports, the NIM API mode and the examples layout (so variant
    images never pass for each other)."""
    version = _trtllm_version(trtllm_version, source)
    return hashlib.sha256(source.read_bytes() + RECIPE_VERSION.encode()
                          + b"\0tensorrt_llm=" + version.encode()
                          + b"\0nim_api=" + _nim_api(nim_api).encode()
                          + b"\0examples=" + _examples_layout(examples_layout).encode()
                          + b"\0manifest=" + _manifest_path(manifest_path).encode()).hexdigest()


def _manifest_path(path: str) -> str:
    if path not in MANIFEST_PATHS:
        raise TestbedError(f"manifest_path {path!r} is not one of {MANIFEST_PATHS}")
    return path


def _examples_layout(layout: str) -> str:
    if layout not in EXAMPLES_LAYOUTS:
        raise TestbedError(f"examples_layout {layout!r} is not one of {sorted(EXAMPLES_LAYOUTS)}")
    return layout



def source_tag(nim_api: str = "1.x", *, examples_layout: str = "0.18", trtllm_version: str | None = None,
               manifest_path: str = MANIFEST_PATH) -> str:
    """A tag naming this exact stand-in source, for tests: ``nimflow/nim-standin:src-<hash12>``
    (``src2x-`` for 2.x; a variant's layout or version adds ``ex<layout>-``/``trt<version>-``). Clones
    with different stand-in sources on one Docker host (helpers, branches) then never retag each
    other's image while their tests run."""
    prefix = "src2x" if _nim_api(nim_api) == "2.x" else "src"
    if examples_layout != "0.18":
        prefix += f"-ex{_examples_layout(examples_layout)}"
    if trtllm_version is not None:
        prefix += f"-trt{_trtllm_version(trtllm_version)}"
    if manifest_path != MANIFEST_PATH:
        prefix += f"-mf{MANIFEST_PATHS.index(_manifest_path(manifest_path))}"
    digest = source_hash(nim_api=nim_api, examples_layout=examples_layout, trtllm_version=trtllm_version,
                         manifest_path=manifest_path)
    return f"nimflow/nim-standin:{prefix}-{digest[:12]}"

def dist_info_metadata(version: str) -> bytes:
    """METADATA of the placeholder ``tensorrt_llm`` distribution (core metadata 2.1)."""
    return (f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n"
            "Summary: NIM STAND-IN placeholder, NOT TensorRT-LLM: metadata only, no module\n").encode()


def _ensure_host_python() -> None:
    """Debian's python3.11 is the image's interpreter; install it if this machine lacks it."""
    if HOST_PYTHON.is_file() and HOST_STDLIB.is_dir():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise TestbedError(f"{HOST_PYTHON} (Debian's python3.11) is missing: run "
                           "`sudo apt-get install -y python3.11`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "python3.11"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise TestbedError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")


def _shared_libs() -> list[str]:
    """Absolute paths of the libraries the interpreter and its extension modules load (ldd)."""
    targets = [str(HOST_PYTHON)] + sorted(str(p) for p in (HOST_STDLIB / "lib-dynload").glob("*.so"))
    proc = subprocess.run(["ldd", *targets], capture_output=True, text=True)
    libs = set(re.findall(r"(?<![\w.-])(/[^\s:]+\.so[^\s:]*)", proc.stdout))
    # ldd also prints each argument as a header line; those are already in the stdlib tree.
    return sorted(lib for lib in libs if not lib.startswith(str(HOST_STDLIB)) and os.path.exists(lib))


class _RootfsTar:
    """A tar of a rootfs, owned by root, with every parent directory present."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar, self.dirs = tar, {""}

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if path in self.dirs:
            return
        self.mkdir(os.path.dirname(path))
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
        self.tar.addfile(info)
        self.dirs.add(path)

    def add_file(self, src: str | Path, dest: str, mode: int | None = None) -> None:
        """Copy ``src`` (symlinks followed: the rootfs must not point outside itself) to ``dest``."""
        dest = dest.strip("/")
        self.mkdir(os.path.dirname(dest))
        info = self.tar.gettarinfo(os.path.realpath(src), arcname=dest)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if mode is not None:
            info.mode = mode
        with open(os.path.realpath(src), "rb") as fh:
            self.tar.addfile(info, fh)

    def add_bytes(self, data: bytes, dest: str, mode: int = 0o644) -> None:
        dest = dest.strip("/")
        self.mkdir(os.path.dirname(dest))
        info = tarfile.TarInfo(dest)
        info.size, info.mode, info.mtime = len(data), mode, 0
        self.tar.addfile(info, io.BytesIO(data))

    def add_symlink(self, target: str, dest: str) -> None:
        dest = dest.strip("/")
        self.mkdir(os.path.dirname(dest))
        info = tarfile.TarInfo(dest)
        info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 0
        self.tar.addfile(info)


def write_rootfs_tar(out: Path, source: Path = STANDIN_SOURCE, trtllm_version: str | None = None,
                     nim_api: str = "1.x", examples_layout: str = "0.18", manifest_path: str = MANIFEST_PATH) -> None:
    """Write the stand-in image's rootfs as an uncompressed tar at ``out``."""
    version = _trtllm_version(trtllm_version, source)
    v2 = _nim_api(nim_api) == "2.x"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        fs = _RootfsTar(tar)
        fs.add_file(HOST_PYTHON, "usr/bin/python3.11")
        fs.add_symlink("python3.11", "usr/bin/python3")
        for dirpath, dirnames, filenames in os.walk(HOST_STDLIB):
            # config-3.11-<arch> holds the static libpython (25 MB), only needed to embed Python.
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in _STDLIB_EXCLUDE and not d.startswith("config-"))
            rel = os.path.relpath(dirpath, "/")
            fs.mkdir(rel)
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    target = os.readlink(path)
                    if not os.path.isabs(target) and os.path.exists(path):  # keep in-tree links
                        fs.add_symlink(target, f"{rel}/{name}")
                    continue  # e.g. sitecustomize.py -> /etc/python3.11/... (host-only apport hook)
                fs.add_file(path, f"{rel}/{name}")
        for lib in _shared_libs():
            fs.add_file(lib, lib)
        fs.add_bytes(b"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                     b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", "etc/passwd")
        fs.add_bytes(b"root:x:0:\nnogroup:x:65534:\n", "etc/group")
        fs.mkdir("tmp", 0o1777)
        fs.mkdir("root", 0o700)
        fs.mkdir("opt/nim/.cache", 0o777)  # NIM containers run with -u <uid>: cache must be writable
        fs.add_file(source, "opt/nim/nim_standin.py", mode=0o755)
        for command in COMMANDS_2X if v2 else COMMANDS:  # dispatch on basename(argv[0])
            fs.add_symlink("/opt/nim/nim_standin.py", f"usr/local/bin/{command}")
        if v2:  # NIM 2.x: no TensorRT-LLM engine tools, no 1.x manifest
            return
        examples_root = EXAMPLES_LAYOUTS[_examples_layout(examples_layout)]
        for directory in CONVERTER_DIRS if examples_root else ():  # run as `python3 <path> ...`
            fs.add_symlink("/opt/nim/nim_standin.py", f"{examples_root}/{directory}/convert_checkpoint.py")
        dist_info = f"{DIST_PACKAGES}/tensorrt_llm-{version}.dist-info"
        fs.add_bytes(dist_info_metadata(version), f"{dist_info}/METADATA")
        fs.add_bytes(b"nimflow-standin\n", f"{dist_info}/INSTALLER")
        fs.add_bytes(bundled_manifest(source).encode(), _manifest_path(manifest_path))


def _split_tag(tag: str) -> tuple[str, str]:
    repo, sep, name = tag.rpartition(":")
    return (repo, name) if sep and "/" not in name else (tag, "latest")


def build_standin_image(client: docker.DockerClient, tag: str = STANDIN_IMAGE, *,
                        force: bool = False, trtllm_version: str | None = None, nim_api: str = "1.x",
                        examples_layout: str = "0.18", manifest_path: str = MANIFEST_PATH) -> str:
    """Build (or reuse) the NIM stand-in image and return its id.

    ``trtllm_version`` (default: the stand-in's ``STANDIN_TRTLLM_VERSION``) is the TensorRT-LLM
    version the image reports and binds its engines to; give variants their own ``tag``.
    ``nim_api="2.x"`` builds the NIM 2.x variant (suggested tag :data:`STANDIN_IMAGE_2X`).
    ``examples_layout`` (:data:`EXAMPLES_LAYOUTS`) places the converters as a TensorRT-LLM 0.18+
    (default), <= 0.17 or newest (none) release image does; ``manifest_path`` (:data:`MANIFEST_PATHS`)
    is where the 1.x image keeps, and the stand-in reads, its model manifest.
    Cached by tag: an image whose ``nimflow.source-hash`` label equals :func:`source_hash` (which
    covers the version) is returned as is unless ``force``. A superseded image is removed when no
    container uses it.
    """
    if not STANDIN_SOURCE.is_file():
        raise TestbedError(f"stand-in source not found at {STANDIN_SOURCE} (a broken install: reinstall nimflow)")
    version = _trtllm_version(trtllm_version)
    digest = source_hash(trtllm_version=version, nim_api=nim_api, examples_layout=examples_layout,
                         manifest_path=manifest_path)
    old_id = None
    try:
        old = client.images.get(tag)
        if old.labels.get("nimflow.source-hash") == digest and not force:
            return str(old.id)
        old_id = old.id
    except ImageNotFound:
        pass
    _ensure_host_python()
    repo, name = _split_tag(tag)
    with tempfile.TemporaryDirectory(prefix="nimflow-standin-") as tmp:
        tar_path = Path(tmp) / "rootfs.tar"
        write_rootfs_tar(tar_path, trtllm_version=version, nim_api=nim_api, examples_layout=examples_layout,
                         manifest_path=manifest_path)
        try:
            client.api.import_image_from_file(
                str(tar_path), repository=repo, tag=name,
                changes=[*image_changes(nim_api), f"LABEL nimflow.source-hash={digest}",
                         # 1.x: where the stand-in reads its manifest (real NIM: one fixed path per release)
                         *([f"ENV NIMSTANDIN_MANIFEST_PATH={_manifest_path(manifest_path)}"] if nim_api == "1.x" else []),
                         f"LABEL nimflow.trtllm-version={version}"])
        except APIError as exc:
            raise TestbedError(f"docker import of {tag} failed: {exc}") from exc
    image_id = str(client.images.get(tag).id)
    if old_id and old_id != image_id:
        with contextlib.suppress(APIError):  # now untagged: drop it unless a container holds it
            client.images.remove(old_id)
    return image_id


def main(argv: list[str] | None = None) -> int:
    """``python -m nimflow.testbed.nim_image [--tag T] [--force]``: ensure Docker, build, report."""
    from nimflow.testbed.docker_engine import ensure_docker_engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=None,
                        help=f"default {STANDIN_IMAGE} (1.x) or {STANDIN_IMAGE_2X} (2.x)")
    parser.add_argument("--nim-api", choices=NIM_APIS, default="1.x",
                        help="1.x: start-server, engines, manifest; 2.x: nim-serve, NIM_MODEL_PATH")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    parser.add_argument("--trtllm-version", default=None,
                        help="TensorRT-LLM version the image reports (default: the stand-in's own)")
    parser.add_argument("--examples-layout", choices=sorted(EXAMPLES_LAYOUTS), default="0.18",
                        help="where the converters are: 0.18 (examples/models/core), 0.17 (examples), none")
    args = parser.parse_args(argv)
    tag = args.tag or (STANDIN_IMAGE_2X if args.nim_api == "2.x" else STANDIN_IMAGE)
    try:
        client = ensure_docker_engine()
        start = time.monotonic()
        image_id = build_standin_image(client, tag, force=args.force, trtllm_version=args.trtllm_version,
                                       nim_api=args.nim_api, examples_layout=args.examples_layout)
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = client.images.get(image_id).attrs.get("Size", 0) / 1e6
    print(f"{tag} {image_id} ({size:.0f} MB) in {time.monotonic() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

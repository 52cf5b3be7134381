"""The one rule by which a name from outside becomes a path on this host.

S3 keys, engine-store manifest entries, ``*.index.json`` weight maps, hub file lists and the files of
a local directory are all written by someone else. Each name they carry becomes a path only through
:func:`contained_path`: relative, normalised, no ``..``, not absolute, no NUL or control characters,
bounded in length and depth, and the resolved target inside the destination directory. Anything
else is refused with an error naming the source and the offending name, before a byte is written.

Local directories are read through :func:`regular_files`: regular files only; a symbolic link is
followed only when it resolves inside the source directory, or, for a Hugging Face cache snapshot
(``models--org--name/snapshots/<sha>/file -> ../../blobs/<hash>``), inside that repo's ``blobs/``;
the caller copies the target's bytes, never the link.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from nimflow.errors import InvalidWeights, NimflowError

#: Longest name accepted (bytes of UTF-8): far above any real checkpoint's, below PATH_MAX.
MAX_NAME_BYTES = 1024
#: Deepest relative name accepted (path components).
MAX_DEPTH = 16


def safe_relative(name: object, *, source: str, error: type[NimflowError] = InvalidWeights) -> str:
    """Check a relative name from outside and return it normalised (POSIX, no ``.`` parts).

    Raises:
        error (default InvalidWeights): the name is not a string, empty, absolute, has ``..``, a NUL
            or another control character, a backslash, or is longer or deeper than the bounds.
    """
    def refuse(why: str) -> NimflowError:
        return error(f"{source}: refused the name {name!r}: {why}; names must be relative paths inside the directory")

    if not isinstance(name, str) or not name:
        raise refuse("not a non-empty string")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise refuse(f"longer than {MAX_NAME_BYTES} bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise refuse("it holds a NUL or control character")
    if "\\" in name:
        raise refuse("it holds a backslash")
    if name.startswith("/"):
        raise refuse("it is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refuse("it has a '..' component")
    if "//" in name.strip("/") or not parts:
        raise refuse("it has an empty component")
    if len(parts) > MAX_DEPTH:
        raise refuse(f"deeper than {MAX_DEPTH} directories")
    return str(PurePosixPath(*parts))


def contained_path(root: Path, name: object, *, source: str, error: type[NimflowError] = InvalidWeights) -> Path:
    """``root / name`` for a name from outside, once it is shown to stay inside ``root``.

    The name passes :func:`safe_relative`; then the target, with every symbolic link already on
    disk resolved, must lie under ``root`` resolved (a link planted in ``root`` cannot redirect a write).

    Raises:
        error (default InvalidWeights): the name is unsafe or its target resolves outside ``root``.
    """
    relative = safe_relative(name, source=source, error=error)
    base = root.resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise error(f"{source}: refused the name {name!r}: it resolves outside {root}")
    return base / relative


def link_roots(directory: Path) -> list[Path]:
    """Where a symbolic link in a local source may point: the directory itself and, for a Hugging
    Face cache snapshot (``<cache>/models--org--name/snapshots/<sha>``), that repo's ``blobs/``."""
    base = directory.resolve()
    roots = [base]
    repo = base.parent.parent
    if base.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        roots.append(repo / "blobs")
    return roots


def regular_files(directory: Path, *, source: str, error: type[NimflowError] = InvalidWeights) -> Iterator[tuple[str, Path]]:
    """Every file under a local directory from outside, as (relative name, path whose bytes to read).

    Regular files only. A symbolic link is accepted only when it resolves to a regular file inside
    ``directory`` or, when ``directory`` is a Hugging Face cache snapshot, inside the repo's
    ``blobs/`` (:func:`link_roots`); the path returned is then the resolved target, so a caller copies
    bytes, never the link. Hidden entries (``.git``, ``.cache``) are skipped.

    Raises:
        error (default InvalidWeights): a link that leaves the directory or dangles, a device, FIFO
            or socket, or an unsafe name; the message names the entry.
    """
    roots = link_roots(directory)
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for link in [d for d in dirnames if (here / d).is_symlink()]:
            dirnames.remove(link)  # a linked directory is refused below like a linked file would be
            filenames.append(link)
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = here / filename
            relative = safe_relative(path.relative_to(directory).as_posix(), source=source, error=error)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = path.resolve()
                if not any(root in target.parents for root in roots) or not target.is_file():
                    raise error(f"{source}: refused {relative}: it is a symbolic link to {os.readlink(path)!r}, "
                                "outside the directory (or to no regular file); copy the file in instead of linking it")
                yield relative, target
            elif stat.S_ISREG(mode):
                yield relative, path
            else:
                raise error(f"{source}: refused {relative}: not a regular file (a device, FIFO or socket)")

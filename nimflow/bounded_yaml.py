"""YAML written by someone else, read with bounds: file size, and how much aliases may add.

Hosting specs (anyone who can write the specs directory), NIM model manifests (taken from an image or
a file) and ``prefect.yaml`` are parsed here. Two hostile shapes are refused before anything walks
the data:

* a file larger than the caller's limit (specs: :data:`MAX_SPEC_BYTES`), read without ever holding
  more than the limit plus one byte, and only from a regular file (a FIFO would block the run);
* aliases that expand the document beyond :data:`MAX_ALIAS_NODES` nodes more than the file spells
  out, or that refer to a node from inside itself. PyYAML builds ``*alias`` as a shared reference,
  cheap to parse; but everything after it (validation, error messages, copies) walks the expanded
  tree: a 531-byte "billion laughs" file of nine nested levels of ten aliases is 10**9 nodes. The
  expanded size is computed on the composed node graph, once per distinct node, so the check costs
  time linear in the file.

Ordinary anchors (a repeated ``deploy`` block, a shared list) stay allowed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_MANIFEST_BYTES",
    "MAX_SPEC_BYTES",
    "AliasExpansionError",
    "BoundedSafeLoader",
    "UnreadableInput",
    "load",
    "read_text",
]

#: Largest hosting spec read (bytes); real specs are a few KiB.
MAX_SPEC_BYTES = 256 * 1024
#: Largest NIM model manifest read (bytes); NIM's own manifests with every profile are a few MiB.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
#: How many nodes aliases may add to a document beyond those the file spells out.
MAX_ALIAS_NODES = 10_000


class UnreadableInput(Exception):
    """The file is larger than its limit, or not a regular file; the message says which and the limit."""


class AliasExpansionError(yaml.MarkedYAMLError):
    """Aliases that expand the document beyond :data:`MAX_ALIAS_NODES` nodes, or refer to themselves."""


def read_text(path: Path, *, limit: int) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes.

    Opened without blocking (a FIFO named like a spec must not hang the run) and read up to
    ``limit + 1`` bytes, so an oversized or endless file costs at most that much memory.

    Raises:
        UnreadableInput: not a regular file, or more than ``limit`` bytes.
        OSError: the file cannot be opened or read (``FileNotFoundError`` when missing).
        UnicodeDecodeError: not UTF-8.
        ValueError: the path has a NUL character.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableInput("not a regular file (a directory, FIFO or device); give a YAML file")
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise UnreadableInput(f"larger than {limit} bytes, the most nimflow reads from such a file")
    return raw.decode("utf-8")


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses alias expansion beyond :data:`MAX_ALIAS_NODES` nodes (and recursive aliases)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._first_alias: yaml.Mark | None = None

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self._first_alias is None and self.check_event(AliasEvent):
            self._first_alias = self.peek_event().start_mark
        return super().compose_node(parent, index)

    def compose_document(self) -> Node | None:
        node = super().compose_document()
        if node is not None and self._first_alias is not None:
            _check_expansion(node, self._first_alias)
        return node


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _check_expansion(root: Node, alias_mark: yaml.Mark) -> None:
    """Refuse a node graph whose tree (aliases expanded) is too large, or that holds a cycle.

    Sizes are computed once per distinct node (an iterative post-order walk: no recursion limit),
    so the check is linear in the file even when the expansion is astronomical.

    Raises:
        AliasExpansionError: marked at the document's first alias.
    """
    def refuse(why: str) -> AliasExpansionError:
        return AliasExpansionError(
            problem=f"{why}; write the values out instead of aliasing them (aliases may add at most "
                    f"{MAX_ALIAS_NODES} nodes)",
            problem_mark=alias_mark,
        )

    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in _children(node))
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise refuse("an alias refers to a node from inside that node (a recursive structure)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)
    added = size[id(root)] - len(size)
    if added > MAX_ALIAS_NODES:
        raise refuse(f"its aliases expand it by {added} nodes")


def load(text: str, loader: type[BoundedSafeLoader] = BoundedSafeLoader) -> Any:
    """Parse one YAML document with a :class:`BoundedSafeLoader` (or a subclass).

    Raises:
        yaml.YAMLError: not YAML, or :class:`AliasExpansionError`.
        ValueError: a scalar PyYAML cannot build (``2001-99-99`` as a date).
        RecursionError: nested too deeply for the parser.
    """
    return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass

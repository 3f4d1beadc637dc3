"""Nested-dict parameter trees addressed by key paths (("model", "layers_3", "mamba", "D"))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def get_path(tree, path: Sequence[str]):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: Sequence[str], value) -> None:
    """Sets tree[path] = value, creating the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def copy_path(tree: dict, path: Sequence[str]) -> dict:
    """Shallow-copies the dicts along `path` inside `tree` and returns the last one, so writing into
    it leaves every other holder of the original tree untouched."""
    node = tree
    for p in path:
        node[p] = dict(node[p])
        node = node[p]
    return node


def key_path(path) -> tuple[str, ...]:
    """A jax tree path (DictKey / GetAttrKey / SequenceKey entries) as a tuple of strings."""
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def flat_items(tree) -> list[tuple[tuple[str, ...], Any]]:
    """[(key path, leaf)] of a tree, in jax's leaf order."""
    import jax

    return [(key_path(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]

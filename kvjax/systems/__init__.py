"""Serving systems around the cache: prefix sharing across an offline batch (BatchLLM)."""

from kvjax.systems.prefix_sharing import generate_shared
from kvjax.systems.prefix_tree import PrefixGroup, group_by_prefix

__all__ = ["PrefixGroup", "generate_shared", "group_by_prefix"]

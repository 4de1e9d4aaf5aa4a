"""Global prefix sharing for a known batch (BatchLLM): which requests share which prefix.

Every request is given one shared prefix (a node of the prefix tree over all requests'
token ids) and keeps the rest as its own suffix. The requests given the same node form a
group whose prefix is prefilled once. The assignment maximises the prefill tokens saved,
sum over groups of (members - 1) * prefix length, by a dynamic program over the radix
tree (BatchLLM flattens the tree to one level the same way). The last token of every
request is always left to its suffix: it is the token whose logits start decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kvjax import validation
from kvjax.errors import GenerationError


@dataclasses.dataclass(frozen=True)
class PrefixGroup:
  """Requests `members` (indices into the batch) share their first `prefix_length` tokens."""
  prefix_length: int
  members: tuple[int, ...]

  @property
  def saved_tokens(self) -> int:
    return (len(self.members) - 1) * self.prefix_length


@dataclasses.dataclass
class _Node:
  depth: int                  # tokens from the root
  ends: list                  # requests whose shareable part ends exactly here
  children: list


def _common_length(seqs: list, ids: list, start: int) -> int:
  """The length of the prefix all of `ids` share (all share the first `start` tokens)."""
  shortest = min(len(seqs[i]) for i in ids)
  first = seqs[ids[0]]
  n = start
  while n < shortest and all(seqs[i][n] == first[n] for i in ids):
    n += 1
  return n


def _radix_tree(seqs: list) -> _Node:
  """The path-compressed prefix tree: nodes only where requests branch or end."""
  root = _Node(depth=0, ends=[], children=[])
  stack = [(root, list(range(len(seqs))))]
  while stack:
    node, ids = stack.pop()
    by_token: dict = {}
    for i in ids:
      if len(seqs[i]) == node.depth:
        node.ends.append(i)
      else:
        by_token.setdefault(seqs[i][node.depth], []).append(i)
    for group in by_token.values():
      child = _Node(depth=_common_length(seqs, group, node.depth + 1), ends=[], children=[])
      node.children.append(child)
      stack.append((child, group))
  return root


def _postorder(root: _Node) -> list:
  order, stack = [], [(root, ())]
  while stack:
    node, ancestors = stack.pop()
    order.append((node, ancestors))
    for child in node.children:
      stack.append((child, ancestors + (node.depth,)))
  return order[::-1]


def group_by_prefix(token_ids: Sequence[Sequence[int]], min_prefix_tokens: int = 1
                    ) -> list[PrefixGroup]:
  """The prefix groups that save the most prefill tokens, among groupings whose shared
  prefixes are each at least `min_prefix_tokens` long (or empty: requests that share
  less stay in the group of the longest qualifying prefix above them, else with nothing).

  value(v, x): the most tokens saved by the requests under node v when an open group at
  depth x (an ancestor's, or 0 for none) is theirs to join: each joiner saves x. At v they
  either stay with that group or open v's own group (which costs v's depth once and lets
  every joiner below save v's depth). Ties keep the shallower group: fewer, larger groups.
  Requests that share nothing form one group with an empty prefix.
  """
  validation.integer("min_prefix_tokens", min_prefix_tokens, 1, error=GenerationError,
                     what="the shortest prefix worth a group of its own")
  seqs = []
  for i, ids in enumerate(token_ids):
    if len(ids) == 0 or not all(isinstance(t, (int, np.integer)) for t in ids):
      raise ValueError(f"prompt {i} must be a non-empty sequence of integer token ids, got "
                       f"{list(ids)[:8]}")
    seqs.append(tuple(int(t) for t in ids)[:-1])
  if not seqs:
    return []
  root = _radix_tree(seqs)
  value: dict = {}   # (id(node), x) -> (saved, opens)
  for node, ancestors in _postorder(root):
    for x in set(ancestors) | {0, node.depth}:
      stay = sum(value[id(c), x][0] for c in node.children) + len(node.ends) * x
      best = (stay, False)
      if node.depth > x and node.depth >= min_prefix_tokens:
        opened = (sum(value[id(c), node.depth][0] for c in node.children)
                  + len(node.ends) * node.depth - node.depth)
        if opened > stay:
          best = (opened, True)
      value[id(node), x] = best
  return _collect(root, value)


def _collect(root: _Node, value: dict) -> list[PrefixGroup]:
  """Walks the tree with the dynamic program's choices; each opened node is a group."""
  groups: dict = {}          # group key (id of the opening node, or None) -> (depth, members)
  stack = [(root, 0, None)]
  while stack:
    node, x, key = stack.pop()
    if value[id(node), x][1]:
      x, key = node.depth, id(node)
    depth_members = groups.setdefault(key, (x, []))
    depth_members[1].extend(node.ends)
    stack.extend((child, x, key) for child in node.children)
  out = [PrefixGroup(prefix_length=depth, members=tuple(sorted(m)))
         for depth, m in groups.values() if m]
  return sorted(out, key=lambda g: g.members[0])


def saved_tokens(groups: Sequence[PrefixGroup]) -> int:
  return sum(g.saved_tokens for g in groups)

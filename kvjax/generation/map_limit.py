"""Keeps a long-running process (a sweep, a server) under the kernel's limit on memory
mappings (vm.max_map_count).

XLA:CPU maps every compiled module's code and data separately (about three mappings per
module), and JAX keeps compiled functions cached for the life of the process. A sweep
compiles thousands of (method, shape) programs; at 65530 mappings the next one fails with
"LLVM compilation error: Cannot allocate memory" and the process segfaults (seen twice in
a 13-variant Qwen2.5-0.5B sweep at 2K, with 5 of 24 GiB in use). Dropping the compiled
caches unmaps their code; what is needed again is recompiled (or read from the disk cache).
"""

from __future__ import annotations

import jax
from absl import logging

from kvjax.generation import engine

# Past this share of the limit, a sweep drops its compiled code between batches and a
# server before an admission.
SHARE = 0.5


def _count(path: str) -> int | None:
  try:
    with open(path) as f:
      return sum(1 for _ in f)
  except OSError:   # not Linux: nothing to watch
    return None


def _limit(path: str = "/proc/sys/vm/max_map_count") -> int | None:
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


def mappings() -> int | None:
  """This process's memory mappings (None where /proc is not there)."""
  return _count("/proc/self/maps")


def release_if_near_limit(share: float = SHARE) -> bool:
  """Drops every compiled function JAX and kvjax hold when this process uses more than
  `share` of vm.max_map_count mappings; True when it did."""
  used, limit = mappings(), _limit()
  if used is None or limit is None or used <= share * limit:
    return False
  jax.clear_caches()
  engine.STEPS.clear()
  logging.info("%d of %d memory mappings in use: compiled code dropped (%s left)", used,
               limit, mappings())
  return True

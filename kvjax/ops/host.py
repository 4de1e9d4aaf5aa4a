"""Reading device arrays back to the host, also when their shards live in other processes
(a multi-process run, kvjax.sharding.distributed): here, below the cache layer, so that
host-side cache logic can use it."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def host_array(x) -> np.ndarray:
  """x as a numpy array on this host, gathered from the other processes when some of its
  shards live there (every process must call this for the same array, in the same order)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)

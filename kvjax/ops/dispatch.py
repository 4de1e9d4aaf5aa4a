"""Whether kvjax runs its Pallas kernels or their jnp references.

KVJAX_PALLAS=1 forces the kernels (in interpret mode on CPU, for tests); =0 forces jnp.
The choice is read while tracing, so compiled-step caches key on it.
"""

from __future__ import annotations

import os

import jax


def use_pallas() -> bool:
  forced = os.environ.get("KVJAX_PALLAS")
  if forced is not None:
    return forced not in ("0", "false", "")
  return jax.default_backend() in ("gpu", "tpu")

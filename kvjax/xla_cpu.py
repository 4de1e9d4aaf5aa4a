"""XLA:CPU options kvjax sets before JAX starts its CPU backend.

XLA reads `XLA_FLAGS` once, when the first computation starts the backend, so `import
kvjax` appends its defaults there (an option the user already set is left as set; a backend
already started keeps what it had). On 2 cores, sweeps under jax 0.10.2 stopped for good
inside XLA every few minutes (every XLA thread idle, the main thread waiting for a result:
`kvjax.evaluation.stall`); with XLA:CPU's concurrency-optimized scheduler off, the same
GEAR sweep ran without a stall (see the README's evaluation section for the numbers).
`KVJAX_XLA_DEFAULTS=0` leaves XLA_FLAGS alone.
"""

from __future__ import annotations

import os

DEFAULTS = {"xla_cpu_enable_concurrency_optimized_scheduler": "false"}
OPT_OUT_ENV = "KVJAX_XLA_DEFAULTS"


def with_defaults(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) with each default option the value does not set."""
  added = [f"--{name}={value}" for name, value in DEFAULTS.items() if name not in flags]
  return " ".join([flags.strip()] + added).strip()


def apply_defaults(environ=os.environ) -> None:
  if environ.get(OPT_OUT_ENV) == "0":
    return
  environ["XLA_FLAGS"] = with_defaults(environ.get("XLA_FLAGS", ""))

"""XLA:CPU options kvjax sets before JAX starts its CPU backend.

XLA reads `XLA_FLAGS` once, when the first computation starts the backend, so `import
kvjax` appends its defaults there (an option the user already set is left as set; a backend
already started keeps what it had). On 2 cores, sweeps under jax 0.10.2 stopped for good
inside XLA every few minutes (every XLA thread idle, the main thread waiting for a result:
`kvjax.evaluation.stall`); with XLA:CPU's concurrency-optimized scheduler off, the same
GEAR sweep ran without a stall (see the README's evaluation section for the numbers).
`KVJAX_XLA_DEFAULTS=0` leaves XLA_FLAGS alone.

XLA:CPU takes each call's buffers from the C heap. With glibc's defaults, allocations over
32 MiB are fresh mmaps and freed memory above 128 KiB at the heap's top goes back to the
system, so every call touches fresh pages again (page faults and zeroing, per layer when
the prefill runs one layer per call). `import kvjax` therefore asks glibc (mallopt) to serve
allocations up to 1 GiB from the heap (a worker thread's arena still maps what exceeds its
64 MiB heaps) and to keep up to 64 MiB of freed memory there
(`MALLOC_DEFAULTS`: a 2K-token SmolLM2 prefill ran 15-25% faster, the process's peak
resident memory grew about 12%; the README's speed section has the numbers).
`KVJAX_MALLOC_DEFAULTS=0`, or a user's own MALLOC_* / glibc.malloc tunables, leave malloc
alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

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


# mallopt parameters (glibc's <malloc.h>).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_DEFAULTS = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: 64 << 20, M_TOP_PAD: 64 << 20}
MALLOC_OPT_OUT_ENV = "KVJAX_MALLOC_DEFAULTS"
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "MALLOC_MMAP_MAX_")


def tune_malloc(environ=os.environ, libc=None) -> bool:
  """Sets MALLOC_DEFAULTS with glibc's mallopt; whether they were set. `libc`: the C
  library to call (None: glibc's, on Linux; elsewhere nothing is done)."""
  if environ.get(MALLOC_OPT_OUT_ENV) == "0" or any(name in environ for name in _USER_MALLOC_ENV):
    return False
  if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
    return False
  try:
    if libc is None:
      if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
      libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success. glibc before 2.35 refuses mmap thresholds above 32 MiB;
    # the other options alone would freeze its threshold at 128 KiB (worse than its
    # default), so nothing more is set then.
    if libc.mallopt(M_MMAP_THRESHOLD, MALLOC_DEFAULTS[M_MMAP_THRESHOLD]) != 1:
      return False
    return all([libc.mallopt(option, value) == 1 for option, value in MALLOC_DEFAULTS.items()
                if option != M_MMAP_THRESHOLD])
  except (OSError, AttributeError):  # no usable C library: malloc keeps its defaults
    return False

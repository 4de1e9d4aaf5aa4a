"""Restarts a resumable process that has stopped making progress (a sweep on XLA:CPU).

Long evaluation sweeps on XLA:CPU (jax 0.10.2) sometimes stop for good: the main thread
waits inside XLA for a computation that never runs while every XLA thread idles (with
async dispatch off: inside the executable's launch, waiting on an input that reports
ready). Seen in sweeps of several families, at the second or a later batch of one process;
the same batch finishes in a new process. Still seen with cache donation off, async
dispatch off, single-threaded Eigen, the persistent compilation cache off and a freshly
allocated initial cache, each tried on a reproducer (GEAR, qa_squad, 1K) that stalls
at its second batch in most runs. With XLA:CPU's concurrency-optimized scheduler off
(which `import kvjax` now sets, kvjax/xla_cpu.py) the GEAR sweep that had stalled 15 times
in 8 batches ran 22 batches without one; the watchdog stays as a safety net. Sweeps append
their records batch by batch and resume
from them, so the workaround is a watchdog: when the process has used no CPU for
`stall_seconds`, it re-executes itself with the same command line and carries on from the
last finished batch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Callable

from absl import logging

RESTARTS_ENV = "KVJAX_STALL_RESTARTS"   # how many times this command has been restarted


@dataclasses.dataclass
class StallDetector:
  """Says a process is stalled once its CPU time has not grown by `min_cpu_seconds` for
  `stall_seconds` of wall time. Clocks are injectable for tests."""
  stall_seconds: float
  min_cpu_seconds: float = 0.5
  wall_clock: Callable[[], float] = time.monotonic
  cpu_clock: Callable[[], float] = time.process_time   # every thread of this process

  def __post_init__(self):
    if not self.stall_seconds > 0:
      raise ValueError(f"stall_seconds={self.stall_seconds!r} must be > 0")
    self._since, self._cpu = self.wall_clock(), self.cpu_clock()

  def stalled(self) -> bool:
    now, cpu = self.wall_clock(), self.cpu_clock()
    if cpu - self._cpu >= self.min_cpu_seconds:
      self._since, self._cpu = now, cpu
      return False
    return now - self._since >= self.stall_seconds


def restarts() -> int:
  """How many times the current command has been restarted by the watchdog."""
  try:
    return int(os.environ.get(RESTARTS_ENV, "0"))
  except ValueError:
    return 0


def restart_on_stall(stall_seconds: float, max_restarts: int = 20, *,
                     check_every: float | None = None,
                     restart: Callable[[], None] | None = None) -> threading.Thread | None:
  """Starts a daemon thread that re-executes this process (same interpreter, same argv)
  when it stalls; at most `max_restarts` times per command, then it only logs. Returns the
  thread, or None when `stall_seconds` is 0 (off)."""
  if stall_seconds == 0:
    return None
  detector = StallDetector(stall_seconds)
  check_every = check_every or min(30.0, stall_seconds / 4)
  restart = restart or _exec_self

  def watch():
    while True:
      time.sleep(check_every)
      if not detector.stalled():
        continue
      count = restarts()
      if count >= max_restarts:
        logging.error("no CPU used for %.0f s; already restarted %d times, not again",
                      stall_seconds, count)
        return
      logging.warning("no CPU used for %.0f s (an XLA:CPU stall): restarting (%d of %d) to "
                      "resume from the last finished batch", stall_seconds, count + 1,
                      max_restarts)
      os.environ[RESTARTS_ENV] = str(count + 1)
      restart()
      return

  thread = threading.Thread(target=watch, name="kvjax-stall-watchdog", daemon=True)
  thread.start()
  return thread


def _exec_self() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv keeps what argv drops: interpreter options (-X, -W) and `-m module`.
  os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])

"""The stall watchdog that restarts a resumable sweep (kvjax.evaluation.stall)."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from kvjax.evaluation import stall


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_detector_needs_a_whole_window_without_cpu():
  wall, cpu = Clock(), Clock()
  d = stall.StallDetector(100.0, wall_clock=wall, cpu_clock=cpu)
  wall.now, cpu.now = 60.0, 0.1
  assert not d.stalled()          # 60 s without CPU: not yet
  wall.now, cpu.now = 99.0, 0.4
  assert not d.stalled()          # 0.4 CPU seconds is below the threshold, 99 s
  wall.now = 100.0
  assert d.stalled()              # a full window with under 0.5 CPU seconds
  cpu.now = 1.0                   # work resumed: the window restarts here
  assert not d.stalled()
  wall.now = 199.0
  assert not d.stalled()
  wall.now = 200.0
  assert d.stalled()
  with pytest.raises(ValueError, match="stall_seconds=0"):
    stall.StallDetector(0)


def test_watchdog_restarts_a_process_that_waits_and_counts(monkeypatch):
  monkeypatch.delenv(stall.RESTARTS_ENV, raising=False)
  restarted = threading.Event()
  thread = stall.restart_on_stall(0.3, max_restarts=2, check_every=0.05,
                                  restart=restarted.set)
  assert restarted.wait(10), "a process that uses no CPU is restarted"
  thread.join(5)
  assert os.environ[stall.RESTARTS_ENV] == "1" and stall.restarts() == 1
  # At the limit it only logs.
  monkeypatch.setenv(stall.RESTARTS_ENV, "2")
  again = threading.Event()
  thread = stall.restart_on_stall(0.3, max_restarts=2, check_every=0.05, restart=again.set)
  thread.join(10)
  assert not thread.is_alive() and not again.is_set()
  assert stall.restart_on_stall(0) is None


def test_a_stalled_script_is_re_executed_with_its_arguments(tmp_path):
  """The real restart: the first run blocks forever without CPU; the re-executed one sees
  its restart count and the same argv, and finishes."""
  script = tmp_path / "job.py"
  script.write_text(textwrap.dedent("""
      import sys, threading
      from kvjax.evaluation import stall
      if stall.restarts():
        print("resumed", stall.restarts(), sys.argv[1:], sys.flags.utf8_mode)
        sys.exit(0)
      stall.restart_on_stall(0.5, check_every=0.1)
      threading.Event().wait()
  """))
  env = dict(os.environ)
  env.pop(stall.RESTARTS_ENV, None)
  env.pop("PYTHONUTF8", None)   # utf8 mode must come from the -X option alone
  done = subprocess.run([sys.executable, "-X", "utf8", str(script), "--flag=1"],
                        capture_output=True,
                        text=True, timeout=120, env=env, cwd=os.getcwd())
  assert done.returncode == 0, done.stderr
  assert "resumed 1 ['--flag=1'] 1" in done.stdout   # interpreter options kept too

"""kvjax's XLA:CPU defaults (appended to XLA_FLAGS at import, never over a user's
choice, and glibc's malloc options), and the program shapes chosen for XLA:CPU."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kvjax import xla_cpu
from kvjax.ops import rope
from method_inputs import rope_np

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def test_defaults_are_added_beside_other_flags():
  assert xla_cpu.with_defaults("") == FLAG
  assert xla_cpu.with_defaults(" --xla_force_host_platform_device_count=8 ") == (
      "--xla_force_host_platform_device_count=8 " + FLAG)


def test_a_users_own_setting_is_kept():
  mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  assert xla_cpu.with_defaults(mine) == mine


def test_opting_out_leaves_the_environment_alone():
  environ = {"KVJAX_XLA_DEFAULTS": "0", "XLA_FLAGS": "--a=1"}
  xla_cpu.apply_defaults(environ)
  assert environ["XLA_FLAGS"] == "--a=1"
  environ = {}
  xla_cpu.apply_defaults(environ)
  assert environ["XLA_FLAGS"] == FLAG


def test_import_sets_the_flag_and_xla_accepts_it():
  """In a fresh process: `import kvjax` sets the option before the backend starts, and
  XLA starts with it (an option XLA no longer knows would abort the backend here)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KVJAX_XLA_DEFAULTS")}
  code = ("import os, kvjax, jax, jax.numpy as jnp; "
          "print(int(jax.jit(lambda x: x + 1)(jnp.int32(1)))); print(os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.split("\n")
  assert lines[0] == "2" and lines[1] == FLAG


class _RecordingLibc:

  def __init__(self, answer=1):
    self.calls, self.answer = [], answer

  def mallopt(self, option, value):
    self.calls.append((option, value))
    return self.answer


def test_malloc_keeps_large_buffers_in_the_heap():
  libc = _RecordingLibc()
  assert xla_cpu.tune_malloc({}, libc)
  assert dict(libc.calls) == {-3: 1 << 30, -1: 64 << 20, -2: 64 << 20}
  # An old glibc refusing the mmap threshold gets nothing else (the rest would freeze its
  # threshold low).
  refusing = _RecordingLibc(answer=0)
  assert not xla_cpu.tune_malloc({}, refusing)
  assert refusing.calls == [(-3, 1 << 30)]

  class NoMallopt:
    pass

  assert not xla_cpu.tune_malloc({}, NoMallopt())


def test_malloc_is_left_alone_when_asked_or_set_by_the_user():
  for environ in ({"KVJAX_MALLOC_DEFAULTS": "0"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                  {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}):
    libc = _RecordingLibc()
    assert not xla_cpu.tune_malloc(environ, libc)
    assert libc.calls == []
  libc = _RecordingLibc()
  assert xla_cpu.tune_malloc({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, libc)


def test_glibc_accepts_the_malloc_options():
  """On Linux with glibc 2.35 or later the real mallopt takes every option; elsewhere (an
  older glibc refuses the 1 GiB mmap threshold) nothing is set."""
  import platform
  glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
  if glibc:
    major, minor = os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2]
    glibc = (int(major), int(minor)) >= (2, 35)
  assert xla_cpu.tune_malloc({}) == glibc


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a choice made for XLA:CPU")
def test_a_prefill_chunks_rope_tables_come_out_of_a_conditional(monkeypatch):
  """On CPU a long chunk's cos/sin tables are computed in a conditional (once per token;
  fused into the rotation XLA computed them once per head and dimension), with the fused
  form's result; a decode step's few angles keep the fused form."""
  inv_freq = (1.0 / 10000 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 64, 9, 64)).astype(np.float32)   # 64 x 32 = 2048 angles
  positions = np.arange(64, dtype=np.int32)[None] - 3          # three padding slots
  rotate = lambda x, p: rope.apply_rope(x, p, inv_freq)
  compiled = jax.jit(rotate).lower(x, positions).compile()
  assert " conditional(" in compiled.as_text()   # the HLO instruction
  got = np.asarray(compiled(x, positions))
  np.testing.assert_allclose(got, rope_np(x, positions, inv_freq), atol=2e-5)
  monkeypatch.setattr(rope, "MATERIALISED_ANGLES", 1 << 30)
  fused = jax.jit(lambda x, p: rope.apply_rope(x, p, inv_freq)).lower(x, positions).compile()
  assert " conditional(" not in fused.as_text()
  np.testing.assert_allclose(got, np.asarray(fused(x, positions)), rtol=0, atol=1e-6)
  monkeypatch.undo()
  step = jax.jit(rotate).lower(x[:, :1], positions[:, :1]).compile()
  assert " conditional(" not in step.as_text()
  np.testing.assert_allclose(np.asarray(step(x[:, :1], positions[:, :1])),
                             rope_np(x[:, :1], positions[:, :1], inv_freq), atol=2e-5)

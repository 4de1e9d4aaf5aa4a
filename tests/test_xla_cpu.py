"""kvjax's XLA:CPU defaults: appended to XLA_FLAGS at import, never over a user's choice."""

import os
import subprocess
import sys

from kvjax import xla_cpu

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

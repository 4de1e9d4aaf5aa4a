"""kvjax dispatches CPU computations inline (JAX's async CPU dispatch hung long sweeps)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ("import jax, kvjax; from jax._src import xla_bridge; "
          "print(xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)")


@pytest.mark.parametrize("env_value, expected", [(None, "False"), ("1", "True"),
                                                 ("0", "False")])
def test_inline_dispatch_unless_the_user_chose(env_value, expected):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("KVJAX_CPU_ASYNC_DISPATCH", None)
  if env_value is not None:
    env["KVJAX_CPU_ASYNC_DISPATCH"] = env_value
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == expected

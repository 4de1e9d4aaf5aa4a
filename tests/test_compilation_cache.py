"""The persistent compilation cache: a second process loads kvjax's steps from disk."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys
import jax
sys.path.insert(0, {tests!r})
if {user_dir!r}:
  jax.config.update("jax_compilation_cache_dir", {user_dir!r})
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
if {min_seconds!r} is not None:
  # The tiny model's steps compile in about kvjax's 0.2 s threshold: keep every one, so
  # what is written does not depend on the machine's load.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", {min_seconds!r})
import kvjax
from kvjax.generation import engine
from tiny import tiny_model
kvjax.generate(tiny_model(), [[1, 2, 3, 4, 5]], max_new_tokens=3)
print(json.dumps(dict(directory=jax.config.jax_compilation_cache_dir,
                      min_seconds=jax.config.jax_persistent_cache_min_compile_time_secs,
                      max_size=jax.config.jax_compilation_cache_max_size)))
"""


def _run(env_value, user_dir="", min_seconds=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if env_value is None:
    env.pop("KVJAX_COMPILATION_CACHE", None)
  else:
    env["KVJAX_COMPILATION_CACHE"] = env_value
  code = SCRIPT.format(tests=str(ROOT / "tests"), user_dir=user_dir, min_seconds=min_seconds)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  report["stderr"] = out.stderr
  return report


def _entries(directory):
  return sorted(p.name for p in pathlib.Path(directory).iterdir() if "cache" in p.name)


def test_kvjax_keeps_steps_that_compile_in_over_a_fifth_of_a_second(tmp_path):
  report = _run(str(tmp_path / "xla"))
  assert report["directory"] == str(tmp_path / "xla")
  assert report["min_seconds"] == 0.2 and report["max_size"] > 0


def test_second_process_reuses_the_steps_on_disk(tmp_path):
  first = _run(str(tmp_path / "xla"), min_seconds=0.0)
  assert first["directory"] == str(tmp_path / "xla")
  written = _entries(tmp_path / "xla")
  for step in ("prefill_embed", "prefill_layer", "prefill_logits", "decode_loop"):
    assert any(step in name for name in written), step
  _run(str(tmp_path / "xla"), min_seconds=0.0)
  # Every step was found on disk: nothing new was compiled and written.
  assert _entries(tmp_path / "xla") == written


def test_an_entry_left_by_a_killed_process_does_not_block_writes(tmp_path):
  # A process killed between writing an entry and its access time left this behind.
  directory = tmp_path / "xla"
  directory.mkdir()
  (directory / "jit_orphan-0123-cache").write_bytes(b"left behind")
  report = _run(str(directory), min_seconds=0.0)
  assert "Error writing persistent compilation cache" not in report["stderr"]
  assert any("prefill" in name for name in _entries(directory))
  assert (directory / "jit_orphan-0123-atime").exists()


@pytest.mark.parametrize("value", ["0", "off"])
def test_it_can_be_turned_off(value):
  assert _run(value)["directory"] is None


def test_a_users_own_settings_win(tmp_path):
  report = _run(None, user_dir=str(tmp_path / "mine"))
  assert report["directory"] == str(tmp_path / "mine")
  assert report["min_seconds"] == 7.0

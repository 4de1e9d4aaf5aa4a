"""Orbax checkpoints and the convert script: exact round trips."""

import subprocess
import sys

import jax
import numpy as np

import kvjax
from checkpoints_conversion import orbax_io
from hf_models import save_tiny
from kvjax.model import to_flat_params
from tiny import tiny_model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _assert_same_params(a, b):
  fa, fb = to_flat_params(a), to_flat_params(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    assert fa[name].dtype == fb[name].dtype, name
    np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


def test_save_load_round_trip_is_exact(tmp_path):
  model = tiny_model(seed=5, architecture="qwen2", qkv_bias=True)
  path = orbax_io.save(model, tmp_path / "ckpt")
  restored = kvjax.load(path)
  assert restored.config == model.config
  _assert_same_params(model, restored)
  prompt = list(range(1, 20))
  assert (kvjax.generate(restored, prompt, max_new_tokens=6).token_ids ==
          kvjax.generate(model, prompt, max_new_tokens=6).token_ids)


def test_bfloat16_round_trip(tmp_path):
  model = tiny_model(seed=6, dtype="bfloat16")
  restored = kvjax.load(orbax_io.save(model, tmp_path / "bf16"))
  assert jax.tree_util.tree_leaves(restored.params)[0].dtype == "bfloat16"
  _assert_same_params(model, restored)


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
  model = tiny_model()
  path = orbax_io.save(model, tmp_path / "c")
  try:
    orbax_io.save(model, path)
  except kvjax.CheckpointError as e:
    assert "overwrite=True" in str(e)
  else:
    raise AssertionError("expected CheckpointError")
  other = tiny_model(seed=9)
  orbax_io.save(other, path, overwrite=True)
  _assert_same_params(other, kvjax.load(path))
  assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no staging or old dirs left


def test_convert_script_hf_to_orbax(tmp_path):
  hf_dir = save_tiny("qwen2", tmp_path / "hf")
  dst = tmp_path / "converted"
  out = subprocess.run([sys.executable, str(ROOT / "scripts/convert.py"), f"--src={hf_dir}",
                        f"--dst={dst}"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "wrote" in out.stdout
  _assert_same_params(kvjax.load(hf_dir), kvjax.load(dst))


def test_conversion_layout_matches_the_model_parameters():
  """The converters' canonical names/shapes are exactly what the NNX model declares."""
  from flax import nnx
  from checkpoints_conversion.layout import expected_shapes
  from kvjax.model import abstract_params
  from kvjax.model.model import _flatten
  for overrides in ({}, dict(architecture="qwen2", qkv_bias=True, tie_embeddings=False),
                    dict(tie_embeddings=True)):
    config = tiny_model(**overrides).config
    _, state = abstract_params(config)
    declared = {n: tuple(x.shape) for n, x in _flatten(nnx.to_pure_dict(state)).items()}
    assert declared == expected_shapes(config)

"""Every public entry point rejects bad input with an error naming the value and the range."""

import json

import pytest

import kvjax
from checkpoints_conversion import orbax_io
from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def test_unknown_model_name_lists_registry():
  with pytest.raises(kvjax.UnknownModelError, match="smollm2-135m") as err:
    kvjax.load("llama-9000")
  assert "llama-9000" in str(err.value)


def test_bad_dtype():
  with pytest.raises(kvjax.KvjaxError, match="float16"):
    kvjax.load("smollm2-135m", dtype="float16")


def test_truncated_gguf(tmp_path, smollm2_gguf):
  bad = tmp_path / "cut.gguf"
  bad.write_bytes(smollm2_gguf.read_bytes()[: 3 << 20])
  with pytest.raises(kvjax.CheckpointError, match="cut.gguf"):
    kvjax.load(bad)


def test_not_a_gguf(tmp_path):
  bad = tmp_path / "noise.gguf"
  bad.write_bytes(b"definitely not gguf" * 100)
  with pytest.raises(kvjax.CheckpointError, match="noise.gguf"):
    kvjax.load(bad)


@pytest.fixture
def checkpoint(tmp_path, model):
  return orbax_io.save(model, tmp_path / "ckpt")


def _edit_config(checkpoint, **changes):
  path = checkpoint / orbax_io.CONFIG_FILE
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_checkpoint_config_mismatch_names_tensor_and_shapes(checkpoint):
  _edit_config(checkpoint, intermediate_size=96)
  with pytest.raises(kvjax.CheckpointError, match=r"mlp\.down\.kernel.*\(128, 64\).*\(96, 64\)"):
    kvjax.load(checkpoint)


def test_checkpoint_with_missing_layer(checkpoint):
  _edit_config(checkpoint, num_layers=3)
  with pytest.raises(kvjax.CheckpointError, match=r"missing tensors \['layers\.2\."):
    kvjax.load(checkpoint)


def test_corrupt_checkpoint_files(checkpoint):
  for path in sorted((checkpoint / orbax_io.PARAMS_DIR).rglob("*")):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:100])  # truncate the array data
  with pytest.raises(kvjax.CheckpointError, match="params"):
    kvjax.load(checkpoint)


def test_unknown_config_field(checkpoint):
  _edit_config(checkpoint, sliding_window=4)
  with pytest.raises(kvjax.ConfigError, match="sliding_window"):
    kvjax.load(checkpoint)


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch, smollm2_gguf):
  from kvjax.loading import assets, converted, load as load_lib
  monkeypatch.setattr(assets, "fetch", lambda name, cache=None: smollm2_gguf)

  def failing_conversion(path, dtype=None):
    raise kvjax.CheckpointError("conversion failed half-way")

  monkeypatch.setattr(converted, "iter_gguf", failing_conversion)
  with pytest.raises(kvjax.CheckpointError, match="half-way"):
    kvjax.load("smollm2-135m", cache=tmp_path)
  assert not load_lib.converted_path("smollm2-135m", tmp_path).exists()


def test_interrupted_save_leaves_nothing(tmp_path, model, monkeypatch):
  import orbax.checkpoint as ocp

  def crash(self, *args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
  with pytest.raises(KeyboardInterrupt):
    orbax_io.save(model, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_prompt_longer_than_context(model):
  with pytest.raises(kvjax.GenerationError, match=r"600.*512|512.*600"):
    kvjax.generate(model, list(range(1, 256)) * 2 + list(range(90)), max_new_tokens=10)


def test_prompt_plus_new_tokens_longer_than_context(model):
  with pytest.raises(kvjax.GenerationError, match="max_new_tokens=100"):
    kvjax.generate(model, list(range(1, 256)) + list(range(1, 200)), max_new_tokens=100)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0.0), r"top_p=0.0.*\(0, 1\]"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(seed="x"), "seed='x'"),
    (dict(stop=""), "stop=''"),
    (dict(stream="yes"), "stream='yes'"),
    (dict(method="snapkv-9"), r"unknown method 'snapkv-9'.*available.*full"),
    (dict(compression_ratio=1.0), r"compression_ratio=1.0.*\[0, 1\)"),
    (dict(compression_ratio=-0.1), r"compression_ratio=-0.1"),
    (dict(budget=0), "budget=0"),
    (dict(budget=5, compression_ratio=0.5), "not both"),
    (dict(compression_ratio=0.5), "method 'full' keeps the whole cache"),
])
def test_invalid_generate_arguments(model, kwargs, pattern):
  with pytest.raises(kvjax.GenerationError, match=pattern):
    kvjax.generate(model, list(range(10)), **kwargs)


def test_invalid_prompts(model):
  with pytest.raises(kvjax.GenerationError, match="prompts"):
    kvjax.generate(model, [])
  with pytest.raises(kvjax.GenerationError, match="no tokenizer"):
    kvjax.generate(model, "text needs a tokenizer")
  with pytest.raises(kvjax.GenerationError, match="2 questions for 3 prompts"):
    kvjax.generate(model, [[1], [2], [3]], questions=[[4], [5]])


def test_unknown_method_hyperparameter():
  with pytest.raises(kvjax.GenerationError, match=r"no hyperparameters \['window'\]"):
    kvjax.methods.get("full", window=3)


def test_score_errors(model):
  with pytest.raises(kvjax.GenerationError, match="pair up"):
    kvjax.score(model, [[1, 2]], [[3], [4]])
  with pytest.raises(kvjax.GenerationError, match="compression_ratio=2"):
    kvjax.score(model, [1, 2], [3], compression_ratio=2)

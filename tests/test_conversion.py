"""Hugging Face safetensors and GGUF -> kvjax params, checked against torch weights."""

import json
import math
import pathlib

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from checkpoints_conversion import gguf_reader, hf
from checkpoints_conversion.gguf_reader import read_gguf
from checkpoints_conversion.hf import config_from_hf, expected_shapes, params_from_safetensors
from kvjax.config import ModelConfig, RopeScaling
from kvjax.errors import CheckpointError, ConfigError

@pytest.fixture(scope="module")
def smollm2_gguf_file(smollm2_gguf) -> pathlib.Path:
  """The real SmolLM2-135M-Instruct Q4_1 GGUF (shared/ASSETS.md), via the project's fetch."""
  return smollm2_gguf


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _tiny_model(kind: str, seed: int = 0, **overrides):
  """A tiny random Llama/Qwen2 with every tensor (norms and biases too) random."""
  torch.manual_seed(seed)
  options = {**TINY, **overrides}
  if kind == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**options))
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**options))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_()
  return model.eval()


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# Expected canonical tensors, restated element by element from the HF [out, in] layout.

def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  """kernel[:, h, j] is row h * head_dim + j of a [heads * head_dim, d] weight."""
  dh = w.shape[0] // heads
  out = np.empty((w.shape[1], heads, dh), np.float32)
  for h in range(heads):
    for j in range(dh):
      out[:, h, j] = w[h * dh + j]
  return out


def _heads_out(w: np.ndarray, heads: int) -> np.ndarray:
  """kernel[h, j, :] is column h * head_dim + j of a [d, heads * head_dim] weight."""
  dh = w.shape[1] // heads
  out = np.empty((heads, dh, w.shape[0]), np.float32)
  for h in range(heads):
    for j in range(dh):
      out[h, j] = w[:, h * dh + j]
  return out


def _expected(sd: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
  h, k = config.num_heads, config.num_kv_heads
  out = {"embed.embedding": sd["model.embed_tokens.weight"],
         "final_norm.scale": sd["model.norm.weight"]}
  if not config.tie_embeddings:
    out["lm_head.kernel"] = sd["lm_head.weight"].T
  for i in range(config.num_layers):
    src, dst = f"model.layers.{i}.", f"layers.{i}."
    out[dst + "attn_norm.scale"] = sd[src + "input_layernorm.weight"]
    out[dst + "mlp_norm.scale"] = sd[src + "post_attention_layernorm.weight"]
    for proj, heads in (("q", h), ("k", k), ("v", k)):
      out[dst + f"attn.{proj}.kernel"] = _heads_in(sd[src + f"self_attn.{proj}_proj.weight"], heads)
      if config.qkv_bias:
        bias = sd[src + f"self_attn.{proj}_proj.bias"]
        out[dst + f"attn.{proj}.bias"] = _heads_in(bias[:, None], heads)[0]
    out[dst + "attn.o.kernel"] = _heads_out(sd[src + "self_attn.o_proj.weight"], h)
    for proj in ("gate", "up", "down"):
      out[dst + f"mlp.{proj}.kernel"] = sd[src + f"mlp.{proj}_proj.weight"].T
  return out


def _assert_params_equal(params, sd, config, atol=0.0):
  expected = _expected(sd, config)
  assert sorted(params) == sorted(expected)
  for name, want in expected.items():
    got = np.asarray(params[name], np.float32)
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def _save_flat(directory: pathlib.Path, config_json: dict, tensors: dict[str, np.ndarray]):
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(config_json))
  save_file(tensors, str(directory / "model.safetensors"))
  return directory


# ----------------------------------------------------------------------------- safetensors

@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory):
  """An untied float32 Llama saved in several shards with an index."""
  model = _tiny_model("llama", tie_word_embeddings=False)
  directory = tmp_path_factory.mktemp("llama_sharded")
  model.save_pretrained(directory, max_shard_size="40KB")
  return model, directory


def test_llama_sharded_matches_torch(llama_sharded):
  model, directory = llama_sharded
  assert (directory / hf.INDEX_FILE).exists()
  assert len(list(directory.glob("*.safetensors"))) > 2
  config = config_from_hf(json.loads((directory / "config.json").read_text()))
  assert config == ModelConfig(
      architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
      rope_theta=model.config.rope_parameters["rope_theta"], rope_scaling=None,
      rms_norm_eps=model.config.rms_norm_eps, tie_embeddings=False, qkv_bias=False,
      dtype="float32")
  params = params_from_safetensors(str(directory), config)
  _assert_params_equal(params, _state_dict(model), config)
  assert all(p.dtype == np.float32 for p in params.values())
  assert {n: p.shape for n, p in params.items()} == expected_shapes(config)


def test_shards_without_index_read_alike(llama_sharded, tmp_path):
  model, directory = llama_sharded
  copy = tmp_path / "no_index"
  copy.mkdir()
  for f in directory.iterdir():
    if f.name != hf.INDEX_FILE:
      (copy / f.name).write_bytes(f.read_bytes())
  config, params = hf.read_hf_checkpoint(str(copy))
  _assert_params_equal(params, _state_dict(model), config)


def test_kernels_act_like_torch_linears(llama_sharded):
  """x @ kernel reproduces torch's projections, split into heads the way HF views them."""
  model, directory = llama_sharded
  config, params = hf.read_hf_checkpoint(str(directory))
  layer = model.model.layers[1]
  x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
  with torch.no_grad():
    q = layer.self_attn.q_proj(torch.from_numpy(x)).view(3, 4, 16).numpy()
    k = layer.self_attn.k_proj(torch.from_numpy(x)).view(3, 2, 16).numpy()
    o = layer.self_attn.o_proj(torch.from_numpy(q.reshape(3, 64))).numpy()
    down = layer.mlp.down_proj(torch.from_numpy(x[:, :48].repeat(2, 1))).numpy()
  np.testing.assert_allclose(np.einsum("td,dhk->thk", x, params["layers.1.attn.q.kernel"]), q,
                             atol=1e-4)
  np.testing.assert_allclose(np.einsum("td,dhk->thk", x, params["layers.1.attn.k.kernel"]), k,
                             atol=1e-4)
  np.testing.assert_allclose(np.einsum("thk,hkd->td", q, params["layers.1.attn.o.kernel"]), o,
                             atol=1e-3)
  np.testing.assert_allclose(x[:, :48].repeat(2, 1) @ params["layers.1.mlp.down.kernel"], down,
                             atol=1e-4)


def test_qwen2_bfloat16_tied(tmp_path):
  model = _tiny_model("qwen2", seed=1, tie_word_embeddings=True).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  config = config_from_hf(hf_config, dtype="auto")
  assert (config.architecture, config.qkv_bias, config.tie_embeddings, config.dtype) == (
      "qwen2", True, True, "bfloat16")
  params = params_from_safetensors(str(tmp_path), config)
  assert "lm_head.kernel" not in params
  assert all(p.dtype == ml_dtypes.bfloat16 for p in params.values())
  _assert_params_equal(params, _state_dict(model), config)  # bf16 -> f32 is exact
  params32 = params_from_safetensors(str(tmp_path), config.replace(dtype="float32"))
  assert params32["layers.0.attn.q.bias"].dtype == np.float32
  _assert_params_equal(params32, _state_dict(model), config)


def test_qwen2_untied_float32(tmp_path):
  model = _tiny_model("qwen2", seed=2, tie_word_embeddings=False)
  model.save_pretrained(tmp_path)
  config, params = hf.read_hf_checkpoint(str(tmp_path))
  assert (config.qkv_bias, config.tie_embeddings, config.dtype) == (True, False, "float32")
  _assert_params_equal(params, _state_dict(model), config)


@pytest.fixture
def tied_llama(tmp_path):
  """A tied Llama as flat tensors plus its config.json, for hand-edited checkpoints."""
  model = _tiny_model("llama", seed=3, tie_word_embeddings=True)
  model.save_pretrained(tmp_path / "orig")
  config_json = json.loads((tmp_path / "orig" / "config.json").read_text())
  tensors = {k: v for k, v in _state_dict(model).items() if k != "lm_head.weight"}
  return model, config_json, tensors


def test_tied_checkpoint_may_repeat_embedding(tied_llama, tmp_path):
  model, config_json, tensors = tied_llama
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  directory = _save_flat(tmp_path / "ckpt", config_json, tensors)
  config, params = hf.read_hf_checkpoint(str(directory))
  assert config.tie_embeddings
  _assert_params_equal(params, _state_dict(model), config)


def test_tied_checkpoint_with_different_head_fails(tied_llama, tmp_path):
  _, config_json, tensors = tied_llama
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
  directory = _save_flat(tmp_path / "ckpt", config_json, tensors)
  with pytest.raises(CheckpointError, match="lm_head.weight differs"):
    hf.read_hf_checkpoint(str(directory))


def test_missing_tensor(tied_llama, tmp_path):
  _, config_json, tensors = tied_llama
  del tensors["model.layers.1.mlp.up_proj.weight"]
  directory = _save_flat(tmp_path / "ckpt", config_json, tensors)
  with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj"):
    hf.read_hf_checkpoint(str(directory))


def test_wrong_shape_names_tensor_and_shapes(tied_llama, tmp_path):
  _, config_json, tensors = tied_llama
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  directory = _save_flat(tmp_path / "ckpt", config_json, tensors)
  with pytest.raises(CheckpointError) as error:
    hf.read_hf_checkpoint(str(directory))
  message = str(error.value)
  assert "model.layers.0.self_attn.k_proj.weight" in message
  assert "(16, 64)" in message and "(32, 64)" in message


def test_config_checkpoint_mismatch(tied_llama, tmp_path):
  _, config_json, tensors = tied_llama
  directory = _save_flat(tmp_path / "ckpt", {**config_json, "intermediate_size": 80}, tensors)
  with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*\(96, 64\).*\(80, 64\)"):
    hf.read_hf_checkpoint(str(directory))


def test_unexpected_tensor_is_listed(tied_llama, tmp_path):
  _, config_json, tensors = tied_llama
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  directory = _save_flat(tmp_path / "ckpt", config_json, tensors)
  with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.o_proj"):
    hf.read_hf_checkpoint(str(directory))


def test_truncated_safetensors_names_file(llama_sharded, tmp_path):
  _, directory = llama_sharded
  copy = tmp_path / "cut"
  copy.mkdir()
  for f in directory.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  shard = sorted(copy.glob("*.safetensors"))[1]
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) - 100])
  with pytest.raises(CheckpointError, match=shard.name):
    hf.read_hf_checkpoint(str(copy))
  shard.unlink()
  with pytest.raises(CheckpointError, match=f"shard '{shard.name}'"):
    hf.read_hf_checkpoint(str(copy))


def test_no_checkpoint_files(tmp_path):
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    params_from_safetensors(str(tmp_path), config_from_hf({**LLAMA31_8B, "num_hidden_layers": 1}))
  with pytest.raises(CheckpointError, match="config.json"):
    hf.read_hf_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------- configs

# Llama-3.1-8B's config.json as written by transformers 4 (rope_theta, rope_scaling, torch_dtype).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def test_llama31_config():
  config = config_from_hf(LLAMA31_8B, name="llama-3.1-8b")
  assert config.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0,
                                            original_max_position_embeddings=8192)
  assert (config.rope_theta, config.head_dim, config.num_kv_heads, config.max_position_embeddings,
          config.rms_norm_eps, config.dtype, config.name) == (
              500000.0, 128, 8, 131072, 1e-5, "float32", "llama-3.1-8b")
  assert config_from_hf(LLAMA31_8B, dtype="auto").dtype == "bfloat16"
  assert config_from_hf(LLAMA31_8B, dtype="bfloat16").dtype == "bfloat16"


def test_transformers5_llama3_rope_parameters(tmp_path):
  scaling = dict(rope_type="llama3", factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0,
                 original_max_position_embeddings=64, rope_theta=50000.0)
  transformers.LlamaConfig(**TINY, head_dim=32, rope_parameters=scaling).save_pretrained(tmp_path)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" in hf_config and "rope_theta" not in hf_config
  config = config_from_hf(hf_config)
  assert config.rope_scaling == RopeScaling(16.0, 2.0, 8.0, 64)
  assert (config.rope_theta, config.head_dim) == (50000.0, 32)


def test_mistral_and_qwen2_configs():
  mistral = {**LLAMA31_8B, "model_type": "mistral", "rope_scaling": None,
             "max_position_embeddings": 32768, "sliding_window": 4096}
  with pytest.raises(ConfigError, match="sliding_window=4096"):
    config_from_hf(mistral)
  assert config_from_hf({**mistral, "sliding_window": None}).architecture == "llama"
  qwen = {**LLAMA31_8B, "model_type": "qwen2", "rope_scaling": None, "sliding_window": 131072,
          "use_sliding_window": False, "max_position_embeddings": 32768}
  del qwen["tie_word_embeddings"]
  config = config_from_hf(qwen)
  assert (config.architecture, config.qkv_bias, config.tie_embeddings) == ("qwen2", True, False)
  with pytest.raises(ConfigError, match="sliding"):
    config_from_hf({**qwen, "use_sliding_window": True, "sliding_window": 4096})


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gemma"}, ["'gemma'", "llama", "qwen2"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'yarn'", "llama3"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["'linear'", "default"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["low_freq_factor"]),
    ({"hidden_act": "gelu"}, ["'gelu'", "silu"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"hidden_size": None}, ["hidden_size"]),
])
def test_config_errors_name_the_value(change, words):
  with pytest.raises(ConfigError) as error:
    config_from_hf({**LLAMA31_8B, **change})
  for word in words:
    assert word in str(error.value)


def test_bad_dtype_rejected():
  with pytest.raises(ConfigError, match="float16"):
    config_from_hf(LLAMA31_8B, dtype="float16")


# ----------------------------------------------------------------------------- GGUF (real file)

@pytest.fixture(scope="module")
def smollm2_read(smollm2_gguf_file):
  return read_gguf(smollm2_gguf_file)


@pytest.mark.slow  # reads and dequantizes every SmolLM2 weight
def test_smollm2_gguf_config(smollm2_read):
  config, params = smollm2_read
  assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads,
          config.num_kv_heads, config.head_dim, config.intermediate_size, config.vocab_size,
          config.max_position_embeddings, config.rope_theta, config.rms_norm_eps,
          config.tie_embeddings, config.qkv_bias, config.rope_scaling) == (
              "llama", 30, 576, 9, 3, 64, 1536, 49152, 8192, 100000.0, 1e-5, True, False, None)
  assert {n: p.shape for n, p in params.items()} == expected_shapes(config)
  assert all(p.dtype == np.float32 for p in params.values())


@pytest.mark.slow  # and transformers' copy of them
def test_smollm2_gguf_matches_transformers_loader(smollm2_transformers, smollm2_read):
  """transformers' own GGUF loader (independent un-permutation) gives the same weights."""
  config, params = smollm2_read
  model = smollm2_transformers
  sd = _state_dict(model)
  assert model.config.num_key_value_heads == config.num_kv_heads
  _assert_params_equal(params, sd, config, atol=1e-6)


def test_truncated_gguf(smollm2_gguf_file, tmp_path):
  head = tmp_path / "head.gguf"
  with open(smollm2_gguf_file, "rb") as f:
    head.write_bytes(f.read(1 << 20))
  with pytest.raises(CheckpointError, match="head.gguf"):
    read_gguf(head)
  tail_cut = tmp_path / "tail.gguf"
  data = smollm2_gguf_file.read_bytes()
  tail_cut.write_bytes(data[:len(data) - 4096])
  with pytest.raises(CheckpointError, match="tail.gguf"):
    read_gguf(tail_cut)


def test_not_a_gguf(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_bytes(b"PK\x03\x04 not a gguf")
  with pytest.raises(CheckpointError, match="not a GGUF file"):
    read_gguf(path)
  with pytest.raises(CheckpointError, match="does not exist"):
    read_gguf(tmp_path / "absent.gguf")


# ----------------------------------------------------------------------------- GGUF (written here)

_GGUF_LAYER_NAMES = {  # llama.cpp tensor names, as facts about the format
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def _interleave_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's storage of Q/K: per head, row 2j + i holds HF row i * head_dim/2 + j."""
  dh = w.shape[0] // heads
  order = [h * dh + i * (dh // 2) + j for h in range(heads) for j in range(dh // 2)
           for i in range(2)]
  return w[order]


def _llama3_divisors(theta, head_dim, factor, low, high, context):
  """rope_freqs.weight as llama.cpp's converter defines it, one frequency at a time."""
  out = []
  for i in range(0, head_dim, 2):
    wavelen = 2 * math.pi * theta ** (i / head_dim)
    if wavelen < context / high:
      out.append(1.0)
    elif wavelen > context / low:
      out.append(factor)
    else:
      smooth = (context / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def _write_gguf(path, arch, model, head_dim, rope_freqs=None, tied=False):
  cfg = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_rope_dimension_count(head_dim)
  for name, w in _state_dict(model).items():
    if name == "lm_head.weight":
      if not tied:
        writer.add_tensor("output.weight", w)
      continue
    if name in ("model.embed_tokens.weight", "model.norm.weight"):
      writer.add_tensor({"model.embed_tokens.weight": "token_embd.weight",
                         "model.norm.weight": "output_norm.weight"}[name], w)
      continue
    layer, rest = name.split(".")[2], name.split(".", 3)[3]
    if arch == "llama" and rest.startswith("self_attn.q_proj"):
      w = _interleave_rows(w, cfg.num_attention_heads)
    if arch == "llama" and rest.startswith("self_attn.k_proj"):
      w = _interleave_rows(w, cfg.num_key_value_heads)
    writer.add_tensor(f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}", w)
  if rope_freqs is not None:
    writer.add_tensor("rope_freqs.weight", rope_freqs)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_gguf_llama31_rope_freqs_and_permutation(tmp_path):
  # head_dim 64, theta 5e5: the same frequency geometry as Llama 3.2, so a few divisors blend.
  scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192, rope_theta=500000.0)
  model = _tiny_model("llama", seed=4, head_dim=64, rope_parameters=scaling,
                      max_position_embeddings=131072, tie_word_embeddings=True)
  divisors = _llama3_divisors(500000.0, 64, 32.0, 1.0, 4.0, 8192)
  assert ((divisors > 1) & (divisors < 32)).sum() >= 2
  path = _write_gguf(tmp_path / "llama31.gguf", "llama", model, 64, rope_freqs=divisors,
                     tied=True)
  config, params = read_gguf(path)
  assert config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
  assert (config.rope_theta, config.head_dim, config.tie_embeddings, config.qkv_bias,
          config.max_position_embeddings) == (500000.0, 64, True, False, 131072)
  _assert_params_equal(params, _state_dict(model), config)
  # What transformers' llama3 RoPE computes from our config is what the file encodes.
  hf_from_ours = transformers.LlamaConfig(**TINY, head_dim=64, rope_parameters=dict(
      rope_type="llama3", rope_theta=config.rope_theta, factor=config.rope_scaling.factor,
      low_freq_factor=config.rope_scaling.low_freq_factor,
      high_freq_factor=config.rope_scaling.high_freq_factor,
      original_max_position_embeddings=config.rope_scaling.original_max_position_embeddings))
  inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_from_ours, "cpu")
  plain = 500000.0 ** (-np.arange(0, 64, 2) / 64)
  np.testing.assert_allclose(plain / inv_freq.numpy(), divisors, rtol=1e-5)


def test_gguf_qwen2_biases_not_permuted(tmp_path):
  model = _tiny_model("qwen2", seed=5, tie_word_embeddings=False)
  path = _write_gguf(tmp_path / "qwen2.gguf", "qwen2", model, 16)
  config, params = read_gguf(path, dtype="bfloat16")
  assert (config.architecture, config.qkv_bias, config.tie_embeddings, config.dtype) == (
      "qwen2", True, False, "bfloat16")
  assert params["layers.0.attn.q.bias"].dtype == ml_dtypes.bfloat16
  _assert_params_equal(params, _state_dict(model), config, atol=0.05)
  config32, params32 = read_gguf(path)
  _assert_params_equal(params32, _state_dict(model), config32)


def test_gguf_unsupported_architecture(tmp_path):
  writer = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.ones((4, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ConfigError, match=r"'gemma'.*llama"):
    read_gguf(tmp_path / "gemma.gguf")


def test_rope_freqs_that_are_not_llama3():
  divisors = np.linspace(1.0, 5.0, 32)
  with pytest.raises(ConfigError, match="not a llama3"):
    gguf_reader.scaling_from_rope_freqs(divisors, 500000.0, 64)
  assert gguf_reader.scaling_from_rope_freqs(np.ones(32), 500000.0, 64) is None


def test_rope_freqs_with_one_blended_value_uses_llama3_defaults():
  divisors = _llama3_divisors(500000.0, 32, 8.0, 1.0, 4.0, 8192)
  assert ((divisors > 1) & (divisors < 8)).sum() == 1  # too few to fit: defaults, verified
  assert gguf_reader.scaling_from_rope_freqs(divisors, 500000.0, 32) == RopeScaling(8.0, 1.0,
                                                                                    4.0, 8192)
  other = _llama3_divisors(500000.0, 32, 8.0, 1.0, 2.0, 8192)
  with pytest.raises(ConfigError, match="not a llama3"):
    gguf_reader.scaling_from_rope_freqs(other, 500000.0, 32)

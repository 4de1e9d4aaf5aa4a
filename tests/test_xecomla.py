"""X-EcoMLA: upcycling into latent attention, the latent cache and its decode kernel, and
the distillation that trains the student."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernel_inputs
import kvjax
from kvjax import training
from kvjax.cache import cache_nbytes, init_cache
from kvjax.cache.kv_cache import LatentLayerCache
from kvjax.config import LatentAttention, ModelConfig
from kvjax.errors import ConfigError, KvjaxError, MethodError
from kvjax.model import to_flat_params, transformer, upcycle
from kvjax.ops import rope
from kvjax.training import data as data_lib
from kvjax.training import distillation, xecomla
from pallas_kernels import decode_attention as da
from pallas_kernels import reference
from tests.test_attention_gate import _rms_norm, _rotate, _sigmoid, _softmax
from tests.tiny import jnp_and_kernel_tokens, random_prompts, tiny_config, tiny_model

SMALL = xecomla.XEcoMLASettings(kv_rank=16, rope_dim=4)
DATA = data_lib.DataSettings(sequence_length=24, answer_tokens=4, sources=("random",))


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=2)


def _logits(model, tokens):
  tokens = jnp.asarray(tokens)[None]
  mask = jnp.ones(tokens.shape, bool)
  return np.asarray(transformer.forward(model.graphdef, model.params, tokens, mask,
                                        init_cache(model.config, 1, tokens.shape[1]))[0][0])


# ----------------------------------------------------------------- numpy restatements

def _weights(model):
  return {k: np.asarray(v, np.float64) for k, v in to_flat_params(model).items()}


def np_latent_forward(student, tokens):
  """[T, V] logits of one row through a decoupled-RoPE student, attention written the
  plain way: every head's key [W_uk,h c_j; RoPE(k_rope_j)] and value W_uv,h c_j + b_v,h
  built per token, then a causal softmax at D^-1/2."""
  cfg, spec = student.config, student.config.latent
  w = _weights(student)
  hd, r, dr = cfg.head_dim, spec.kv_rank, spec.rope_dim
  inv_freq = rope.inverse_frequencies(cfg, dr).astype(np.float64)
  t = len(tokens)
  positions = np.arange(t)
  x = w["embed.embedding"][tokens]
  for layer in range(cfg.num_layers):
    p = lambda name: w[f"layers.{layer}.attn.{name}"]
    bias = lambda name: w.get(f"layers.{layer}.attn.{name}.bias", 0.0)
    h = _rms_norm(x, w[f"layers.{layer}.attn_norm.scale"], cfg.rms_norm_eps)
    q = np.einsum("td,dhk->thk", h, p("q.kernel")) + bias("q")
    latent = h @ p("kv_down.kernel") + bias("kv_down")
    c = latent[:, :r]
    k_rope = _rotate(latent[:, None, r:], positions, inv_freq)[:, 0]      # [T, d_r]
    q_rope = _rotate(q[..., hd - dr:], positions, inv_freq)
    k_free = np.einsum("tr,rhn->thn", c, p("key_up.kernel"))
    v = np.einsum("tr,rhk->thk", c, p("value_up.kernel")) + bias("value_up")
    att = np.zeros_like(q)
    for i in range(t):
      for head in range(cfg.num_heads):
        keys = np.concatenate([k_free[:i + 1, head], k_rope[:i + 1]], -1)
        query = np.concatenate([q[i, head, :hd - dr], q_rope[i, head]])
        att[i, head] = _softmax(keys @ query / np.sqrt(hd)) @ v[:i + 1, head]
    x = x + np.einsum("thk,hkd->td", att, p("o.kernel"))
    h = _rms_norm(x, w[f"layers.{layer}.mlp_norm.scale"], cfg.rms_norm_eps)
    gate = h @ w[f"layers.{layer}.mlp.gate.kernel"]
    x = x + (gate * _sigmoid(gate) * (h @ w[f"layers.{layer}.mlp.up.kernel"])) @ w[
        f"layers.{layer}.mlp.down.kernel"]
  return _rms_norm(x, w["final_norm.scale"], cfg.rms_norm_eps) @ w["lm_head.kernel"]


def np_truncated(matrix, rank):
  u, s, vt = np.linalg.svd(matrix, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


# ----------------------------------------------------------------- upcycling

@pytest.mark.parametrize("bias", [False, True])
def test_full_rank_reproduces_the_original_model(bias):
  """rope="rebuilt" at rank 2 K D: the original model's logits and greedy tokens."""
  original = tiny_model(seed=3, qkv_bias=bias)
  cfg = original.config
  student = upcycle.upcycle(original, 2 * cfg.num_kv_heads * cfg.head_dim, rope="rebuilt")
  tokens = random_prompts([14], seed=3)[0]
  want = _logits(original, tokens)
  np.testing.assert_allclose(_logits(student, tokens), want, atol=2e-5 * np.abs(want).max())
  prompts = random_prompts([11, 17], seed=4)
  assert (kvjax.generate(student, prompts, max_new_tokens=6).token_ids
          == kvjax.generate(original, prompts, max_new_tokens=6).token_ids)
  # Below full rank the model changes: the check above can fail.
  low = upcycle.upcycle(original, cfg.num_kv_heads * cfg.head_dim, rope="rebuilt")
  assert np.abs(_logits(low, tokens) - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("bias", [False, True])
def test_decoupled_initialisation_follows_the_svd_reading(bias):
  """kvjax's reading of the official re_init_kv (methods_B.md section 2): per head,
  key_up x kv_down is the rank-r truncation of the repeated, stacked [W_k'; W_v'] (its
  position-free key rows and its value rows: sign-free products), and the shared rotary
  key is the KV heads' mean of W_k's last d_r rows."""
  original = tiny_model(seed=5, qkv_bias=bias)
  cfg = original.config
  k, g, hd, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cfg.hidden_size
  r, dr = 12, 4
  student = upcycle.upcycle(original, r, rope_dim=dr)
  w, s = _weights(original), _weights(student)
  rows = lambda name: w[f"layers.1.attn.{name}.kernel"].reshape(d, -1).T   # [heads D, d]
  repeat = lambda m: np.repeat(m.reshape(k, hd, d), g, axis=0)            # [H, D, d]
  stacked = np.concatenate([repeat(rows("k")), repeat(rows("v"))]).reshape(-1, d)
  truncated = np_truncated(stacked, r).reshape(2, cfg.num_heads, hd, d)
  down = s["layers.1.attn.kv_down.kernel"]                                 # [d, r + d_r]
  key_eff = np.einsum("rhn,dr->hnd", s["layers.1.attn.key_up.kernel"], down[:, :r])
  value_eff = np.einsum("rhk,dr->hkd", s["layers.1.attn.value_up.kernel"], down[:, :r])
  np.testing.assert_allclose(key_eff, truncated[0, :, :hd - dr], atol=1e-5)
  np.testing.assert_allclose(value_eff, truncated[1], atol=1e-5)
  np.testing.assert_allclose(down[:, r:].T, rows("k").reshape(k, hd, d)[:, hd - dr:].mean(0),
                             atol=1e-6)
  np.testing.assert_array_equal(s["layers.1.attn.q.kernel"], w["layers.1.attn.q.kernel"])
  np.testing.assert_array_equal(s["layers.1.attn.o.kernel"], w["layers.1.attn.o.kernel"])
  np.testing.assert_array_equal(s["layers.1.mlp.up.kernel"], w["layers.1.mlp.up.kernel"])
  if bias:
    b = w["layers.1.attn.k.bias"]
    np.testing.assert_allclose(s["layers.1.attn.kv_down.bias"][r:], b[:, hd - dr:].mean(0),
                               atol=1e-6)
    np.testing.assert_array_equal(s["layers.1.attn.value_up.bias"],
                                  np.repeat(w["layers.1.attn.v.bias"], g, axis=0))


def test_query_rank_factorises_the_query():
  original = tiny_model(seed=6)
  student = upcycle.upcycle(original, 16, rope_dim=4, query_rank=20)
  w, s = _weights(original), _weights(student)
  d = original.config.hidden_size
  want = np_truncated(w["layers.0.attn.q.kernel"].reshape(d, -1).T, 20)
  got = (s["layers.0.attn.q_down.kernel"] @ s["layers.0.attn.q_up.kernel"].reshape(20, -1)).T
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_latent_attention_matches_the_plain_numpy_attention(bias):
  """The absorbed computation (folded queries over cached latents) equals MLA written
  head by head; trained-looking weights: the upcycled ones perturbed."""
  student = upcycle.upcycle(tiny_model(seed=7, qkv_bias=bias), 12, rope_dim=4)
  noise = jax.random.split(jax.random.key(0), 64)
  leaves, tree = jax.tree_util.tree_flatten(student.params)
  student.params = jax.tree_util.tree_unflatten(tree, [
      x + 0.05 * jax.random.normal(key, x.shape, x.dtype) for x, key in zip(leaves, noise)])
  tokens = random_prompts([10], seed=8)[0]
  want = np_latent_forward(student, tokens)
  np.testing.assert_allclose(_logits(student, tokens), want, atol=1e-4 * np.abs(want).max())


def test_decoding_token_by_token_equals_reading_at_once(model):
  student = upcycle.upcycle(model, 16, rope_dim=4)
  tokens = jnp.asarray(random_prompts([12], seed=9)[0])[None]
  mask = jnp.ones(tokens.shape, bool)
  whole = _logits(student, tokens[0])
  cache = init_cache(student.config, 1, 12)
  got, cache = transformer.forward(student.graphdef, student.params, tokens[:, :7],
                                   mask[:, :7], cache)
  steps = [np.asarray(got[0])]
  for i in range(7, 12):
    got, cache = transformer.forward(student.graphdef, student.params, tokens[:, i:i + 1],
                                     mask[:, i:i + 1], cache)
    steps.append(np.asarray(got[0]))
  np.testing.assert_allclose(np.concatenate(steps), whole, atol=1e-5 * np.abs(whole).max())


@pytest.mark.parametrize("chunk", [None, 4])
def test_a_padded_batch_decodes_each_row_as_alone(chunk):
  """Decoupled latent attention with biases: rows of a left-padded batch, prefilled whole
  or in chunks, get the tokens each gets alone."""
  student = upcycle.upcycle(tiny_model(seed=14, qkv_bias=True), 16, rope_dim=4)
  prompts = random_prompts([9, 15], seed=15)
  together = kvjax.generate(student, prompts, max_new_tokens=5,
                            prefill_chunk_size=chunk).token_ids
  alone = [kvjax.generate(student, [p], max_new_tokens=5).token_ids[0] for p in prompts]
  assert together == alone


def test_pallas_decode_path_generates_the_same_tokens(model, monkeypatch):
  student = upcycle.upcycle(model, 16, rope_dim=4)
  want, got = jnp_and_kernel_tokens(student, random_prompts([9, 15], seed=10), monkeypatch,
                                    max_new_tokens=5)
  assert want == got


def test_latent_cache_bytes_follow_the_rank(model):
  """r + d_r numbers per token and layer (plus its position), against 2 K D."""
  cfg = model.config
  student = upcycle.upcycle(model, 16, rope_dim=4)
  b, s = 2, 40
  cache = init_cache(student.config, b, s)
  assert all(isinstance(layer, LatentLayerCache) for layer in cache.layers)
  per_layer = b * s * ((16 + 4) * 4 + 4) + 4        # latents, positions, the end index
  lengths = b * 4
  assert cache_nbytes(cache) == cfg.num_layers * per_layer + lengths
  full = init_cache(cfg, b, s)
  assert cache_nbytes(full) == cfg.num_layers * (
      b * s * cfg.num_kv_heads * (2 * cfg.head_dim * 4 + 4) + 4) + lengths
  assert upcycle.cache_numbers_per_token(student.config) == 20
  assert upcycle.cache_numbers_per_token(cfg) == 2 * cfg.num_kv_heads * cfg.head_dim


def test_compression_methods_are_refused(model):
  student = upcycle.upcycle(model, 16, rope_dim=4)
  with pytest.raises(MethodError, match=r"snapkv compresses .* one latent per token"):
    kvjax.generate(student, random_prompts([20]), method="snapkv", compression_ratio=0.5,
                   max_new_tokens=2)


def test_config_round_trip_and_bad_settings(model):
  student = upcycle.upcycle(model, 16, rope_dim=4, query_rank=8)
  assert ModelConfig.from_json(student.config.to_json()) == student.config
  cases = [
      (dict(kv_rank=16, rope_dim=3), r"rope_dim=3 must be even"),
      (dict(kv_rank=16, rope_dim=0), r"rope_dim=0 must be even and >= 2"),
      (dict(kv_rank=16, rope_dim=4, rope="rebuilt"), r"must be 0 with rope='rebuilt'"),
      (dict(kv_rank=16, rope_dim=4, rope="nope"), r"latent.rope='nope'"),
      (dict(kv_rank=0, rope_dim=4), r"latent.kv_rank"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ConfigError, match=match):
      LatentAttention(**kwargs)
  with pytest.raises(ConfigError, match=r"rope_dim=16 must be below head_dim=16"):
    tiny_config(latent=LatentAttention(kv_rank=8, rope_dim=16))
  with pytest.raises(ConfigError, match=r"kv_rank=65 exceeds .* = 64"):
    upcycle.upcycle(model, 65, rope="rebuilt")
  with pytest.raises(ConfigError, match=r"already has latent attention"):
    upcycle.upcycle(student, 8, rope_dim=4)
  with pytest.raises(ConfigError, match=r"latent=.* must be null or an object"):
    ModelConfig.from_dict({**model.config.to_dict(), "latent": {"rank": 3}})


# ----------------------------------------------------------------- the decode kernel

@pytest.mark.parametrize("g,width,dtype", [(4, 20, jnp.float32), (9, 36, jnp.float32),
                                           (9, 36, jnp.bfloat16)])
def test_shared_decode_kernel_matches_reference(g, width, dtype):
  """Keys that are the values, one latent head for all query heads (K = 1)."""
  rng = kernel_inputs.rng(g + width)
  b, s = 3, 100
  q = jnp.asarray(rng.normal(size=(b, 1, g, width)), dtype)
  latent = jnp.asarray(rng.normal(size=(b, 1, s, width)), dtype)
  pos = jnp.asarray(kernel_inputs.shuffled_positions(rng, (b, 1, s)))
  qpos = jnp.array([70, -1, 99], jnp.int32)
  got = da.decode_attention_shared(q, latent, pos, qpos, return_probs=True, block_k=16)
  want = reference.decode_attention(q, latent, latent, pos, qpos)
  assert got[0].shape == q.shape and got[0].dtype == dtype
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    kernel_inputs.close(a, e, dtype)
  assert (np.asarray(got[0][1], np.float32) == 0).all()
  np.testing.assert_array_equal(got[1][1], np.float32(da.EMPTY_LSE))


def test_shared_decode_kernel_tpu_interpreter():
  rng = kernel_inputs.rng(31)
  b, g, s, width = 1, 4, 200, 32
  q = jnp.asarray(rng.normal(size=(b, 1, g, width)), jnp.float32)
  latent = jnp.asarray(rng.normal(size=(b, 1, s, width)), jnp.float32)
  pos = jnp.asarray(kernel_inputs.shuffled_positions(rng, (b, 1, s)))
  qpos = jnp.array([150], jnp.int32)
  got = da.decode_attention_shared(q, latent, pos, qpos, interpret=pltpu.InterpretParams())
  for a, e in zip(got, reference.decode_attention(q, latent, latent, pos, qpos)):
    kernel_inputs.close(a, e, jnp.float32)


_SD = jax.ShapeDtypeStruct
SHARED_EXPORTS = {
    # SmolLM2 upcycled at r = 128, d_r = 32 (9 heads); DeepSeek-V2's 512 + 64, 16 heads.
    "smollm2": (2, 9, 160, 4096),
    "deepseek": (1, 16, 576, 8192),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(SHARED_EXPORTS))
def test_shared_decode_kernel_exports(name, platform):
  b, g, width, s = SHARED_EXPORTS[name]
  structs = (_SD((b, 1, g, width), jnp.bfloat16), _SD((b, 1, s, width), jnp.bfloat16),
             _SD((b, 1, s), jnp.int32), _SD((b,), jnp.int32))
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exported = jax.export.export(jax.jit(da.decode_attention_shared), platforms=[platform],
                               disabled_checks=[triton])(*structs)
  marker = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}[platform]
  assert marker in exported.mlir_module()


# ----------------------------------------------------------------- distillation

def _task(model, settings=SMALL):
  return xecomla.task(model, settings, DATA)


def _train_on_one_batch(task, workdir, steps):
  """`steps` constant-rate steps on the task's first two examples, again and again."""
  fixed = task.batch(0, 2)
  task = dataclasses.replace(task, batch=lambda position, count: fixed)
  optimizer = training.OptimizerSettings(learning_rate=3e-3, warmup_steps=0,
                                         total_steps=steps, schedule="constant")
  return training.train(task, workdir, steps, optimizer,
                        training.LoopSettings(batch_size=2, checkpoint_every=steps,
                                              progress_bar=False))


def test_only_the_attention_is_trained_and_it_gets_gradients(model):
  task = _task(model)
  params = task.init_params(jax.random.key(0))
  assert params and all(".attn." in name for name in params)
  batch = {k: jnp.asarray(v) for k, v in task.batch(0, 2).items()}
  grads = jax.grad(lambda p: task.loss(p, task.frozen, batch, None)[0])(params)
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name
  frozen_grads = jax.grad(lambda f: task.loss(params, f, batch, None)[0])(task.frozen)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(frozen_grads))
  everything = _task(model, dataclasses.replace(SMALL, trainable="all"))
  assert "embed.embedding" in everything.init_params(None)


def test_kl_matches_numpy():
  rng = np.random.default_rng(0)
  t, s = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  log = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))
  kl = (np.exp(log(t)) * (log(t) - log(s))).sum(-1)
  got = distillation.kl_to_teacher(jnp.asarray(t), jnp.asarray(s), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), kl[mask].mean(), rtol=1e-5)


def test_distillation_reduces_the_kl_on_a_fixed_batch(model, tmp_path):
  result = _train_on_one_batch(_task(model), tmp_path / "run", 15)
  losses = [h["loss"] for h in result.history]
  assert losses[0] > 0.05                      # the upcycled student is not the teacher
  assert losses[-1] < 0.5 * losses[0], losses
  assert result.history[-1]["teacher_nll"] == pytest.approx(result.history[0]["teacher_nll"])


def test_the_trained_student_loads_and_is_refused_for_another_model(model, tmp_path):
  task = _task(model)
  optimizer = training.OptimizerSettings(learning_rate=1e-3, warmup_steps=0, total_steps=2,
                                         schedule="constant")
  result = training.train(task, tmp_path / "run", 2, optimizer,
                          training.LoopSettings(batch_size=1, checkpoint_every=2,
                                                progress_bar=False))
  student = xecomla.student(tmp_path / "run", model)
  assert student.config.latent == LatentAttention(kv_rank=16, rope_dim=4)
  got = to_flat_params(student)
  for name, value in result.params.items():
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value))
  np.testing.assert_array_equal(np.asarray(got["layers.0.mlp.up.kernel"]),
                                np.asarray(to_flat_params(model)["layers.0.mlp.up.kernel"]))
  with pytest.raises(MethodError, match=r"trained on weights with fingerprint"):
    xecomla.student(tmp_path / "run", tiny_model(seed=9))
  with pytest.raises(MethodError, match=r"num_layers: trained for 2, this model has 3"):
    xecomla.student(tmp_path / "run", tiny_model(seed=2, num_layers=3))


def test_bad_settings():
  with pytest.raises(KvjaxError, match=r"trainable='mlp'"):
    xecomla.XEcoMLASettings(trainable="mlp")
  with pytest.raises(KvjaxError, match=r"rope='x'"):
    xecomla.XEcoMLASettings(rope="x")


def test_train_script_distils_and_exports_the_student(model, tmp_path):
  from checkpoints_conversion import orbax_io
  from tests.test_training import ROOT, _env
  model_dir = orbax_io.save(model, tmp_path / "model")
  out = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "train.py"), f"--model={model_dir}",
       "--method=xecomla", f"--workdir={tmp_path / 'run'}", "--steps=3", "--sources=random",
       "--sequence_length=24", "--answer_tokens=4", "--kv_rank=16", "--rope_dim=4",
       "--learning_rate=0.003", f"--export_model={tmp_path / 'student'}", "--noprogress_bar"],
      env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "xecomla: 3 steps" in out.stdout and "--model=" in out.stdout
  loaded = kvjax.load(tmp_path / "student")
  assert loaded.config.latent == LatentAttention(kv_rank=16, rope_dim=4)
  want = xecomla.student(tmp_path / "run", kvjax.load(model_dir))
  tokens = random_prompts([9], seed=12)[0]
  np.testing.assert_array_equal(_logits(loaded, tokens), _logits(want, tokens))


def test_a_saved_student_with_fewer_kv_heads_is_distilled(model, tmp_path):
  """--method=distill: any saved student (here the model's KV heads merged 2 -> 1 by PCA)
  learns from the teacher; the run's student loads, and another initial student is refused."""
  from checkpoints_conversion import orbax_io
  from kvjax.calibration import kv_heads
  tokens = np.asarray(random_prompts([64, 64], seed=13), np.int32)
  calibration_batch = [(tokens, np.ones(tokens.shape, bool))]
  merged = kv_heads.compress_kv_heads(model, calibration_batch, 2)
  assert merged.config.num_kv_heads == 1
  path = orbax_io.save(merged, tmp_path / "student")
  task = distillation.saved_student_task(model, path, data_settings=DATA)
  result = _train_on_one_batch(task, tmp_path / "run", 12)
  losses = [h["loss"] for h in result.history]
  assert losses[-1] < 0.5 * losses[0], losses
  student = distillation.saved_student(tmp_path / "run", model)
  assert student.config.num_kv_heads == 1
  np.testing.assert_array_equal(np.asarray(to_flat_params(student)["layers.0.attn.k.kernel"]),
                                np.asarray(result.params["layers.0.attn.k.kernel"]))
  other = orbax_io.save(kv_heads.compress_kv_heads(model, calibration_batch, 2, values=False),
                        tmp_path / "other")
  with pytest.raises(KvjaxError, match=r"distilled another student"):
    distillation.saved_student(tmp_path / "run", model, student_path=other)
  with pytest.raises(KvjaxError, match=r"trained 'distill', not 'xecomla'"):
    xecomla.student(tmp_path / "run", model)

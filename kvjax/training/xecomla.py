"""X-EcoMLA's stage 1: distilling the original model into its latent-attention upcycling.

Reading: arXiv 2503.11132 and the official `X-EcoMLA/trainer/kd_trainer.py`: the student
starts from the SVD initialisation (`kvjax.model.upcycle`) and learns to match the
teacher's next-token distributions, loss KL(softmax(z_T) || softmax(z_S)) at temperature
1 (kl_weight 1, ce_weight 0), here averaged over the real tokens of the batch. The teacher
is the original model (the paper may use a larger one of the same tokenizer; kvjax's
teacher is the model being upcycled). The paper trains every parameter; kvjax's default
trains the attention layers only (what upcycling changed: the query, latent, up- and
output projections), `trainable="all"` trains everything. The official run: sequence
2048, lr 8e-5 cosine, one epoch of an SFT mixture (1-8B tokens); kvjax's defaults are
CPU-sized, on the essays/SQuAD rows of `kvjax.training.data`. Stage 2 (DPO) is not done.

The trainable parameters are a flat {name: array} dict (the student's names, e.g.
"layers.0.attn.kv_down.kernel"); the rest of the student is the teacher's own weights
(upcycling copies them). `student(path, model)` rebuilds the trained student of a run
for `model`, refused for another model or other weights.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import calibration, validation
from kvjax.cache.kv_cache import init_cache
from kvjax.config import LATENT_ROPE_MODES
from kvjax.errors import KvjaxError
from kvjax.methods import trained
from kvjax.model import model as model_lib
from kvjax.model import transformer, upcycle
from kvjax.training import data as data_lib
from kvjax.training import evaluation
from kvjax.training.attention_gate import lm_loss
from kvjax.training.loop import Task

KIND = "xecomla"
TRAINABLE = ("attention", "all")


@dataclasses.dataclass(frozen=True)
class XEcoMLASettings:
  kv_rank: int = 128              # latent rank r_kv
  rope_dim: int = 32              # the shared rotary key's dimensions d_r
  rope: str = "decoupled"         # or "rebuilt" (see kvjax.config.LatentAttention)
  query_rank: int | None = None   # r_q (None: the full query projection)
  trainable: str = "attention"    # or "all"

  def __post_init__(self):
    validation.integer("kv_rank", self.kv_rank, 1, error=KvjaxError)
    validation.integer("rope_dim", self.rope_dim, 0, error=KvjaxError)
    if self.rope not in LATENT_ROPE_MODES:
      raise KvjaxError(f"rope={self.rope!r}; allowed: {LATENT_ROPE_MODES}")
    if self.query_rank is not None:
      validation.integer("query_rank", self.query_rank, 1, error=KvjaxError)
    if self.trainable not in TRAINABLE:
      raise KvjaxError(f"trainable={self.trainable!r}; allowed: {TRAINABLE}")

  def upcycle(self, model):
    return upcycle.upcycle(model, self.kv_rank, self.rope_dim, self.rope, self.query_rank)


def is_trainable(name: str, trainable: str) -> bool:
  return trainable == "all" or ".attn." in name


def split_student(student, trainable: str) -> tuple[dict, dict]:
  """(trainable {name: array}, the rest {name: array}) of a student model's weights."""
  flat = model_lib.to_flat_params(student)
  train = {n: v for n, v in flat.items() if is_trainable(n, trainable)}
  return train, {n: v for n, v in flat.items() if n not in train}


def merge_student(abstract_state, flat: dict):
  """The student's parameter state from flat {name: array} (traceable)."""
  state = jax.tree_util.tree_map(lambda x: x, abstract_state)
  pure = nnx.to_pure_dict(state)

  def fill(tree, prefix=()):
    return {k: fill(v, prefix + (str(k),)) if isinstance(v, dict)
            else flat[".".join(prefix + (str(k),))] for k, v in tree.items()}

  nnx.replace_by_pure_dict(state, fill(pure))
  return state


def kl_to_teacher(teacher_logits, student_logits, mask):
  """Mean over the real tokens of KL(softmax(teacher) || softmax(student)) (float32)."""
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  real = mask.astype(jnp.float32)
  return (kl * real).sum() / jnp.maximum(real.sum(), 1.0)


def full_logits(graphdef, params, config, tokens, mask):
  """Logits [B, T, V] of token rows read from the start."""
  cache = init_cache(config, tokens.shape[0], tokens.shape[1])
  return transformer.forward(graphdef, params, tokens, mask, cache)[0]


def distillation_loss(trainable, frozen, batch, teacher_model, student_graphdef,
                      student_shape, student_config):
  """(KL to the teacher, metrics) of a token batch; only `trainable` gets gradients.
  frozen: {"teacher": the teacher's weights, "student_rest": the student's untrained
  tensors}; student_shape: the student's abstract parameter state (shapes only)."""
  frozen = jax.lax.stop_gradient(frozen)
  tokens, mask = batch["tokens"], batch["mask"]
  teacher = full_logits(teacher_model.graphdef, frozen["teacher"], teacher_model.config,
                        tokens, mask)
  state = merge_student(student_shape, {**frozen["student_rest"], **trainable})
  student = full_logits(student_graphdef, state, student_config, tokens, mask)
  kl = kl_to_teacher(teacher, student, mask)
  return kl, {"kl": kl, "student_nll": lm_loss(student, tokens, mask),
              "teacher_nll": lm_loss(teacher, tokens, mask)}


def task(model, settings: XEcoMLASettings = XEcoMLASettings(),
         data_settings: data_lib.DataSettings = data_lib.DataSettings(),
         eval_settings: evaluation.EvalSettings | None = None) -> Task:
  """The distillation task of `model`'s latent-attention upcycling (the teacher frozen);
  with `eval_settings`, it evaluates the student against the teacher on held-out essays."""
  student = settings.upcycle(model)
  train, rest = split_student(student, settings.trainable)
  graphdef, student_shape = model_lib.abstract_params(student.config)
  frozen = {"teacher": model.params, "student_rest": rest}

  def batch(position, count):
    return data_lib.batch(data_settings, position, count, model.tokenizer,
                          model.config.vocab_size)

  def loss(params, frozen_tree, micro_batch, key):
    del key
    return distillation_loss(params, frozen_tree, micro_batch, model, graphdef,
                             student_shape, student.config)

  def init_params(key):
    del key   # the SVD initialisation is deterministic
    return dict(train)

  def student_of(params):
    state = merge_student(student_shape, {**rest, **params})
    return model_lib.Model(config=student.config, graphdef=graphdef, params=state,
                           tokenizer=model.tokenizer)

  evaluate = None if eval_settings is None else evaluation.student_evaluator(
      model, student_of, lambda m, tokens, mask: full_logits(m.graphdef, m.params, m.config,
                                                              tokens, mask), eval_settings)
  identity = trained.model_identity(model.config)
  meta = {"kind": KIND, "hyperparameters": dataclasses.asdict(settings),
          "data": dataclasses.asdict(data_settings), "model": identity,
          "model_hash": trained.identity_hash(identity),
          "weights_fingerprint": calibration.model_fingerprint(model),
          "student": student.config.to_dict()}
  return Task(init_params=init_params, loss=loss, frozen=frozen, batch=batch, meta=meta,
              evaluate=evaluate)


def student(path, model):
  """The latent-attention student a run at `path` (a run directory or a step folder)
  trained from `model`: refused for another model or other weights."""
  params, meta = trained.read(path)
  where = f" at {trained.step_dir(path)}"
  if meta.get("kind") != KIND:
    raise KvjaxError(f"the run{where} trained {meta.get('kind')!r}, not {KIND!r}")
  trained.check_model(meta, model.config, where)
  trained.check_fingerprint(meta, calibration.model_fingerprint(model), where)
  hyper = dict(meta["hyperparameters"])
  settings = XEcoMLASettings(**hyper)
  upcycled = settings.upcycle(model)
  flat = {name: np.asarray(value) for name, value in
          model_lib.to_flat_params(upcycled).items()}
  missing = sorted(set(flat) - set(params) - set(
      n for n in flat if not is_trainable(n, settings.trainable)))
  if missing:
    raise KvjaxError(f"the run{where} lacks trained tensors {missing[:3]}")
  flat.update(params)
  return model_lib.from_flat_params(upcycled.config, flat, model.tokenizer,
                                    source=f"X-EcoMLA run{where}")

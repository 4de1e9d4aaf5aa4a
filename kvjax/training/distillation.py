"""Distilling a student model from its teacher: KL(teacher || student) on every token.

The student is a converted copy of the teacher (X-EcoMLA's latent-attention upcycling,
`kvjax.training.xecomla`; or any saved model of the same vocabulary, e.g. fewer KV heads
from `scripts/convert.py --kv_head_group`, `--method=distill --student=PATH`): it learns
to match the teacher's next-token distributions, loss KL(softmax(z_T) || softmax(z_S)) at
temperature 1 averaged over the real tokens. Its attention layers are trained (what the
conversions change), or every parameter (`trainable="all"`); the rest stays the
student's own. The trainable parameters are a flat {name: array} dict (the student's names,
e.g. "layers.0.attn.kv_down.kernel").
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import calibration
from kvjax.cache.kv_cache import init_cache
from kvjax.errors import KvjaxError
from kvjax.loading import load as load_lib
from kvjax.methods import trained
from kvjax.model import model as model_lib
from kvjax.model import transformer
from kvjax.sharding import placement_of
from kvjax.training import data as data_lib
from kvjax.training import evaluation
from kvjax.training.attention_gate import lm_loss
from kvjax.training.loop import Task

TRAINABLE = ("attention", "all")
KIND = "distill"   # a saved student (`saved_student_task`)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
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


def task(teacher, student, kind: str, meta: dict, trainable: str = "attention",
         data_settings: data_lib.DataSettings = data_lib.DataSettings(),
         eval_settings: evaluation.EvalSettings | None = None) -> Task:
  """The task of distilling `teacher` (frozen) into `student`, starting from the student's
  weights; `meta` (JSON-ready: what the student is) joins the run's metadata under `kind`.
  With `eval_settings`, it evaluates the student against the teacher on held-out essays."""
  if trainable not in TRAINABLE:
    raise KvjaxError(f"trainable={trainable!r}; allowed: {TRAINABLE}")
  if student.config.vocab_size != teacher.config.vocab_size:
    raise KvjaxError(f"the student's vocabulary ({student.config.vocab_size}) is not the "
                     f"teacher's ({teacher.config.vocab_size}): their distributions differ")
  train, rest = split_student(student, trainable)
  graphdef, student_shape = model_lib.abstract_params(student.config)
  frozen = {"teacher": teacher.params, "student_rest": rest}

  def batch(position, count):
    return data_lib.batch(data_settings, position, count, teacher.tokenizer,
                          teacher.config.vocab_size)

  def loss(params, frozen_tree, micro_batch, key):
    del key
    return distillation_loss(params, frozen_tree, micro_batch, teacher, graphdef,
                             student_shape, student.config)

  def student_of(params):
    state = merge_student(student_shape, {**rest, **params})
    return model_lib.Model(config=student.config, graphdef=graphdef, params=state,
                           tokenizer=teacher.tokenizer)

  evaluate = None if eval_settings is None else evaluation.student_evaluator(
      teacher, student_of, lambda m, tokens, mask: full_logits(m.graphdef, m.params, m.config,
                                                                tokens, mask), eval_settings)
  identity = trained.model_identity(teacher.config)
  run_meta = {"kind": kind, **meta, "trainable": trainable,
              "data": dataclasses.asdict(data_settings), "model": identity,
              "model_hash": trained.identity_hash(identity),
              "weights_fingerprint": calibration.model_fingerprint(teacher),
              "student": student.config.to_dict(),
              "student_fingerprint": calibration.model_fingerprint(student)}
  return Task(init_params=lambda key: dict(train), loss=loss, frozen=frozen, batch=batch,
              meta=run_meta, evaluate=evaluate, placement=placement_of(teacher))


def trained_student(path, teacher, kind: str, initial_student: Callable[[dict], object]):
  """The student a run at `path` (a run directory or step folder) of `kind` distilled from
  `teacher`: `initial_student(meta)` rebuilds the student it started from (from the run's
  metadata), whose trained tensors are then replaced. Refused for another kind of run,
  another teacher, other teacher weights or another initial student."""
  params, meta = trained.read(path)
  where = f" at {trained.step_dir(path)}"
  if meta.get("kind") != kind:
    raise KvjaxError(f"the run{where} trained {meta.get('kind')!r}, not {kind!r}")
  trained.check_model(meta, teacher.config, where)
  trained.check_fingerprint(meta, calibration.model_fingerprint(teacher), where)
  student = initial_student(meta)
  if meta.get("student_fingerprint") != calibration.model_fingerprint(student):
    raise KvjaxError(f"the run{where} distilled another student (fingerprint "
                     f"{meta.get('student_fingerprint')}, this one "
                     f"{calibration.model_fingerprint(student)})")
  flat = {name: np.asarray(value) for name, value in
          model_lib.to_flat_params(student).items()}
  unknown = sorted(set(params) - set(flat))
  if unknown:
    raise KvjaxError(f"the run{where} holds tensors the student lacks: {unknown[:3]}")
  flat.update(params)
  return model_lib.from_flat_params(student.config, flat, teacher.tokenizer,
                                    source=f"distillation run{where}")


def saved_student_task(teacher, student_path, trainable: str = "attention",
                       data_settings: data_lib.DataSettings = data_lib.DataSettings(),
                       eval_settings: evaluation.EvalSettings | None = None) -> Task:
  """Distilling `teacher` into the model saved at `student_path` (any kvjax.load source of
  the same vocabulary, e.g. `scripts/convert.py --kv_head_group` output)."""
  source = str(pathlib.Path(student_path).expanduser().absolute())
  return task(teacher, load_lib.load(source), KIND, {"student_source": source}, trainable,
              data_settings, eval_settings)


def saved_student(path, teacher, student_path=None):
  """The student a `saved_student_task` run at `path` trained: the saved student (from
  `student_path`, by default where the run read it) with the run's weights."""
  def initial(meta):
    return load_lib.load(student_path or meta["student_source"])
  return trained_student(path, teacher, KIND, initial)

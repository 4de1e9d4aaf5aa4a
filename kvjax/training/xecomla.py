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

from kvjax import validation
from kvjax.config import LATENT_ROPE_MODES
from kvjax.errors import KvjaxError
from kvjax.model import upcycle
from kvjax.training import data as data_lib
from kvjax.training import distillation, evaluation
from kvjax.training.distillation import TRAINABLE
from kvjax.training.loop import Task

KIND = "xecomla"


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


def task(model, settings: XEcoMLASettings = XEcoMLASettings(),
         data_settings: data_lib.DataSettings = data_lib.DataSettings(),
         eval_settings: evaluation.EvalSettings | None = None) -> Task:
  """The distillation task of `model`'s latent-attention upcycling (the teacher frozen);
  with `eval_settings`, it evaluates the student against the teacher on held-out essays."""
  return distillation.task(model, settings.upcycle(model), KIND,
                           {"hyperparameters": dataclasses.asdict(settings)},
                           settings.trainable, data_settings, eval_settings)


def student(path, model):
  """The latent-attention student a run at `path` (a run directory or a step folder)
  trained from `model`: refused for another model or other weights."""
  return distillation.trained_student(
      path, model, KIND, lambda meta: XEcoMLASettings(**meta["hyperparameters"]).upcycle(model))

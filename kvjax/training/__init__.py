"""Training of trainable compression components on a frozen backbone.

  loop        the generic loop (Task, train): jitted value_and_grad step, gradient
              accumulation, progress bar, lossless resumable checkpoints
  optim       optax AdamW, warmup + cosine/linear schedules, clipping
  checkpoint  the run directory's orbax checkpoints
  data        deterministic examples from the RULER essays and SQuAD
  locret      Locret's retaining heads: labels, loss, task
  attention_gate  Attention-Gate's gates: the in-context masked forward pass, loss, task
  lococo      LoCoCo's fusing convolutions: the chunked forward through a fused memory
  pretrained  recipes whose weights are trained on first use (method="locret:checkpoint=trained")
`scripts/train.py` is the command line; `load_method` reads a trained component back for
a model, checking it was trained for that model's weights.
"""

from __future__ import annotations

from kvjax import calibration
from kvjax.errors import KvjaxError
from kvjax.methods import trained
from kvjax.methods.attention_gate import AttentionGate
from kvjax.methods.locret import Locret
from kvjax.methods.lococo import LoCoCo
from kvjax.training import pretrained  # noqa: F401 (registers checkpoint=trained)
from kvjax.training.loop import LoopSettings, RunResult, Task, train
from kvjax.training.optim import OptimizerSettings

METHODS = {"locret": Locret, "attention_gate": AttentionGate, "lococo": LoCoCo}


def load_method(path, model, method: str = "locret", **hyperparameters):
  """The trained method saved at `path` (a run directory or a step folder; "trained": the
  recipe's, trained now if it is not yet), refused unless it was trained for `model`: its
  architecture and name, and its weights' fingerprint."""
  if method not in METHODS:
    raise KvjaxError(f"method={method!r} has no trained parameters to load; trainable: "
                     f"{sorted(METHODS)}")
  loaded = METHODS[method].from_checkpoint(
      path, fingerprint=calibration.model_fingerprint(model), **hyperparameters)
  if loaded.checkpoint == trained.TRAINED:   # the recipe's run for this model
    return calibration.bind(loaded, model)
  loaded.check_model(model.config)
  return loaded


__all__ = ["LoopSettings", "OptimizerSettings", "RunResult", "Task", "load_method", "pretrained",
           "train"]

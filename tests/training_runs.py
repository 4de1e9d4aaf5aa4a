"""A training run directory written as `kvjax.training.train` writes it, without training."""

import jax
import optax

from kvjax.training import checkpoint as checkpoint_lib


def save_initial_step(task, directory, step: int):
  """(directory, params): `task`'s initial parameters saved as completed step `step`."""
  params = task.init_params(jax.random.key(0))
  run = checkpoint_lib.RunCheckpoints(directory, every=1)
  run.save(step, params, optax.adamw(1e-3).init(params), jax.random.key(0),
           {"step": step, "examples": 0, "history": []}, {**task.meta, "step": step})
  run.close()
  return directory, params

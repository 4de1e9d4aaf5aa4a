"""Lossless training checkpoints: everything a run needs to continue bit for bit.

A run directory is an orbax CheckpointManager root (absolute path: orbax writes in a
background thread that a relative one breaks). Each saved step holds
  params       the trained parameters (what `kvjax.methods.trained` reads back)
  meta         what is trained for which model, and with which settings (JSON)
  train_state  the optimiser state's leaves and the RNG key's data
  progress     the step, the data position (examples consumed) and the logged history
orbax writes a step into a temporary folder and renames it when complete (then writes
`commit_success.txt`), so a process killed while saving leaves the previous step as the
latest; the half-written folder is ignored and cleaned up by the next run.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kvjax.errors import CheckpointError
from kvjax.methods import trained

TRAIN_STATE = "train_state"
PROGRESS = "progress"
ITEMS = (trained.PARAMS, trained.META, TRAIN_STATE, PROGRESS)


def _leaf_dict(leaves) -> dict:
  # Optax states are nested named tuples: saved as numbered leaves and rebuilt from the
  # structure of a fresh state, so nothing depends on how orbax stores tuples.
  return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
  """The checkpoints of one training run, kept every `every` steps (the last `keep`)."""

  def __init__(self, directory, every: int, keep: int = 2):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    with trained.quiet():
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int, last: int) -> bool:
    return step % self.every == 0 or step == last

  def save(self, step: int, params, opt_state, rng, progress: dict, meta: dict) -> None:
    """Writes step `step` (complete or not at all)."""
    state = {"opt": _leaf_dict(jax.tree_util.tree_leaves(opt_state)),
             "rng": jax.random.key_data(rng)}
    with trained.quiet():
      self.manager.save(step, args=ocp.args.Composite(**{
          trained.PARAMS: ocp.args.StandardSave(params),
          trained.META: ocp.args.JsonSave(meta),
          TRAIN_STATE: ocp.args.StandardSave(state),
          PROGRESS: ocp.args.JsonSave(progress)}))
      self.manager.wait_until_finished()

  def meta(self, step: int) -> dict:
    """Step `step`'s metadata alone (JSON): what a resume checks before it reads arrays
    whose shapes may not fit."""
    try:
      with trained.quiet():
        return self.manager.restore(step, args=ocp.args.Composite(**{
            trained.META: ocp.args.JsonRestore()}))[trained.META]
    except Exception as e:  # orbax raises many types for a foreign or damaged folder
      raise CheckpointError(f"cannot read the metadata of step {step} of {self.directory}: "
                            f"{type(e).__name__}: {e}") from None

  def restore(self, step: int, params, opt_state, rng):
    """(params, opt_state, rng, progress, meta) of step `step`, shaped like the given
    fresh ones (their values are not used)."""
    leaves, treedef = jax.tree_util.tree_flatten(opt_state)
    template = {"opt": _leaf_dict(leaves), "rng": jax.random.key_data(rng)}
    try:
      with trained.quiet():
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            trained.PARAMS: ocp.args.StandardRestore(_abstract(params)),
            trained.META: ocp.args.JsonRestore(),
            TRAIN_STATE: ocp.args.StandardRestore(_abstract(template)),
            PROGRESS: ocp.args.JsonRestore()}))
    except Exception as e:  # orbax raises many types for a foreign or damaged folder
      raise CheckpointError(f"cannot restore step {step} of {self.directory}: "
                            f"{type(e).__name__}: {e}") from None
    state = restored[TRAIN_STATE]
    opt_leaves = [state["opt"][name] for name in sorted(state["opt"])]
    opt_state = jax.tree_util.tree_unflatten(treedef, opt_leaves)
    rng = jax.random.wrap_key_data(jnp.asarray(state["rng"]),
                                   impl=jax.random.key_impl(rng))
    return restored[trained.PARAMS], opt_state, rng, restored[PROGRESS], restored[trained.META]

  def close(self) -> None:
    with trained.quiet():
      self.manager.close()

"""kvjax checkpoints: an orbax parameter tree plus the config and tokenizer, written atomically.

Layout of a checkpoint directory:
  kvjax_config.json   the ModelConfig
  params/             orbax StandardCheckpointer save of {canonical name: array}
  tokenizer.json, kvjax_tokenizer.json   (when the model has a tokenizer)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile

import orbax.checkpoint as ocp
from absl import logging

from kvjax.config import ModelConfig
from kvjax.errors import CheckpointError, ConfigError

CONFIG_FILE = "kvjax_config.json"
PARAMS_DIR = "params"


@contextlib.contextmanager
def _quiet():
  """Orbax logs every read/write at INFO through absl; keep user output readable."""
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.WARNING))  # absl: higher means more verbose
  try:
    yield
  finally:
    logging.set_verbosity(level)


def is_checkpoint(path) -> bool:
  path = pathlib.Path(path)
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save(model, directory, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `model` to `directory` atomically: a crash leaves no half-written checkpoint.

  In a run of several processes (kvjax.sharding.distributed) every process calls it with
  the same directory, which all of them must reach (a shared disk or bucket): each writes
  the shards its devices hold into one staging folder process 0 names, and process 0
  writes the config and tokenizer and moves the folder into place once all are done."""
  import jax
  from jax.experimental import multihost_utils
  from kvjax.model import to_flat_params
  from kvjax.sharding import distributed
  directory = pathlib.Path(directory).expanduser().absolute()  # orbax needs absolute paths
  primary = distributed.is_primary()
  several = jax.process_count() > 1
  sync = lambda name: several and multihost_utils.sync_global_devices(f"kvjax_save_{name}")
  # Process 0's view decides, so that every process raises or none does.
  exists = distributed.broadcast_from_primary(directory.exists() if primary else None)
  if exists and not overwrite:
    raise CheckpointError(f"{directory} already exists; pass overwrite=True to replace it")
  staging = None
  if primary:
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent)
  staging = pathlib.Path(distributed.broadcast_from_primary(staging))
  try:
    if primary:
      (staging / CONFIG_FILE).write_text(model.config.to_json())
      if model.tokenizer is not None:
        model.tokenizer.save(staging)
    with _quiet(), ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging / PARAMS_DIR, to_flat_params(model))
    sync("written")
    if primary:
      if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(staging, directory)
    sync("moved")
  except BaseException:
    if primary:
      shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def _restore_target(checkpointer, path, placement):
  """Where orbax puts each tensor. With a placement (kvjax.sharding.Placement) every tensor
  goes straight into its shards by the placement's rules: each device reads only its part,
  whatever mesh the checkpoint was saved from. Without one: a one-process run puts every
  tensor on its first device; several processes (kvjax.sharding.distributed) each read
  every tensor whole. Orbax refuses to restore a checkpoint saved by another number of
  processes without such a target."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
  if placement is None and jax.process_count() == 1:
    first = SingleDeviceSharding(jax.devices()[0])
    where = lambda name, shape: first
  elif placement is None:
    everywhere = NamedSharding(Mesh(jax.devices(), ("all",)), PartitionSpec())
    where = lambda name, shape: everywhere
  else:
    from kvjax.sharding import param_axes
    where = lambda name, shape: placement.sharding(param_axes(name), shape)
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  return {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                     sharding=where(name, tuple(leaf.shape)))
          for name, leaf in metadata.items()}


def load(directory, *, dtype: str | None = None, placement=None):
  """Restores a Model saved by `save`, validating every tensor against the config; with a
  placement (kvjax.sharding.Placement), straight into the shards its rules give (the
  returned model is not yet marked as placed: kvjax.load(..., mesh=) does that)."""
  from kvjax.loading.tokenizer import Tokenizer
  from kvjax.model import from_flat_params
  directory = pathlib.Path(directory).expanduser().absolute()
  if not is_checkpoint(directory):
    raise CheckpointError(f"{directory} is not a kvjax checkpoint (needs {CONFIG_FILE} and "
                          f"{PARAMS_DIR}/)")
  try:
    config = ModelConfig.from_json((directory / CONFIG_FILE).read_text(),
                                   source=directory / CONFIG_FILE)
  except (ValueError, TypeError) as e:
    if isinstance(e, ConfigError):
      raise
    raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid kvjax config: {e}") from None
  if dtype is not None:
    config = config.replace(dtype=dtype)
  try:
    with _quiet(), ocp.StandardCheckpointer() as checkpointer:
      flat = checkpointer.restore(directory / PARAMS_DIR, _restore_target(
          checkpointer, directory / PARAMS_DIR, placement))
  except Exception as e:  # orbax raises many types for truncated/corrupt files
    raise CheckpointError(f"cannot restore parameters from {directory / PARAMS_DIR}: "
                          f"{type(e).__name__}: {e}") from None
  tokenizer = (Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None)
  return from_flat_params(config, flat, tokenizer=tokenizer, source=str(directory))

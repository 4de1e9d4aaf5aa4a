"""Trained components on disk: how a method reads back what `kvjax.training` saved.

A training run's directory is an orbax CheckpointManager root: one folder per saved step,
each holding the items named below. A method needs two of them: `PARAMS`, its parameter
pytree, and `META`, a JSON object saying what was trained for which model:
  {"kind": "locret", "hyperparameters": {...}, "model": model_identity(config),
   "model_hash": identity_hash(...), "weights_fingerprint": "...", "step": N}
The other items (optimiser state, data position, RNG, loss history) only resume training.
Parameters trained for another model are refused by its architecture and name
(`check_model`, always) and by its weights (`check_fingerprint`, wherever the method meets
a model: `kvjax.calibration.bind` hands it the model's fingerprint).

checkpoint=TRAINED ("trained") names no path: where the method meets a model, the weights
of kvjax's recipe for that model are used, trained on first use into the cache directory
(`kvjax.training.pretrained`, which registers the calibration `trained_calibration(KIND)`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import ClassVar

import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from kvjax.config import ModelConfig
from kvjax.errors import MethodError

PARAMS = "params"          # the trained parameter pytree (orbax StandardSave)
META = "meta"              # what was trained for which model (JSON)
COMMIT_MARKER = "commit_success.txt"   # orbax writes it last: the step folder is complete
TRAINED = "trained"        # checkpoint=TRAINED: the recipe's weights, trained on first use

# The fields that make parameters fit a model: its name and every shape they depend on.
IDENTITY_FIELDS = ("name", "architecture", "vocab_size", "hidden_size", "num_layers",
                   "num_heads", "num_kv_heads", "head_dim", "num_value_heads", "rope_theta")


@contextlib.contextmanager
def quiet():
  """Orbax logs every read and write at INFO through absl: keep user output readable."""
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.WARNING))
  try:
    yield
  finally:
    logging.set_verbosity(level)


def model_identity(config: ModelConfig) -> dict:
  """The model facts trained parameters are tied to (JSON-ready)."""
  return {field: getattr(config, field) for field in IDENTITY_FIELDS}


def identity_hash(identity: dict) -> str:
  """A short hash of `model_identity`: the "model hash" stored beside the parameters."""
  text = json.dumps(identity, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_model(meta: dict, config: ModelConfig, where: str = "") -> None:
  """Refuses parameters trained for a model other than `config`, naming what differs."""
  stored = meta.get("model") or {}
  mine = model_identity(config)
  differ = [f"{field}: trained for {stored.get(field)!r}, this model has {mine[field]!r}"
            for field in IDENTITY_FIELDS if stored.get(field) != mine[field]]
  if differ:
    raise MethodError(f"{meta.get('kind', 'trained')} parameters{where} were trained for "
                      f"another model ({stored.get('name') or 'unnamed'!s}, model hash "
                      f"{meta.get('model_hash')}; this one is {config.name or 'unnamed'!s}, "
                      f"model hash {identity_hash(mine)}): " + "; ".join(differ)
                      + ". Train them for this model (scripts/train.py --model=...)")


def check_fingerprint(meta: dict, fingerprint: str, where: str = "") -> None:
  """Refuses parameters trained on other weights (same architecture and name, e.g. a
  fine-tune), by the weights fingerprint of `kvjax.calibration.model_fingerprint`."""
  stored = meta.get("weights_fingerprint")
  if stored != fingerprint:
    raise MethodError(f"{meta.get('kind', 'trained')} parameters{where} were trained on "
                      f"weights with fingerprint {stored}, not on this model's "
                      f"({fingerprint}): train them for these weights")


def trained_calibration(kind: str) -> str:
  """The calibration that trains (or finds) `kind`'s recipe weights for a model and
  returns (run directory, model config, weights fingerprint)."""
  return f"{TRAINED}:{kind}"


def steps(root: pathlib.Path) -> list[int]:
  """The completed step folders of a run directory, in order."""
  found = []
  for child in root.iterdir() if root.is_dir() else ():
    if child.name.isdigit() and (child / COMMIT_MARKER).is_file():
      found.append(int(child.name))
  return sorted(found)


def step_dir(path) -> pathlib.Path:
  """The step folder `path` names: itself, or a run directory's latest completed step."""
  try:
    path = pathlib.Path(path).expanduser().absolute()
    if (path / META).is_dir() and (path / PARAMS).is_dir():
      return path
    done = steps(path)
  except (OSError, ValueError) as e:   # e.g. a NUL byte, a name too long
    raise MethodError(f"cannot read trained parameters at {str(path)!r}: {e}") from None
  if not done:
    raise MethodError(f"no trained parameters at {path}: expected a training run directory "
                      f"(scripts/train.py --workdir) with a completed step, or one of its "
                      f"step folders (holding {PARAMS}/ and {META}/)")
  return path / str(done[-1])


def read(path) -> tuple[dict, dict]:
  """(parameters as numpy arrays, metadata) of the step folder `path` names (see
  `step_dir`). The arrays are read-only: they are shared by every later read."""
  folder = step_dir(path)
  # Keyed by the commit marker's identity too: a run directory deleted and trained again
  # writes the same step folder names with other weights.
  marker = folder / COMMIT_MARKER
  stamp = (marker if marker.exists() else folder / META).stat()
  params, meta = _read(str(folder), stamp.st_ino, stamp.st_mtime_ns)
  return params, copy.deepcopy(meta)


@functools.lru_cache(maxsize=2)   # a model's heads can be hundreds of MB
def _read(folder: str, marker_inode: int, marker_mtime_ns: int) -> tuple[dict, dict]:
  del marker_inode, marker_mtime_ns   # cache key only
  folder = pathlib.Path(folder)
  try:
    with quiet(), ocp.CheckpointManager(folder.parent, item_names=(PARAMS, META)) as manager:
      restored = manager.restore(int(folder.name), args=ocp.args.Composite(**{
          PARAMS: ocp.args.StandardRestore(), META: ocp.args.JsonRestore()}))
  except Exception as e:  # orbax raises many types for truncated or foreign folders
    raise MethodError(f"cannot read trained parameters from {folder}: "
                      f"{type(e).__name__}: {e}") from None
  meta = restored[META]
  if not isinstance(meta, dict) or "kind" not in meta:
    raise MethodError(f"{folder / META} holds no trained-component metadata")
  params = {name: np.array(value) for name, value in restored[PARAMS].items()}
  for value in params.values():
    value.setflags(write=False)
  return params, meta


class TrainedWeights:
  """What a method whose weights come from a training run shares (Locret, Attention-Gate).

  A mixin for a frozen method dataclass with a `checkpoint: str` field (a run directory or
  step folder) and an in-memory weights field named by WEIGHTS_FIELD (an object with
  `params` and `meta`, of type WEIGHTS_TYPE); at most one of the two is given. KIND is the
  "kind" its training writes into the metadata; `check_shapes(params, config)` refuses
  weights of the wrong shapes. Where the method meets a model (`kvjax.calibration.bind`,
  calibration "weights_fingerprint"), the architecture, name and weights are checked.
  """
  KIND: ClassVar[str]
  WEIGHTS_FIELD: ClassVar[str]
  WEIGHTS_TYPE: ClassVar[type]
  MISSING: ClassVar[str]         # what is missing without weights, e.g. "trained gates"
  # Whether checkpoint=TRAINED is offered: kvjax.training.pretrained has a recipe for it
  # (LoCoCo's serves one budget, the recipe's memory size).
  TRAINS_ON_FIRST_USE: ClassVar[bool] = False

  @property
  def calibration(self) -> str:
    """What `kvjax.calibration.bind` computes from the model: the recipe's run (trained on
    first use) for checkpoint=TRAINED, else the fingerprint the weights are checked by."""
    if self.checkpoint == TRAINED:
      return trained_calibration(self.KIND)
    return "weights_fingerprint"

  def check_weights_source(self) -> None:
    """__post_init__'s part: a path or weights of the right type, not both; a checkpoint is
    pinned to one step folder (a run that trains on does not change what this means)."""
    weights = getattr(self, self.WEIGHTS_FIELD)
    if not isinstance(self.checkpoint, str):
      raise MethodError(f"{self.KIND} checkpoint={self.checkpoint!r} must be a path (str)")
    if weights is not None and not isinstance(weights, self.WEIGHTS_TYPE):
      raise MethodError(f"{self.KIND} {self.WEIGHTS_FIELD}={type(weights).__name__} must be "
                        f"a {self.WEIGHTS_TYPE.__name__} (or None, with a checkpoint)")
    if self.checkpoint and weights is not None:
      raise MethodError(f"{self.KIND} takes its weights from checkpoint or "
                        f"{self.WEIGHTS_FIELD}, not both")
    if self.checkpoint == TRAINED:
      if not self.TRAINS_ON_FIRST_USE:
        raise MethodError(f"{self.KIND} checkpoint={TRAINED!r}: kvjax has no recipe for "
                          f"{self.KIND} (see kvjax.training.pretrained.RECIPES); train it "
                          f"with scripts/train.py --method={self.KIND} and give the run's "
                          f"directory")
      # Relative to the working directory, as a path checkpoint would be read.
      if pathlib.Path(TRAINED).exists():
        raise MethodError(f"{self.KIND} checkpoint={TRAINED!r} names kvjax's recipe weights, "
                          f"and ./{TRAINED} exists too: for that directory give "
                          f"checkpoint=./{TRAINED}")
      return   # bound to the recipe's run where the method meets a model
    if self.checkpoint:
      folder = step_dir(self.checkpoint)
      _, meta = read(folder)
      if meta.get("kind") != self.KIND:
        raise MethodError(f"{folder} holds {meta.get('kind')!r} parameters, not "
                          f"{self.KIND}'s")
      object.__setattr__(self, "checkpoint", str(folder))

  @classmethod
  def from_checkpoint(cls, path, fingerprint: str | None = None, **hyperparameters):
    """The method with the weights a training run saved at `path` (its latest step, or the
    step folder given). fingerprint: the model's weights fingerprint
    (`kvjax.calibration.model_fingerprint`), checked now when given; the architecture,
    name and fingerprint are checked whenever the method meets a model. path=TRAINED: the
    recipe's weights, found (or trained) and checked when the method meets a model."""
    method = cls(checkpoint=str(path), **hyperparameters)
    if fingerprint is not None and method.checkpoint != TRAINED:
      check_fingerprint(method.metadata(), fingerprint, method.where())
    return method

  def where(self) -> str:
    if self.checkpoint == TRAINED:
      return " (trained on first use)"
    return f" ({self.checkpoint})" if self.checkpoint else ""

  def metadata(self) -> dict | None:
    """What the weights were trained for (None for in-memory weights without it, and
    before checkpoint=TRAINED meets a model)."""
    if self.checkpoint == TRAINED:
      return None
    if self.checkpoint:
      return read(self.checkpoint)[1]
    weights = getattr(self, self.WEIGHTS_FIELD)
    return None if weights is None else weights.meta

  def weights(self) -> dict:
    """The trained parameters (numpy, read-only when read from a run)."""
    if self.checkpoint == TRAINED:
      raise MethodError(f"{self.KIND}:checkpoint={TRAINED} has its weights once it meets a "
                        f"model (kvjax.generate and the other entry points bind it; "
                        f"kvjax.calibration.bind(method, model) does it by hand)")
    if self.checkpoint:
      return read(self.checkpoint)[0]
    weights = getattr(self, self.WEIGHTS_FIELD)
    if weights is None:
      raise MethodError(
          f"{self.KIND} has no {self.MISSING}: give {type(self).__name__}.from_checkpoint(path)"
          f" (a run of scripts/train.py --method={self.KIND}), method='{self.KIND}:"
          f"checkpoint=PATH', or {type(self).__name__}({self.WEIGHTS_FIELD}="
          f"{self.WEIGHTS_TYPE.__name__}(params))")
    return weights.params

  def check_model(self, config: ModelConfig) -> None:
    """Refuses weights trained for another model (name, architecture, shapes); the
    recipe's weights (checkpoint=TRAINED) are trained for the model they meet."""
    if self.checkpoint == TRAINED:
      return
    meta = self.metadata()
    if meta is not None:
      check_model(meta, config, self.where())
    self.check_shapes(self.weights(), config)

  def needs_calibration(self) -> bool:
    """Whether the recipe's weights are still to be found, or there is a training
    fingerprint to check against the model's weights."""
    if self.checkpoint == TRAINED:
      return True
    return bool((self.metadata() or {}).get("weights_fingerprint"))

  def calibrated(self, result):
    """`result`: (the model's config, its weights fingerprint), or for checkpoint=TRAINED
    (the recipe's run directory, config, fingerprint); refused unless the weights were
    trained for this architecture and on these weights."""
    if self.checkpoint == TRAINED:
      path, *result = result
      return dataclasses.replace(self, checkpoint=str(path)).calibrated(tuple(result))
    config, fingerprint = result
    self.check_model(config)
    check_fingerprint(self.metadata(), fingerprint, self.where())
    return self

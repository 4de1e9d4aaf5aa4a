"""KV-cache compression methods: registry, method objects and argument validation.

A method is a frozen dataclass of hyperparameters (hashable, so static under jit) plus pure
scoring hooks (see `base.Method`). Names here are what `generate(method=...)` and the
command line's --method accept; objects can be built directly for composition, e.g.
`AdaKV(press=ExpectedAttention())` or `SinksWindow(press=Knorm(), sinks=4, window=64)`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

from kvjax import validation
from kvjax.errors import MethodError
from kvjax.methods import registry
from kvjax.methods.accumulated import H2O, TOVA, Scissorhands
from kvjax.methods.attention_gate import AttentionGate
from kvjax.methods.base import LayerInputs, Method
from kvjax.methods.cake import CAKE
from kvjax.methods.compresskv import CompressKV
from kvjax.methods.epicache import EpiCache
from kvjax.methods.gear import GEAR
from kvjax.methods.key_statistics import ExpectedAttention, Knorm
from kvjax.methods.kvcrush import KVCrush
from kvjax.methods.kvzip import KVzip
from kvjax.methods.lazy_eviction import LazyEviction
from kvjax.methods.locret import Locret
from kvjax.methods.lococo import LoCoCo
from kvjax.methods.loopserve import LoopServe
from kvjax.methods.merging import D2O, EMS, ElasticCache, KVMerger
from kvjax.methods.minicache import MiniCache
from kvjax.methods.mixed_precision import MiKV, ZipVL
from kvjax.methods.mpcache import MPCache
from kvjax.methods.positional import StreamingLLM
from kvjax.methods.quest import Quest
from kvjax.methods.quantization import KIVI
from kvjax.methods.sentencekv import SentenceKV
from kvjax.methods.think import ThinK
from kvjax.methods.window import PyramidKV, SnapKV
from kvjax.methods.xkv import XKV
from kvjax.methods.wrappers import AdaKV, PerLayer, SinksWindow
from kvjax.methods.razor import RazorAttention
from kvjax.methods.specpc import SpecPC
from kvjax.methods.speckv import SpecKV
from kvjax.methods.registry import available, get


@registry.register
@dataclasses.dataclass(frozen=True)
class Full(Method):
  """The uncompressed cache: every token of every layer and head is kept."""
  name: ClassVar[str] = "full"
  compresses: ClassVar[bool] = False
  needs_budget: ClassVar[bool] = False


__all__ = ["AdaKV", "CAKE", "CompressKV", "D2O", "EMS", "ElasticCache", "EpiCache", "ExpectedAttention", "Full", "GEAR", "H2O", "KIVI", "Knorm", "KVCrush", "KVMerger", "KVzip", "LayerInputs", "LoCoCo", "LoopServe", "MPCache", "Quest", "SentenceKV", "SpecKV", "SpecPC", "LazyEviction",
           "Method", "MiKV", "MiniCache", "PerLayer", "PyramidKV", "RazorAttention", "Scissorhands", "SinksWindow", "SnapKV",
           "StreamingLLM", "ThinK", "TOVA", "XKV", "ZipVL", "available", "get",
           "validate_compression"]


def validate_compression(method: Method, context_lengths, compression_ratio=None,
                         budget=None) -> int | None:
  """Checks compression_ratio/budget against the method and the contexts of a batch.

  Returns the number of context tokens to keep per layer and KV head (None = keep all). A
  ratio applies to the longest context (the cache's size). A budget is a cap: rows whose
  context is not longer than it keep every token, and a budget above the longest context
  keeps everything (the returned count is then that context's length, so no cache is
  larger than the full one).

  Protected tokens (sinks, recent windows) never refuse a budget: where they would not
  leave a slot to the method's scores they shrink to fit (`Method.fitted`), so a short
  prompt's ratio is honoured.

  Ratio -> budget follows kvpress (`ScorerPress.compress` in kvpress/presses/scorer_press.py:
  `n_kept = int(k_len * (1 - compression_ratio))`): the kept count is truncated, not rounded,
  and computed with the same float expression, so it equals kvpress's count bit for bit
  (e.g. 2048 tokens at 0.9 keep int(204.799...) = 204, where round() would give 205). kvpress
  has no lower bound (a tiny context at a high ratio keeps 0 tokens there); kvjax keeps at
  least 1, since an empty cache has nothing to attend to.
  """
  lengths = [context_lengths] if isinstance(context_lengths, numbers.Integral) else list(
      context_lengths)
  if compression_ratio is not None and budget is not None:
    raise MethodError(f"give compression_ratio ({compression_ratio}) or budget ({budget}), "
                      f"not both")
  if compression_ratio is not None:
    validation.number("compression_ratio", compression_ratio, 0, 1, high_open=True,
                      error=MethodError, what="the fraction of the prompt cache removed")
  if budget is not None:
    validation.integer("budget", budget, 1, error=MethodError,
                       what="tokens kept per layer and KV head (a cap: shorter rows keep "
                            "every token)")
  compressing = bool(compression_ratio) or budget is not None
  if compressing and not method.compresses:
    raise MethodError(
        f"method {method.name!r} keeps the whole cache, so compression_ratio="
        f"{compression_ratio} / budget={budget} cannot apply; choose a compression method "
        f"from {registry.compressing()}")
  if compressing and method.compresses and not method.needs_budget:
    has_press = "press" in {f.name for f in dataclasses.fields(method)}
    raise MethodError(
        f"method {method.label!r} sizes its cache by its own hyperparameters (it keeps every "
        f"token in its own storage, or, like razor, by a capacity such as local_capacity), so "
        f"compression_ratio={compression_ratio} / budget={budget} would be ignored; leave "
        f"them unset"
        + (", or give the method a token-selecting press (e.g. press='snapkv') for them to "
           "apply to" if has_press else ""))
  if method.needs_budget and compression_ratio is None and budget is None:
    raise MethodError(f"method {method.label!r} needs compression_ratio (in [0, 1)) or "
                      f"budget (tokens kept per layer and KV head)")
  if budget is not None:
    keep = min(int(budget), max(lengths))
  elif compression_ratio is not None and method.needs_budget:
    # float(): the same IEEE double expression as kvpress's, whatever Real type was given.
    keep = max(1, int(max(lengths) * (1 - float(compression_ratio))))
  else:
    return None
  protected = method.fitted(keep).protected_tokens(keep)
  if protected > keep:  # only a method whose protection cannot shrink (its own `fitted`)
    raise MethodError(f"method {method.label!r} always keeps {protected} tokens (sinks and "
                      f"recent window) but the budget is {keep} tokens per layer; raise the "
                      f"budget to {protected} or shrink the method's window")
  return keep

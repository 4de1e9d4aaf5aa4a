"""CompressKV's calibration: semantic retrieval head scores and the layer error profile.

Reading: the official code (TUDa-HWAI/CompressKV),
`Retrieval_Head_Identification/semantic_retrieval_head_detection.py` for the heads and
`longbench/model/modeling_llama_new.py` (`layer_error_fnorm`) with
`longbench/pred_get_importance_score.py` for the layer errors.

Heads: needle prompts (RULER's niah_single_1 from `kvjax.evaluation.tasks`: a 7-digit
number under a key, in repeated noise sentences, then the question; in the tokenizer's chat
template, else followed by "\nAnswer:") are prefilled but for their last token, then
decoded greedily from it. At every step whose generated token occurs in the needle
(counted once per occurrence, as the code loops over the needle's tokens), each query head
adds the attention mass that the query producing that token puts on the whole needle span.
A row stops after a newline or EOS. Rows whose answer recall (the share of the answer's
words found in the generated text) is above `min_recall` are kept; the head scores are
their mean.

Layer errors: the same prompts are prefilled whole, each layer's CompressKV selection at
the uniform calibration `budget` is taken from the found heads (top `first_k`), and the
model decodes greedily over its full cache; at every step each layer's attention output
after o_proj over the selection (plus the tokens decoded so far) is compared with the full
one: e_l += ||O_comp - O_full||_F / (||O_full||_F + 1e-5) per row and step. The sums are
L1-normalised into u_l.

Defaults: 4 prompts of about 285 tokens (256 of context and question, in the chat template
when the tokenizer has one), up to 32 answer steps (SmolLM2 answers "The special magic
number for ... is 5793496." in about 25, and all 4 rows pass the recall bar), 8 error
steps, calibration budget 64, first_k 4, recall > 0.5. Measured on SmolLM2-135M on 2 CPU
cores shared with other jobs (load average 7): 85 s the first time (about two thirds of it
compiling four forward passes), 26 s when compiled, 0.5 s when read back from disk.

Differences from the official code: a few short synthetic prompts instead of NIAH up to
128K tokens and LongBench samples (the same prompts serve both profiles); recall is over
the expected answer's words (lower-cased alphanumeric runs, no stemming), where the code's
ROUGE-1 recall is over the whole needle sentence (its needles are answered by repeating
them); when no row passes the recall bar the mean is over every row (the code would have
no score); prompts are batched, left-padded to a common width; the needle span comes from
tokenizing the text before, in and after the needle separately (the code searches the
tokens for a 90% overlap); the error decode runs a fixed number of steps.

The result is stored as JSON in kvjax's cache directory under the model's weight
fingerprint (`kvjax.calibration.model_fingerprint`) and the settings, and is checked
against both when read: a file made for other weights is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import fileio
from kvjax.cache.kv_cache import EMPTY_POSITION, Cache, init_cache
from kvjax.errors import MethodError
from kvjax.evaluation import tasks
from kvjax.loading import assets
from kvjax.methods import base, plan
from kvjax.methods.compresskv import CompressKV, top_heads
from kvjax.model import to_flat_params, transformer
from kvjax.ops import attention as attention_ops
from kvjax.ops.host import host_array

KIND = "compresskv"
VERSION = 1
EPSILON = 1e-5   # the code's eps in the relative error


@dataclasses.dataclass(frozen=True)
class Settings:
  """The calibration's sizes (all part of the stored file's key)."""
  prompts: int = 4
  prompt_tokens: int = 256
  answer_steps: int = 32
  error_steps: int = 8
  budget: int = 64
  first_k: int = 4
  min_recall: float = 0.5
  seed: int = 0

  def __post_init__(self):
    for name in ("prompts", "answer_steps", "error_steps", "budget", "first_k"):
      base.check_int(name, getattr(self, name), 1)
    base.check_int("prompt_tokens", self.prompt_tokens, tasks.MIN_TARGET_TOKENS)
    base.check_fraction("min_recall", self.min_recall)
    base.check_int("seed", self.seed, 0)

  @property
  def key(self) -> str:
    return "-".join(f"{f.name}{getattr(self, f.name)}" for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  ids: tuple[int, ...]
  start: int      # the needle's tokens are ids[start:end]
  end: int
  answer: str


def needle_prompts(tokenizer, settings: Settings) -> list[NeedlePrompt]:
  """The calibration prompts, deterministic in the settings."""
  examples = tasks.generate_examples("niah_single_1", tokenizer, settings.prompt_tokens,
                                     settings.prompts, settings.seed)
  encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))
  # As generate does: a chat template's text carries its own special tokens.
  chat = getattr(tokenizer, "has_chat_template", False)
  bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos", False) and not chat else []
  prompts = []
  for ex in examples:
    answer = ex.answers[0]
    text = (tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                          add_generation_prompt=True)
            if chat else ex.prompt + "\nAnswer:")
    found = re.search(r" ?One of the special magic \w+ for [^.]*? is: " + re.escape(answer)
                      + r"\.", text)
    before, needle, after = text[:found.start()], found.group(), text[found.end():]
    head = bos + encode(before)
    needle_ids = encode(needle)
    prompts.append(NeedlePrompt(tuple(head + needle_ids + encode(after)), len(head),
                                len(head) + len(needle_ids), answer))
  return prompts


def answer_recall(answer: str, text: str) -> float:
  """Share of the answer's words (lower-cased alphanumeric runs) found in `text`, each
  matched at most as often as it occurs there (ROUGE-1 recall without stemming)."""
  words = lambda s: re.findall(r"[a-z0-9]+", s.lower())
  want, got = words(answer), words(text)
  hits = 0
  for word in want:
    if word in got:
      got.remove(word)
      hits += 1
  return hits / max(len(want), 1)


# ------------------------------------------------------------------------------ probes


@dataclasses.dataclass(frozen=True)
class NeedleMass:
  """Decode policy: stores every token and returns [B, L, H], the attention mass each
  query head's (single) query puts on the slots at positions params["start"] <=
  p < params["end"] [B]."""

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache.append(new), None, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, stats
    probs = attention_ops.probabilities(
        step.queries.astype(jnp.float32), layer_cache.keys.astype(jnp.float32),
        step.new.positions, layer_cache.positions)[:, :, :, -1]            # [B, K, G, S]
    pos = layer_cache.positions
    span = (pos >= step.params["start"][:, None, None]) & (pos < step.params["end"][:, None,
                                                                                  None])
    b, k, g, _ = probs.shape
    return layer_cache, (probs * span[:, :, None]).sum(-1).reshape(b, k * g)

  def finish(self, layers, lengths):
    return (Cache(layers=tuple(c for c, _ in layers), lengths=lengths),
            jnp.stack([m for _, m in layers], 1))


@dataclasses.dataclass(frozen=True)
class Selection:
  """Prefill policy: stores every token and marks, in each slot's state, the prompt tokens
  that `method`'s selection at `budget` drops (1.0); later tokens append with state 0."""
  method: CompressKV
  budget: int

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache.append(new), None, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del stats
    prio = base.priorities(self.method, plan.layer_inputs(layer, layer_cache, step, None),
                           self.budget)
    _, index = jax.lax.top_k(prio, self.budget)
    b, k, s = prio.shape
    kept = jnp.zeros((b, k, s), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], index].set(True)
    return layer_cache.replace(state=((layer_cache.positions >= 0) & ~kept).astype(
        jnp.float32))

  def finish(self, layers, lengths):
    return Cache(layers=tuple(layers), lengths=lengths)


@dataclasses.dataclass(frozen=True)
class OutputError:
  """Decode policy: stores every token and returns per layer the new query's attention
  output [B, 1, H, D] over the full cache and over the slots not marked dropped."""

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache.append(new), None, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, stats
    c = layer_cache
    q, qpos = step.queries, step.new.positions
    full = attention_ops.attend(q, c.keys, c.values, qpos, c.positions)
    kept = jnp.where(c.state > 0, EMPTY_POSITION, c.positions)
    return c, (full, attention_ops.attend(q, c.keys, c.values, qpos, kept))

  def finish(self, layers, lengths):
    outs = [o for _, o in layers]
    return (Cache(layers=tuple(c for c, _ in layers), lengths=lengths),
            jnp.stack([f for f, _ in outs]), jnp.stack([p for _, p in outs]))


@functools.partial(jax.jit, static_argnames=("graphdef", "policy"))
def _forward(graphdef, params, tokens, mask, cache, policy, method_params):
  return transformer.forward(graphdef, params, tokens, mask, cache, "last", policy,
                             method_params)


@jax.jit
def relative_errors(full, comp, o_kernels):
  """[L, B]: ||o(comp) - o(full)||_F / (||o(full)||_F + eps) per layer and row, from
  outputs [L, B, 1, H, D] and o_proj kernels [L, H, D, hidden]."""
  project = lambda x: jnp.einsum("lbthk,lhkd->lbtd", x.astype(jnp.float32),
                                 o_kernels.astype(jnp.float32),
                                 precision=jax.lax.Precision.HIGHEST)
  o_full = project(full)
  diff = project(comp) - o_full
  norm = lambda x: jnp.sqrt((x ** 2).sum((2, 3)))
  return norm(diff) / (norm(o_full) + EPSILON)


# ------------------------------------------------------------------------- calibration


def _left_pad(rows) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    tokens[i, width - len(row):] = row
    mask[i, width - len(row):] = True
  return tokens, mask


def _stops(tokenizer) -> set[int]:
  stops = set(getattr(tokenizer, "eos_token_ids", ()) or ())
  stops.update(t for t in (tokenizer.token_to_id("\n"), tokenizer.token_to_id("Ċ"))
               if t is not None)
  return stops


def head_scores(model, prompts: list[NeedlePrompt], settings: Settings
                ) -> tuple[np.ndarray, int]:
  """([L, H] mean needle-attention scores over the kept rows, how many rows were kept)."""
  tokenizer, cfg = model.tokenizer, model.config
  tokens, mask = _left_pad([p.ids for p in prompts])
  rows, width = tokens.shape
  # Positions count real tokens only, so a row's needle sits at [start, end) whatever its
  # padding.
  params = {"start": jnp.asarray([p.start for p in prompts], jnp.int32),
            "end": jnp.asarray([p.end for p in prompts], jnp.int32)}
  cache = init_cache(cfg, rows, width + settings.answer_steps)
  _, cache = _forward(model.graphdef, model.params, jnp.asarray(tokens[:, :-1]),
                      jnp.asarray(mask[:, :-1]), cache, None, None)
  token = jnp.asarray(tokens[:, -1])
  stops = _stops(tokenizer)
  needles = [list(p.ids[p.start:p.end]) for p in prompts]
  scores = np.zeros((rows, cfg.num_layers, cfg.num_heads))
  generated = [[] for _ in range(rows)]
  live = np.ones(rows, bool)
  for _ in range(settings.answer_steps):
    logits, (cache, mass) = _forward(model.graphdef, model.params, token[:, None],
                                     jnp.ones((rows, 1), bool), cache, NeedleMass(), params)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    ids, mass = host_array(token), host_array(mass).astype(np.float64)
    for row in np.flatnonzero(live):
      scores[row] += needles[row].count(int(ids[row])) * mass[row]
      generated[row].append(int(ids[row]))
      live[row] = int(ids[row]) not in stops
    if not live.any():
      break
  recall = np.array([answer_recall(p.answer, tokenizer.decode(g))
                     for p, g in zip(prompts, generated)])
  kept = recall > settings.min_recall
  chosen = scores[kept] if kept.any() else scores
  return chosen.mean(0), int(kept.sum())


def layer_errors(model, prompts: list[NeedlePrompt], heads, settings: Settings) -> np.ndarray:
  """[L] relative attention-output errors of the CompressKV selection (query heads `heads`
  per layer) at the uniform calibration budget, summed over rows and decode steps."""
  cfg = model.config
  tokens, mask = _left_pad([p.ids for p in prompts])
  rows, width = tokens.shape
  budget = min(settings.budget, min(len(p.ids) for p in prompts) - 1)
  method = CompressKV(heads=heads, layer_weights=(1.0,) * cfg.num_layers).fitted(budget)
  flat = to_flat_params(model)
  o_kernels = jnp.stack([flat[f"layers.{i}.attn.o.kernel"] for i in range(cfg.num_layers)])
  cache = init_cache(cfg, rows, width + settings.error_steps)
  logits, cache = _forward(model.graphdef, model.params, jnp.asarray(tokens),
                           jnp.asarray(mask), cache, Selection(method, budget), None)
  total = np.zeros(cfg.num_layers)
  for _ in range(settings.error_steps):
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    logits, (cache, full, comp) = _forward(model.graphdef, model.params, token[:, None],
                                           jnp.ones((rows, 1), bool), cache, OutputError(),
                                           None)
    total += host_array(relative_errors(full, comp, o_kernels)).astype(np.float64).sum(1)
  return total


def calibrate(model, fingerprint: str, settings: Settings = Settings()) -> dict:
  """The calibration of `model` (weights fingerprint `fingerprint`) as the stored dict."""
  if model.tokenizer is None:
    raise MethodError(f"compresskv calibrates on text needle prompts; model "
                      f"{model.config.name or '(unnamed)'} has no tokenizer")
  prompts = needle_prompts(model.tokenizer, settings)
  scores, kept = head_scores(model, prompts, settings)
  errors = layer_errors(model, prompts, top_heads(scores, settings.first_k), settings)
  weights = errors / errors.sum() if errors.sum() > 0 else np.full(len(errors),
                                                                   1 / len(errors))
  return {"kind": KIND, "version": VERSION, "model": model.config.name,
          "model_hash": fingerprint, "settings": dataclasses.asdict(settings),
          "kept_runs": kept, "runs": len(prompts), "head_scores": scores.tolist(),
          "layer_errors": errors.tolist(), "layer_weights": weights.tolist()}


def check(result: dict, model, fingerprint: str, path="") -> dict:
  """`result` if it is a CompressKV calibration of this model, else a clear error."""
  where = f" ({path})" if path else ""
  if not isinstance(result, dict) or result.get("kind") != KIND:
    raise MethodError(f"not a compresskv calibration file{where}")
  if result.get("version") != VERSION:
    raise MethodError(f"compresskv calibration{where} has version {result.get('version')!r}; "
                      f"this kvjax reads version {VERSION}: recalibrate")
  if result.get("model_hash") != fingerprint:
    raise MethodError(f"compresskv calibration{where} belongs to model "
                      f"{result.get('model')!r} (weights {result.get('model_hash')}), not to "
                      f"this one ({model.config.name!r}, weights {fingerprint}): calibrate "
                      f"this model instead")
  cfg = model.config
  try:
    shape = np.shape(result.get("head_scores"))
  except ValueError:   # ragged lists
    shape = None
  if shape != (cfg.num_layers, cfg.num_heads) or len(result.get("layer_weights", ())) != (
      cfg.num_layers):
    raise MethodError(f"compresskv calibration{where} has head scores of shape {shape}; the "
                      f"model has {cfg.num_layers} layers of {cfg.num_heads} query heads")
  return result


def path_for(fingerprint: str, settings: Settings) -> pathlib.Path:
  return assets.cache_dir() / KIND / f"{fingerprint}-{settings.key}.json"


def load(path, model, fingerprint: str) -> dict:
  """A stored calibration, checked against the model (see `check`)."""
  stored = fileio.read_json(path)
  if stored is None:
    raise MethodError(f"no compresskv calibration at {path} (missing, unreadable or not a "
                      f"JSON object)")
  return check(stored, model, fingerprint, path)


def calibration(model, fingerprint: str, settings: Settings = Settings()) -> dict:
  """`calibrate`'s result, read from kvjax's cache directory when this model (by weight
  fingerprint) was calibrated with these settings before, else computed and stored."""
  path = path_for(fingerprint, settings)
  stored = fileio.read_json(path)
  if stored is not None and stored.get("version") == VERSION:
    return check(stored, model, fingerprint, path)
  result = calibrate(model, fingerprint, settings)
  path.parent.mkdir(parents=True, exist_ok=True)
  fileio.write_json_atomic(path, result)
  return result

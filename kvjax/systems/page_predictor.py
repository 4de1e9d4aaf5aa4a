"""Training and measuring the offload tier's learned discard predictor
(`kvjax.cache.page_predictor`, page_buffer's "learned" policy).

Data: real decodes through Quest with the offload buffer and `record_pages=True`
(`collect`): every buffered decode step hands over, per layer, its requests [B, K, R] and
every page's features [B, K, P, F]. A `Trace` is one (prompt row, layer, KV head): its
steps' requests (served in order, as the buffer serves them) and features.

Labels (`examples`): the paper's discard bit, `paging.belady_discard_bits` of the trace's
requests flattened in serving order at the buffer's capacity (`device_pages`). At step s
a page read at or before s gets the bit of its latest read up to the end of step s (the
bit the paper attaches to a page at its request holds until the next one); pages never
read yet give no example. The buffer uses a page's step-s bit only once step s is done
reading it (its same-step rule), which is what this label describes. Features are those
the buffer computes at step s, so the model learns exactly what the jitted step sees.
Censoring (`HORIZON` = 4 steps): in the recording's last 4 steps, a page whose latest
read has no later read gives no example (Belady calls it safe only because the recording
stops). `censoring_errors` measures the rule by cutting recordings 8 steps short: of such
"safe" pairs, 60% were in fact not safe at the cut trace's last step, 16%, 8%, 5% with
1, 2, 3 steps left, 3.4% and fewer from 4 steps on (SmolLM2 training recordings, 12
frames); the horizon drops 13,441 of 127,069 training examples.

Training (`train`): full-batch optax Adam on the binary cross-entropy (plus a little L2),
deterministic. `write_trained` rewrites the `TRAINED` block of
kvjax/cache/page_predictor.py with the result.

Measurement (`measure`): on held-out prompts, decodes with the buffer under "lru",
"predictions" (the heuristic) and "learned" (faults and fault rate from the buffer's own
counters, tokens checked equal), and on the traces recorded in the "learned" run:
Belady's optimum (`paging.belady`), `paging.lru`, and per kind of bits (learned,
heuristic) the prediction errors (eta0, eta1) = `paging.prediction_errors` of the
per-request bits (the bit of the request's page at its step, 0 when the step reads the
page again: `request_bits`) against Belady's.

Reproduce the shipped weights and the measured numbers (5-15 minutes on 2 CPU cores;
docs/results/systems/page_predictor_smollm2.json):

    python scripts/train_page_predictor.py --write --json_out=page_predictor.json

(SmolLM2-135M, six ~500-token Paul Graham essay passages: four to train, two held out;
Quest at compression_ratio 0.75 with 12 device frames per row and KV head, 24 new
tokens, a one-hidden-layer model of 4 units, horizon 4; training is deterministic given
the recordings, but the recordings are not bit-reproducible: LRU's count moved by one
fault between two runs of unchanged selection code, a near-tie in Quest's pages.) Measured so
(held out, 92,736 requests over 28 paged layers, 3 KV heads, 2 rows, 23 steps): faults
learned 8,188 (fault rate 0.0883), heuristic "predictions" 8,124 (0.0876), LRU 8,784
(0.0947), Belady 5,417 (0.0584); tokens identical to on-device Quest for all three.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax import validation
from kvjax.cache import page_buffer
from kvjax.cache.page_predictor import (NUM_FEATURES, PagePredictor, PredictorError,
                                        num_weights, predictor_logits)
from kvjax.evaluation import data
from kvjax.generation.generate import generate
from kvjax.loading.load import load
from kvjax.methods.quest import Quest
from kvjax.systems import paging

TRAINED_FILE = pathlib.Path(__file__).resolve().parents[1] / "cache" / "page_predictor.py"


@dataclasses.dataclass(frozen=True)
class Trace:
  """One (row, layer, KV head)'s recorded decode steps. requests [S, R] int (served in
  order), features [S, P, F], heuristic / learned bits [S, P] (the buffer's)."""
  requests: np.ndarray
  features: np.ndarray
  heuristic: np.ndarray
  learned: np.ndarray

  def pages(self) -> list:
    """The requests flattened in serving order: the paging trace."""
    return [int(p) for p in self.requests.reshape(-1)]


def traces_from_recording(recording: dict) -> list:
  """`page_buffer.recording()`'s {layer: [(step, requests, features, heuristic, learned)]}
  as Traces, ordered by layer, row and head."""
  out = []
  for tag in sorted(recording):
    items = sorted(recording[tag], key=lambda item: item[0])
    steps = [item[0] for item in items]
    if steps != list(range(steps[0], steps[0] + len(steps))):
      raise PredictorError(f"layer {tag}'s recording has steps {steps}: record one decode "
                           "per recording() block")
    req, feat, heur, learn = (np.stack([item[i] for item in items]) for i in range(1, 5))
    for b in range(req.shape[1]):
      for k in range(req.shape[2]):
        out.append(Trace(req[:, b, k], feat[:, b, k], heur[:, b, k], learn[:, b, k]))
  return out


def quest(device_pages: int, policy: str = "learned", predictor=None, record=False) -> Quest:
  return Quest(device_pages=device_pages, eviction=policy, predictor=predictor,
               record_pages=record)


def collect(model, prompts, *, device_pages: int = 12, compression_ratio: float = 0.75,
            max_new_tokens: int = 24, policy: str = "learned", predictor=None):
  """(traces, generate's result) of one recorded greedy decode of `prompts` (a batch)."""
  with page_buffer.recording() as rec:
    result = generate(model, prompts, method=quest(device_pages, policy, predictor, True),
                      compression_ratio=compression_ratio, max_new_tokens=max_new_tokens,
                      chat_template=False)
  return traces_from_recording(rec), result


# ------------------------------------------------------------------ labels and examples


def labels(trace: Trace, capacity: int) -> tuple:
  """The Belady discard bit of every request of the trace (serving order)."""
  return paging.belady_discard_bits(trace.pages(), capacity)


def example_index(trace: Trace, horizon: int = 0) -> tuple:
  """(steps [N], pages [N], reads [N]): every (step, page read at or before the step), in
  step order, pages in order of first read, with the index (serving order) of the page's
  latest read up to the end of the step. horizon: the censoring rule (see `examples`):
  a pair whose read has no later read of its page in the trace, at a step with fewer than
  `horizon` steps after it, is left out (0: none is)."""
  validation.integer("horizon", horizon, 0, error=PredictorError,
                     what="steps a page must stay unread before the recording ends")
  steps, r = trace.requests.shape
  pages = trace.pages()
  again = np.array(paging.next_uses(pages)) < len(pages)   # the read's page is read later
  latest: dict = {}
  out_s, out_p, out_r = [], [], []
  for s in range(steps):
    for j in range(r):
      latest[int(trace.requests[s, j])] = s * r + j
    censored = steps - 1 - s < horizon
    for page, read in latest.items():
      if censored and not again[read]:
        continue
      out_s.append(s)
      out_p.append(page)
      out_r.append(read)
  return np.array(out_s, int), np.array(out_p, int), np.array(out_r, int)


HORIZON = 4   # the default censoring horizon (steps; see `examples`)


def examples(trace: Trace, capacity: int, horizon: int = HORIZON) -> tuple:
  """(features [N, F], labels [N]) for every (step, page read at or before the step): the
  label is the discard bit of the page's latest read up to the end of the step.

  Censoring: Belady's bit is 1 for a read whose page is never read again, which near the
  end of a recording mostly means "not read again before the recording stops", not
  "safe". So a (step s, page) pair whose latest read has no later read in the trace gives
  no example when fewer than `horizon` steps follow s (the recording's last `horizon`
  steps); there a pair counts only when its page's next read is recorded. The rule drops
  only pairs labelled safe, so the last steps' examples lean towards "keep", and Belady's
  choices near the cut differ from the unrecorded future's even for the pairs kept; the
  held-out accuracy and step errors are computed on the same censored pairs.
  """
  bits = np.array(labels(trace, capacity), np.float32)
  steps, pages, reads = example_index(trace, horizon)
  return trace.features[steps, pages], bits[reads]


def dataset(traces, capacity: int, horizon: int = HORIZON) -> tuple:
  """(features [N, F], labels [N]) of every trace's `examples`."""
  if not traces:
    raise PredictorError("no recorded traces: record a decode through a buffered Quest "
                         "cache with record_pages=True first")
  pairs = [examples(t, capacity, horizon) for t in traces]
  return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])


def request_bits(trace: Trace, page_bits: np.ndarray) -> list:
  """Per request (serving order): the bit page_bits [S, P] gives its page at its step, and
  0 when the step reads the page again later (the buffer's same-step rule: a page the
  step still reads is never safe)."""
  steps = trace.requests.shape[0]
  out = []
  for s in range(steps):
    row = [int(p) for p in trace.requests[s]]
    out += [0 if page in row[j + 1:] else int(page_bits[s, page])
            for j, page in enumerate(row)]
  return out


def censoring_errors(traces, capacity: int, cut: int = 8) -> dict:
  """How wrong the end-of-recording labels are, measured by cutting the recording short:
  each trace without its last `cut` steps is labelled as `examples` would (horizon 0), and
  the pairs whose read has no later read in the cut trace (labelled safe for lack of a
  future) are compared with their labels in the whole trace. {steps left after the pair's
  step in the cut trace: [pairs, of them not safe in the whole trace]} for 0 .. cut - 1
  steps left."""
  validation.integer("cut", cut, 1, error=PredictorError, what="steps cut from each trace")
  out = {left: [0, 0] for left in range(cut)}
  for t in traces:
    steps = t.requests.shape[0]
    if steps <= cut:
      continue
    short = Trace(t.requests[:-cut], t.features[:-cut], t.heuristic[:-cut], t.learned[:-cut])
    full = labels(t, capacity)
    s_idx, _, reads = example_index(short)
    kept = set(zip(*example_index(short, cut)[::2]))
    for s, read in zip(s_idx, reads):
      if (s, read) in kept:
        continue
      left = steps - cut - 1 - s
      out[left][0] += 1
      out[left][1] += full[read] == 0
  return {left: {"pairs": n, "not_safe": int(bad)} for left, (n, bad) in out.items()}


# ------------------------------------------------------------------ training


def loss(weights, hidden: int, features, targets, l2: float = 0.0):
  """Mean binary cross-entropy of the discard logits, plus l2 * |weights|^2."""
  logits = predictor_logits(weights, hidden, features)
  return optax.sigmoid_binary_cross_entropy(logits, targets).mean() + l2 * (weights ** 2).sum()


def train(features, targets, *, hidden: int = 4, steps: int = 400, learning_rate: float = 0.05,
          l2: float = 1e-4, seed: int = 0, threshold: float = 0.5) -> tuple:
  """(PagePredictor, losses per step) fitted by full-batch Adam (deterministic)."""
  validation.integer("hidden", hidden, 0, 256, error=PredictorError, what="hidden units")
  validation.integer("steps", steps, 1, 100_000, error=PredictorError, what="optimizer steps")
  validation.number("learning_rate", learning_rate, 0, low_open=True, error=PredictorError)
  validation.number("l2", l2, 0, error=PredictorError, what="the weight penalty")
  validation.number("threshold", threshold, 0, 1, low_open=True, high_open=True,
                    error=PredictorError, what="the probability above which a page is safe")
  features = jnp.asarray(features, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  if features.ndim != 2 or features.shape[1] != NUM_FEATURES or features.shape[0] == 0:
    raise PredictorError(f"features has shape {features.shape}; need [N > 0, {NUM_FEATURES}]")
  if targets.shape != features.shape[:1]:
    raise PredictorError(f"targets has shape {targets.shape}; need [{features.shape[0]}]")
  if not bool(jnp.all((targets == 0) | (targets == 1))):
    raise PredictorError("targets must be discard bits, 0 or 1")
  n = num_weights(hidden)
  key = jax.random.PRNGKey(seed)
  weights = 0.5 * jax.random.normal(key, (n,), jnp.float32) if hidden else jnp.zeros(n)
  opt = optax.adam(learning_rate)
  state = opt.init(weights)

  @jax.jit
  def update(weights, state):
    value, grad = jax.value_and_grad(loss)(weights, hidden, features, targets, l2)
    change, state = opt.update(grad, state)
    return optax.apply_updates(weights, change), state, value

  losses = []
  for _ in range(steps):
    weights, state, value = update(weights, state)
    losses.append(float(value))
  predictor = PagePredictor(tuple(float(w) for w in np.asarray(weights)), hidden, threshold)
  return predictor, losses


def accuracy(predictor: PagePredictor, features, targets) -> float:
  bits = np.asarray(predictor.bits(jnp.asarray(features, jnp.float32)))
  return float((bits == (np.asarray(targets) > 0.5)).mean())


def write_trained(predictor: PagePredictor, path: pathlib.Path = TRAINED_FILE) -> None:
  """Rewrites the TRAINED block of kvjax/cache/page_predictor.py with `predictor`."""
  text = pathlib.Path(path).read_text()
  values = [repr(w) for w in predictor.weights]
  lines = ",\n".join("        " + ", ".join(values[i:i + 4]) for i in range(0, len(values), 4))
  block = (f"TRAINED = PagePredictor(\n    weights=(\n{lines}),\n"
           f"    hidden={predictor.hidden}, threshold={predictor.threshold!r})\n")
  pattern = re.compile(r"(# BEGIN TRAINED[^\n]*\n).*?(# END TRAINED)", re.S)
  if not pattern.search(text):
    raise PredictorError(f"{path} has no '# BEGIN TRAINED' ... '# END TRAINED' block")
  pathlib.Path(path).write_text(pattern.sub(lambda m: m.group(1) + block + m.group(2), text))


# ------------------------------------------------------------------ measurement


def trace_report(traces, capacity: int, horizon: int = HORIZON) -> dict:
  """Belady, LRU and the discard-bit simulations summed over traces, with the errors of the
  recorded heuristic and learned bits against Belady's: (eta0, eta1) per request, the
  paper's, each request taking its page's bit at the request's step, 0 when the step
  reads the page again (`request_bits`, `paging.prediction_errors`), and step_eta0 /
  step_eta1 over the examples' (step, page) pairs (`examples` with `horizon`: the bits the
  buffer evicts by once the step is done with the page)."""
  out = {"requests": 0, "belady_faults": 0, "lru_faults": 0, "step_examples": 0}
  for kind in ("heuristic", "learned"):
    out.update({f"{kind}_eta0": 0, f"{kind}_eta1": 0, f"{kind}_follow_faults": 0,
                f"{kind}_step_eta0": 0, f"{kind}_step_eta1": 0})
  for t in traces:
    pages = t.pages()
    true = paging.belady_discard_bits(pages, capacity)
    steps, at, reads = example_index(t, horizon)
    label = np.array(true)[reads]
    out["step_examples"] += len(label)
    out["requests"] += len(pages)
    out["belady_faults"] += paging.belady(pages, capacity).faults
    out["lru_faults"] += paging.lru(pages, capacity).faults
    for kind in ("heuristic", "learned"):
      bits = request_bits(t, getattr(t, kind))
      eta0, eta1 = paging.prediction_errors(bits, true)
      out[f"{kind}_eta0"] += eta0
      out[f"{kind}_eta1"] += eta1
      out[f"{kind}_follow_faults"] += paging.follow_discard_predictions(
          pages, bits, capacity).faults
      step_bits = getattr(t, kind)[steps, at]
      out[f"{kind}_step_eta0"] += int((~step_bits & (label == 1)).sum())
      out[f"{kind}_step_eta1"] += int((step_bits & (label == 0)).sum())
  return out


def measure(model, prompts, predictor: PagePredictor, *, device_pages: int = 12,
            compression_ratio: float = 0.75, max_new_tokens: int = 24,
            horizon: int = HORIZON) -> dict:
  """The held-out comparison (see the module docstring)."""
  common = dict(compression_ratio=compression_ratio, max_new_tokens=max_new_tokens,
                chat_template=False)
  reference = generate(model, prompts, method=Quest(offload=False), **common).token_ids
  traces, learned = collect(model, prompts, device_pages=device_pages,
                            compression_ratio=compression_ratio,
                            max_new_tokens=max_new_tokens, predictor=predictor)
  runs = {"learned": learned}
  for policy in ("lru", "predictions"):
    runs[policy] = generate(model, prompts, method=quest(device_pages, policy), **common)
  buffer = {}
  for policy, result in runs.items():
    s = result.stats["decode_method_stats"]
    buffer[policy] = {"faults": s["faults"], "requests": s["requests"],
                      "fault_rate": round(s["fault_rate"], 4), "regrets": s["regrets"],
                      "fallbacks": s["fallbacks"],
                      "tokens_identical": result.token_ids == reference}
  report = trace_report(traces, device_pages, horizon)
  report["belady_fault_rate"] = round(report["belady_faults"] / report["requests"], 4)
  return {"buffer": buffer, "traces": report}


def essay_prompts(count: int, chars: int = 2200, stride: int = 20_000) -> list:
  """`count` passages of `chars` characters from the RULER Paul Graham essays, `stride`
  characters apart (about 500 SmolLM2 tokens each)."""
  text = data.essays_text()
  return [text[i * stride:i * stride + chars] for i in range(count)]


def run(*, write: bool = False, hidden: int = 4, device_pages: int = 12,
        compression_ratio: float = 0.75, max_new_tokens: int = 24, train_prompts: int = 4,
        heldout_prompts: int = 2, horizon: int = HORIZON) -> dict:
  """The whole pipeline: record, train, (write), measure on held-out prompts."""
  model = load("smollm2-135m")
  prompts = essay_prompts(train_prompts + heldout_prompts)
  train_set, heldout = prompts[:train_prompts], prompts[train_prompts:]
  settings = dict(device_pages=device_pages, compression_ratio=compression_ratio,
                  max_new_tokens=max_new_tokens)
  traces, _ = collect(model, train_set, policy="lru", **settings)
  x, y = dataset(traces, device_pages, horizon)
  uncensored = sum(len(example_index(t)[0]) for t in traces)
  predictor, losses = train(x, y, hidden=hidden)
  base = float(y.mean())
  report = {"settings": {**settings, "hidden": hidden, "train_prompts": train_prompts,
                         "heldout_prompts": heldout_prompts, "horizon": horizon},
            "censoring": {"dropped_examples": uncensored - int(len(y)),
                          "by_steps_left": censoring_errors(traces, device_pages)},
            "train": {"examples": int(len(y)), "positive_fraction": round(base, 4),
                      "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                      "accuracy": round(accuracy(predictor, x, y), 4),
                      "constant_accuracy": round(max(base, 1 - base), 4)},
            "weights": list(predictor.weights)}
  hx, hy = dataset(collect(model, heldout, policy="lru", **settings)[0], device_pages, horizon)
  hb = float(hy.mean())
  report["heldout_examples"] = {"examples": int(len(hy)), "accuracy": round(
      accuracy(predictor, hx, hy), 4), "constant_accuracy": round(max(hb, 1 - hb), 4)}
  if write:
    write_trained(predictor)
  report["heldout"] = measure(model, heldout, predictor, horizon=horizon, **settings)
  return report

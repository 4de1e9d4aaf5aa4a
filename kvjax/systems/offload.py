"""The offload tier end to end: Quest decoding with cold pages in host memory and a device
page buffer in front of them (`kvjax.cache.page_buffer`), and its benchmark against the
all-on-device Quest cache.

`offloaded_generate` decodes prompts through Quest with the tier configured by keyword:
`kvjax.generate(model, prompts, method="quest:device_pages=64:eviction=predictions:
prefetch=2", ...)` underneath (policies: `page_buffer.POLICIES`, "learned" with the
trained discard predictor, `kvjax.cache.page_predictor.TRAINED`), its
stats["decode_method_stats"] (the final cache's buffer counters: hits, faults,
prefetches, fault rate) flattened into the result's stats.

`compare_offload` decodes the same prompts with (a) the Quest cache all on the device,
(b) offloaded without a buffer (every selected page copied every step), (c) offloaded with
the buffer under each eviction policy, repeats interleaved (a, b, c..., a, b, c...), and
reports device and host bytes, the fault rate, prefetch counts, decode tokens/s (median)
and the median of per-repeat speed ratios against (a), and whether every variant's tokens
equal (a)'s. On CPU nothing is overlapped (see page_buffer's docstring): the buffer saves
host-to-device copies, whose cost on CPU is a memcpy.
"""

from __future__ import annotations

import dataclasses
import statistics

from kvjax import validation
from kvjax.cache.page_buffer import POLICIES
from kvjax.errors import KvjaxError
from kvjax.generation.generate import generate
from kvjax.methods.quest import Quest


class OffloadError(KvjaxError):
  """Invalid arguments to the offload entry points."""


@dataclasses.dataclass
class OffloadResult:
  token_ids: list[list[int]]
  texts: list[str]
  stats: dict     # device_bytes, host_bytes, buffer counters, decode speed, ...


def quest_method(device_pages: int = 0, policy: str = "lru", prefetch: int = 0,
                 victim_pages: int = 0, offload: bool = True, page_size: int = 16,
                 min_pages: int = 3, skip_layers: int = 2, gqa: str = "query") -> Quest:
  """The Quest method with an offload tier of `device_pages` frames (0: none) evicting by
  `policy` (a MethodError names a bad value)."""
  return Quest(page_size=page_size, min_pages=min_pages, skip_layers=skip_layers, gqa=gqa,
               offload=offload, device_pages=device_pages, eviction=policy, prefetch=prefetch,
               victim_pages=victim_pages)


def _decode(model, prompts, method: Quest, max_new_tokens: int, compression_ratio, budget,
            chat_template) -> OffloadResult:
  result = generate(model, prompts, method=method, compression_ratio=compression_ratio,
                    budget=budget, max_new_tokens=max_new_tokens, chat_template=chat_template)
  s = result.stats
  stats = {
      "method": s["method"],
      "device_bytes": s["context_cache_bytes"],
      "host_bytes": s["context_cache_host_bytes"],
      "buffer_bytes": s["method_stats"].get("buffer_bytes", 0),
      "method_stats": s["method_stats"],
      "decode_steps": s["decode_steps"],
      "decode_seconds": s["decode_seconds"],
      "decode_tokens_per_second": s["decode_tokens_per_second"],
      **s["decode_method_stats"]}
  return OffloadResult(token_ids=result.token_ids, texts=result.texts, stats=stats)


def _check_common(max_new_tokens, policy=None):
  validation.integer("max_new_tokens", max_new_tokens, 1, validation.INT32_MAX,
                     error=OffloadError, what="tokens generated per prompt")
  if policy is not None:
    validation.choice("policy", policy, POLICIES, error=OffloadError)


def offloaded_generate(model, prompts, max_new_tokens: int = 64, *, compression_ratio=None,
                       budget=None, device_pages: int = 64, policy: str = "lru",
                       prefetch: int = 0, victim_pages: int = 0, page_size: int = 16,
                       min_pages: int = 3, skip_layers: int = 2, gqa: str = "query",
                       chat_template: bool | None = None) -> OffloadResult:
  """Greedy Quest decoding with the paged layers' keys and values in host memory and
  `device_pages` device frames per row and KV head in front of them (0: no buffer, every
  selected page copied every step). compression_ratio / budget: Quest's token budget per
  step (pages read = max(min_pages, ceil(budget / page_size))). Returns the tokens and
  stats: device_bytes, host_bytes, buffer_bytes, hits, faults, victim_hits, prefetches,
  prefetch_hits, regrets, fallbacks, requests, fault_rate, decode_tokens_per_second."""
  _check_common(max_new_tokens, policy)
  method = quest_method(device_pages, policy, prefetch, victim_pages, True, page_size,
                        min_pages, skip_layers, gqa)
  return _decode(model, prompts, method, max_new_tokens, compression_ratio, budget,
                 chat_template)


def compare_offload(model, prompts, max_new_tokens: int = 32, *, compression_ratio=None,
                    budget=None, device_pages: int = 64, policies=POLICIES,
                    prefetch: int = 2, victim_pages: int = 4, page_size: int = 16,
                    min_pages: int = 3, skip_layers: int = 2, gqa: str = "query",
                    repeats: int = 3, chat_template: bool | None = None) -> dict:
  """Decodes `prompts` with (a) "on_device": Quest all on the device, (b) "offloaded": host
  pages without a buffer, (c) "buffer_<policy>" for each policy (`device_pages` frames,
  `prefetch`, and `victim_pages` victim frames for "hybrid"). One untimed warm-up run per
  variant (compilation), then `repeats` rounds, each running every variant once in turn.

  Returns {"config": ..., "variants": {name: {device_bytes, host_bytes, buffer_bytes,
  hits, faults, prefetches, prefetch_hits, victim_hits, fault_rate, host_pages_read
  (demand faults + prefetches; every request for "offloaded"), decode_tokens_per_second
  (median over repeats), speed_vs_on_device (median of per-repeat ratios),
  tokens_identical (to on_device)}}, "all_tokens_identical": bool}."""
  _check_common(max_new_tokens)
  validation.integer("repeats", repeats, 1, 1000, error=OffloadError, what="timed rounds")
  if isinstance(policies, str) or not isinstance(policies, (list, tuple)) or not policies:
    raise OffloadError(f"policies={validation.show(policies)} must be a non-empty list of "
                       f"{list(POLICIES)}")
  for p in policies:
    validation.choice("policies item", p, POLICIES, error=OffloadError)
  common = dict(page_size=page_size, min_pages=min_pages, skip_layers=skip_layers, gqa=gqa)
  variants = {"on_device": quest_method(offload=False, **common),
              "offloaded": quest_method(offload=True, **common)}
  for p in policies:
    variants[f"buffer_{p}"] = quest_method(device_pages, p, prefetch,
                                           victim_pages if p == "hybrid" else 0, True,
                                           **common)
  run = lambda method: _decode(model, prompts, method, max_new_tokens, compression_ratio,
                               budget, chat_template)
  first = {name: run(method) for name, method in variants.items()}   # warm-up, compiles
  speeds = {name: [] for name in variants}
  for _ in range(repeats):
    for name, method in variants.items():
      speeds[name].append(run(method).stats["decode_tokens_per_second"])
  reference = first["on_device"].token_ids
  requests = max((r.stats["requests"] for r in first.values()), default=0)
  report = {}
  for name, result in first.items():
    s = result.stats
    buffered = name.startswith("buffer_")
    report[name] = {
        "device_bytes": s["device_bytes"], "host_bytes": s["host_bytes"],
        "buffer_bytes": s["buffer_bytes"],
        **{key: s[key] for key in ("hits", "faults", "victim_hits", "prefetches",
                                   "prefetch_hits", "regrets", "fallbacks", "requests",
                                   "fault_rate")},
        "host_pages_read": (s["faults"] + s["prefetches"] if buffered
                            else requests if name == "offloaded" else 0),
        "decode_steps": s["decode_steps"],
        "decode_tokens_per_second": statistics.median(speeds[name]),
        "speed_vs_on_device": statistics.median(
            a / b for a, b in zip(speeds[name], speeds["on_device"])),
        "tokens_identical": result.token_ids == reference}
  if "offloaded" in report:   # every request of the unbuffered tier is a host read
    report["offloaded"].update(requests=requests, faults=requests,
                               fault_rate=1.0 if requests else 0.0)
  return {"config": dict(max_new_tokens=max_new_tokens, compression_ratio=compression_ratio,
                         budget=budget, device_pages=device_pages, policies=list(policies),
                         prefetch=prefetch, victim_pages=victim_pages, repeats=repeats,
                         rows=len(reference), **common),
          "variants": report,
          "all_tokens_identical": all(v["tokens_identical"] for v in report.values())}

"""Throughput of prefix sharing (BatchLLM) against the same batch without it, in one run.

The workload is offline question answering over SQuAD: every prompt is the same
instruction with a few solved examples, then one paragraph, then one of that
paragraph's questions, so prompts share a long prefix with all others and a longer one
with the other questions on their paragraph.
"""

from __future__ import annotations

import statistics
import time

from kvjax.evaluation import data
from kvjax.generation import engine
from kvjax.generation.generate import generate
from kvjax.systems.prefix_sharing import generate_shared

INSTRUCTION = ("Answer each question with a short phrase copied from its paragraph.\n\n")


def squad_prompts(documents: int, questions_per_document: int, examples: int = 3
                  ) -> list[str]:
  """`documents` SQuAD paragraphs with `questions_per_document` questions each (the first
  paragraphs that have that many), after `examples` solved examples from other paragraphs."""
  by_paragraph: dict = {}
  for item in data.squad():
    by_paragraph.setdefault(item.documents, []).append(item)
  paragraphs = [items for items in by_paragraph.values() if len(items) >= questions_per_document]
  if len(paragraphs) < documents + examples:
    raise ValueError(f"SQuAD has {len(paragraphs)} paragraphs with {questions_per_document} "
                     f"questions; {documents} + {examples} examples asked for")
  shots = "".join(f"Paragraph: {items[0].documents[0]}\nQuestion: {items[0].question}\n"
                  f"Answer: {items[0].answers[0]}\n\n" for items in paragraphs[:examples])
  return [f"{INSTRUCTION}{shots}Paragraph: {item.documents[0]}\nQuestion: {item.question}\n"
          f"Answer:"
          for items in paragraphs[examples:examples + documents]
          for item in items[:questions_per_document]]


def compare(model, prompts, max_new_tokens: int = 16, rows_per_prefix: int = 8,
            memory_budget_bytes: int | None = None, batch_size: int | None = None,
            repeats: int = 3, log=print) -> dict:
  """Shared against unshared generation of `prompts`, interleaved: one untimed run of each
  (compiles), then `repeats` timed runs of each in turn. Unshared runs `kvjax.generate` in
  batches of `batch_size` rows (default: the shared run's largest wave). Greedy; both must
  give the same tokens. Throughput counts every generated token over the wall time of the
  whole batch (prefill and decode, compilation excluded)."""
  shared = generate_shared(model, prompts, max_new_tokens, rows_per_prefix=rows_per_prefix,
                           memory_budget_bytes=memory_budget_bytes)
  rows = batch_size or max(w["rows"] for w in shared.stats["waves"])

  def unshared_run():
    start, tokens, peak = time.perf_counter(), [], 0
    compile_before = engine.STEPS.compile_seconds
    for i in range(0, len(prompts), rows):
      result = generate(model, prompts[i:i + rows], max_new_tokens=max_new_tokens)
      tokens += result.token_ids
      peak = max(peak, result.stats["cache_bytes"])
    seconds = time.perf_counter() - start - (engine.STEPS.compile_seconds - compile_before)
    return tokens, seconds, peak

  unshared_tokens, _, unshared_peak = unshared_run()
  shared_seconds, unshared_seconds = [], []
  for i in range(repeats):
    run = generate_shared(model, prompts, max_new_tokens, rows_per_prefix=rows_per_prefix,
                          memory_budget_bytes=memory_budget_bytes)
    shared_seconds.append(run.stats["seconds"])
    _, seconds, _ = unshared_run()
    unshared_seconds.append(seconds)
    log(f"repeat {i}: shared {shared_seconds[-1]:.2f} s, unshared {seconds:.2f} s")
  generated = sum(len(t) for t in shared.token_ids)
  shared_median, unshared_median = (statistics.median(shared_seconds),
                                    statistics.median(unshared_seconds))
  stats = shared.stats
  return {
      "prompts": len(prompts), "max_new_tokens": max_new_tokens,
      "rows_per_prefix": rows_per_prefix, "memory_budget_bytes": memory_budget_bytes,
      "unshared_batch_size": rows,
      "same_tokens": shared.token_ids == unshared_tokens,
      "rows_with_same_tokens": sum(a == b for a, b in zip(shared.token_ids, unshared_tokens)),
      "prompt_tokens_total": stats["prompt_tokens_total"],
      "shared_prefilled_tokens": stats["prefilled_tokens"],
      "prefill_saved_fraction": stats["prefill_saved_fraction"],
      "groups": [{"prefix_length": g["prefix_length"], "requests": len(g["members"])}
                 for g in stats["groups"]],
      "waves": stats["waves"],
      "shared_peak_cache_bytes": stats["peak_cache_bytes"],
      "unshared_peak_cache_bytes": unshared_peak,
      "generated_tokens": generated,
      "shared_seconds": shared_seconds, "unshared_seconds": unshared_seconds,
      "shared_tokens_per_second": generated / shared_median,
      "unshared_tokens_per_second": generated / unshared_median,
      "throughput_ratio": unshared_median / shared_median,
  }



def write_plot(report: dict, path) -> str:
  """PNG: generated tokens per second, peak cache MiB and prefilled tokens, shared against
  unshared."""
  from kvjax.evaluation import report as report_lib
  fig, axes = report_lib._figure(1, 3, width=3.4, height=3.2)  # headless, saved atomically
  names = ("unshared", "shared")
  panels = (("tokens/s", [report["unshared_tokens_per_second"],
                          report["shared_tokens_per_second"]]),
            ("peak cache (MiB)", [report["unshared_peak_cache_bytes"] / 2 ** 20,
                                  report["shared_peak_cache_bytes"] / 2 ** 20]),
            ("prefilled tokens", [report["prompt_tokens_total"],
                                  report["shared_prefilled_tokens"]]))
  for ax, (title, values) in zip(axes.flat, panels):
    ax.bar(names, values, color=["tab:gray", "tab:blue"])
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
  fig.suptitle(f"{report.get('model', '')}: {report['prompts']} prompts, prefix sharing "
               f"{report['throughput_ratio']:.2f}x throughput", fontsize=10)
  return report_lib._save(fig, path)

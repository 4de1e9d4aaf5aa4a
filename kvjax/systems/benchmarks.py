"""Benchmarks of the serving systems, each a ratio measured in one run.

- `compare_sharing`: prefix sharing (BatchLLM) against the same batch without it.
- `compare_serving`: the continuous-batching server, full cache against a compressing
  method, under one cache-memory bound.
- `compare_server_sharing`: the server without and with its prefix store (BatchLLM's
  shared prefixes in continuous batching).
- `compare_chunk_reuse`: retrieval-augmented prompts assembled from cached chunks
  (Cache-Craft) against full recompute: prefill saved, answers, prefill seconds.
- `compare_server_chunks`: the same through the server (`Server.submit_chunks` against
  plain prompts).

The workload is offline question answering over SQuAD: every prompt is the same
instruction with a few solved examples, then one paragraph, then one of that
paragraph's questions, so prompts share a long prefix with all others and a longer one
with the other questions on their paragraph.
"""

from __future__ import annotations

import random
import statistics
import time

from kvjax.evaluation import data, scoring
from kvjax.generation import engine, inputs
from kvjax.generation.generate import generate
from kvjax.systems import chunk_cache
from kvjax.systems.prefix_sharing import generate_shared
from kvjax.systems.scheduler import Server

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


def compare_sharing(model, prompts, max_new_tokens: int = 16, rows_per_prefix: int = 8,
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



def _bars(path, title: str, names, panels) -> str:
  """PNG of one bar panel per (title, values), a bar per name."""
  from kvjax.evaluation import report as report_lib
  fig, axes = report_lib._figure(1, len(panels), width=3.4, height=3.2)  # headless, atomic
  for ax, (panel, values) in zip(axes.flat, panels):
    ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:orange", "tab:green",
                                 "tab:red", "tab:purple", "tab:brown", "tab:pink"][:len(names)])
    if len(names) > 2:
      ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title(panel, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
  fig.suptitle(title, fontsize=10)
  return report_lib._save(fig, path)


def write_sharing_plot(report: dict, path) -> str:
  """PNG: generated tokens per second, peak cache MiB and prefilled tokens, shared against
  unshared."""
  return _bars(path, f"{report.get('model', '')}: {report['prompts']} prompts, prefix "
                     f"sharing {report['throughput_ratio']:.2f}x throughput",
               ("unshared", "shared"),
               (("tokens/s", [report["unshared_tokens_per_second"],
                              report["shared_tokens_per_second"]]),
                ("peak cache (MiB)", [report["unshared_peak_cache_bytes"] / 2 ** 20,
                                      report["shared_peak_cache_bytes"] / 2 ** 20]),
                ("prefilled tokens", [report["prompt_tokens_total"],
                                      report["shared_prefilled_tokens"]])))


def write_serving_plot(report: dict, path) -> str:
  """PNG: tokens per second and rows admitted, full cache against the method."""
  full, compressed = report["full"], report["compressed"]
  return _bars(path, f"{report.get('model', '')}: {report['prompts']} requests under "
                     f"{report['memory_budget_bytes'] / 2 ** 20:.0f} MiB of cache",
               ("full", f"{report['method']} {report['budget']}"),
               (("tokens/s", [full["tokens_per_second"], compressed["tokens_per_second"]]),
                ("rows admitted", [full["rows"], compressed["rows"]])))


def _interleaved_servers(model, prompts, variants: dict, max_new_tokens: int, repeats: int,
                         ignore_eos: bool, log, submit=None, max_prompt_tokens=None) -> dict:
  """{name: (served, server of the untimed run, timed seconds)} for servers built with each
  variant's keyword arguments (a fresh server per run): one untimed run each (compiles),
  then `repeats` rounds that run every variant once in turn. `submit(name, server)` queues
  the requests (default: every prompt of `prompts`)."""
  if max_prompt_tokens is None:
    max_prompt_tokens = max(len(p) for p in inputs.encode(model, list(prompts), None,
                                                          None).prompts)
  if submit is None:
    submit = lambda name, server: [server.submit(p) for p in prompts]

  def run(name):
    server = Server(model, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                    eos_token_ids=[] if ignore_eos else None, **variants[name])
    submit(name, server)
    served = server.run()
    if server.prefixes is not None:   # no stored prefixes held through later runs
      server.prefixes.clear()
    return served, server

  out = {name: (*run(name), []) for name in variants}
  for i in range(repeats):
    for name in variants:
      out[name][2].append(run(name)[1].stats["seconds"])
    log(f"repeat {i}: " + ", ".join(f"{name} {out[name][2][-1]:.2f} s" for name in variants))
  return out


def _server_summary(stats: dict, seconds: list, keys) -> dict:
  return {**{k: stats[k] for k in keys}, "seconds": seconds,
          "tokens_per_second": stats["generated_tokens"] / statistics.median(seconds)}


def compare_serving(model, prompts, memory_budget_bytes: int, method: str, budget: int,
                    max_new_tokens: int = 16, repeats: int = 3, ignore_eos: bool = True,
                    log=print) -> dict:
  """The server with the full cache against `method` at `budget` tokens, both under
  `memory_budget_bytes` of batch cache, interleaved: one untimed run each (compiles), then
  `repeats` timed runs of each in turn. Compression makes a row smaller, so the same bound
  admits more rows. With ignore_eos every request generates max_new_tokens tokens, so both
  do the same work (compression changes where EOS falls, which would change the work).
  Also counts the rows whose greedy tokens equal the full cache's."""
  if method in (None, "full"):
    raise ValueError(f"method={method!r}: compare_serving compares the full cache with a "
                     f"compressing method")
  runs = _interleaved_servers(
      model, prompts, {"full": dict(memory_budget_bytes=memory_budget_bytes),
                       method: dict(memory_budget_bytes=memory_budget_bytes, method=method,
                                    budget=budget)},
      max_new_tokens, repeats, ignore_eos, log)
  (full, full_server, full_seconds), (compressed, compressed_server, compressed_seconds) = (
      runs["full"], runs[method])
  full_stats, compressed_stats = full_server.stats, compressed_server.stats
  keys = ("rows", "row_bytes", "cache_bytes", "generated_tokens", "decode_calls",
          "admissions", "compactions", "peak_active_rows")
  summary = {"full": _server_summary(full_stats, full_seconds, keys),
             "compressed": _server_summary(compressed_stats, compressed_seconds, keys)}
  return {
      "prompts": len(prompts), "max_new_tokens": max_new_tokens,
      "memory_budget_bytes": memory_budget_bytes, "method": method, "budget": budget,
      "ignore_eos": ignore_eos, **summary,
      "throughput_ratio": (summary["compressed"]["tokens_per_second"]
                           / summary["full"]["tokens_per_second"]),
      "rows_with_same_tokens_as_full": sum(a.token_ids == b.token_ids
                                           for a, b in zip(full, compressed)),
  }


def compare_server_sharing(model, prompts, memory_budget_bytes: int, prefix_cache_bytes: int,
                           max_new_tokens: int = 16, min_prefix_tokens: int = 16,
                           repeats: int = 3, ignore_eos: bool = True, log=print) -> dict:
  """The server (full cache, `memory_budget_bytes` of batch cache) without and with prefix
  sharing (`prefix_cache_bytes` of prefix store, which starts empty every run),
  interleaved as `compare_serving`. Both do the same work; greedy tokens should match."""
  runs = _interleaved_servers(
      model, prompts,
      {"unshared": dict(memory_budget_bytes=memory_budget_bytes),
       "shared": dict(memory_budget_bytes=memory_budget_bytes,
                      prefix_cache_bytes=prefix_cache_bytes,
                      min_prefix_tokens=min_prefix_tokens)},
      max_new_tokens, repeats, ignore_eos, log)
  (plain, plain_server, plain_seconds), (shared, shared_server, shared_seconds) = (
      runs["unshared"], runs["shared"])
  plain_stats, shared_stats = plain_server.stats, shared_server.stats
  keys = ("rows", "cache_bytes", "generated_tokens", "admissions", "prompt_tokens",
          "prefilled_tokens", "prefill_saved_fraction")
  summary = {"unshared": _server_summary(plain_stats, plain_seconds, keys),
             "shared": {**_server_summary(shared_stats, shared_seconds, keys),
                        "prefix_store": shared_stats["prefix_store"]}}
  same = [a.token_ids == b.token_ids for a, b in zip(plain, shared)]
  return {
      "prompts": len(prompts), "max_new_tokens": max_new_tokens,
      "memory_budget_bytes": memory_budget_bytes, "prefix_cache_bytes": prefix_cache_bytes,
      "min_prefix_tokens": min_prefix_tokens, "ignore_eos": ignore_eos, **summary,
      "throughput_ratio": (summary["shared"]["tokens_per_second"]
                           / summary["unshared"]["tokens_per_second"]),
      "same_tokens": all(same), "rows_with_same_tokens": sum(same),
  }


def write_server_sharing_plot(report: dict, path) -> str:
  """PNG: tokens per second and prompt tokens prefilled, without and with sharing."""
  plain, shared = report["unshared"], report["shared"]
  return _bars(path, f"{report.get('model', '')}: {report['prompts']} requests, server "
                     f"prefix sharing {report['throughput_ratio']:.2f}x throughput",
               ("unshared", "shared"),
               (("tokens/s", [plain["tokens_per_second"], shared["tokens_per_second"]]),
                ("prefilled tokens", [plain["prefilled_tokens"],
                                      shared["prefilled_tokens"]])))


RAG_PREAMBLE = "Answer the question with a short phrase copied from the documents.\n\n"


def rag_workload(dataset: str, questions: int, distractors: int, seed: int = 0):
  """Two passes over the same questions of `dataset` ("hotpotqa" or "squad"), each prompt
  [preamble, documents..., ] + question: the question's own documents and `distractors`
  documents of the other questions, shuffled; the second pass draws other distractors
  and another order. Returns (first, second): lists of (chunks, question, answers)."""
  items = {"hotpotqa": data.hotpotqa, "squad": data.squad}[dataset]()
  chosen, seen = [], set()
  for item in items:
    if not seen & set(item.documents):
      chosen.append(item)
      seen |= set(item.documents)
    if len(chosen) == questions:
      break
  pool = [d for item in chosen for d in item.documents]
  if len(chosen) < questions or len(pool) - 2 < distractors:
    raise ValueError(f"{dataset} gives {len(chosen)} questions with distinct documents; "
                     f"{questions} with {distractors} distractors asked for")
  rng = random.Random(seed)

  def prompt(item):
    others = [d for d in pool if d not in item.documents]
    docs = list(item.documents) + rng.sample(others, distractors)
    rng.shuffle(docs)
    return ([RAG_PREAMBLE] + [f"Document: {d}\n\n" for d in docs],
            f"Question: {item.question}\nAnswer:", item.answers)

  return [prompt(i) for i in chosen], [prompt(i) for i in chosen]


def compare_chunk_reuse(model, workload, max_new_tokens: int = 16,
                        fractions=(0.0, 0.15, 0.3, 0.5, 1.0), repeats: int = 1,
                        log=print) -> dict:
  """Cache-Craft against full recompute on `rag_workload`'s two passes. The first pass
  fills a chunk store (the chunks each prompt reuses from earlier prompts of the pass are
  reused already). On the second, each prompt runs, interleaved: a full prefill
  (kvjax.generate of the same tokens), Cache-Craft's CFO recompute, and reuse with each
  fixed recompute fraction in `fractions` (0.0: positions fixed, nothing recomputed),
  all reading the same store. One untimed round compiles; `repeats` timed rounds follow.
  Greedy. Reports per variant: the share of prompt tokens not prefilled, answers equal to
  the full prefill's, gold answers found, and prefill seconds with their ratio to full."""
  store = chunk_cache.ChunkStore(model, max_bytes=8 << 30)
  first, second = workload
  creation = [chunk_cache.generate_from_chunks(model, store, c, q, max_new_tokens).stats
              for c, q, _ in first]
  log(f"first pass: {len(store)} chunk variants, {store.bytes / 2 ** 20:.1f} MiB")
  variants = [("cache-craft", None)] + [(f"fraction {f:g}", f) for f in fractions]
  names = ["full"] + [n for n, _ in variants]
  out = {n: {"texts": [], "token_ids": [], "saved": [], "seconds": []} for n in names}
  for round_ in range(1 + repeats):
    timed = round_ > 0
    for chunks, question, _ in second:
      ids, q = chunk_cache.encode_chunks(model, chunks, question)
      full = generate(model, [[t for c in ids for t in c] + q], max_new_tokens=max_new_tokens)
      runs = [("full", full.token_ids[0], full.texts[0], 0.0, full.stats["prefill_seconds"])]
      for name, fraction in variants:
        r = chunk_cache.generate_from_chunks(model, store, ids, q, max_new_tokens,
                                             recompute_fraction=fraction, update_store=False)
        runs.append((name, r.token_ids[0], r.texts[0], r.stats["prefill_saved_fraction"],
                     r.stats["prefill_seconds"]))
      for name, tokens, text, saved, seconds in runs:
        if timed:
          out[name]["seconds"].append(seconds)
        if round_ == 1 or not repeats:
          out[name]["token_ids"].append(tokens)
          out[name]["texts"].append(text)
          out[name]["saved"].append(saved)
    log(f"round {round_}: " + ", ".join(
        f"{n} {sum(out[n]['seconds'][-len(second):]):.2f} s" for n in names if timed))
  answers = [a for _, _, a in second]
  full_seconds = statistics.median(out["full"]["seconds"] or [float("nan")])
  report = {"prompts": len(second), "max_new_tokens": max_new_tokens,
            "chunk_variants": len(store), "store_bytes": store.bytes,
            "first_pass_prefill_saved_fraction": statistics.mean(
                s["prefill_saved_fraction"] for s in creation),
            "prompt_tokens_mean": statistics.mean(s["prompt_tokens"] for s in creation),
            "variants": {}}
  for name in names:
    o = out[name]
    seconds = statistics.median(o["seconds"]) if o["seconds"] else None
    report["variants"][name] = {
        "prefill_saved_fraction": statistics.mean(o["saved"]),
        "answers_equal_to_full": sum(a == b for a, b in zip(o["token_ids"],
                                                            out["full"]["token_ids"])),
        "gold_found": statistics.mean(scoring.string_match_part(t, a)
                                      for t, a in zip(o["texts"], answers)),
        "word_f1_to_full": statistics.mean(scoring.word_f1(t, f) for t, f in
                                           zip(o["texts"], out["full"]["texts"])),
        "prefill_seconds_median": seconds,
        "prefill_speedup": full_seconds / seconds if seconds else None,
        "texts": o["texts"]}
  return report


def compare_server_chunks(model, workload, memory_budget_bytes: int, max_new_tokens: int = 16,
                          recompute_fraction: float | None = None, repeats: int = 3,
                          log=print) -> dict:
  """Cache-Craft through the continuous-batching server: `rag_workload`'s second pass
  served (full cache, `memory_budget_bytes` of batch cache) as plain prompts (full
  recompute) and as prompts of cached chunks (`Server.submit_chunks` with
  `recompute_fraction`, None: Cache-Craft's CFO) from a store the first pass filled,
  interleaved as `compare_serving`. Greedy, EOS honoured (both give the answers they
  would). Reports throughput, the prompt tokens prefilled, answers equal to the plain
  server's and gold answers found."""
  store = chunk_cache.ChunkStore(model, max_bytes=8 << 30)
  first, second = workload
  for chunks, question, _ in first:
    chunk_cache.generate_from_chunks(model, store, chunks, question, max_new_tokens)
  encoded = [chunk_cache.encode_chunks(model, c, q) for c, q, _ in second]
  joined = [[t for c in ids for t in c] + q for ids, q in encoded]

  def submit(name, server):
    for (ids, q), prompt in zip(encoded, joined):
      if name == "recompute":
        server.submit(prompt)
      else:
        server.submit_chunks(store, ids, q, recompute_fraction=recompute_fraction,
                             update_store=False)

  runs = _interleaved_servers(
      model, None, {"recompute": dict(memory_budget_bytes=memory_budget_bytes),
                    "chunks": dict(memory_budget_bytes=memory_budget_bytes)},
      max_new_tokens, repeats, False, log, submit=submit,
      max_prompt_tokens=max(map(len, joined)))
  answers = [a for _, _, a in second]
  report = {"prompts": len(second), "max_new_tokens": max_new_tokens,
            "memory_budget_bytes": memory_budget_bytes,
            "recompute_fraction": recompute_fraction, "prompt_tokens": sum(map(len, joined))}
  for name, (served, server, seconds) in runs.items():
    texts = [s.text for s in served]
    prefilled = (sum(server.chunk_stats[s.id]["prefilled_tokens"] for s in served)
                 if name == "chunks" else server.stats["prefilled_tokens"])
    report[name] = {
        "rows": server.rows, "generated_tokens": server.stats["generated_tokens"],
        "prefilled_tokens": prefilled, "seconds": seconds,
        "tokens_per_second": server.stats["generated_tokens"] / statistics.median(seconds),
        "gold_found": statistics.mean(scoring.string_match_part(t, a)
                                      for t, a in zip(texts, answers)),
        "texts": texts}
  plain, chunks = runs["recompute"][0], runs["chunks"][0]
  report["answers_equal"] = sum(a.token_ids == b.token_ids for a, b in zip(plain, chunks))
  report["prefill_saved_fraction"] = 1 - report["chunks"]["prefilled_tokens"] / max(
      1, report["prompt_tokens"])
  # Seconds per request served: EOS falls where it falls, so the work differs slightly.
  report["speedup"] = (statistics.median(runs["recompute"][2])
                       / statistics.median(runs["chunks"][2]))
  return report


def write_server_chunks_plot(report: dict, path) -> str:
  """PNG: seconds and prompt tokens prefilled, full recompute against cached chunks."""
  plain, chunks = report["recompute"], report["chunks"]
  return _bars(path, f"{report.get('model', '')}: {report['prompts']} RAG requests through "
                     f"the server, {report['speedup']:.2f}x faster from cached chunks",
               ("recompute", "chunks"),
               (("seconds (median)", [statistics.median(plain["seconds"]),
                                      statistics.median(chunks["seconds"])]),
                ("prefilled tokens", [plain["prefilled_tokens"], chunks["prefilled_tokens"]]),
                ("gold found (%)", [100 * plain["gold_found"], 100 * chunks["gold_found"]])))


def write_chunk_reuse_plot(report: dict, path) -> str:
  """PNG: prefill saved, answers equal to full recompute and gold found, per variant."""
  names = list(report["variants"])
  v = report["variants"]
  n = report["prompts"]
  return _bars(path, f"{report.get('model', '')}: {n} RAG prompts from cached chunks",
               names,
               (("prefill saved (%)", [100 * v[k]["prefill_saved_fraction"] for k in names]),
                ("answers = full (%)", [100 * v[k]["answers_equal_to_full"] / n
                                        for k in names]),
                ("word F1 to full (%)", [100 * v[k]["word_f1_to_full"] for k in names]),
                ("gold found (%)", [100 * v[k]["gold_found"] for k in names])))


def write_offload_plot(report: dict, path) -> str:
  """PNG: device MiB, fault rate and decode tokens per second, per offload variant."""
  v = report["variants"]
  names = list(v)
  return _bars(path, f"{report.get('model', '')}: Quest decoding, {report.get('prompt_tokens')}"
                     f"-token prompt, budget {report['config']['budget']}",
               names,
               (("device MiB", [v[k]["device_bytes"] / 2 ** 20 for k in names]),
                ("fault rate", [v[k]["fault_rate"] for k in names]),
                ("decode tok/s", [v[k]["decode_tokens_per_second"] for k in names])))

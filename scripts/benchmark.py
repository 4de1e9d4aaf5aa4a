"""Speed and memory benchmark per compression method, against the full cache.

  python scripts/benchmark.py --model=smollm2-135m --context_lengths=512,2048 --batch_sizes=1,4
  python scripts/benchmark.py --model=smollm2-135m --methods=snapkv,h2o --compression_ratio=0.5
  python scripts/benchmark.py --shape=llama-3.1-8b --context_lengths=32768 --batch_sizes=8 \
      --methods=snapkv,knorm --compression_ratio=0.9 --json_out=/tmp/bench.json
  python scripts/benchmark.py --model=smollm2-135m --baseline=transformers \
      --context_lengths=512,2048 --batch_sizes=1 --plot_out=/tmp/side_by_side.png

Per method, context length and batch size: prefill seconds (compression included) and its
overhead over the full cache's, decode ms/step and tokens/s, context cache bytes and their
ratio to the full cache's, and the decode-step speedup. On GPU/TPU the Pallas decode-attention
kernel is also timed alone. The report ends with the issue's goals next to the measurements.
--shape benchmarks random weights at a real model's shapes (or a JSON ModelConfig file).
--baseline=transformers times Hugging Face transformers on the same weights next to kvjax
(float32, interleaved repeats, paired ratios, identical greedy tokens checked): see
kvjax/benchmarking_baseline.py. With --ops it times the CPU prefill attention and an MLP-sized
matrix product against torch's instead (kvjax/benchmarking_ops.py):
  python scripts/benchmark.py --model=smollm2-135m --baseline=transformers --ops \
      --context_lengths=2048,4096 --repeats=5 --json_out=/tmp/ops.json
--prefix_sharing times BatchLLM prefix sharing (kvjax.systems.generate_shared) against
kvjax.generate on the same offline SQuAD batch (--sharing_documents paragraphs x
--sharing_questions questions, --decode_steps new tokens each):
  python scripts/benchmark.py --prefix_sharing --json_out=/tmp/sharing.json \
      --plot_out=/tmp/sharing.png
--serving times the continuous-batching server with the full cache against --method at
--budget, both under --memory_budget_mib of batch cache (compression admits more rows):
  python scripts/benchmark.py --serving --method=snapkv --budget=128 --memory_budget_mib=64
and with --prefix_cache_mib the server without and with shared prompt prefixes:
  python scripts/benchmark.py --serving --prefix_cache_mib=256 --memory_budget_mib=200 \
      --decode_steps=16
--chunk_reuse assembles retrieval-augmented prompts from cached document chunks
(Cache-Craft, kvjax.systems.generate_from_chunks) and compares them with full recompute
(--rag_dataset, --rag_questions, --rag_distractors, --decode_steps new tokens):
  python scripts/benchmark.py --chunk_reuse --rag_dataset=hotpotqa --json_out=/tmp/rag.json
(with --memory_budget_mib: through the continuous-batching server instead).
--meshes runs it once per device mesh, the model sharded over each, and reports per-device
cache and weight bytes next to the speeds (--cpu_devices emulates devices on a CPU):
  python scripts/benchmark.py --cpu_devices=8 --meshes=data:1 --meshes=data:2 \
      --meshes=data:4 --meshes=data:8 --batch_sizes=8 --context_lengths=512
--offload decodes one --offload_context-token essay prompt through Quest (--budget tokens
read per step) all on the device, offloaded to host memory, and offloaded behind a device
page buffer of --device_pages frames per eviction policy (kvjax.systems.offload):
  python scripts/benchmark.py --offload --budget=64 --device_pages=24 --decode_steps=16
"""

from absl import flags

from kvjax import benchmarking, benchmarking_baseline, benchmarking_ops, cli, sharding
from kvjax.model import random_params
from kvjax.systems import benchmarks

FLAGS = flags.FLAGS
cli.define_model_flags()
cli.define_method_flags()
flags.DEFINE_string("shape", None, f"Instead of --model: random weights at a named shape "
                    f"{benchmarking.available_shapes()} or a JSON ModelConfig file; "
                    f"--dtype defaults to {benchmarking.DEFAULT_SHAPE_DTYPE} here.")
flags.DEFINE_list("methods", None, "Methods to compare, e.g. full,snapkv,h2o (default: "
                  "--method); --compression_ratio/--budget/--method_arg apply to all but "
                  "full, and the full cache is always measured as the baseline.")
flags.DEFINE_list("context_lengths", ["512"], "Prompt lengths in tokens, e.g. 512,2048.")
flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes, e.g. 1,4.")
flags.DEFINE_integer("decode_steps", 32, "Decode steps timed per run.")
flags.DEFINE_integer("warmup", 2, "Untimed runs before the timed ones.")
flags.DEFINE_integer("repeats", 3, "Timed runs; the median and the min are reported.")
flags.DEFINE_float("hbm_bandwidth_gbps", None, "The device's peak or measured memory "
                   "bandwidth in GB/s, for hbm_fraction (default: the measured copy bandwidth).")
flags.DEFINE_integer("copy_bandwidth_mib", 256, "Array size for the copy-bandwidth measurement.")
flags.DEFINE_integer("seed", 0, "Seed of the random prompts and random weights.")
flags.DEFINE_string("baseline", None, f"Also time this library on the same weights, side by "
                    f"side: {list(benchmarking_baseline.BASELINES)} (needs torch and "
                    f"transformers; --model only, float32).")
flags.DEFINE_integer("torch_threads", None, "With --baseline: torch's threads (default "
                     "os.cpu_count(), the cores XLA uses); reported in the JSON.")
flags.DEFINE_bool("ops", False, "With --baseline=transformers: instead of generating, time "
                  "kvjax's CPU prefill attention and an MLP-sized matrix product against "
                  "torch's at --model's shapes (kvjax/benchmarking_ops.py).")
flags.DEFINE_string("plot_out", None, "With --baseline: write a PNG of prefill seconds and "
                    "decode ms/step against context length here.")
flags.DEFINE_bool("prefix_sharing", False, "Time prefix sharing (BatchLLM) against unshared "
                  "generation of one offline SQuAD batch instead.")
flags.DEFINE_integer("sharing_documents", 4, "With --prefix_sharing: SQuAD paragraphs.")
flags.DEFINE_integer("sharing_questions", 8, "With --prefix_sharing: questions per paragraph.")
flags.DEFINE_integer("rows_per_prefix", 8, "With --prefix_sharing: rows decoded against one "
                     "prefix copy.")
flags.DEFINE_integer("memory_budget_mib", None, "With --prefix_sharing: the most MiB a wave's "
                     "cache may allocate (default: no bound); with --serving: the server's "
                     "batch cache bound (required); with --chunk_reuse: serve the second "
                     "pass through the server under this bound, plain prompts against "
                     "cached chunks, instead.")
flags.DEFINE_bool("chunk_reuse", False, "Compare prompts assembled from cached chunks "
                  "(Cache-Craft) with full recompute instead.")
flags.DEFINE_enum("rag_dataset", "hotpotqa", ["hotpotqa", "squad"], "With --chunk_reuse: "
                  "where the questions and their documents come from.")
flags.DEFINE_integer("rag_questions", 16, "With --chunk_reuse: questions (each asked twice).")
flags.DEFINE_list("rag_fractions", ["0", "0.15", "0.3", "0.5", "1"], "With --chunk_reuse: "
                  "fixed recompute fractions compared with Cache-Craft's CFO.")
flags.DEFINE_integer("rag_distractors", 2, "With --chunk_reuse: other questions' documents "
                     "added to each prompt.")
flags.DEFINE_bool("offload", False, "Compare Quest decoding on the device, offloaded, and "
                  "offloaded behind a page buffer per eviction policy instead.")
flags.DEFINE_integer("offload_context", 512, "With --offload: prompt tokens.")
flags.DEFINE_integer("device_pages", 24, "With --offload: buffer frames per row and KV head.")
flags.DEFINE_list("offload_policies", ["lru", "predictions", "hybrid"], "With --offload: "
                  "eviction policies of the buffer, any of lru, predictions (heuristic "
                  "discard bits), learned (bits from the trained predictor, "
                  "kvjax.cache.page_predictor), hybrid.")
flags.DEFINE_bool("serving", False, "Time the continuous-batching server (kvjax.systems.Server) "
                  "with the full cache against --method at --budget under --memory_budget_mib, "
                  "on the same SQuAD requests, instead.")
flags.DEFINE_integer("prefix_cache_mib", None, "With --serving: instead compare the server "
                     "(full cache) without and with a prefix store of this many MiB "
                     "(BatchLLM's shared prefixes in continuous batching).")
flags.DEFINE_integer("min_prefix_tokens", 16, "With --serving --prefix_cache_mib: the "
                     "shortest prefix shared.")
flags.DEFINE_multi_string("meshes", None, "Run the benchmark once per mesh, the model "
                          "sharded over it (repeat the flag: --meshes=data:1 --meshes=data:2 "
                          "--meshes=data:2,model:2); rows report per-device cache and weight "
                          "bytes.")
flags.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices (for --mesh / "
                     "--meshes on a CPU machine).")
flags.DEFINE_string("json_out", None, "Write {device, jax_version, model, method, methods, "
                    "results, decode_attention_kernel, goals, config} here.")


def main(argv):
  del argv
  cli.check_single_process()
  if FLAGS.cpu_devices is not None:
    benchmarking.emulate_cpu_devices(FLAGS.cpu_devices)   # before anything touches a device
  if FLAGS.prefix_sharing:
    return prefix_sharing()
  if FLAGS.serving:
    return serving()
  if FLAGS.chunk_reuse:
    return chunk_reuse()
  if FLAGS.offload:
    return offload_tier()
  methods = benchmarking.build_methods(
      FLAGS.methods if FLAGS.methods is not None else FLAGS.method,
      benchmarking.parse_method_args(FLAGS.method_arg),
      what="--methods" if FLAGS.methods is not None else "--method")
  context_lengths = benchmarking.parse_sizes(FLAGS.context_lengths, "--context_lengths")
  batch_sizes = benchmarking.parse_sizes(FLAGS.batch_sizes, "--batch_sizes")
  benchmarking_baseline.check_flags(FLAGS.baseline, [
      name for name in benchmarking_baseline.MODE_FLAGS if FLAGS[name].present])
  if FLAGS.ops:
    return ops_side_by_side(context_lengths, batch_sizes)
  if FLAGS.baseline is not None:
    return side_by_side(context_lengths, batch_sizes, methods)
  plan = dict(decode_steps=FLAGS.decode_steps, hbm_bandwidth_gbps=FLAGS.hbm_bandwidth_gbps,
              methods=methods, compression_ratio=FLAGS.compression_ratio, budget=FLAGS.budget,
              prefill_chunk_size=FLAGS.prefill_chunk_size)
  if FLAGS.meshes:
    return mesh_sweep(context_lengths, batch_sizes, plan)
  model, source = _model(context_lengths, batch_sizes, plan)
  report = _run(model, source, context_lengths, batch_sizes, plan)
  print(benchmarking.format_table(report))
  if FLAGS.json_out:
    cli.write_json(FLAGS.json_out, {**report, "config": cli.run_config()})


def _model(context_lengths, batch_sizes, plan, mesh=True):
  """(model, source): --shape's random weights, else the --model loaded (on --mesh)."""
  if FLAGS.shape is not None:
    if FLAGS["model"].present:
      raise benchmarking.BenchmarkError(
          f"give --model={FLAGS.model!r} or --shape={FLAGS.shape!r}, not both")
    config = benchmarking.named_shape(FLAGS.shape, FLAGS.dtype)
    # Fail before allocating (an 8B model's random weights take minutes on a CPU).
    benchmarking.check_plan(config, context_lengths, batch_sizes, **plan)
    model, source = random_params(config, FLAGS.seed), f"shape:{FLAGS.shape}"
    if mesh and FLAGS.mesh is not None:
      model = sharding.shard_model(model, FLAGS.mesh)
    return model, source
  return cli.load_model(), FLAGS.model


def _run(model, source, context_lengths, batch_sizes, plan):
  return benchmarking.run(
      model, context_lengths, batch_sizes, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
      copy_bandwidth_bytes=FLAGS.copy_bandwidth_mib << 20, seed=FLAGS.seed, source=source,
      log=lambda line: print(f"[kvjax] {line}", flush=True), **plan)


def mesh_sweep(context_lengths, batch_sizes, plan):
  """The same benchmark with the model sharded over each --meshes spec in turn."""
  if FLAGS.mesh is not None:
    raise benchmarking.BenchmarkError(f"give --mesh={FLAGS.mesh!r} or --meshes, not both")
  meshes = [sharding.make_mesh(spec) for spec in FLAGS.meshes]   # bad specs fail first
  model, source = _model(context_lengths, batch_sizes, plan, mesh=False)
  runs = []
  for spec, mesh in zip(FLAGS.meshes, meshes):
    print(f"[kvjax] mesh {spec}", flush=True)
    report = _run(sharding.shard_model(model, mesh), source, context_lengths, batch_sizes,
                  plan)
    runs.append({"mesh": spec, "devices": int(mesh.devices.size), "report": report})
  print(benchmarking.format_mesh_table(runs))
  if FLAGS.json_out:
    cli.write_json(FLAGS.json_out, {"device": benchmarking.device_info(), "meshes": runs,
                                    "config": cli.run_config()})


def ops_side_by_side(context_lengths, batch_sizes):
  if FLAGS.plot_out:
    raise benchmarking.BenchmarkError("--plot_out does not apply with --ops")
  benchmarking_baseline.check_baseline(FLAGS.baseline)
  benchmarking_ops.check_flags(
      [name for name in benchmarking_ops.UNUSED_FLAGS if FLAGS[name].present])
  report = benchmarking_ops.run(
      FLAGS.model, context_lengths, batch_sizes, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
      seed=FLAGS.seed, torch_threads=FLAGS.torch_threads,
      log=lambda line: print(f"[kvjax] {line}", flush=True))
  print(benchmarking_ops.format_table(report))
  if FLAGS.json_out:
    cli.write_json(FLAGS.json_out, {**report, "config": cli.run_config()})


def side_by_side(context_lengths, batch_sizes, methods):
  report = benchmarking_baseline.run(
      FLAGS.baseline, FLAGS.model, context_lengths, batch_sizes,
      decode_steps=FLAGS.decode_steps, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
      methods=methods, compression_ratio=FLAGS.compression_ratio, budget=FLAGS.budget,
      seed=FLAGS.seed, torch_threads=FLAGS.torch_threads, dtype=FLAGS.dtype,
      log=lambda line: print(f"[kvjax] {line}", flush=True))
  print(benchmarking_baseline.format_table(report))
  if FLAGS.plot_out:
    benchmarking_baseline.write_plot(report, FLAGS.plot_out)
  if FLAGS.json_out:
    cli.write_json(FLAGS.json_out, {**report, "config": cli.run_config()})


def prefix_sharing():
  log = lambda line: print(f"[kvjax] {line}", flush=True)
  model = cli.load_model()
  prompts = benchmarks.squad_prompts(FLAGS.sharing_documents, FLAGS.sharing_questions)
  budget = None if FLAGS.memory_budget_mib is None else FLAGS.memory_budget_mib << 20
  report = benchmarks.compare_sharing(model, prompts, FLAGS.decode_steps, FLAGS.rows_per_prefix,
                                     budget, repeats=FLAGS.repeats, log=log)
  report = {"model": FLAGS.model, "device": benchmarking.device_info(), **report}
  log(f"{report['prompts']} prompts: shared {report['shared_tokens_per_second']:.2f} tok/s, "
      f"unshared {report['unshared_tokens_per_second']:.2f} tok/s "
      f"({report['throughput_ratio']:.2f}x); prefill saved "
      f"{report['prefill_saved_fraction']:.0%}; peak cache "
      f"{report['shared_peak_cache_bytes'] / 2 ** 20:.1f} vs "
      f"{report['unshared_peak_cache_bytes'] / 2 ** 20:.1f} MiB; same tokens: "
      f"{report['same_tokens']}")
  _write_systems_report(report, benchmarks.write_sharing_plot)


def serving():
  if FLAGS.prefix_cache_mib is not None:
    return server_sharing()
  if FLAGS.memory_budget_mib is None or FLAGS.budget is None or FLAGS.method == "full":
    raise benchmarking.BenchmarkError("--serving needs --memory_budget_mib, a compressing "
                                      "--method and its --budget")
  log = lambda line: print(f"[kvjax] {line}", flush=True)
  model = cli.load_model()
  prompts = benchmarks.squad_prompts(FLAGS.sharing_documents, FLAGS.sharing_questions)
  report = benchmarks.compare_serving(model, prompts, FLAGS.memory_budget_mib << 20,
                                      FLAGS.method, FLAGS.budget, FLAGS.decode_steps,
                                      repeats=FLAGS.repeats, log=log)
  report = {"model": FLAGS.model, "device": benchmarking.device_info(), **report}
  log(f"{report['prompts']} requests: {report['method']} {report['budget']} "
      f"{report['compressed']['tokens_per_second']:.2f} tok/s in "
      f"{report['compressed']['rows']} rows, full "
      f"{report['full']['tokens_per_second']:.2f} tok/s in {report['full']['rows']} rows "
      f"({report['throughput_ratio']:.2f}x)")
  _write_systems_report(report, benchmarks.write_serving_plot)


def server_chunks(model, workload):
  report = benchmarks.compare_server_chunks(
      model, workload, FLAGS.memory_budget_mib << 20, FLAGS.decode_steps,
      repeats=FLAGS.repeats, log=lambda line: print(f"[kvjax] {line}", flush=True))
  report.update(model=FLAGS.model, dataset=FLAGS.rag_dataset,
                distractors=FLAGS.rag_distractors, device=benchmarking.device_info())
  plain, chunks = report["recompute"], report["chunks"]
  print(f"{report['prompts']} requests in {chunks['rows']} rows: from cached chunks "
        f"{report['speedup']:.2f}x faster, prefilled {chunks['prefilled_tokens']} of "
        f"{report['prompt_tokens']} prompt tokens; answers equal {report['answers_equal']}/"
        f"{report['prompts']}; gold found {chunks['gold_found']:.0%} (recompute "
        f"{plain['gold_found']:.0%})")
  _write_systems_report(report, benchmarks.write_server_chunks_plot)


def server_sharing():
  if FLAGS.memory_budget_mib is None or FLAGS.method != "full":
    raise benchmarking.BenchmarkError(
        f"--serving --prefix_cache_mib={FLAGS.prefix_cache_mib} needs --memory_budget_mib "
        f"and the full cache (--method={FLAGS.method!r} given)")
  log = lambda line: print(f"[kvjax] {line}", flush=True)
  model = cli.load_model()
  prompts = benchmarks.squad_prompts(FLAGS.sharing_documents, FLAGS.sharing_questions)
  report = benchmarks.compare_server_sharing(
      model, prompts, FLAGS.memory_budget_mib << 20, FLAGS.prefix_cache_mib << 20,
      FLAGS.decode_steps, FLAGS.min_prefix_tokens, repeats=FLAGS.repeats, log=log)
  report = {"model": FLAGS.model, "device": benchmarking.device_info(), **report}
  plain, shared = report["unshared"], report["shared"]
  log(f"{report['prompts']} requests in {shared['rows']} rows: shared "
      f"{shared['tokens_per_second']:.2f} tok/s, unshared {plain['tokens_per_second']:.2f} "
      f"tok/s ({report['throughput_ratio']:.2f}x); prefilled {shared['prefilled_tokens']} of "
      f"{shared['prompt_tokens']} prompt tokens; same tokens: {report['same_tokens']}")
  _write_systems_report(report, benchmarks.write_server_sharing_plot)


def chunk_reuse():
  if FLAGS.memory_budget_mib is not None and (FLAGS["rag_fractions"].present
                                              or FLAGS.method != "full"):
    raise benchmarking.BenchmarkError(
        "--chunk_reuse --memory_budget_mib compares the full-cache server fed plain prompts "
        "with Cache-Craft's own recompute; --rag_fractions and --method do not apply")
  model = cli.load_model()
  workload = benchmarks.rag_workload(FLAGS.rag_dataset, FLAGS.rag_questions,
                                     FLAGS.rag_distractors, FLAGS.seed)
  if FLAGS.memory_budget_mib is not None:
    return server_chunks(model, workload)
  fractions = []
  for f in FLAGS.rag_fractions:
    try:
      fractions.append(float(f))
    except ValueError:
      fractions.append(-1.0)
    if not 0 <= fractions[-1] <= 1:
      raise benchmarking.BenchmarkError(f"--rag_fractions entry {f!r} must be a number in "
                                        f"[0, 1]")
  report = benchmarks.compare_chunk_reuse(model, workload, FLAGS.decode_steps,
                                          fractions=fractions, repeats=FLAGS.repeats)
  report.update(model=FLAGS.model, dataset=FLAGS.rag_dataset,
                distractors=FLAGS.rag_distractors)
  for name, v in report["variants"].items():
    print(f"{name:>14}: prefill saved {v['prefill_saved_fraction']:.0%}, answers equal to "
          f"full {v['answers_equal_to_full']}/{report['prompts']} (word F1 "
          f"{v['word_f1_to_full']:.2f}), gold found "
          f"{v['gold_found']:.0%}, prefill {v['prefill_seconds_median']:.3f} s "
          f"({v['prefill_speedup']:.2f}x)")
  _write_systems_report(report, benchmarks.write_chunk_reuse_plot)


def offload_tier():
  from kvjax.evaluation import data
  from kvjax.systems import offload
  model = cli.load_model()
  prompt = model.tokenizer.encode(data.essays_text())[:FLAGS.offload_context]
  report = offload.compare_offload(model, [prompt], FLAGS.decode_steps, budget=FLAGS.budget,
                                   device_pages=FLAGS.device_pages,
                                   policies=FLAGS.offload_policies, repeats=FLAGS.repeats,
                                   chat_template=False)
  report.update(model=FLAGS.model, prompt_tokens=len(prompt))
  for name, v in report["variants"].items():
    print(f"{name:>20}: device {v['device_bytes'] / 2 ** 20:.1f} MiB, host "
          f"{v['host_bytes'] / 2 ** 20:.1f} MiB, fault rate {v['fault_rate']:.3f}, "
          f"{v['decode_tokens_per_second']:.1f} tok/s ({v['speed_vs_on_device']:.2f}x), "
          f"same tokens {v['tokens_identical']}")
  _write_systems_report(report, benchmarks.write_offload_plot)


def _write_systems_report(report: dict, write_plot) -> None:
  if FLAGS.plot_out:
    write_plot(report, FLAGS.plot_out)
  if FLAGS.json_out:
    cli.write_json(FLAGS.json_out, {**report, "config": cli.run_config()})


if __name__ == "__main__":
  cli.run(main)

"""The evaluation sweep end to end on a tiny random model: files, resume, interruption."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

import kvjax
from kvjax import calibration
from kvjax.evaluation import fidelity
from kvjax.evaluation import tasks as tasks_lib
from kvjax.evaluation import sweep
from kvjax.generation import context
from tiny import tiny_chat_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = sweep.SweepConfig(methods=("full", "streaming_llm"), ratios=(0.5,),
                           tasks=("niah_single_2", "multiturn_niah", "fidelity"),
                           lengths=(384,), num_examples=2, batch_size=2, max_new_tokens=4,
                           turns=2, continuation_tokens=16)


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)


def _spy_prefill_many(monkeypatch):
  """Counts the variants of each shared prefill (prefill_many goes through the iterator)."""
  calls = []
  real = context.iter_prefill_many

  def spy(*args, **kwargs):
    calls.append(len(args[3]))
    return real(*args, **kwargs)
  monkeypatch.setattr(context, "iter_prefill_many", spy)
  return calls


def _lines(path):
  return path.read_text().splitlines()


def test_sweep_writes_results_and_resumes(model, tmp_path, monkeypatch):
  from kvjax.evaluation import report
  calls = _spy_prefill_many(monkeypatch)
  summary = sweep.run_sweep(model, "tiny", CONFIG, tmp_path)
  # One prefill per batch (each task has one batch of 2), shared by both variants.
  assert calls == [2, 2, 2]
  cells = summary["cells"]
  assert [(c["task"], c["method"], c["compression_ratio"]) for c in cells] == [
      ("niah_single_2", "full", 0.0), ("niah_single_2", "streaming_llm", 0.5),
      ("multiturn_niah", "full", 0.0), ("multiturn_niah", "streaming_llm", 0.5),
      ("fidelity", "full", 0.0), ("fidelity", "streaming_llm", 0.5)]
  assert all(c["examples"] == 2 for c in cells) and summary["complete"]
  records = [json.loads(line) for line in _lines(tmp_path / "examples.jsonl")]
  assert len(records) == 12
  for r in records:
    if r["task"] == "fidelity":
      assert r["tokens"] == 16 and r["kl_sum"] >= 0
    else:
      assert 0 <= r["score"] <= 100 and len(r["predictions"]) == len(r["answers"])
      assert len(r["predictions"]) == (2 if r["task"] == "multiturn_niah" else 1)
  fidelity_cells = {c["method"]: c["metrics"] for c in cells if c["task"] == "fidelity"}
  assert fidelity_cells["full"]["kl"] < 1e-6 and fidelity_cells["full"]["top1"] == 1.0
  assert fidelity_cells["streaming_llm"]["kl"] > 0
  compressed = [c for c in cells if c["method"] == "streaming_llm"]
  assert all(c["context_cache_bytes"] < 0.6 * c["full_context_cache_bytes"] for c in compressed)
  assert all(0.4 < c["removed_fraction"] < 0.6 for c in compressed)
  assert json.loads((tmp_path / "summary.json").read_text())["cells"] == cells

  paths = report.write_report(cells, tmp_path)
  table = (tmp_path / "results.md").read_text()
  assert "| streaming_llm | 0.5 |" in table and "niah_single_2" in table
  assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert set(paths) >= {"results", "scores", "memory", "fidelity"}

  # A second run finds every example done and computes nothing.
  calls.clear()
  again = sweep.run_sweep(model, "tiny", CONFIG, tmp_path)
  assert calls == [] and again["cells"] == cells
  assert len(_lines(tmp_path / "examples.jsonl")) == 12

  # An interrupted run: the last batch's records are half written. Only that batch reruns.
  lines = _lines(tmp_path / "examples.jsonl")
  (tmp_path / "examples.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:40])
  resumed = sweep.run_sweep(model, "tiny", CONFIG, tmp_path)
  assert calls == [2]   # the fidelity batch, for the variants it lacked
  assert [c["examples"] for c in resumed["cells"]] == [2] * 6
  for a, b in zip(resumed["cells"], cells):
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5, abs=1e-6)


def test_changed_settings_are_not_mixed_with_old_results(model, tmp_path, monkeypatch):
  config = sweep.SweepConfig(methods=("full",), ratios=(0.5,), tasks=("niah_single_2",),
                             lengths=(384,), num_examples=1, batch_size=1, max_new_tokens=3)
  sweep.run_sweep(model, "tiny", config, tmp_path)
  calls = _spy_prefill_many(monkeypatch)
  longer = sweep.SweepConfig(**{**config.__dict__, "max_new_tokens": 5})
  summary = sweep.run_sweep(model, "tiny", longer, tmp_path)
  assert calls == [1] and summary["cells"][0]["examples"] == 1


def test_fidelity_records_of_another_example_count_are_not_reused(smollm2_tokenizer):
  """Example i of the essay windows depends on how many are drawn, so a fidelity record
  made with num_examples=12 is not example i of a sweep with 8; generated tasks'
  examples are pure functions of their index and keep their records."""
  draw = lambda n: fidelity.essay_samples(smollm2_tokenizer, 64, 8, n)
  assert [s.context_ids for s in draw(8)] != [s.context_ids for s in draw(12)[:8]]
  eight = dataclasses.replace(CONFIG, num_examples=8)
  twelve = dataclasses.replace(CONFIG, num_examples=12)
  assert sweep._fingerprint(eight, "fidelity") != sweep._fingerprint(twelve, "fidelity")
  assert sweep._fingerprint(eight, "niah_single_2") == sweep._fingerprint(twelve,
                                                                          "niah_single_2")


def test_a_sweep_with_another_example_count_recomputes_fidelity(model, tmp_path, monkeypatch):
  config = sweep.SweepConfig(methods=("full",), ratios=(0.5,), tasks=("fidelity",),
                             lengths=(384,), num_examples=2, batch_size=2,
                             continuation_tokens=16)
  sweep.run_sweep(model, "tiny", config, tmp_path)
  calls = _spy_prefill_many(monkeypatch)
  summary = sweep.run_sweep(model, "tiny", dataclasses.replace(config, num_examples=3),
                            tmp_path)
  assert calls == [1, 1] and summary["cells"][0]["examples"] == 3   # 0-1 again, then 2


@pytest.mark.parametrize("overrides, match", [
    (dict(tasks=("nope",)), "unknown task 'nope'"),
    (dict(modes=("sideways",)), "unknown mode 'sideways'"),
    (dict(ratios=(1.0,)), r"compression ratio 1.0 must be in \(0, 1\)"),
    (dict(num_examples=0), "num_examples=0 must be an integer >= 1"),
    (dict(methods=("magic",)), "unknown method 'magic'"),
])
def test_bad_sweeps_are_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    sweep.SweepConfig(**{**CONFIG.__dict__, **overrides}).validate()


def test_a_length_the_chat_template_pushes_below_the_tasks_minimum_is_refused(model,
                                                                              tmp_path):
  template = sweep.template_tokens(model)
  assert template > 0
  least = tasks_lib.MIN_TARGET_TOKENS + template
  config = sweep.SweepConfig(**{**CONFIG.__dict__, "lengths": (least + 64, least - 1)})
  with pytest.raises(sweep.SweepError, match=f"length {least - 1} leaves .* use lengths >= "
                                             f"{least}"):
    sweep.run_sweep(model, "tiny", config, tmp_path)
  assert not (tmp_path / "examples.jsonl").exists()   # refused before any work
  # Fidelity alone has no task minimum.
  sweep.check_lengths(model, sweep.SweepConfig(**{**config.__dict__,
                                                  "tasks": (sweep.FIDELITY,)}))


def test_evaluate_script_reports_bad_flags_in_one_line(tmp_path):
  run = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"),
                        f"--out_dir={tmp_path}", "--tasks=nope"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith("error: unknown task 'nope'")


def test_question_aware_mode_compresses_the_question_too(model, tmp_path):
  config = sweep.SweepConfig(methods=("full", "knorm"), ratios=(0.5,), tasks=("niah_single_2",),
                             lengths=(384,), modes=sweep.MODES, num_examples=1, batch_size=1,
                             max_new_tokens=3)
  cells = sweep.run_sweep(model, "tiny", config, tmp_path)["cells"]
  assert [(c["mode"], c["method"]) for c in cells] == [
      ("query_agnostic", "full"), ("query_agnostic", "knorm"),
      ("question_aware", "full"), ("question_aware", "knorm")]
  tokens = {c["mode"]: c["context_tokens"] for c in cells if c["method"] == "full"}
  # Question-aware contexts hold the question (and the whole chat template) as well.
  assert tokens["question_aware"] > tokens["query_agnostic"] + 10
  assert 370 <= tokens["question_aware"] <= 384


def test_configurations_of_one_method_are_separate_rows(model):
  """A method without a label of its own is labelled with its non-default hyperparameters
  (the sweep's results are keyed by label), a wrapper with its own and its press's;
  default ones and custom labels are unchanged, and a method calibrated for the model
  (its per-model fields filled) keeps its configured label."""
  config = sweep.SweepConfig(
      methods=("full", "loopserve", "loopserve:alpha=0.9", "snapkv", "snapkv:window=4",
               "adakv", "sinks_window:sinks=8", "compresskv"),
      ratios=(0.5,), tasks=("niah_single_2",), lengths=(1024,))
  found = sweep.variants(config)
  labels = [v.label for v in found]
  assert labels == ["full", "loopserve", "loopserve:alpha=0.9", "snapkv", "snapkv:window=4",
                    "adakv(snapkv)", "sinks_window:sinks=8(snapkv)", "compresskv"]
  assert kvjax.methods.get("adakv", press="snapkv:window=4").label == "adakv(snapkv:window=4)"
  bound = dataclasses.replace(found[-1], method=calibration.bind(found[-1].method, model))
  assert bound.method != found[-1].method and bound.label == "compresskv"


def test_sweep_runs_configured_and_quantized_methods(model, tmp_path):
  """Method specs with hyperparameters; a method that keeps every token (KIVI) is one
  ratio-0 column; bytes are reported per cell."""
  kivi = "kivi:bits=4:group_size=16:residual=16"
  config = sweep.SweepConfig(methods=("full", kivi, kivi + ":press=snapkv"), ratios=(0.5,),
                             tasks=("niah_single_2", "fidelity"), lengths=(384,),
                             num_examples=2, batch_size=2, max_new_tokens=4,
                             continuation_tokens=16)
  cells = sweep.run_sweep(model, "tiny", config, tmp_path)["cells"]
  labels = sorted({(c["method"], c["compression_ratio"]) for c in cells})
  spec = "kivi:bits=4:group_size=16:residual=16"
  assert labels == [("full", 0.0), (spec, 0.0), (spec + ":press=snapkv", 0.5)]
  share = {c["method"]: c["context_cache_bytes"] / c["full_context_cache_bytes"]
           for c in cells if c["task"] == "niah_single_2"}
  assert share["full"] == pytest.approx(1.0, abs=0.05)
  assert 0.2 < share[spec] < 0.5       # 4-bit codes + 16-bit scales, 16-token window
  assert share[spec + ":press=snapkv"] < 0.6 * share[spec]
  fid = {c["method"]: c["metrics"]["kl"] for c in cells if c["task"] == "fidelity"}
  assert fid["full"] < 1e-6 < fid[spec]

"""kvjax.evaluation.report on hand-made sweep cells: tables written out by hand, PNGs checked."""

import os
import pathlib
import struct

import pytest

from kvjax.errors import KvjaxError
from kvjax.evaluation import report

MIB = 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Scores by (method, ratio) -> [niah_single_2 1K, niah_single_2 4K, vt 1K, vt 4K]; None: not run.
SCORES = {
    ("full", 0.0): [100.0, 96.0, 90.0, 80.0],     # avg 366 / 4 = 91.5
    ("snapkv", 0.5): [80.0, 76.0, 60.0, 50.0],    # avg 266 / 4 = 66.5
    ("snapkv", 0.25): [87.5, 90.0, 85.0, 70.0],   # avg 332.5 / 4 = 83.125
    ("knorm", 0.5): [50.0, 30.0, 20.0, None],     # avg 100 / 3 = 33.33 over the cells present
    ("knorm", 0.25): [70.0, 65.0, 55.0, 40.0],    # avg 230 / 4 = 57.5
}
COLUMNS = [("niah_single_2", 1024), ("niah_single_2", 4096), ("vt", 1024), ("vt", 4096)]
FULL_BYTES = {1024: 2 * MIB, 4096: 8 * MIB}


def make_cell(method, ratio, task, length, mode="query_agnostic", model="smollm2-135m",
              metrics=None, score=None):
  return {
      "model": model, "task": task, "length": length, "mode": mode, "method": method,
      "compression_ratio": ratio, "examples": 10,
      "metrics": metrics if metrics is not None else {"score": score},
      "context_cache_bytes": FULL_BYTES[length] * (1 - ratio),
      "full_context_cache_bytes": FULL_BYTES[length], "seconds": 2.5,
  }


def score_cells(mode="query_agnostic", model="smollm2-135m", methods=None):
  # Deliberately out of order (full last, ratio 0.5 before 0.25): the table must sort rows.
  keys = [k for k in list(SCORES)[1:] + [("full", 0.0)] if methods is None or k[0] in methods]
  return [make_cell(m, r, t, n, mode, model, score=value)
          for m, r in keys for (t, n), value in zip(COLUMNS, SCORES[(m, r)]) if value is not None]


FIDELITY = {  # (method, ratio, length) -> (perplexity, kl, top1)
    ("full", 0.0, 1024): (9.5, 0.0, 1.0),
    ("snapkv", 0.5, 1024): (10.25, 0.0312, 0.9375),
    ("snapkv", 0.5, 4096): (11.5, 0.05, 0.875),
    ("knorm", 0.5, 1024): (12.0, 0.125, 0.8125),
}


def fidelity_cells():
  return [make_cell(m, r, "fidelity", n, metrics={"perplexity": p, "kl": kl, "top1": top1})
          for (m, r, n), (p, kl, top1) in FIDELITY.items()]


def table_lines(text):
  return [line for line in text.splitlines() if line.startswith("|")]


def png_size(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_SIGNATURE, "not a PNG file"
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def colored_fraction(path):
  """Fraction of pixels that are clearly not white/grey: lines were actually drawn."""
  import matplotlib.image
  pixels = matplotlib.image.imread(path)[..., :3]
  spread = pixels.max(axis=-1) - pixels.min(axis=-1)
  return float((spread > 0.2).mean())


# ---------------------------------------------------------------------------------------------
# Tables.


def test_results_table_rows_columns_values_by_hand():
  text = report.results_table(score_cells())
  assert "#" not in text  # one (model, mode): no heading line
  assert table_lines(text) == [
      "| method | ratio | niah_single_2 1K | niah_single_2 4K | vt 1K | vt 4K | avg | bytes |",
      "|:--|:--|--:|--:|--:|--:|--:|--:|",
      "| full | 0 | 100.0 | 96.0 | 90.0 | 80.0 | 91.5 | 1.000 |",
      "| snapkv | 0.25 | 87.5 | 90.0 | 85.0 | 70.0 | 83.1 | 0.750 |",
      "| snapkv | 0.5 | 80.0 | 76.0 | 60.0 | 50.0 | 66.5 | 0.500 |",
      "| knorm | 0.25 | 70.0 | 65.0 | 55.0 | 40.0 | 57.5 | 0.750 |",
      "| knorm | 0.5 | 50.0 | 30.0 | 20.0 | – | 33.3* | 0.500 |",
  ]
  assert "average over the columns present only" in text


def test_results_table_without_missing_cells_has_no_footnote():
  cells = [c for c in score_cells() if c["method"] != "knorm"]
  text = report.results_table(cells)
  assert "*" not in text and "–" not in text
  assert len(table_lines(text)) == 2 + 3


def test_results_table_skips_fidelity_cells_and_other_metrics():
  text = report.results_table(score_cells() + fidelity_cells())
  assert "fidelity" not in text
  kl = report.results_table(fidelity_cells(), metric="kl")
  assert "| snapkv | 0.5 | 0.0 | 0.1 | 0.0 | 0.500 |" in table_lines(kl)  # 1 decimal, like scores


def test_results_table_groups_modes_and_borrows_the_full_baseline():
  # question_aware has no full cells: the full cache does not depend on the mode, so they are
  # borrowed from query_agnostic.
  cells = score_cells("query_agnostic") + [
      dict(c, metrics={"score": c["metrics"]["score"] - 10.0})
      for c in score_cells("question_aware", methods={"snapkv"})]
  text = report.results_table(cells)
  assert "### smollm2-135m · query_agnostic" in text
  assert "### smollm2-135m · question_aware" in text
  aware = text.split("question_aware")[1]
  assert table_lines(aware)[2:] == [
      "| full | 0 | 100.0 | 96.0 | 90.0 | 80.0 | 91.5 | 1.000 |",
      "| snapkv | 0.25 | 77.5 | 80.0 | 75.0 | 60.0 | 73.1 | 0.750 |",
      "| snapkv | 0.5 | 70.0 | 66.0 | 50.0 | 40.0 | 56.5 | 0.500 |",
  ]
  only = report.results_table(cells, mode="question_aware")
  assert "###" not in only and table_lines(only) == table_lines(aware)
  with pytest.raises(report.ReportError, match="no cells for"):
    report.results_table(cells, mode="nonexistent")


def test_results_table_one_table_per_model():
  cells = score_cells(model="a") + score_cells(model="b", methods={"full"})
  text = report.results_table(cells)
  assert "### a · query_agnostic" in text and "### b · query_agnostic" in text
  assert len(table_lines(text.split("### b")[1])) == 3


def test_fidelity_table_values_by_hand():
  text = report.fidelity_table(score_cells() + fidelity_cells())
  assert table_lines(text) == [
      "| method | ratio | ppl 1K | KL 1K | top-1 1K | ppl 4K | KL 4K | top-1 4K |",
      "|:--|:--|--:|--:|--:|--:|--:|--:|",
      "| full | 0 | 9.50 | 0.0000 | 1.000 | – | – | – |",
      "| snapkv | 0.5 | 10.25 | 0.0312 | 0.938 | 11.50 | 0.0500 | 0.875 |",
      "| knorm | 0.5 | 12.00 | 0.1250 | 0.812 | – | – | – |",
  ]


def test_memory_table_means_by_hand():
  text = report.memory_table(score_cells())
  assert table_lines(text) == [
      "| ratio | cache | 1K | 4K |",
      "|:--|:--|--:|--:|",
      "| 0 | full | 2.0 | 8.0 |",
      "| 0.25 | compressed | 1.5 | 6.0 |",
      "| 0.5 | compressed | 1.0 | 4.0 |",
  ]


@pytest.mark.parametrize("function", [
    report.results_table, report.fidelity_table, report.memory_table])
def test_tables_reject_empty_cells(function):
  with pytest.raises(report.ReportError, match="no evaluation cells"):
    function([])


def test_errors_are_kvjax_errors_with_a_reason():
  assert issubclass(report.ReportError, KvjaxError)
  bad = score_cells()
  del bad[3]["method"]
  with pytest.raises(report.ReportError, match=r"cell 3 .*lacks \['method'\]"):
    report.results_table(bad)
  with pytest.raises(report.ReportError, match="two cells"):
    report.results_table(score_cells() + score_cells()[:1])
  with pytest.raises(report.ReportError, match="no cell has metric 'accuracy'"):
    report.results_table(score_cells(), metric="accuracy")
  with pytest.raises(report.ReportError, match="no fidelity cells"):
    report.fidelity_table(score_cells())


def test_labels():
  assert [report.length_label(n) for n in (512, 1000, 1024, 1536, 4096, 131072)] == [
      "512", "1000", "1K", "1.5K", "4K", "128K"]
  assert [report.ratio_label(r) for r in (0.0, 0.25, 0.5, 0.1 + 0.2)] == ["0", "0.25", "0.5", "0.3"]
  assert report.format_seconds(4.25) == "4.2s"
  assert report.format_seconds(65) == "1m 05s"
  assert report.format_seconds(3725.2) == "1h 02m 05s"


# ---------------------------------------------------------------------------------------------
# Plots.


def test_plot_scores_writes_a_png_with_one_panel_per_task(tmp_path):
  import matplotlib.pyplot as plt
  path = report.plot_scores(score_cells(), tmp_path / "scores.png")
  assert path == str(tmp_path / "scores.png")
  width, height = png_size(path)
  # "all tasks" + 2 tasks: one row of three subplots, so clearly wider than tall.
  assert 800 <= width <= 4000 and 250 <= height <= 1500 and width > 1.8 * height
  assert colored_fraction(path) > 0.002
  by_length = report.plot_scores(score_cells(), tmp_path / "by_length.png", by_length=True)
  assert png_size(by_length)[1] > height  # 4 (task, length) panels need a second row
  assert plt.get_fignums() == []  # nothing left open in pyplot's registry
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_plot_scores_needs_one_mode(tmp_path):
  cells = score_cells("query_agnostic") + score_cells("question_aware", methods={"snapkv"})
  with pytest.raises(report.ReportError, match="pass model= and/or mode="):
    report.plot_scores(cells, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()
  png_size(report.plot_scores(cells, tmp_path / "aware.png", mode="question_aware"))
  with pytest.raises(report.ReportError, match="no evaluation cells"):
    report.plot_scores([], tmp_path / "empty.png")


def test_plot_memory_and_fidelity_write_pngs(tmp_path):
  width, height = png_size(report.plot_memory(score_cells(), tmp_path / "memory.png"))
  assert 300 <= width <= 3000 and 250 <= height <= 2000
  width, height = png_size(report.plot_fidelity(fidelity_cells(), tmp_path / "fidelity.png"))
  assert 300 <= width <= 3000 and 300 <= height <= 2000
  assert colored_fraction(tmp_path / "fidelity.png") > 0.002
  with pytest.raises(report.ReportError, match="no fidelity cells"):
    report.plot_fidelity(score_cells(), tmp_path / "none.png")
  no_bytes = [dict(c, context_cache_bytes=None, full_context_cache_bytes=None)
              for c in score_cells()]
  with pytest.raises(report.ReportError, match="context_cache_bytes"):
    report.plot_memory(no_bytes, tmp_path / "none.png")


def test_write_report_files_links_and_totals(tmp_path):
  cells = (score_cells("query_agnostic") + score_cells("question_aware", methods={"snapkv"})
           + fidelity_cells())
  out = tmp_path / "report"
  files = report.write_report(cells, out, title="Demo sweep")
  assert set(files) == {"results", "scores_query_agnostic", "scores_question_aware", "memory",
                        "fidelity"}
  for name, path in files.items():
    assert pathlib.Path(path).parent == out and pathlib.Path(path).stat().st_size > 0
    if name != "results":
      png_size(path)
  text = pathlib.Path(files["results"]).read_text()
  assert text.startswith("# Demo sweep\n")
  for link in ("(scores_query_agnostic.png)", "(scores_question_aware.png)", "(memory.png)",
               "(fidelity.png)"):
    assert link in text  # relative to out_dir, so the folder can be moved or published
  assert "### smollm2-135m · question_aware" in text
  assert "| snapkv | 0.5 | 10.25 | 0.0312 | 0.938 | 11.50 | 0.0500 | 0.875 |" in text
  # 19 score cells + 8 question_aware + 4 fidelity = 31 cells, 10 examples and 2.5 s each.
  assert "**Totals:** 31 cells, 310 examples, 1m 18s (78 s) of evaluation." in text
  assert sorted(p.name for p in out.iterdir()) == sorted(
      pathlib.Path(p).name for p in files.values())  # no temp files left behind


def test_write_report_one_mode_names_plain_scores_png(tmp_path):
  files = report.write_report(score_cells(), tmp_path)
  assert set(files) == {"results", "scores", "memory"}
  assert "![scores smollm2-135m · query_agnostic](scores.png)" in pathlib.Path(
      files["results"]).read_text()
  with pytest.raises(report.ReportError, match="no evaluation cells"):
    report.write_report([], tmp_path / "empty")
  assert not (tmp_path / "empty").exists()


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "results.md"
  path.write_text("old")

  def fail(*_):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    report.write_report(score_cells(), tmp_path)
  assert path.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["results.md"]

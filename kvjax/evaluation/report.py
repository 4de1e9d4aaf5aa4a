"""Reports for evaluation sweeps: markdown tables and PNG plots in the kvpress leaderboard style.

A sweep produces one summary record ("cell") per model x mode x method x ratio x task x length:

    {"model": "smollm2-135m", "task": "niah_single_2", "length": 1024, "mode": "query_agnostic",
     "method": "snapkv", "compression_ratio": 0.5, "examples": 20, "metrics": {"score": 85.0},
     "context_cache_bytes": 1.2e7, "full_context_cache_bytes": 2.4e7, "seconds": 12.3}

"full" is the uncompressed baseline (its ratio is always read as 0). Fidelity cells (task
"fidelity") carry {"perplexity", "kl", "top1"} metrics instead of "score".

    from kvjax.evaluation import report
    print(report.results_table(cells))
    report.write_report(cells, "runs/sweep1")   # results.md, scores.png, memory.png, ...

Tables need only the standard library; plots need matplotlib (`pip install kvjax[eval]`).
"""

from __future__ import annotations

import io
import math
import pathlib
import re
import statistics
from typing import Iterable, Sequence

from kvjax import fileio
from kvjax.errors import KvjaxError

FULL = "full"
FIDELITY_TASK = "fidelity"
MISSING = "–"  # en dash: reads as "not run" rather than as a minus sign.
REQUIRED_KEYS = ("model", "task", "length", "mode", "method", "compression_ratio", "metrics")
FIDELITY_METRICS = (("perplexity", "ppl", "{:.2f}"), ("kl", "KL", "{:.4f}"),
                    ("top1", "top-1", "{:.3f}"))


class ReportError(KvjaxError):
  """Sweep cells a report cannot be made from (none, missing keys, duplicates, no data)."""


# ----------------------------------------------------------------------------------------------
# Cells: validation, keys, grouping.


def _check_cells(cells) -> list[dict]:
  """Returns the cells as a list, raising ReportError on an empty list or a malformed cell."""
  cells = list(cells or [])
  if not cells:
    raise ReportError("no evaluation cells to report; the sweep produced no results")
  for i, cell in enumerate(cells):
    if not isinstance(cell, dict):
      raise ReportError(f"cell {i} is a {type(cell).__name__}, not a dict")
    missing = [k for k in REQUIRED_KEYS if k not in cell]
    if missing:
      raise ReportError(f"cell {i} ({cell.get('method')}, {cell.get('task')}) lacks {missing}")
    if not isinstance(cell["metrics"], dict):
      raise ReportError(f"cell {i}: metrics must be a dict, got {cell['metrics']!r}")
  return cells


def _ratio(cell: dict) -> float:
  # Rounded so 0.30000000000000004 and 0.3 are the same row; full is ratio 0 by definition.
  return 0.0 if cell["method"] == FULL else round(float(cell["compression_ratio"]), 6)


def _row_key(cell: dict) -> tuple[str, float]:
  return cell["method"], _ratio(cell)


def _col_key(cell: dict) -> tuple[str, int]:
  return cell["task"], int(cell["length"])


def _unique(values: Iterable) -> list:
  """Distinct values in first-seen order."""
  return list(dict.fromkeys(values))


def _ordered_rows(cells: Sequence[dict]) -> list[tuple[str, float]]:
  """(method, ratio) rows: full first, then methods in first-seen order, ratios ascending."""
  keys = _unique(_row_key(c) for c in cells)
  methods = _unique(m for m, _ in keys)
  methods.sort(key=lambda m: m != FULL)  # stable: keeps first-seen order otherwise
  return [(m, r) for m in methods for r in sorted(r for mm, r in keys if mm == m)]


def _ordered_cols(cells: Sequence[dict]) -> list[tuple[str, int]]:
  """(task, length) columns: tasks in first-seen order, lengths ascending within a task."""
  keys = _unique(_col_key(c) for c in cells)
  tasks = _unique(t for t, _ in keys)
  return [(t, n) for t in tasks for n in sorted(n for tt, n in keys if tt == t)]


def _groups(cells: Sequence[dict], mode: str | None = None,
            model: str | None = None) -> list[tuple[tuple[str, str], list[dict]]]:
  """Splits cells into ((model, mode), cells) groups, first-seen order.

  A full-cache cell does not depend on the mode (nothing is compressed), so a group lacking the
  full baseline for some (task, length) borrows it from another mode of the same model: a sweep
  may run the baseline once.
  """
  keys = _unique((c["model"], c["mode"]) for c in cells)
  if model is not None:
    keys = [k for k in keys if k[0] == model]
  if mode is not None:
    keys = [k for k in keys if k[1] == mode]
  if not keys:
    raise ReportError(f"no cells for model={model!r} mode={mode!r}; present: "
                      f"{_unique((c['model'], c['mode']) for c in cells)}")
  groups = []
  for key in keys:
    own = [c for c in cells if (c["model"], c["mode"]) == key]
    have_full = {_col_key(c) for c in own if c["method"] == FULL}
    borrowed = {}
    for c in cells:
      if (c["model"] == key[0] and c["method"] == FULL and _col_key(c) not in have_full):
        borrowed.setdefault(_col_key(c), c)
    groups.append((key, own + list(borrowed.values())))
  return groups


def _grid(cells: Sequence[dict], metric: str) -> dict:
  """{((method, ratio), (task, length)): value} for the cells that have `metric`."""
  grid = {}
  for c in cells:
    if metric not in c["metrics"] or c["metrics"][metric] is None:
      continue
    key = (_row_key(c), _col_key(c))
    if key in grid:
      raise ReportError(f"two cells for {c['model']} {c['mode']} {key}: a sweep writes one cell "
                        f"per combination; drop the duplicate")
    grid[key] = float(c["metrics"][metric])
  return grid


def _with_metric(cells: Sequence[dict], metric: str) -> list[dict]:
  return [c for c in cells if c["metrics"].get(metric) is not None]


# ----------------------------------------------------------------------------------------------
# Formatting.


def length_label(length: int) -> str:
  """1024 -> '1K', 1536 -> '1.5K', 131072 -> '128K', 1000 -> '1000'."""
  length = int(length)
  if length >= 1024 and length % 512 == 0:
    return f"{length / 1024:g}K"
  return str(length)


def ratio_label(ratio: float) -> str:
  return f"{ratio:g}"


def _fmt(value: float | None, spec: str = "{:.1f}") -> str:
  return MISSING if value is None else spec.format(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table; text columns left-aligned, the rest right-aligned."""
  align = [":--" if i < 2 else "--:" for i in range(len(header))]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _heading(key: tuple[str, str], level: int = 3) -> str:
  return f"{'#' * level} {key[0]} · {key[1]}"


def _joined_sections(sections: list[tuple[tuple[str, str], str]]) -> str:
  """One table alone, or each under a (model, mode) heading when there are several."""
  if len(sections) == 1:
    return sections[0][1]
  return "\n\n".join(f"{_heading(key)}\n\n{text}" for key, text in sections)


def format_seconds(seconds: float) -> str:
  """3725.2 -> '1h 02m 05s'; 65 -> '1m 05s'; 4.2 -> '4.2s'."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  whole = int(round(seconds))
  h, rest = divmod(whole, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


# ----------------------------------------------------------------------------------------------
# Tables.


def _byte_ratios(cells: Sequence[dict]) -> dict:
  """{(method, ratio): mean of context_cache_bytes / full_context_cache_bytes over its cells}:
  what a row keeps, which for quantized caches is not 1 - ratio."""
  ratios = {}
  for c in cells:
    full, kept = c.get("full_context_cache_bytes"), c.get("context_cache_bytes")
    if full and kept is not None:
      ratios.setdefault(_row_key(c) if c["method"] != FULL else (FULL, 0.0), []).append(
          kept / full)
  return {row: statistics.fmean(values) for row, values in ratios.items()}


def _score_table(cells: Sequence[dict], metric: str) -> str:
  grid = _grid(cells, metric)
  rows, cols = _ordered_rows(cells), _ordered_cols(cells)
  byte_ratios = _byte_ratios(cells)
  header = (["method", "ratio"] + [f"{t} {length_label(n)}" for t, n in cols]
            + ["avg", "bytes"])
  body, partial = [], False
  for row in rows:
    values = [grid.get((row, col)) for col in cols]
    present = [v for v in values if v is not None]
    avg = _fmt(statistics.fmean(present)) if present else MISSING
    if present and len(present) < len(cols):
      avg += "*"  # averaged over fewer columns than other rows: not directly comparable.
      partial = True
    body.append([row[0], ratio_label(row[1])] + [_fmt(v) for v in values]
                + [avg, _fmt(byte_ratios.get(row), "{:.3f}")])
  table = _markdown(header, body)
  table += ("\n\nbytes: the context cache's bytes as a fraction of the full cache's (mean over "
            "the row's cells).")
  if partial:
    table += f"\n\n\\* average over the columns present only (some cells are {MISSING})."
  return table


def results_table(cells, metric: str = "score", mode: str | None = None) -> str:
  """Markdown table of `metric`: rows (method, ratio), columns (task, length), plus an average.

  Rows: full first, then methods in first-seen order with ratios ascending. Columns: one per
  (task, length), e.g. "niah_single_2 1K", then "avg" (mean of the row's cells; marked "*" when
  the row lacks some). Values have 1 decimal; a missing cell shows "–". Cells without `metric`
  (e.g. fidelity cells for "score") are left out. When the cells span several models or modes
  (and `mode` is None) there is one table per (model, mode), each under a heading line.

  Args:
    cells: sweep summary records (see the module docstring).
    metric: the key in each cell's "metrics" to tabulate.
    mode: only this mode ("query_agnostic" / "question_aware"); None: every mode.

  Raises:
    ReportError: no cells, malformed cells, duplicates, or no cell has `metric`.
  """
  cells = _with_metric(_check_cells(cells), metric)
  if not cells:
    raise ReportError(f"no cell has metric {metric!r}")
  return _joined_sections([(key, _score_table(group, metric))
                           for key, group in _groups(cells, mode)])


def _fidelity_cells(cells: Sequence[dict]) -> list[dict]:
  names = [name for name, _, _ in FIDELITY_METRICS]
  return [c for c in cells if any(c["metrics"].get(n) is not None for n in names)]


def _fidelity_group_table(cells: Sequence[dict]) -> str:
  rows, lengths = _ordered_rows(cells), sorted({int(c["length"]) for c in cells})
  grids = {name: _grid(cells, name) for name, _, _ in FIDELITY_METRICS}
  tasks = _unique(c["task"] for c in cells)
  header = ["method", "ratio"]
  body = [[m, ratio_label(r)] for m, r in rows]
  for n in lengths:
    for name, label, spec in FIDELITY_METRICS:
      header.append(f"{label} {length_label(n)}")
      for row, line in zip(rows, body):
        # One fidelity task per length in practice; take the first one that has a value.
        value = next((grids[name][(row, (t, n))] for t in tasks
                      if (row, (t, n)) in grids[name]), None)
        line.append(_fmt(value, spec))
  return _markdown(header, body)


def fidelity_table(cells) -> str:
  """Markdown table of fidelity metrics: rows (method, ratio); perplexity, KL, top-1 per length.

  Uses the cells whose metrics include any of "perplexity", "kl", "top1" (the fidelity task).
  Perplexity has 2 decimals, KL 4, top-1 3 (as stored: a fraction stays a fraction).

  Raises:
    ReportError: no cells, malformed cells, or none with fidelity metrics.
  """
  cells = _fidelity_cells(_check_cells(cells))
  if not cells:
    raise ReportError("no fidelity cells (metrics perplexity / kl / top1)")
  return _joined_sections([(key, _fidelity_group_table(group)) for key, group in _groups(cells)])


def _memory_points(cells: Sequence[dict]) -> dict:
  """{ratio: {length: [MiB per cell]}}; ratio 0 is the full cache. Methods that keep every
  token (quantizers: ratio 0 but compressed) are left out: the score tables' bytes column
  reports them."""
  points = {}
  for c in cells:
    n = int(c["length"])
    full = c.get("full_context_cache_bytes")
    if c["method"] == FULL and full is None:
      full = c.get("context_cache_bytes")
    if full is not None:
      points.setdefault(0.0, {}).setdefault(n, []).append(full / 2**20)
    if c["method"] != FULL and _ratio(c) > 0 and c.get("context_cache_bytes") is not None:
      points.setdefault(_ratio(c), {}).setdefault(n, []).append(c["context_cache_bytes"] / 2**20)
  return points


def memory_table(cells) -> str:
  """Markdown table of mean context cache MiB: rows ratio (full first), columns context length.

  Averages over methods, tasks and modes (one table per model when there are several).

  Raises:
    ReportError: no cells, malformed cells, or none with cache sizes.
  """
  cells = _check_cells(cells)
  sections = []
  for model in _unique(c["model"] for c in cells):
    points = _memory_points([c for c in cells if c["model"] == model])
    if not points:
      continue
    lengths = sorted({n for by_length in points.values() for n in by_length})
    header = ["ratio", "cache"] + [length_label(n) for n in lengths]
    body = [[ratio_label(r), FULL if r == 0 else "compressed"]
            + [_fmt(statistics.fmean(points[r][n]) if n in points[r] else None) for n in lengths]
            for r in sorted(points)]
    sections.append(((model, "MiB"), _markdown(header, body)))
  if not sections:
    raise ReportError("no cell has context_cache_bytes / full_context_cache_bytes")
  if len(sections) == 1:
    return sections[0][1]
  return "\n\n".join(f"### {key[0]}\n\n{text}" for key, text in sections)


# ----------------------------------------------------------------------------------------------
# Plots.


def _figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.3):
  """A Figure not registered with pyplot: no global backend switch, nothing left open.

  Figure.savefig renders PNG through Agg on its own, so this works headless and does not touch
  the backend of a notebook the caller may be running.
  """
  try:
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ReportError("plots need matplotlib: pip install 'kvjax[eval]'") from e
  fig = Figure(figsize=(width * ncols, height * nrows + 0.6), dpi=110, layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def _grid_shape(count: int, max_cols: int = 3) -> tuple[int, int]:
  cols = min(count, max_cols)
  return math.ceil(count / cols), cols


def _save(fig, path) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  fileio.write_bytes_atomic(path, buffer.getvalue())
  return str(path)


def _method_styles(methods: Sequence[str]) -> dict[str, dict]:
  """One color and marker per method, stable across panels and files."""
  from matplotlib import colormaps
  colors = colormaps["tab10"].colors
  markers = "osD^vP*Xh<>"
  compressed = [m for m in methods if m != FULL]
  return {m: {"color": colors[i % len(colors)], "marker": markers[i % len(markers)]}
          for i, m in enumerate(compressed)}


def _mean_over(grid: dict, row, cols: Sequence) -> float | None:
  """Mean of a row over `cols`, or None unless every column is present (no biased points)."""
  values = [grid.get((row, col)) for col in cols]
  return None if any(v is None for v in values) else statistics.fmean(values)


def _draw_method_lines(ax, grid: dict, rows, cols, styles: dict, y_range=(0, 100)) -> None:
  """One line per method over its ratios; the full value is every line's ratio-0 point."""
  full = _mean_over(grid, (FULL, 0.0), cols)
  if full is not None:
    ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache", zorder=1)
  for method, style in styles.items():
    points = [(r, _mean_over(grid, (m, r), cols)) for m, r in rows if m == method]
    points = [(r, v) for r, v in points if v is not None]
    if not points:
      continue
    if full is not None and points[0][0] > 0:
      points.insert(0, (0.0, full))
    xs, ys = zip(*points)
    ax.plot(xs, ys, label=method, linewidth=1.6, markersize=5, **style)
  ratios = sorted({r for _, r in rows})
  ax.set_xticks(ratios, [ratio_label(r) for r in ratios])
  if y_range is not None:
    pad = 0.03 * (y_range[1] - y_range[0])
    ax.set_ylim(y_range[0] - pad, y_range[1] + pad)
  ax.grid(True, alpha=0.3)


def _shared_legend(fig, axes) -> None:
  handles, labels = {}, []
  for ax in axes.flat:
    for h, label in zip(*ax.get_legend_handles_labels()):
      if label not in handles:
        handles[label] = h
        labels.append(label)
  if not labels:
    return
  handles = [handles[label] for label in labels]
  if axes.shape[1] == 1:  # a single column is too narrow for a legend row beneath it
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
  else:
    fig.legend(handles, labels, loc="outside lower center",
               ncol=min(len(labels), 2 * axes.shape[1]), frameon=False)


def _hide_unused(axes, used: int) -> None:
  for ax in list(axes.flat)[used:]:
    ax.set_visible(False)


def _one_group(cells, mode, model, what: str):
  groups = _groups(cells, mode, model)
  if len(groups) > 1:
    raise ReportError(f"{what}: cells span {[k for k, _ in groups]}; pass model= and/or mode= "
                      f"(write_report makes one plot per (model, mode))")
  return groups[0]


def plot_scores(cells, path, mode: str | None = None, model: str | None = None,
                by_length: bool = False) -> str:
  """PNG of score against compression ratio, one subplot per task, one line per method.

  kvpress leaderboard style: x = compression ratio, y = score 0..100, a marked line per method
  that starts at the full-cache score (ratio 0), which is also drawn as a dashed line. By default
  each task's subplot averages over its context lengths (a point is drawn only when every length
  is present, so points are comparable), led by an "all tasks" subplot when there are several
  tasks. by_length=True draws one subplot per (task, length) instead. Fidelity cells are ignored.

  Args:
    cells: sweep summary records.
    path: the PNG to write (atomically).
    mode, model: which (model, mode) to plot; needed only when the cells span several.
    by_length: one subplot per (task, length) instead of per task.

  Returns:
    str(path).

  Raises:
    ReportError: no score cells, several (model, mode) groups and none chosen, or no matplotlib.
  """
  cells = _with_metric(_check_cells(cells), "score")
  if not cells:
    raise ReportError("no cell has a 'score' metric to plot")
  (model_name, mode_name), group = _one_group(cells, mode, model, "plot_scores")
  grid = _grid(group, "score")
  rows, cols = _ordered_rows(group), _ordered_cols(group)
  panels = _score_panels(cols, by_length)
  fig, axes = _figure(*_grid_shape(len(panels)))
  styles = _method_styles(_unique(m for m, _ in rows))
  for ax, (title, panel_cols) in zip(axes.flat, panels):
    _draw_method_lines(ax, grid, rows, panel_cols, styles)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("compression ratio")
    ax.set_ylabel("score")
  _hide_unused(axes, len(panels))
  _shared_legend(fig, axes)
  fig.suptitle(f"{model_name} · {mode_name}")
  return _save(fig, path)


def _score_panels(cols: Sequence[tuple[str, int]], by_length: bool) -> list[tuple[str, list]]:
  """[(title, columns averaged in that subplot)]."""
  if by_length:
    return [(f"{t} {length_label(n)}", [(t, n)]) for t, n in cols]
  tasks = _unique(t for t, _ in cols)
  panels = []
  for task in tasks:
    task_cols = [c for c in cols if c[0] == task]
    lengths = ", ".join(length_label(n) for _, n in task_cols)
    suffix = f"\n(mean over {lengths})" if len(task_cols) > 1 else f" {lengths}"
    panels.append((task + suffix, task_cols))
  if len(tasks) > 1:
    lengths = sorted({n for _, n in cols})
    panels.insert(0, (f"all tasks\n(mean of {len(tasks)} tasks x {len(lengths)} lengths)",
                      list(cols)))
  return panels


def plot_memory(cells, path) -> str:
  """PNG of mean context cache MiB against context length: the full cache and each ratio.

  One line per compression ratio (the mean over methods, tasks and modes; a shaded band spans
  the methods' min..max where they differ) with the full cache as a dashed black baseline. Axes
  are log-log (base 2) when the lengths span more than 4x, so every length stays readable. One
  subplot per model.

  Returns:
    str(path).

  Raises:
    ReportError: no cells, none with cache sizes, or no matplotlib.
  """
  cells = _check_cells(cells)
  models = [m for m in _unique(c["model"] for c in cells)
            if _memory_points([c for c in cells if c["model"] == m])]
  if not models:
    raise ReportError("no cell has context_cache_bytes / full_context_cache_bytes to plot")
  fig, axes = _figure(*_grid_shape(len(models), max_cols=2), width=5.2, height=3.8)
  for ax, model in zip(axes.flat, models):
    _draw_memory(ax, [c for c in cells if c["model"] == model])
    ax.set_title(model, fontsize=10)
  _hide_unused(axes, len(models))
  _shared_legend(fig, axes)
  fig.suptitle("context KV cache per example")
  return _save(fig, path)


def _method_spread(cells: Sequence[dict], ratio: float, length: int) -> tuple[float, float]:
  """Min and max over methods of the mean cache MiB at one (ratio, length)."""
  by_method = {}
  for c in cells:
    if (c["method"] != FULL and _ratio(c) == ratio and int(c["length"]) == length
        and c.get("context_cache_bytes") is not None):
      by_method.setdefault(c["method"], []).append(c["context_cache_bytes"] / 2**20)
  means = [statistics.fmean(v) for v in by_method.values()]
  return min(means), max(means)


def _draw_memory(ax, cells: Sequence[dict]) -> None:
  from matplotlib import colormaps
  from matplotlib.ticker import FuncFormatter
  points = _memory_points(cells)
  ratios = [r for r in sorted(points) if r > 0]
  colors = colormaps["viridis"]
  for i, ratio in enumerate([0.0] + ratios if 0.0 in points else ratios):
    lengths = sorted(points[ratio])
    means = [statistics.fmean(points[ratio][n]) for n in lengths]
    if ratio == 0:
      ax.plot(lengths, means, "k--o", markersize=4, label="full cache")
      continue
    color = colors(0.15 + 0.7 * (i - 1) / max(1, len(ratios) - 1))
    ax.plot(lengths, means, "-o", color=color, markersize=4, label=f"ratio {ratio_label(ratio)}")
    lows, highs = zip(*(_method_spread(cells, ratio, n) for n in lengths))
    if any(h > l * 1.001 for l, h in zip(lows, highs)):
      ax.fill_between(lengths, lows, highs, color=color, alpha=0.15, linewidth=0)
  lengths = sorted({n for by_length in points.values() for n in by_length})
  if lengths[-1] > 4 * lengths[0]:
    # Cache size grows linearly with length: log-log keeps short contexts off the floor.
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax.set_xticks(lengths, [length_label(n) for n in lengths])
  ax.minorticks_off()
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("cache (MiB)")
  ax.grid(True, alpha=0.3)


def plot_fidelity(cells, path) -> str:
  """PNG of KL and top-1 agreement against compression ratio, one line per method.

  Rows: KL, top-1; columns: context lengths. A full-cache fidelity cell, when present, is the
  ratio-0 point of every line. Series are labelled "method" (plus model / mode when the cells
  span several).

  Returns:
    str(path).

  Raises:
    ReportError: no cells, no fidelity cells, or no matplotlib.
  """
  cells = _fidelity_cells(_check_cells(cells))
  if not cells:
    raise ReportError("no fidelity cells (metrics perplexity / kl / top1) to plot")
  lengths = sorted({int(c["length"]) for c in cells})
  metrics = [(name, label) for name, label, _ in FIDELITY_METRICS if name != "perplexity"]
  fig, axes = _figure(len(metrics), len(lengths))
  groups = _groups(cells)
  varying = _varying(k for k, _ in groups)
  colors = _method_styles(_unique(c["method"] for c in cells))
  for g, (key, group) in enumerate(groups):
    prefix = " · ".join(part for part, varies in zip(key, varying) if varies)
    rows = _ordered_rows(group)
    # Same color per method in every group; the line style tells the (model, mode) groups apart.
    styles = {m: {**colors[m], "linestyle": ["-", "--", ":", "-."][g % 4]}
              for m in _unique(m for m, _ in rows) if m != FULL}
    for i, (name, label) in enumerate(metrics):
      grid = _grid(group, name)
      for j, n in enumerate(lengths):
        cols = [(t, n) for t in _unique(c["task"] for c in group if int(c["length"]) == n)][:1]
        ax = axes[i, j]
        _draw_series(ax, grid, rows, cols, styles, prefix)
        ax.set_title(f"{label} · {length_label(n)}", fontsize=10)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel(label)
  _shared_legend(fig, axes)
  fig.suptitle("fidelity against the full cache")
  return _save(fig, path)


def _varying(keys: Iterable[tuple]) -> list[bool]:
  """For each position of the keys: whether it takes more than one value."""
  keys = list(keys)
  return [len({k[i] for k in keys}) > 1 for i in range(len(keys[0]))]


def _draw_series(ax, grid, rows, cols, styles, prefix: str) -> None:
  """Fidelity lines: like the score lines, without the 0..100 range or a full-cache hline."""
  full = _mean_over(grid, (FULL, 0.0), cols) if cols else None
  for method, style in styles.items():
    points = [(r, _mean_over(grid, (m, r), cols)) for m, r in rows if m == method and cols]
    points = [(r, v) for r, v in points if v is not None]
    if not points:
      continue
    if full is not None:
      points.insert(0, (0.0, full))
    xs, ys = zip(*points)
    label = f"{prefix} · {method}" if prefix else method
    ax.plot(xs, ys, label=label, linewidth=1.6, markersize=5, **style)
  ratios = sorted({r for _, r in rows})
  ax.set_xticks(ratios, [ratio_label(r) for r in ratios])
  ax.grid(True, alpha=0.3)


# ----------------------------------------------------------------------------------------------
# Files.


def _file_stem(base: str, key: tuple[str, str], varying: Sequence[bool]) -> str:
  """'scores', or 'scores_<model>_<mode>' with only the parts that vary, made file-safe."""
  parts = [base] + [part for part, v in zip(key, varying) if v]
  return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)


def _totals_line(cells: Sequence[dict]) -> str:
  examples = sum(int(c.get("examples") or 0) for c in cells)
  seconds = sum(float(c.get("seconds") or 0.0) for c in cells)
  return (f"**Totals:** {len(cells)} cells, {examples:,} examples, "
          f"{format_seconds(seconds)} ({seconds:,.0f} s) of evaluation.")


def _summary_line(cells: Sequence[dict]) -> str:
  def names(key):
    return ", ".join(str(v) for v in _unique(c[key] for c in cells))
  methods = ", ".join(m for m in _unique(c["method"] for c in cells))
  ratios = ", ".join(ratio_label(r) for r in sorted({_ratio(c) for c in cells if _ratio(c) > 0}))
  lengths = ", ".join(length_label(n) for n in sorted({int(c["length"]) for c in cells}))
  return (f"Model: {names('model')}. Modes: {names('mode')}. Methods: {methods}. "
          f"Compression ratios: {ratios or MISSING}. Context lengths: {lengths}.")


def write_report(cells, out_dir, title: str = "kvjax evaluation") -> dict[str, str]:
  """Writes results.md and the PNG plots for a sweep into out_dir.

  Files: results.md (title, a summary line, the score tables, fidelity and memory tables when
  there is data, image links relative to out_dir, a totals line of examples and seconds),
  scores.png (scores_<mode>.png per mode, and per model, when there are several), memory.png
  when cells carry cache sizes, fidelity.png when there are fidelity cells. Every file is written
  atomically.

  Returns:
    {file stem: path}, e.g. {"results": ".../results.md", "scores": ".../scores.png", ...}.

  Raises:
    ReportError: no cells, malformed cells, or no matplotlib.
  """
  cells = _check_cells(cells)
  out_dir = pathlib.Path(out_dir)
  written = {}
  lines = [f"# {title}", "", _summary_line(cells), ""]

  score_cells = _with_metric(cells, "score")
  if score_cells:
    groups = _groups(score_cells)
    varying = _varying(k for k, _ in groups)
    lines += ["## Scores", ""]
    for key, group in groups:
      stem = _file_stem("scores", key, varying)
      written[stem] = plot_scores(group, out_dir / f"{stem}.png", mode=key[1], model=key[0])
      if len(groups) > 1:
        lines += [_heading(key), ""]
      lines += [_score_table(group, "score"), "", f"![scores {' · '.join(key)}]({stem}.png)", ""]

  if _fidelity_cells(cells):
    written["fidelity"] = plot_fidelity(cells, out_dir / "fidelity.png")
    lines += ["## Fidelity against the full cache", "", fidelity_table(cells), "",
              "![fidelity](fidelity.png)", ""]

  if any(_memory_points([c]) for c in cells):
    written["memory"] = plot_memory(cells, out_dir / "memory.png")
    lines += ["## Context cache memory (MiB per example)", "", memory_table(cells), "",
              "![memory](memory.png)", ""]

  lines += [_totals_line(cells), ""]
  results = out_dir / "results.md"
  fileio.write_bytes_atomic(results, "\n".join(lines).encode())
  return {"results": str(results), **written}

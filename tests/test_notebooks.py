"""The notebooks run as written: their code cells are executed in order on CPU."""

import json
import pathlib

import pytest

import kvjax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_notebook(path: pathlib.Path) -> dict:
  namespace: dict = {}
  for cell in json.loads(path.read_text())["cells"]:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)  # noqa: S102
  return namespace


@pytest.mark.slow  # the real SmolLM2: a dozen compiled steps
def test_quickstart_notebook(smollm2, monkeypatch):
  # The notebook's kvjax.load("smollm2-135m") is the session's model, not a second load.
  load = kvjax.load
  monkeypatch.setattr(kvjax, "load", lambda source, **kwargs: smollm2 if (
      source == "smollm2-135m" and not kwargs) else load(source, **kwargs))
  namespace = _run_notebook(ROOT / "notebooks/quickstart.ipynb")
  assert namespace["model"] is smollm2
  assert "Paris" in namespace["result"].texts[0]
  assert len(namespace["batch"].texts) == 2
  assert namespace["logprobs"].shape[0] >= 2 and (namespace["logprobs"] < 0).all()
  assert namespace["example"].answers[0] in namespace["example"].context
  assert {c["method"] for c in namespace["cells"]} >= {"full", "snapkv"}


@pytest.mark.slow  # the real SmolLM2: a few training steps and five chunked prefills
def test_train_locret_notebook(smollm2, monkeypatch, tmp_path):
  # The notebook's "ci" preset (tiny heads, 64-token examples, 8 steps) into a fresh run
  # directory, on the session's model; matplotlib draws off screen.
  monkeypatch.setenv("KVJAX_LOCRET_SIZE", "ci")
  monkeypatch.setenv("KVJAX_LOCRET_RUN", str(tmp_path / "run"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  load = kvjax.load
  monkeypatch.setattr(kvjax, "load", lambda source, **kwargs: smollm2 if (
      source == "smollm2-135m" and kwargs in ({}, {"dtype": "float32"}))
      else load(source, **kwargs))
  namespace = _run_notebook(ROOT / "notebooks/train_locret.ipynb")
  assert namespace["model"] is smollm2
  cfg, history = namespace["cfg"], namespace["history"]
  # Trained for the preset's steps, the loss fell, and the run directory holds the last step.
  assert [r["step"] for r in history] == list(range(1, cfg.steps + 1))
  assert namespace["last_loss"] < namespace["first_loss"]
  run = tmp_path / "run"
  assert (run / str(cfg.steps) / "commit_success.txt").is_file()
  assert namespace["methods"]["locret"].checkpoint == str(run / str(cfg.steps))
  # The table: every method, the full cache exact against itself, the others compressed.
  table = {row["method"]: row for row in namespace["table"]}
  assert list(table) == ["full", "streaming_llm", "snapkv", "locret (untrained)", "locret"]
  assert table["full"]["kl"] < 1e-5 and table["full"]["top1"] == 1.0
  expected_tokens = cfg.eval_samples * cfg.continuation_tokens
  for name, row in table.items():
    assert row["tokens"] == expected_tokens
    assert row["perplexity"] > 1 and row["kl"] >= 0
    if name != "full":
      assert row["cache"] < 0.75 and row["kl"] > 0
  # The untrained row really ran other heads (they reach the method as parameters).
  assert table["locret (untrained)"]["kl"] != table["locret"]["kl"]
  # Examples the run never read: the trained heads fit their labels better than the initial.
  assert namespace["held_out_loss"]["trained"] < namespace["held_out_loss"]["initial"]
  assert set(namespace["held_out_overlap"]) == {"initial", "trained"}
  assert namespace["figure_path"].is_file()
  namespace["plt"].close("all")


@pytest.mark.slow  # the real SmolLM2 on 8 emulated CPU devices: two methods, sharded and not
def test_sharded_generation_notebook(smollm2, monkeypatch):
  # The notebook's loads are the session's model, placed on the mesh it asks for.
  load = kvjax.load
  monkeypatch.setattr(kvjax, "load", lambda source, **kwargs: (
      smollm2 if source == "smollm2-135m" and not kwargs else
      kvjax.sharding.shard_model(smollm2, kwargs["mesh"]) if source == "smollm2-135m"
      and set(kwargs) == {"mesh"} else load(source, **kwargs)))
  namespace = _run_notebook(ROOT / "notebooks/sharded_generation.ipynb")
  mesh = namespace["mesh"]
  assert dict(mesh.shape) == {"data": 4, "model": 2}   # the test session's 8 devices
  assert namespace["model"].placement.mesh == mesh
  assert namespace["same_tokens"] == {"full": True, "snapkv": True}
  assert all(len(r.texts) == 4 for r in namespace["sharded"].values())
  full, snapkv = namespace["rows"]
  assert full["devices"] == 8 and snapkv["cache_bytes"] < full["cache_bytes"]
  # Rows over 4 data shards; SmolLM2's 3 KV heads stay whole on model=2.
  for row in (full, snapkv):
    assert row["cache_bytes"] / 4 <= row["cache_bytes_per_device"] < row["cache_bytes"] / 3
    assert row["weight_bytes_per_device"] < row["weight_bytes"]


@pytest.mark.slow  # the real SmolLM2: a two-method sweep at 384 tokens
def test_compare_methods_notebook(smollm2, monkeypatch, tmp_path):
  monkeypatch.setenv("KVJAX_COMPARE_SIZE", "ci")
  monkeypatch.setenv("KVJAX_COMPARE_OUT", str(tmp_path / "sweep"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  load = kvjax.load
  monkeypatch.setattr(kvjax, "load", lambda source, **kwargs: smollm2 if (
      source == "smollm2-135m" and not kwargs) else load(source, **kwargs))
  namespace = _run_notebook(ROOT / "notebooks/compare_methods.ipynb")
  cells = namespace["cells"]
  assert [(c["task"], c["method"], c["compression_ratio"]) for c in cells] == [
      ("niah_single_2", "full", 0.0), ("niah_single_2", "snapkv", 0.5),
      ("fidelity", "full", 0.0), ("fidelity", "snapkv", 0.5)]
  assert all(c["examples"] == 2 for c in cells) and namespace["summary"]["complete"]
  fidelity = {c["method"]: c["metrics"] for c in cells if c["task"] == "fidelity"}
  assert fidelity["full"]["kl"] < 1e-6 and fidelity["snapkv"]["kl"] > 0
  assert set(namespace["images"]) >= {"scores", "memory", "fidelity"}
  for path in namespace["images"].values():
    assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "sweep" / "results.md").is_file()
  namespace["plt"].close("all")

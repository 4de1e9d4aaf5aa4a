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

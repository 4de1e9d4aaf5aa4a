"""scripts/generate.py end to end on a tiny checkpoint with SmolLM2's real tokenizer."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import kvjax
from checkpoints_conversion import orbax_io
from tiny import tiny_chat_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer):
  model = tiny_chat_model(smollm2_tokenizer)
  return orbax_io.save(model, tmp_path_factory.mktemp("cli") / "tiny")


def _generate(*flags):
  # This checkout's kvjax first, whatever the environment installed.
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  return subprocess.run([sys.executable, str(ROOT / "scripts/generate.py"), *flags],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=path))


def test_generate_writes_json(checkpoint, tmp_path):
  out = tmp_path / "result.json"
  run = _generate(f"--model={checkpoint}", "--prompt=Hello there", "--prompt=Second prompt",
                  "--max_new_tokens=5", "--chat_template=off", f"--json_out={out}")
  assert run.returncode == 0, run.stderr[-2000:]
  data = json.loads(out.read_text())
  assert set(data) == {"texts", "token_ids", "stats", "method", "config"}
  assert len(data["texts"]) == 2 and all(len(t) == 5 for t in data["token_ids"])
  assert data["method"] == "full"
  assert data["config"]["max_new_tokens"] == 5 and data["config"]["model"] == str(checkpoint)
  stats = data["stats"]
  assert stats["cache_bytes"] > 0 and stats["generated_tokens"] == [5, 5]
  # The full cache against itself: the same context and the same allocation.
  assert stats["context_cache_bytes"] == stats["full_context_cache_bytes"]
  assert stats["cache_bytes"] == stats["full_cache_bytes"]
  mib = lambda n: f"{n / (1 << 20):.2f} MiB"
  assert (f"[kvjax] context cache {mib(stats['context_cache_bytes'])} of "
          f"{mib(stats['full_context_cache_bytes'])} full (100.0%) | allocated "
          f"{mib(stats['cache_bytes'])} (full {mib(stats['full_cache_bytes'])})") in run.stdout


def test_generate_bad_flag_value_is_one_line_error(checkpoint):
  run = _generate(f"--model={checkpoint}", "--prompt=x", "--method=nonexistent")
  assert run.returncode == 2
  assert "error: unknown method 'nonexistent'" in run.stderr
  assert "Traceback" not in run.stderr


def test_generate_with_compression_flags(checkpoint, tmp_path):
  out = tmp_path / "snap.json"
  prompt = "word " * 120
  run = _generate(f"--model={checkpoint}", f"--prompt={prompt}", "--max_new_tokens=3",
                  "--chat_template=off", "--method=snapkv", "--compression_ratio=0.5",
                  "--method_arg=window=8", "--method_arg=pooling=avg", "--method_arg=kernel_size=5",
                  "--prefill_chunk_size=64", f"--json_out={out}")
  assert run.returncode == 0, run.stderr[-2000:]
  stats = json.loads(out.read_text())["stats"]
  assert stats["method"] == "snapkv" and stats["prefill_chunk_size"] == 64
  assert 0.45 < stats["context_cache_bytes"] / stats["full_context_cache_bytes"] < 0.55
  assert "[kvjax] context cache" in run.stdout and "shrank" not in run.stdout
  wrapped = _generate(f"--model={checkpoint}", f"--prompt={prompt}", "--max_new_tokens=2",
                      "--chat_template=off", "--method=adakv", "--method_arg=press=knorm",
                      "--budget=40")
  assert wrapped.returncode == 0, wrapped.stderr[-2000:]
  assert "method=adakv(knorm)" in wrapped.stdout


def test_generate_bad_method_argument_is_one_line_error(checkpoint):
  run = _generate(f"--model={checkpoint}", "--prompt=x y z", "--method=snapkv",
                  "--compression_ratio=0.5", "--method_arg=windw=3")
  assert run.returncode == 2
  assert "windw" in run.stderr and "Traceback" not in run.stderr


def test_short_prompt_with_compression(checkpoint, tmp_path):
  """The README's question at ratio 0.5 keeps fewer tokens than SnapKV's 32-token window:
  the window shrinks to fit, and the output says so."""
  out = tmp_path / "short.json"
  run = _generate(f"--model={checkpoint}", "--prompt=What is the capital of France?",
                  "--method=snapkv", "--compression_ratio=0.5", "--max_new_tokens=3",
                  f"--json_out={out}")
  assert run.returncode == 0, run.stderr[-2000:]
  stats = json.loads(out.read_text())["stats"]
  keep = stats["prompt_tokens"][0] // 2
  assert stats["kept_tokens_per_layer"] == [keep] * len(stats["kept_tokens_per_layer"])
  assert (stats["protected_tokens_configured"], stats["protected_tokens"]) == (32, keep - 1)
  assert f"protected tokens (sinks + recent window) shrank to {keep - 1}" in run.stdout


def test_stop_flag_reads_escapes(checkpoint, smollm2_tokenizer):
  """--stop takes backslash escapes: the greedy text, cut at one of its characters given
  as \\uXXXX, ends right before that character."""
  text = kvjax.generate(tiny_chat_model(smollm2_tokenizer), "Hello there", max_new_tokens=12,
                        chat_template=False).texts[0]
  cut = next(i for i, c in enumerate(text) if i > 0 and ord(c) < 0x10000 and c != "\ufffd")
  run = _generate(f"--model={checkpoint}", "--prompt=Hello there", "--max_new_tokens=12",
                  "--chat_template=off", "--stream=false", f"--stop=\\u{ord(text[cut]):04x}")
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"[0] {text[:text.index(text[cut])]}\n" in run.stdout

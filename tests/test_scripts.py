"""Every script's bad input ends with one `error:` line and exit status 2, never a traceback,
and bad output paths are refused before a model is loaded or any work is done."""

import os
import pathlib
import subprocess
import sys

import pytest

from kvjax import cli
from kvjax.errors import OutputPathError

REPO = pathlib.Path(__file__).resolve().parents[1]
# A model source that does not exist: if a script got as far as loading it, its error
# would name the model, not the flag under test.
NO_MODEL = "/nonexistent/kvjax-model"


def _script(name, *args):
  # This checkout's kvjax first, whatever the environment installed.
  path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def _assert_usage_error(run, *words):
  assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
  assert "Traceback" not in run.stderr
  errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, run.stderr[-2000:]
  for word in words:
    assert word in errors[0], (word, errors[0])
  return errors[0]


@pytest.fixture
def a_file(tmp_path):
  path = tmp_path / "existing.txt"
  path.write_text("not a folder")
  return path


@pytest.mark.parametrize("script,flag,extra", [
    ("generate.py", "json_out", [f"--model={NO_MODEL}", "--prompt=hi"]),
    ("benchmark.py", "json_out", [f"--model={NO_MODEL}"]),
    ("benchmark.py", "plot_out", [f"--model={NO_MODEL}", "--baseline=transformers"]),
    ("evaluate.py", "out_dir", [f"--model={NO_MODEL}"]),
    ("convert.py", "dst", [f"--src={NO_MODEL}"]),
])
def test_output_under_a_file_fails_before_loading(script, flag, extra, a_file):
  run = _script(script, *extra, f"--{flag}={a_file}/sub/out.json")
  _assert_usage_error(run, f"--{flag}=", "is a file")
  assert "kvjax-model" not in run.stderr


def test_output_kind_mismatch(tmp_path, a_file):
  _assert_usage_error(_script("generate.py", f"--model={NO_MODEL}", "--prompt=hi",
                              f"--json_out={tmp_path}"), "--json_out=", "is a directory")
  _assert_usage_error(_script("evaluate.py", f"--model={NO_MODEL}", f"--out_dir={a_file}"),
                      "--out_dir=", "is a file")


def test_convert_refuses_existing_destination_before_converting(tmp_path):
  dst = tmp_path / "checkpoint"
  dst.mkdir()
  _assert_usage_error(_script("convert.py", f"--src={NO_MODEL}", f"--dst={dst}"),
                      "already exists", "--overwrite")


def test_convert_key_heads_only_needs_a_group(tmp_path):
  _assert_usage_error(_script("convert.py", f"--src={NO_MODEL}", f"--dst={tmp_path}/out",
                              "--key_heads_only"), "--key_heads_only", "--kv_head_group")


def test_unwritable_folder(tmp_path, monkeypatch):
  """os.access says what the process may write (as root, every folder is writable, so
  the refusal itself is checked with os.access answering no for one folder)."""
  locked = tmp_path / "locked"
  locked.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: pathlib.Path(p) != locked and
                      real_access(p, mode))
  with pytest.raises(OutputPathError, match=r"--json_out=.*no write permission in .*locked"):
    cli.check_output_path("--json_out", locked / "a" / "out.json", is_dir=False)
  with pytest.raises(OutputPathError, match="--out_dir=.*no write permission"):
    cli.check_output_path("--out_dir", locked, is_dir=True)
  cli.check_output_path("--json_out", tmp_path / "new" / "deeper" / "out.json", is_dir=False)
  cli.check_output_path("--out_dir", tmp_path / "new_dir", is_dir=True)
  with pytest.raises(OutputPathError, match="empty"):
    cli.check_output_path("--json_out", "", is_dir=False)


@pytest.mark.parametrize("args,words", [
    (["--prompt=hi", "--max_new_tokens=abc"], ["--max_new_tokens=abc"]),
    (["--prompt=hi", "--no_such_flag=1"], ["no_such_flag"]),
    ([], ["--prompt"]),                                   # a required flag is missing
    (["--prompt=hi", "--chat_template=maybe"], ["chat_template", "auto"]),
    (["--prompt=What", "is", "this?"], ["unexpected argument", "'is'"]),
])
def test_flag_parsing_errors_exit_2(args, words):
  _assert_usage_error(_script("generate.py", f"--model={NO_MODEL}", *args), *words)


def test_evaluate_rejects_non_positive_answer_length(tmp_path):
  _assert_usage_error(_script("evaluate.py", f"--model={NO_MODEL}",
                              f"--out_dir={tmp_path / 'eval'}", "--max_new_tokens=0"),
                      "max_new_tokens=0", ">= 1")
  assert not (tmp_path / "eval").exists()


def test_unescape_reads_backslash_escapes_as_python_does():
  assert cli.unescape("\\n") == "\n"
  assert cli.unescape("a\\tb\\r\\\\") == "a\tb\r\\"
  assert cli.unescape("\\x41\\u00e9") == "A\u00e9"
  assert cli.unescape("\\\\n") == "\\n"               # an escaped backslash, then n
  assert cli.unescape("C:\\path\\q") == "C:\\path\\q"  # unknown escapes stay as typed
  assert cli.unescape("é\\n") == "é\n"


def test_help_documents_the_stop_escapes():
  run = _script("generate.py", "--helpfull")
  assert '--stop="\\n" stops at a newline' in " ".join(run.stdout.split())


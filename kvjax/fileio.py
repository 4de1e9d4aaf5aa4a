"""Small file helpers shared across kvjax: nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import tempfile


def read_json(path) -> dict | None:
  """The JSON object in `path`, or None when it is absent, unreadable or not an object."""
  try:
    data = json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None


def write_bytes_atomic(path, data: bytes) -> None:
  """Writes bytes to a temp file beside `path` (".<name>.tmp-*"), flushed to disk, then
  renames it into place: readers see the old file or the whole new one."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  try:
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; others sharing a cache must read it.
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())   # renamed only once its bytes are on disk
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json_atomic(path, data, **dump_options) -> None:
  """Writes JSON to a temp file beside `path`, then renames it into place."""
  write_bytes_atomic(path, json.dumps(data, **dump_options).encode())


@contextlib.contextmanager
def locked(path):
  """Holds an exclusive lock on the file `path` (created if absent) until the block ends.

  Processes that build the same cache entry take the same lock, so one builds while the
  others wait and then find it built. The kernel drops the lock when its holder dies, so a
  killed process never leaves it held. The lock file itself is never deleted (deleting it
  would let two processes lock two different files).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Closing releases the lock.


def remove_leftovers(parent, pattern: str) -> list[pathlib.Path]:
  """Deletes what matches `pattern` in `parent` (staging folders of killed processes).

  Call it only while holding the lock that every writer of those folders holds.
  """
  removed = []
  for path in sorted(pathlib.Path(parent).glob(pattern)):
    try:
      shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
      removed.append(path)
    except OSError:
      pass
  return removed

"""Small file helpers shared across kvjax: nothing is ever left half-written."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile


def write_json_atomic(path, data, **dump_options) -> None:
  """Writes JSON to a temp file beside `path`, then renames it into place."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  try:
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; others sharing a cache must read it.
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, **dump_options)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise

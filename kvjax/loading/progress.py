"""Progress bars for the slow first use of a model: downloading wheels, converting tensors.

Bars go to stderr (tqdm's default) and count bytes; the conversion bar also counts tensors.
`TQDM_DISABLE=1` in the environment turns every bar off.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def byte_bar(desc: str, total: int | None, file=None) -> tqdm:
  """A bar in bytes (shown as KB/MB/GB) that leaves its last line on screen."""
  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              file=file, dynamic_ncols=True, mininterval=0.5)


class DownloadProgress:
  """`(done_bytes, total_bytes)` callback for one wheel download; opens its bar lazily
  (a wheel already in pip's cache reports nothing and shows no bar)."""

  def __init__(self, desc: str, file=None):
    self.desc, self.file, self.bar = desc, file, None

  def __call__(self, done: int, total: int) -> None:
    if self.bar is None:
      self.bar = byte_bar(self.desc, total, self.file)
    self.bar.update(done - self.bar.n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class ConversionProgress:
  """`(name, nbytes)` callback per converted tensor: bytes on the bar, tensors beside it."""

  def __init__(self, desc: str, total_bytes: int, total_tensors: int, file=None):
    self.tensors, self.total_tensors = 0, total_tensors
    self.bar = byte_bar(desc, total_bytes, file)
    self.bar.set_postfix_str(f"tensors 0/{total_tensors}", refresh=False)

  def __call__(self, name: str, nbytes: int) -> None:
    self.tensors += 1
    self.bar.set_postfix_str(f"tensors {self.tensors}/{self.total_tensors}", refresh=False)
    self.bar.update(nbytes)

  def close(self) -> None:
    self.bar.close()

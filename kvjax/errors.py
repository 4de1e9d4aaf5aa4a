"""Errors kvjax raises. All are ValueErrors so callers can catch bad input in one place."""


class KvjaxError(ValueError):
  """Base class: bad input a person can act on."""


class UnknownModelError(KvjaxError):
  """A model source is neither a registry name, a directory, nor a file kvjax can read."""


class ChecksumError(KvjaxError):
  """A downloaded or cached file does not have the pinned sha256 or size."""


class DownloadError(KvjaxError):
  """Fetching a pinned asset from the package registry failed."""


class CheckpointError(KvjaxError):
  """A checkpoint is corrupt, truncated, or does not match its config."""


class ConfigError(KvjaxError):
  """A model config is missing fields or has values kvjax does not support."""


class GenerationError(KvjaxError):
  """Invalid arguments to generate/score (sampling, lengths, methods)."""


class MethodError(GenerationError):
  """A compression method's name, hyperparameters or budget are invalid."""


class OutputPathError(KvjaxError):
  """An output path cannot be written: under a file, in a read-only folder, or a folder
  where a file belongs."""

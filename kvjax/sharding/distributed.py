"""Several processes, one mesh: joining JAX's multi-process runtime and reading arrays that
span processes.

Every process runs the same program on the same inputs (SPMD, multi-controller): each loads
the weights and tokenizes the prompts, `jax.device_put` keeps the shards its own devices
hold, and jit runs one program over the global mesh (collectives between processes go
through JAX's distributed runtime; Gloo on CPU). Host-side logic (EOS, stop strings) reads
values through `host_array`, which gathers what other processes hold, so every process
takes the same decisions and ends with the same tokens. Only the primary process (index
0) should write results. Processes whose models each sit on their own devices instead
work on different inputs (the evaluation sweep's examples per process) and meet only to
share their results (`all_gather`).

    kvjax.sharding.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # first
    model = kvjax.load("smollm2-135m", mesh="data:4,model:2")   # over all processes' devices
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from kvjax import validation
from kvjax.ops import host
from kvjax.sharding.rules import ShardingError

# Read when initialize() is not given the values (e.g. set per process by a launcher).
ENV_COORDINATOR = "KVJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "KVJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KVJAX_PROCESS_ID"
# jax.distributed.initialize() without arguments: the cluster (Cloud TPU, SLURM, Open MPI)
# says who the coordinator is and how many processes there are.
AUTO = "auto"

_joined = None  # the (coordinator, num_processes, process_id) this process joined with


def _env_int(name: str):
  text = os.environ.get(name)
  if text is None or not text.strip():
    return None
  try:
    return int(text)
  except ValueError:
    raise ShardingError(f"{name}={text!r} must be an integer") from None


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ShardingError(f"coordinator address {address!r} must be host:port with a port in "
                        f"[1, 65535] (e.g. '10.0.0.1:1234'), or {AUTO!r} to let the "
                        f"cluster tell")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins this process to a multi-process run (`jax.distributed.initialize`) and returns
  True; with no coordinator given (argument or KVJAX_COORDINATOR_ADDRESS) it joins nothing
  and returns whether an earlier call joined. Call it before anything touches a device.
  Calling it again with the same values is a no-op; with other values it is an error."""
  global _joined
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if coordinator_address is None:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ShardingError(f"num_processes={num_processes} and process_id={process_id} need a "
                          f"coordinator address (host:port of process 0, or {AUTO!r})")
    return _joined is not None
  auto = coordinator_address == AUTO
  if not auto:
    _check_address(coordinator_address)
    if num_processes is None or process_id is None:
      raise ShardingError(f"coordinator {coordinator_address!r} needs num_processes and "
                          f"process_id (got {num_processes} and {process_id})")
  if num_processes is not None:
    num_processes = validation.integer("num_processes", num_processes, 1, error=ShardingError)
  if process_id is not None:
    process_id = validation.integer("process_id", process_id, 0,
                                    None if num_processes is None else num_processes - 1,
                                    error=ShardingError)
  wanted = (coordinator_address, num_processes, process_id)
  if _joined is not None:
    if _joined != wanted:
      raise ShardingError(f"this process already joined {_joined[0]!r} as process "
                          f"{_joined[2]} of {_joined[1]}; it cannot join {wanted}")
    return True
  try:
    # "auto": the cluster names the coordinator (and the rest, where not given).
    jax.distributed.initialize(None if auto else coordinator_address, num_processes,
                               process_id)
  except RuntimeError as error:
    raise ShardingError(f"joining the multi-process run at {coordinator_address!r} failed: "
                        f"{error}") from error
  _joined = wanted
  return True


def asked_to_join(coordinator_address: str | None = None) -> bool:
  """Whether a coordinator is given (the argument or KVJAX_COORDINATOR_ADDRESS)."""
  return bool(coordinator_address or os.environ.get(ENV_COORDINATOR))


# Reading arrays back across processes lives below the cache layer (kvjax.ops.host).
host_array = host.host_array


def is_primary() -> bool:
  """True on the process that writes results (index 0; the only one in a one-process run)."""
  return jax.process_index() == 0


def _json_bytes(value) -> np.ndarray:
  return np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)


def all_gather(value) -> list:
  """Every process's JSON-serialisable value, in process order, on every process; [value]
  in a one-process run. Every process must call it (a collective)."""
  if jax.process_count() == 1:
    return [value]
  data = _json_bytes(value)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  buffer = np.zeros(int(sizes.max()), np.uint8)
  buffer[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buffer))
  return [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]


def holds_its_own_devices(placement) -> bool:
  """Whether a model placed by `placement` (None: unsharded, on this process's default
  device) runs on this process's devices alone, so processes can work on different
  inputs (e.g. each its own examples) without waiting for each other."""
  if placement is None:
    return True
  return all(d.process_index == jax.process_index() for d in placement.mesh.devices.flat)


def broadcast_from_primary(value):
  """A JSON-serialisable value as process 0 has it, on every process (e.g. which results
  exist in files only process 0 may see); the value itself in a one-process run."""
  if jax.process_count() == 1:
    return value
  data = _json_bytes(value)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buffer = np.zeros(size, np.uint8)
  buffer[:min(size, data.size)] = data[:size]
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))))

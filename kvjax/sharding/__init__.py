"""Shard by name: logical axes on parameters and caches, one rules object mapping them
to a mesh ("data", "model", optionally "fsdp"), and placement of a model on it.

    model = kvjax.load("smollm2-135m", mesh="data:2,model:4")
    print(kvjax.sharding.describe(model))   # what is sharded, what is replicated and why

Several processes (hosts) share one mesh after `initialize` (kvjax.sharding.distributed;
the CLIs' --coordinator_address/--num_processes/--process_id): `generate`, `score` and the
evaluation sweep give the one-process results (tested: the full cache, SnapKV, AdaKV, KIVI,
StreamingLLM). The attention kernels run per shard under
jax.shard_map (kvjax.ops.sharded). Not done yet: the other Pallas kernels per shard,
sharded checkpoints, training across processes.
"""

from kvjax.sharding.distributed import host_array, initialize, is_primary
from kvjax.sharding.mesh import auto_axes, make_mesh, parse_mesh_spec
from kvjax.sharding.params import PARAM_AXES, param_axes, params_logical_axes
from kvjax.sharding.placement import (Placement, check_batch, check_rows, describe,
                                      placement_of, shard_model)
from kvjax.sharding.rules import (DEFAULT_RULES, MESH_AXES, AxisPlacement, ShardingError,
                                  ShardingRules, partition_spec, resolve)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "PARAM_AXES", "AxisPlacement", "Placement",
           "ShardingError", "ShardingRules", "auto_axes", "check_batch", "check_rows", "describe",
           "host_array", "initialize", "is_primary", "make_mesh", "param_axes",
           "params_logical_axes", "parse_mesh_spec", "partition_spec", "placement_of",
           "resolve", "shard_model"]

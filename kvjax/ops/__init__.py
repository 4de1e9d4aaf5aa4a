"""The bottom of kvjax: each operation picks a Pallas kernel (GPU/TPU) or its jnp reference.

Imports flow one way: scripts -> kvjax (generation, evaluation) -> methods -> cache -> ops
-> pallas_kernels. Nothing here knows about methods, caches or models.
"""

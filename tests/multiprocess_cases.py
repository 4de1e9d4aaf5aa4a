"""What tests/test_multiprocess.py runs in one process and in two (shared by the test and
its worker processes)."""

import kvjax
from tiny import random_prompts

MESH = "data:2,model:2"      # 4 devices: 2 per process in the two-process run
PROMPTS = random_prompts([30, 41, 12, 25], seed=3)
CONTINUATIONS = random_prompts([5, 3, 4, 2], seed=5)
CASES = {"full": (None, {}), "snapkv": ("snapkv", dict(compression_ratio=0.5)),
         "adakv": ("adakv", dict(compression_ratio=0.5)),
         "kivi": (kvjax.methods.get("kivi", bits=2, group_size=16, residual=16), {})}

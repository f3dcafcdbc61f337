"""benchmarks/precompile.py: the config shards its workers compile cover every config exactly once."""
import os
import subprocess
import sys

SHARDS = r"""
import os
from sparse_runtime.kernels import sparse24 as k
i, n = map(int, os.environ["SPARSE_RUNTIME_TRITON_CONFIGS"][6:].split("/"))
print(",".join(str(k.GPU_DECODE_CONFIGS.index(c)) for c in k.DECODE_CONFIGS) + ";"
      + ",".join(str(k.GPU_TILE_CONFIGS.index(c)) for c in k.TILE_CONFIGS))
"""


def test_shards_partition_the_config_lists():
    got = {"decode": [], "tiles": []}
    for i in range(4):
        env = {**os.environ, "TRITON_INTERPRET": "0", "SPARSE_RUNTIME_TRITON_CONFIGS": f"shard:{i}/4"}
        r = subprocess.run([sys.executable, "-c", SHARDS], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        decode, tiles = r.stdout.strip().splitlines()[-1].split(";")
        got["decode"] += [int(v) for v in decode.split(",")]
        got["tiles"] += [int(v) for v in tiles.split(",")]
    from sparse_runtime.kernels import sparse24 as k

    assert sorted(got["decode"]) == list(range(len(k.GPU_DECODE_CONFIGS)))
    assert sorted(got["tiles"]) == list(range(len(k.GPU_TILE_CONFIGS)))

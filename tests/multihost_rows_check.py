"""One of two processes (jax.distributed + gloo, 4 fake CPU devices each), run by tests/test_cli_multihost.py:

    python tests/multihost_rows_check.py PROCESS_ID PORT OUT.json

On meshes whose batch rows fall on the processes in blocks, interleaved (devices of the two processes alternating)
and shared (an axis other than data×fsdp spanning the processes, so both hold every row), this process reads its
`jgoat.sharding.process_rows` of a global batch of 16 and places them with `place_batch`; writes, per mesh, its rows
and whether the gathered global array equals the global batch.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402


def main(process_id: int, port: int, out_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import jgoat
    from jgoat import sharding

    devices = jax.devices()
    alternating = [d for pair in zip(devices[:4], devices[4:], strict=True) for d in pair]
    meshes = {"blocks": jgoat.mesh(data=2, fsdp=4), "interleaved": jgoat.mesh(data=8, devices=alternating),
              "shared": jgoat.mesh(data=2, tensor=4, devices=alternating)}
    batch = {"ids": np.arange(16 * 3).reshape(16, 3), "labels": np.arange(16) * 10}
    report = {}
    for name, mesh in meshes.items():
        rows = sharding.process_rows(mesh, 16)
        placed = sharding.place_batch({k: v[rows] for k, v in batch.items()}, mesh)
        gathered = multihost_utils.process_allgather(placed, tiled=True)
        report[name] = {"rows": rows.tolist(), "shape": list(placed["ids"].shape),
                        "equal": all(bool(np.array_equal(gathered[k], batch[k])) for k in batch)}
    with open(out_path, "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

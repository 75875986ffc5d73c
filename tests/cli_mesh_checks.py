"""`jgoat train --mesh` on 8 fake CPU devices, run by tests/test_cli_mesh.py in ONE subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/cli_mesh_checks.py SPEC.json OUT

SPEC.json: {"errors": [argv, ...], "runs": {name: [argv, ...]}}. Computes, never asserts: each error's exit status
and stderr, and for each run its exit status, stdout, the shardings its train state and frozen base had at the end of
training (from a callback) and the out folder it wrote; the pytest side asserts on OUT/report.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import jax
from jax.sharding import NamedSharding

from jgoat import cli, trainer


class Placement(trainer.Callback):
    """What the loop's state and frozen base look like on the mesh when training ends."""

    def __init__(self):
        self.seen: dict = {}

    def on_train_end(self, loop):
        def describe(tree):
            leaves = jax.tree.leaves(tree)
            named = [x for x in leaves if isinstance(x.sharding, NamedSharding)]
            return {"leaves": len(leaves), "on_mesh": len(named),
                    "mesh": dict(named[0].sharding.mesh.shape) if named else None,
                    "sharded": sum(any(s is not None for s in x.sharding.spec) for x in named),
                    "donated_buffers_ok": all(not x.is_deleted() for x in leaves)}

        self.seen = {"trainable": describe(loop.state.trainable), "opt_state": describe(loop.state.opt_state),
                     "frozen": describe(loop.frozen), "devices": len(jax.devices())}


def main(spec_path: str, out: str) -> None:
    spec = json.loads(open(spec_path).read())
    report: dict = {"errors": [], "runs": {}}
    for argv in spec["errors"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(argv)
        report["errors"].append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
    for name, argv in spec["runs"].items():
        placement, stdout = Placement(), io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = cli.main(argv, callbacks=[placement])
        report["runs"][name] = {"rc": rc, "stdout": stdout.getvalue(), "placement": placement.seen}
    with open(f"{out}/report.json", "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])

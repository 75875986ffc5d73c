"""Where `jgoat train` puts the base model on a mesh, run by tests/test_cli_load_on_mesh.py in ONE subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/cli_load_checks.py SPEC.json OUT

SPEC.json: {"attach": {name: argv}, "runs": {name: argv}, "control": model folder}. ``cli.load_task`` and
``cli.attach`` are replaced by recording wrappers for the whole subprocess, and every ``jax.device_put`` made while
one of them runs is measured: the shapes it lands on single devices, matched against the shapes of the loaded
base's weights (a weight landed whole on a device is a match; its shards are not). "attach" entries go through
`jgoat train`'s own steps up to the adapters (validate, load_task, check_method, attach per run name) without
training; "runs" are whole ``cli.main`` runs. "control" loads a folder the old way (``from_pretrained`` without a
mesh) under the same meter, to show the meter sees a whole-weight placement.
Computes, never asserts: the pytest side asserts on OUT/report.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import jax
import numpy as np
from jax.sharding import Sharding

import jgoat
from jgoat import cli, sharding
from jgoat.models import from_pretrained


class PutMeter:
    """Wraps ``jax.device_put``: while `active`, records the shape of what each call lands on ONE device for every
    leaf of ≥ 2 dims (a target that is a device, None or a list of devices receives the leaf as it is; a sharding,
    one shard of it)."""

    def __init__(self):
        self.active, self.landed = False, set()
        put = jax.device_put

        def measured(x, device=None, *args, **kwargs):
            if self.active:
                self.record(x, device)
            return put(x, device, *args, **kwargs)

        jax.device_put = measured

    def record(self, x, device) -> None:
        leaves = jax.tree.leaves(x)
        if isinstance(device, Sharding | jax.Device) or device is None:
            targets = [device] * len(leaves)
        else:
            targets = jax.tree.leaves(device, is_leaf=lambda s: isinstance(s, Sharding))
        for leaf, target in zip(leaves, targets, strict=True):
            shape = tuple(np.shape(leaf))
            if len(shape) >= 2:
                self.landed.add(tuple(target.shard_shape(shape)) if isinstance(target, Sharding) else shape)

    @contextlib.contextmanager
    def measuring(self):
        self.active, self.landed = True, set()
        try:
            yield
        finally:
            self.active = False

    def whole(self, tree) -> list:
        """The shapes of `tree`'s large leaves (≥ 2 dims, ≥ SPLIT_MIN_SIZE elements) some call landed whole on one
        device."""
        return sorted({x.shape for x in jax.tree.leaves(tree) if x.ndim >= 2 and x.size >= SPLIT_MIN_SIZE}
                      & self.landed)


SPLIT_MIN_SIZE = 128  # elements: every kernel / embedding / NF4 code array of the test models is larger; NF4's
# double-quantisation statistics ([layers, 1]) are smaller and replicated


def placement(tree) -> dict:
    """Per-device bytes and how finely the leaves of ≥ 2 dims and ≥ SPLIT_MIN_SIZE elements are split: the fewest
    devices such a leaf is split over (its bytes / the bytes of its largest shard), and the largest share of all
    bytes one device holds."""
    per_device: dict = {}
    splits = []
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    for x in leaves:
        for s in x.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
        if x.ndim >= 2 and x.size >= SPLIT_MIN_SIZE:
            splits.append(x.nbytes / max(s.data.nbytes for s in x.addressable_shards))
    total = sum(x.nbytes for x in leaves)
    return {"leaves": len(leaves), "devices": len(per_device), "min_split": min(splits, default=None),
            "max_device_fraction": max(per_device.values()) / total if total else None}


def wrong_shardings(tree, mesh) -> list[str]:
    """Paths of the leaves whose sharding is not the one ``jgoat.shardings`` assigns on `mesh`."""
    expected = sharding.shardings(jax.eval_shape(lambda: tree), mesh)
    got = jax.tree_util.tree_leaves_with_path(tree)
    want = jax.tree.leaves(expected, is_leaf=lambda s: isinstance(s, Sharding))
    return [jax.tree_util.keystr(p) for (p, x), s in zip(got, want, strict=True)
            if not x.sharding.is_equivalent_to(s, x.ndim)]


class Recorder:
    """Replaces cli.load_task / cli.attach with wrappers that meter their device_puts and record where their
    results live (for the entry named `current`)."""

    def __init__(self, meter: PutMeter):
        self.meter, self.current, self.report = meter, None, {}
        load_task, attach = cli.load_task, cli.attach

        def recorded_load(args):
            with meter.measuring():
                task = load_task(args)
            self.entry()["load"] = {**placement(task.params), "whole_puts": meter.whole(task.params)}
            self.base = task.params
            return task

        def recorded_attach(task, cfg, name, key, args, out, mesh):
            with meter.measuring():
                tree = attach(task, cfg, name, key, args, out, mesh)
            trainable, frozen = jgoat.split(tree)
            kept = {id(x) for x in jax.tree.leaves(tree)}
            self.entry().setdefault("attach", {})[name] = {
                "whole_puts": meter.whole(self.base), "frozen": placement(frozen),
                "trainable_leaves": len(jax.tree.leaves(trainable)),
                # how many of the arrays load_task put on the mesh the tree holds as they are (NF4 replaces kernels)
                "base_leaves": len(jax.tree.leaves(self.base)),
                "base_kept": sum(id(x) in kept for x in jax.tree.leaves(self.base)),
                "wrong_sharding": wrong_shardings(tree, mesh) if cfg is None or _born_sharded(cfg) else None}
            return tree

        cli.load_task, cli.attach = recorded_load, recorded_attach

    def entry(self) -> dict:
        return self.report.setdefault(self.current, {})


def _born_sharded(cfg) -> bool:
    """Methods whose params attach builds on the mesh (jgoat.wrap's); GoRA's and the graph-changing ones are built
    whole and placed by cli.run."""
    return not isinstance(cfg, jgoat.GoraConfig | jgoat.PromptTuningConfig | jgoat.PrefixTuningConfig
                          | jgoat.BottleneckConfig)


def attach_only(argv: list[str]) -> None:
    """`jgoat train`'s steps up to the adapters, for every run name (baseline included), without training."""
    args = cli.build_parser().parse_args(argv)
    cli.validate(args)
    task = cli.load_task(args)
    cfg = cli.check_method(args, task)
    mesh = cli.build_mesh(args)
    for name in cli.run_names(args, task.kind):
        cli.attach(task, None if name == "frozen" else cfg, name, jax.random.key(args.seed), args,
                   pathlib.Path(args.out) / name, mesh)


def main(spec_path: str, out: str) -> None:
    spec = json.loads(pathlib.Path(spec_path).read_text())
    meter = PutMeter()
    with meter.measuring():
        _, params, _ = from_pretrained(spec["control"])
    control = {"whole_puts": meter.whole(params), **placement(params),
               "large": len({x.shape for x in jax.tree.leaves(params) if x.ndim >= 2 and x.size >= SPLIT_MIN_SIZE})}
    recorder = Recorder(meter)
    for name, argv in spec["attach"].items():
        recorder.current = name
        attach_only(argv)
    for name, argv in spec["runs"].items():
        recorder.current = name
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = cli.main(argv)
        recorder.entry().update(rc=rc, stdout=stdout.getvalue()[-3000:])
    report = {"control": control, "entries": recorder.report, "devices": len(jax.devices())}
    pathlib.Path(out, "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""``jgoat.wrap`` on a Llama-2-7B-shaped tree on CPU (issue 11, item 3): the SVD inits jitted with output shardings.

The tree: the decoder's seven linear kernels stacked over 32 layers as under ``nn.scan`` (q/k/v/o [32, 4096, 4096],
gate/up [32, 4096, 11008], down [32, 11008, 4096]), fp32: 25 GiB, more than this 24 GiB box holds. So:

* ``--part compile`` (abstract, the full 32 layers): for each target kernel, the jitted init ``jgoat.wrap`` runs
  (the same ``_stacked_init`` function with the same layer split and output shardings) is lowered from
  ``jax.ShapeDtypeStruct`` arguments carrying the kernel's sharding and compiled; reports XLA's per-device memory
  plan (arguments, outputs, temporaries) and whether the compiled output shardings are those ``jgoat.shardings``
  assigns the adapters. Nothing is allocated.
* ``--part svd`` (real arrays): process CPU seconds of one jitted thin SVD per kernel shape (warm), the cost the SVD
  inits (GOAT, PiSSA, MiLoRA, KaSA) pay per kernel and layer; the wrap time of the full tree is extrapolated from
  them (32 layers x (4 x [4096, 4096] + 3 x [11008, 4096]) SVDs, split over the devices by layer).
* ``--part run --layers L`` (real arrays): wall and CPU seconds of ``jgoat.wrap`` itself on L real layers.

Run each part in its own process (the device count is fixed at start):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_wrap.py --part compile --fsdp 8
    python scripts/bench_wrap.py --part compile --fsdp 1
    python scripts/bench_wrap.py --part svd
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/bench_wrap.py --part run --layers 2 --fsdp 2
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

import jgoat
from jgoat.wrap import _layer_split, _stacked_init

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
KERNELS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
           "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE),
           "down_proj": (INTERMEDIATE, HIDDEN)}
METHODS = {"goat": lambda: jgoat.GoatConfig(rank=32, experts=8, top_k=2, targets=list(KERNELS)),
           "pissa": lambda: jgoat.LoraConfig(rank=32, init="pissa", targets=list(KERNELS)),
           "lora": lambda: jgoat.LoraConfig(rank=32, targets=list(KERNELS))}


def tree(layers: int, leaf) -> dict:
    """{model: {layers: {self_attn|mlp: {name: {kernel: leaf(path, shape)}}}}} with stacked kernels."""
    out: dict = {"self_attn": {}, "mlp": {}}
    for name, (i, o) in KERNELS.items():
        group = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        out[group][name] = {"kernel": leaf(f"model/layers/{group}/{name}/kernel", (layers, i, o))}
    return {"model": {"layers": out}}


def part_compile(method: str, fsdp: int, layer_split: bool = True) -> dict:
    mesh = jgoat.mesh(fsdp=fsdp)
    cfg = METHODS[method]()
    abstract = tree(LAYERS, lambda _, s: jax.ShapeDtypeStruct(s, jnp.float32))
    wrapped = jax.eval_shape(lambda p: jgoat.wrap(p, cfg, key=jax.random.key(0)), abstract)
    sh = jgoat.shardings(wrapped, mesh)
    rows, t0 = [], time.perf_counter()
    for group, modules in abstract["model"]["layers"].items():
        for name, module in modules.items():
            ksh = sh["model"]["layers"][group][name]["kernel"]
            want = sh["model"]["layers"][group][name][jgoat.core.ADAPTER_KEY]
            kernel = jax.ShapeDtypeStruct(module["kernel"].shape, jnp.float32, sharding=ksh)
            keys = jax.ShapeDtypeStruct((LAYERS,), jax.random.key(0).dtype, sharding=NamedSharding(mesh, jax.P()))
            split = _layer_split(kernel, (LAYERS,), 3) if layer_split else None
            fn = _stacked_init(cfg, 1, False, split, want)
            t = time.perf_counter()
            compiled = fn.lower(kernel, keys).compile()
            mem = compiled.memory_analysis()
            got = jax.tree.leaves(compiled.output_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
            exp = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
            shape = module["kernel"].shape
            rows.append(dict(kernel=name, compile_s=time.perf_counter() - t, argument=int(mem.argument_size_in_bytes),
                             output=int(mem.output_size_in_bytes), temp=int(mem.temp_size_in_bytes),
                             kernel_bytes=4 * int(np.prod(shape)),
                             layer_split=None if split is None else str(split.spec),
                             shardings_as_assigned=all(g.is_equivalent_to(e, len(a.shape)) for g, e, a in zip(
                                 got, exp, jax.tree.leaves(jax.eval_shape(fn, kernel, keys)), strict=True))))
    return dict(part="compile", method=method, fsdp=fsdp, devices=len(jax.devices()), layer_split=layer_split,
                seconds=time.perf_counter() - t0, rows=rows)


def part_svd() -> dict:
    rows = []
    for shape in ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN)):
        w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        jax.block_until_ready(w)
        f = jax.jit(lambda w: jnp.linalg.svd(w, full_matrices=False)).lower(w).compile()  # compiled ahead
        c, t = time.process_time(), time.perf_counter()
        jax.block_until_ready(f(w))
        rows.append(dict(shape=shape, cpu_s=time.process_time() - c, wall_s=time.perf_counter() - t))
    per_layer = 4 * rows[0]["cpu_s"] + 3 * rows[1]["cpu_s"]
    return dict(part="svd", rows=rows, cpu_s_per_layer=per_layer, cpu_s_32_layers=LAYERS * per_layer)


def part_run(method: str, fsdp: int, layers: int) -> dict:
    mesh = jgoat.mesh(fsdp=fsdp)
    rng = np.random.default_rng(0)
    host = tree(layers, lambda _, s: (0.02 * rng.standard_normal(s, dtype=np.float32)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    params = jax.device_put(host, jgoat.shardings(abstract, mesh))
    del host
    cfg = METHODS[method]()
    place = functools.partial(jgoat.shardings, mesh=mesh)
    c, t = time.process_time(), time.perf_counter()
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0), shardings=place if fsdp > 1 else None)
    jax.block_until_ready(wrapped)
    return dict(part="run", method=method, fsdp=fsdp, layers=layers, wall_s=time.perf_counter() - t,
                cpu_s=time.process_time() - c)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("compile", "svd", "run"), required=True)
    p.add_argument("--method", choices=tuple(METHODS), default="goat")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--no-layer-split", action="store_true",
                   help="compile: without the layer split (each device gathers the stacked kernel, as XLA propagates)")
    args = p.parse_args(argv)
    if args.part == "compile":
        out = part_compile(args.method, args.fsdp, not args.no_layer_split)
    elif args.part == "svd":
        out = part_svd()
    else:
        out = part_run(args.method, args.fsdp, args.layers)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

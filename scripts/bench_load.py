"""Peak host RSS of ``jgoat.models.from_pretrained`` with and without a mesh, against the bytes each process's devices
hold (issue 11, item 3: peak host RSS per process <= 1.3x what that process's devices hold plus one tensor).

Builds (numpy only, one tensor at a time) a Llama-shaped fp32 ``model.safetensors`` + ``config.json`` in a temporary
folder, then loads it in fresh processes, one run per case:

* ``single``: no mesh, one CPU device (the process's device holds the whole model);
* ``fsdp8``: ``mesh=jgoat.mesh(fsdp=8)`` over 8 CPU devices of ONE process (its devices still hold the whole model:
  this measures the sharded reader's overhead);
* ``fsdp8x2``: the same mesh over TWO processes of 4 CPU devices each (``jax.distributed.initialize`` on localhost):
  each process fills only its own devices' blocks, so each should peak near half the model.

Each process reports ``VmHWM`` (peak RSS, from /proc/self/status; reset to the current RSS through
/proc/self/clear_refs just before the load) after the load minus ``VmRSS`` just before it (the interpreter, jax, XLA
and the devices' clients), the bytes its devices hold (the params' addressable shards) and the largest checkpoint
tensor. Bound: peak - baseline <= 1.3 x device bytes + largest tensor.

Usage::

    python scripts/bench_load.py                                  # hidden 1024, 8 layers, vocab 32000: ~0.6 GiB
    python scripts/bench_load.py --layers 2 --cases single,fsdp8  # a quick run
    python scripts/bench_load.py --json out.json                  # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_load_memory import llama_shapes  # the same Llama-shaped state dict (scripts/ is on sys.path)

FACTOR = 1.3
CASES = {"single": (1, 1), "fsdp8": (8, 1), "fsdp8x2": (4, 2)}  # case -> (devices per process, processes)

_CHILD = r"""
import json, os, sys, time
folder, case, devices, processes, process_id, port = sys.argv[1:7]
devices, processes, process_id = int(devices), int(processes), int(process_id)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
import jax
if processes > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=processes, process_id=process_id)
import jgoat, jgoat.models

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

mesh = None if case == "single" else jgoat.mesh(fsdp=len(jax.devices()))
jax.devices()  # the clients are up before the baseline
try:  # restart VmHWM at the current RSS (Linux >= 4.0), so the import phase's peak does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status_kb("VmRSS")
t0 = time.perf_counter()
model, params, cfg = jgoat.models.from_pretrained(folder, mesh=mesh)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
print(json.dumps(dict(case=case, process=process_id, base_kb=base, hwm_kb=status_kb("VmHWM"), seconds=seconds,
                      device_bytes=held, model_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
                      local_devices=jax.local_device_count())))
if processes > 1:
    jax.distributed.shutdown()
"""


def build_checkpoint(folder: pathlib.Path, *, hidden: int, layers: int, vocab: int, intermediate: int,
                     heads: int) -> dict:
    """Writes ``model.safetensors`` (fp32, streamed: one tensor in memory at a time) and ``config.json``; returns
    the total and the largest tensor's bytes."""
    from jgoat.models import formats  # noqa: PLC0415 (the parent process imports no jax until here)

    shapes = llama_shapes(hidden, layers, vocab, intermediate)
    rng = np.random.default_rng(0)

    def produce(shape):
        return lambda: 0.02 * rng.standard_normal(shape, dtype=np.float32)

    total = formats.write_safetensors(folder / formats.SAFE_WEIGHTS_NAME,
                                      [(k, s, np.float32, produce(s)) for k, s in shapes.items()], {"format": "pt"})
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, tie_word_embeddings=False, dtype="float32",
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"total_bytes": total, "largest_tensor_bytes": max(int(np.prod(s)) * 4 for s in shapes.values())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def measure(folder: pathlib.Path, case: str, timeout: float = 1800) -> list[dict]:
    """One fresh process per process of the case; their JSON reports."""
    devices, processes = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), case, str(devices), str(processes),
                               str(i), port], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"{case}: a loading process failed (rc {p.returncode}):\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def run(folder: pathlib.Path, cases: list[str], largest_tensor: int) -> list[dict]:
    """Measured rows with the derived ratio and bound per process."""
    out = []
    for case in cases:
        for r in measure(folder, case):
            extra = (r["hwm_kb"] - r["base_kb"]) * 1024
            bound = FACTOR * r["device_bytes"] + largest_tensor
            out.append({**r, "extra_bytes": extra, "bound_bytes": bound, "ratio": extra / r["device_bytes"],
                        "within": extra <= bound})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma separated, of {', '.join(CASES)}")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    dims = dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab, intermediate=args.intermediate,
                heads=args.heads)
    with tempfile.TemporaryDirectory(prefix="jgoat_bench_load_") as tmp:
        t0 = time.perf_counter()
        ckpt = build_checkpoint(pathlib.Path(tmp), **dims)
        print(f"built {ckpt['total_bytes'] / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = run(pathlib.Path(tmp), cases, ckpt["largest_tensor_bytes"])
    mib = 2**20
    print(f"Llama-shaped fp32 checkpoint: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, intermediate "
          f"{args.intermediate}: {ckpt['total_bytes'] / mib:.0f} MiB, largest tensor "
          f"{ckpt['largest_tensor_bytes'] / mib:.0f} MiB")
    print("| case | process | its devices hold | peak RSS - baseline | peak / held | bound (1.3 x held + 1 tensor) | "
          "time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} ({r['local_devices']} local device(s)) | {r['process']} | "
              f"{r['device_bytes'] / mib:.0f} MiB | {r['extra_bytes'] / mib:.0f} MiB | {r['ratio']:.2f} | "
              f"{r['bound_bytes'] / mib:.0f} MiB {'met' if r['within'] else 'MISSED'} | {r['seconds']:.1f} s |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"checkpoint": {**dims, **ckpt}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

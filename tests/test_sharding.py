"""jgoat.sharding on 8 fake CPU devices: the sharded step equals the single-device step, every leaf has the expected
sharding, FSDP divides the memory, checkpoints move between mesh shapes bit-identically.

All measurements come from ONE subprocess (tests/sharding_checks.py, with
XLA_FLAGS=--xla_force_host_platform_device_count=8 so the rest of the suite keeps one device); each test asserts one
property of its JSON report.

Tolerances (fp32, matmul precision "highest"): sharding changes the order of float32 sums (a batch mean split over
data×fsdp shards; a contraction over an fsdp- or tensor-split dim becomes partial sums plus an all-reduce), so the
results agree to the rounding of those sums, not bit for bit. Measured worst cases over both models, every method and
mesh: loss, aux, grad norm and expert loads 2.1e-7 relative; updated adapters and Adam moments 1.0e-6 relative to each
leaf's largest entry after two steps (Adam with ε = 1e-3, see sharding_checks.run_equivalence). Bounds: 1e-6 for the
scalars, 1e-5 for the state. A sharding bug (a per-shard mean, a missing all-reduce, a wrong slice) gives errors of
order 1e-2 or more.

The subprocess compiles with --xla_backend_optimization_level=0 (LLVM codegen only; reference and sharded steps
compile under the same flag), which halves its compile time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_multihost import script_on_two_processes

HERE = Path(__file__).parent
RTOL_SCALAR = 1e-6
RTOL_STATE = 1e-5
MODELS = ("llama", "bert")
METHODS = ("lora", "goat", "dora", "ia3", "qlora")
MESHES = ("8,1,1", "2,4,1", "1,4,2", "1,1,8")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "sharding_checks.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_sharded_step_equals_single_device(report, model, method):
    for mesh in MESHES:
        entry = report["equivalence"][f"{model}/{method}/{mesh}"]
        assert entry["n_adapter_leaves"] > 0
        assert entry["nf4_kernels"] > 0 if method == "qlora" else entry["nf4_kernels"] == 0
        for name in ("loss", "aux", "grad_norm", "loads"):
            assert entry[name] <= RTOL_SCALAR, (mesh, name, entry[name])
        for name in ("adapters", "adam_moments", "all_trainable"):
            assert entry[name] <= RTOL_STATE, (mesh, name, entry[name])


def test_goat_aux_and_expert_loads_are_global(report):
    """The aux loss is a nonlinear function of the whole batch (load fraction × mean router probability): per-shard
    values would differ from the single-device ones by far more than RTOL_SCALAR. Expert loads are compared directly."""
    for model in MODELS:
        for mesh in MESHES:
            entry = report["equivalence"][f"{model}/goat/{mesh}"]
            assert entry["aux_value"] > 0.0
            assert entry["aux"] <= RTOL_SCALAR and entry["loads"] <= RTOL_SCALAR, entry


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_every_leaf_has_the_expected_sharding(report, model, method):
    for mesh in MESHES:
        assert report["equivalence"][f"{model}/{method}/{mesh}"]["mismatched_specs"] == [], mesh


@pytest.mark.parametrize("kind", ["goat", "full"])
def test_fsdp8_divides_params_and_optimizer_state(report, kind):
    """Bytes on one device (its addressable shard of every param and optimizer leaf) ≤ 1/8 of the sharded leaves
    plus the replicated ones, which are only norms / biases / counts (< 2 % of the total)."""
    m = report["memory"][kind]
    assert m["per_device"] <= (m["total"] - m["replicated"]) / 8 + m["replicated"]
    assert m["replicated"] < 0.02 * m["total"], m
    assert max(m["replicated_ndims"]) <= 2, m  # [L, D] norm scales at most


@pytest.mark.parametrize("target", ["1,8,1", "1,2,4", "one_device"])
def test_checkpoint_moves_between_meshes(report, target):
    """Saved on mesh (2,4,1); restored bit-identically (adapters and Adam state) onto another mesh / one device, each
    leaf on the template's sharding."""
    entry = report["checkpoint"][target]
    assert entry["bit_identical"] and entry["same_sharding_as_template"] and entry["on_target_devices"], entry
    assert entry["metadata"] == {"mesh": "2,4"} and entry["n_leaves"] > 0


def test_sharded_checkpoint_is_jgoat_format(report):
    assert report["checkpoint"]["jgoat.restore"]["bit_identical"]
    assert report["fingerprint_equal"]


def test_clear_errors(report):
    e = report["errors"]
    assert "does not divide the 8 devices" in e["mesh_not_dividing"]
    assert "4 != 8 devices" in e["mesh_product"]
    assert "not divisible by the data×fsdp = 8 devices" in e["batch_not_divisible"]
    assert "pass the full wrapped tree" in e["trainable_half"]
    assert e["default_mesh"] == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}


def test_user_model_default_and_rules(report):
    """A model no default rule knows: FSDP on each kernel's largest divisible dim, adapters following it; user rules
    and logical overrides take precedence."""
    u = report["user_rules"]
    assert u["default"]["up/kernel"] == "(None, 'fsdp')" and u["default"]["down/kernel"] == "('fsdp', None)"
    assert u["default"]["up/jgoat/B"] == "(None, 'fsdp')" and u["default"]["down/jgoat/A"] == "('fsdp', None)"
    assert u["default"]["up/bias"] == "(None,)"
    assert u["ruled"]["up/kernel"] == "('fsdp', 'tensor')" and u["ruled"]["down/kernel"] == "('tensor', 'fsdp')"
    assert u["ruled"]["up/jgoat/A"] == "('fsdp', None)" and u["ruled"]["up/jgoat/B"] == "(None, ('tensor', 'fsdp'))"
    assert u["relabelled"]["up/kernel"] == "('fsdp', None)"


@pytest.mark.parametrize("family", ["llama_unrolled", "llama_moe_tied", "roberta", "clip", "vit"])
def test_default_rules_cover_every_model_family(report, family):
    """Unrolled and MoE decoders, RoBERTa, CLIP vision and ViT (LoRA on all-linear, mesh data=1 fsdp=4 tensor=2):
    every leaf has the expected sharding, and most leaves are sharded at all."""
    entry = report["families"][family]
    assert entry["mismatched_specs"] == []
    assert entry["sharded_leaves"] >= entry["leaves"] // 2, entry


def test_sharded_accumulate_step(report):
    """Gradient accumulation on the mesh (micro-batch leaves [A, B, ...] split on B) equals the single-device step."""
    acc = report["accumulate"]
    assert acc["batch_spec"].endswith("(None, ('data', 'fsdp'))"), acc["batch_spec"]
    for name in ("loss", "aux", "grad_norm"):
        assert acc[name] <= RTOL_SCALAR, (name, acc[name])
    assert acc["trainable"] <= RTOL_STATE, acc


@pytest.mark.parametrize("kind", ["goat", "full"])
def test_estimate_memory_plans_the_sharded_step_per_device(report, kind):
    """jgoat.memory with mesh=fsdp=8 (what `jgoat estimate-memory --mesh fsdp=8` prints): XLA's per-device argument
    bytes are the bytes of each argument's shard counted from the shardings (up to the same few bytes by which the
    one-device plan differs from the unsharded count: a scalar argument XLA does not count, identical on both), so
    about 1/8 of the one-device plan; the peak (with activations, split over the batch) falls as well. Measured:
    arguments 28,200 vs 221,064 bytes (GOAT), 31,208 vs 236,168 (full FT)."""
    e = report["estimate"][kind]
    assert e["counted_one"] - e["one_argument"] == e["counted_eight"] - e["eight_argument"] <= 8, e
    assert e["eight_argument"] < e["one_argument"] / 6, e
    assert e["eight_peak"] < e["one_peak"] / 2, e
    assert e["trainable"][0] == e["trainable"][1]


@pytest.mark.slow
def test_two_processes_on_localhost(tmp_path):
    """Multi-host: two processes (jax.distributed.initialize + gloo CPU collectives, 4 devices each) train 3 sharded
    GOAT steps on the global mesh (data=2, fsdp=4), each feeding only its half of every batch; the gathered adapters
    equal the one-process run (same tolerance as above). About 25 s of CPU per process."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    results = script_on_two_processes(HERE / "multihost_check.py", tmp_path, env)
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["global_devices"], r["local_devices"]) == (i, 2, 8, 4)
        assert r["adapters_rel_err"] <= RTOL_STATE, r
        # each process saw exactly its own half of every global batch
        assert r["first_tokens_seen"] == [row[4 * i:4 * (i + 1)] for row in r["ref_first_tokens"]]
    assert results[0]["loss"] == results[1]["loss"]

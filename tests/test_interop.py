"""jgoat.interop: HF PEFT export/import proven by ``peft.PeftModel.from_pretrained`` logits, and the GOAT format.

Tolerance for logits (fp32): jgoat and torch evaluate the same algebra with different summation orders over
widths ≤ 40 and O(1) values; the worst-case rounding bound is ~ n·u·Σ|terms| ≈ 40 · 6e-8 · O(1) ≈ 3e-6, so
``ATOL = RTOL = 2e-5`` leaves a few times that margin. PiSSA-family exports add one rounding of B' = −res_B / s'
(relative 6e-8), far inside it. Round trips through the files are exact (transposes and concatenations only).

IA³, KaSA and GoRA exports use the same 2e-5. KaSA's truncated base is re-derived by peft (torch SVD) from the torch
base and was derived by jgoat (its own SVD) from the same weights: the two differ by ≈ u · σ₁² / gap per entry
(Wedin), so the KaSA twins get spectra with σ₁ = 2 and a gap of 0.5 at the truncation point (≈ 6e-8 · 4 / 0.5 ≈ 5e-7,
inside the same tolerance); their re-imports are bit-exact (the import re-derives the truncation with wrap's code).
GoRA exports unpadded per-layer slices with rank_pattern / alpha_pattern: peft's scaling rounds to the same fp32 s_l.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import HID, IN, N_CLS, OUT, Deviations, FlaxMLP, gapped_spectrum, torch_mlp
from safetensors.numpy import load_file, save_file

import jgoat
from jgoat.adapters import TrainModule
from jgoat.interop import default_torch_name, export_goat, export_peft, import_goat, import_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

D, F, L = 16, 32, 3  # stacked model: width, hidden, layers
ADAPTERS = (jgoat.LoraAdapter, jgoat.DoraAdapter, jgoat.GoatAdapter, jgoat.IA3Adapter, jgoat.KasaAdapter,
            jgoat.GoraAdapter)


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(D, F)
        self.fc2 = torch.nn.Linear(F, D)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TorchStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(L)])
        self.head = torch.nn.Linear(D, N_CLS)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.gelu(nn.Dense(F, name="fc1")(x), approximate=False)
        return x + nn.Dense(D, name="fc2")(h), None


class FlaxStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(FlaxBlock, variable_axes={"params": 0, "jgoat_aux": 0}, split_rngs={"params": True},
                       length=L)
        x, _ = scan(name="layers")(x, None)
        return nn.Dense(N_CLS, name="head")(x)


class Outer(torch.nn.Module):
    """The MLP one level down (torch names net.fc1, ...): needs a custom torch_name."""

    def __init__(self, inner):
        super().__init__()
        self.net = inner

    def forward(self, x):
        return self.net(x)


DEV = Deviations()
_close = DEV.close


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    DEV.report("peft")


def _t2n(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _linear_params(linear) -> dict:
    return {"kernel": jnp.asarray(_t2n(linear.weight).T), "bias": jnp.asarray(_t2n(linear.bias))}


def _mlp():
    torch.manual_seed(0)
    model = torch_mlp()
    return model, {name: _linear_params(getattr(model, name)) for name in ("fc1", "fc2", "head")}


def _stack():
    torch.manual_seed(1)
    model = TorchStack()
    per_layer = {name: [_linear_params(getattr(block, name)) for block in model.layers] for name in ("fc1", "fc2")}
    layers = {name: {k: jnp.stack([p[k] for p in ps]) for k in ("kernel", "bias")} for name, ps in per_layer.items()}
    return model, {"layers": layers, "head": _linear_params(model.head)}


def _fresh(model_fn):
    """A new torch twin with the same weights (PeftModel.from_pretrained edits its model in place)."""
    return model_fn()[0]


def _perturb(tree, seed: int, steps: int = 3, size: float = 0.05):
    """A few random 'training steps' away from init on every trainable adapter array and modules_to_save param.

    numpy noise (eager jax.random on many shapes would compile a kernel per shape).
    """
    rng = np.random.default_rng(seed)

    def noisy(x):
        x = np.asarray(x)
        for _ in range(steps):
            x = x + size * rng.standard_normal(x.shape)
        return jnp.asarray(x, jnp.float32)

    def visit(node, saved=False):
        if isinstance(node, dict):
            saved = saved or isinstance(node.get("jgoat"), TrainModule)
            return {n: visit(node[n], saved) for n in sorted(node)}
        if isinstance(node, ADAPTERS):
            return node.replace(**{f: noisy(getattr(node, f)) for f in type(node).trainable})
        if saved and hasattr(node, "shape"):
            return noisy(node)
        return node

    return visit(tree)


def _x(shape, seed=2):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_FORWARD = {}


def _jgoat_logits(model, tree, x):
    """One jitted forward per model class, so trees of the same structure reuse the compiled function."""
    if type(model) not in _FORWARD:
        _FORWARD[type(model)] = jax.jit(jgoat.apply(model.apply))
    out, _ = _FORWARD[type(model)]({"params": tree}, jnp.asarray(x))
    return np.asarray(out)


def _peft_logits(torch_model, folder, x):
    loaded = peft.PeftModel.from_pretrained(torch_model, folder)
    loaded.eval()
    with torch.no_grad():
        return _t2n(loaded(torch.from_numpy(x))), loaded


def _config(folder) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# HF PEFT


GOAT_CFG = jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["fc1", "fc2"], modules_to_save=["head"])


METHODS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "milora": {"init": "milora"},
    "olora": {"init": "olora"},
}


@pytest.mark.parametrize("tag", list(METHODS))
def test_export_peft_loads_in_peft(tag, tmp_path):
    base, params = _mlp()
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, targets=["fc1", "fc2"], **METHODS[tag])
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 1)
    export_peft(wrapped, cfg, tmp_path, base_model_name_or_path="tiny-mlp")

    conf = _config(tmp_path)
    offset = cfg.init in ("pissa", "milora", "olora")
    assert conf["peft_type"] == "LORA" and conf["task_type"] is None and conf["bias"] == "none"
    assert conf["r"] == (8 if offset else 4) and conf["init_lora_weights"] is True
    assert conf["target_modules"] == ["fc1", "fc2"] and conf["base_model_name_or_path"] == "tiny-mlp"
    assert conf["use_rslora"] is cfg.use_rslora and conf["use_dora"] is cfg.use_dora
    assert conf["lora_dropout"] == 0.0 and conf["modules_to_save"] is None
    assert conf["rank_pattern"] == {} and conf["alpha_pattern"] == {}
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in ("fc1", "fc2") for ab in "AB"}
    if cfg.use_dora:
        expected |= {f"base_model.model.{n}.lora_magnitude_vector" for n in ("fc1", "fc2")}
    assert keys == expected

    x = _x((2, 5, IN))
    want = _jgoat_logits(FlaxMLP(), wrapped, x)
    got, loaded = _peft_logits(_fresh(_mlp), tmp_path, x)
    assert not np.allclose(want, _jgoat_logits(FlaxMLP(), params, x), atol=1e-3)  # the adapter matters
    _close(f"export {tag}: peft logits", got, want)
    # peft's scaling reproduces the adapter's (and the doubled alpha of the converted offset keeps s' = s)
    assert loaded.base_model.model.fc1.scaling["default"] == pytest.approx(cfg.scale, rel=1e-12)

    imported = import_peft(params, tmp_path)
    if not offset:
        chex.assert_trees_all_equal(imported, wrapped)  # exact, static fields (scale, dropout) included
        chex.assert_trees_all_equal(import_peft(wrapped, tmp_path), wrapped)
    else:  # the exported file is a plain rank-2r LoRA on the unmodified base: same function, same merge
        node = imported["fc1"]["jgoat"]
        assert isinstance(node, jgoat.LoraAdapter) and node.res_A is None and node.A.shape == (IN, 8)
        _close(f"export {tag}: re-imported logits", _jgoat_logits(FlaxMLP(), imported, x), want)
        merged_a, merged_b = jgoat.merge(imported), jgoat.merge(wrapped)
        for name in ("fc1", "fc2"):
            np.testing.assert_allclose(merged_a[name]["kernel"], merged_b[name]["kernel"], atol=1e-6, rtol=0)


def test_stacked_scan_export_per_layer(tmp_path):
    base, params = _stack()
    cfg = jgoat.LoraConfig(rank=4, alpha=4.0, targets=["fc1", "fc2"])
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 3)
    assert wrapped["layers"]["fc1"]["jgoat"].A.shape == (L, D, 4)
    export_peft(wrapped, cfg, tmp_path)
    conf = _config(tmp_path)
    assert conf["target_modules"] == sorted(f"layers.{i}.{n}" for i in range(L) for n in ("fc1", "fc2"))
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert "base_model.model.layers.2.fc2.lora_B.weight" in keys and len(keys) == 4 * L

    x = _x((2, 5, D))
    want = _jgoat_logits(FlaxStack(), wrapped, x)
    got, _ = _peft_logits(_fresh(_stack), tmp_path, x)
    _close("stacked lora: peft logits", got, want)
    chex.assert_trees_all_equal(import_peft(params, tmp_path), wrapped)  # restacked exactly


def test_stacked_pissa_export(tmp_path):
    base, params = _stack()
    cfg = jgoat.LoraConfig(rank=2, alpha=4.0, init="pissa", use_rslora=True, targets=["fc1", "fc2"])
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 4)
    export_peft(wrapped, cfg, tmp_path)
    conf = _config(tmp_path)
    assert conf["r"] == 4 and conf["lora_alpha"] == pytest.approx(4.0 * 2**0.5) and conf["use_rslora"] is True
    x = _x((3, D))
    got, _ = _peft_logits(_fresh(_stack), tmp_path, x)
    _close("stacked pissa+rslora: peft logits", got, _jgoat_logits(FlaxStack(), wrapped, x))


def test_custom_torch_name(tmp_path):
    base, params = _mlp()
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, targets=["fc1", "fc2"], use_dora=True)
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 5)

    def torch_name(path, index):
        return "net." + default_torch_name(path, index)

    export_peft(wrapped, cfg, tmp_path, torch_name=torch_name)
    assert _config(tmp_path)["target_modules"] == ["net.fc1", "net.fc2"]
    x = _x((4, IN))
    got, _ = _peft_logits(Outer(_fresh(_mlp)), tmp_path, x)
    _close("custom torch_name dora: peft logits", got, _jgoat_logits(FlaxMLP(), wrapped, x))
    chex.assert_trees_all_equal(import_peft(params, tmp_path, torch_name=torch_name), wrapped)
    chex.assert_trees_all_equal(import_peft(params, tmp_path), wrapped)  # the mapping recorded by export_peft
    with pytest.raises(ValueError, match="unknown key 'base_model.model.net.fc1.lora_A.weight'"):
        import_peft(params, tmp_path, torch_name=default_torch_name)  # default names: net.* names no module
    os.remove(os.path.join(tmp_path, "jgoat_torch_names.json"))
    with pytest.raises(ValueError, match="unknown key 'base_model.model.net.fc1.lora_A.weight'"):
        import_peft(params, tmp_path)  # a folder from peft itself: the default names


def test_modules_to_save(tmp_path):
    base, params = _mlp()
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, targets=["fc1", "fc2"], modules_to_save=["head"])
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 6)
    assert not np.array_equal(wrapped["head"]["kernel"], params["head"]["kernel"])
    export_peft(wrapped, cfg, tmp_path)
    assert _config(tmp_path)["modules_to_save"] == ["head"]
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= keys  # peft's naming (no infix)
    x = _x((4, IN))
    got, loaded = _peft_logits(_fresh(_mlp), tmp_path, x)
    _close("modules_to_save: peft logits", got, _jgoat_logits(FlaxMLP(), wrapped, x))
    np.testing.assert_array_equal(_t2n(loaded.base_model.model.head.modules_to_save["default"].weight).T,
                                  wrapped["head"]["kernel"])
    chex.assert_trees_all_equal(import_peft(params, tmp_path), wrapped)


def test_mixed_ranks_use_patterns(tmp_path):
    base, params = _mlp()
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, targets=["fc1"])
    tree = jgoat.wrap(params, cfg, key=jax.random.key(0))
    tree = jgoat.wrap(tree, jgoat.LoraConfig(rank=2, alpha=3.0, targets=["fc2"]), key=jax.random.key(1))
    tree = _perturb(tree, 7)
    export_peft(tree, cfg, tmp_path)
    conf = _config(tmp_path)
    assert len(conf["rank_pattern"]) == 1 and len(conf["alpha_pattern"]) == 1  # one of the two layers deviates
    x = _x((4, IN))
    got, loaded = _peft_logits(_fresh(_mlp), tmp_path, x)
    assert loaded.base_model.model.fc2.r["default"] == 2 and loaded.base_model.model.fc1.r["default"] == 4
    _close("mixed ranks: peft logits", got, _jgoat_logits(FlaxMLP(), tree, x))
    chex.assert_trees_all_equal(import_peft(params, tmp_path), tree)


def test_import_peft_saved_by_peft(tmp_path):
    """A folder written by peft itself (DoRA + rsLoRA, trained weights) imports into matching jgoat logits."""
    base, params = _mlp()
    model = peft.get_peft_model(_fresh(_mlp), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["fc1", "fc2"],
                                                              use_dora=True, use_rslora=True, lora_dropout=0.1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path)
    model.eval()
    x = _x((4, IN))
    with torch.no_grad():
        want = _t2n(model(torch.from_numpy(x)))
    tree = import_peft(params, tmp_path)
    node = tree["fc1"]["jgoat"]
    assert isinstance(node, jgoat.DoraAdapter) and node.scale == 6 / 2 and node.dropout == 0.1
    _close("import peft-saved dora+rslora: logits", _jgoat_logits(FlaxMLP(), tree, x), want)


def test_export_peft_errors(tmp_path):
    base, params = _mlp()
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, targets=["fc1", "fc2"])
    with pytest.raises(ValueError, match="no LoRA-family adapter"):
        export_peft(params, cfg, tmp_path)
    goat = jgoat.wrap(params, GOAT_CFG, key=jax.random.key(0))
    with pytest.raises(ValueError, match="GOAT"):
        export_peft(goat, cfg, tmp_path)
    dora = jgoat.wrap(params, jgoat.LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=["fc1", "fc2"]),
                      key=jax.random.key(0))
    with pytest.raises(ValueError, match="use_dora"):
        export_peft(dora, cfg, tmp_path)
    with pytest.raises(ValueError, match="map to the torch module"):
        export_peft(jgoat.wrap(params, cfg, key=jax.random.key(0)), cfg, tmp_path, torch_name=lambda p, i: "x")


def test_import_peft_errors(tmp_path):
    base, params = _mlp()
    cfg = jgoat.LoraConfig(rank=4, alpha=8.0, targets=["fc1", "fc2"])
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0))
    export_peft(wrapped, cfg, tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = load_file(path)
    # a module the tree lacks
    save_file({**tensors, "base_model.model.fc9.lora_A.weight": np.zeros((4, 3), np.float32)}, path)
    with pytest.raises(ValueError, match=r"unknown key 'base_model.model.fc9.lora_A.weight'"):
        import_peft(params, tmp_path)
    # a base of other shapes: every mismatching tensor is listed
    save_file(tensors, path)
    other = {**params, "fc1": {"kernel": jnp.zeros((IN + 1, HID)), "bias": jnp.zeros((HID,))},
             "fc2": {"kernel": jnp.zeros((HID, OUT + 2)), "bias": jnp.zeros((OUT + 2,))}}
    with pytest.raises(ValueError, match=r"(?s)shape mismatch at 'fc1'.*A \(4, 24\) != \(4, 25\).*"
                                         r"shape mismatch at 'fc2'.*B \(16, 4\) != \(18, 4\)"):
        import_peft(other, tmp_path)
    # a wrapped tree whose adapters are of another kind
    dora = jgoat.wrap(params, jgoat.LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=["fc1", "fc2"]),
                      key=jax.random.key(0))
    with pytest.raises(ValueError, match="already holds a DoraAdapter"):
        import_peft(dora, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# HF PEFT: IA³, KaSA, GoRA


IA3_CASES = {
    "mlp": (_mlp, FlaxMLP, (4, IN), jgoat.IA3Config(targets=["fc1", "fc2"], feedforward=["fc2"],
                                                    modules_to_save=["head"])),
    "stack": (_stack, FlaxStack, (2, 5, D), jgoat.IA3Config(targets=["fc1", "fc2"], feedforward=["fc2"])),
}


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_ia3_export_loads_in_peft(case, tmp_path):
    model_fn, flax_model, x_shape, cfg = IA3_CASES[case]
    _, params = model_fn()
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 11)
    export_peft(wrapped, cfg, tmp_path)
    conf = _config(tmp_path)
    names = ["fc1", "fc2"] if case == "mlp" else [f"layers.{i}.{n}" for n in ("fc1", "fc2") for i in range(L)]
    assert conf["peft_type"] == "IA3" and conf["target_modules"] == sorted(names)
    assert conf["feedforward_modules"] == sorted(n for n in names if n.endswith("fc2"))
    assert conf["modules_to_save"] == (["head"] if case == "mlp" else None)
    shapes = {k: v.shape for k, v in load_file(os.path.join(tmp_path, "adapter_model.safetensors")).items()}
    hidden = HID if case == "mlp" else F
    assert shapes[f"base_model.model.{names[0]}.ia3_l"] == (hidden, 1)  # out-side (fc1): [out, 1]
    assert shapes[f"base_model.model.{names[-1]}.ia3_l"] == (1, hidden)  # feed-forward (fc2): [1, in]

    x = _x(x_shape)
    want = _jgoat_logits(flax_model(), wrapped, x)
    assert not np.allclose(want, _jgoat_logits(flax_model(), params, x), atol=1e-3)  # the adapter matters
    got, loaded = _peft_logits(_fresh(model_fn), tmp_path, x)
    assert isinstance(loaded.base_model, peft.IA3Model)
    _close(f"export ia3 {case}: peft logits", got, want)
    chex.assert_trees_all_equal(import_peft(params, tmp_path), wrapped)
    chex.assert_trees_all_equal(import_peft(jgoat.wrap(params, cfg, key=jax.random.key(3)), tmp_path), wrapped)


def _spectral_twin(model_fn, r: int):
    """model_fn's twin whose fc1 / fc2 weights have a spectral gap before their r smallest singular values."""
    model = model_fn()[0]
    with torch.no_grad():
        for i, (name, module) in enumerate(sorted(model.named_modules())):
            if name.endswith(("fc1", "fc2")):
                module.weight.copy_(torch.from_numpy(gapped_spectrum(*module.weight.shape, r, 20 + i)))
    return model


def _params_of(model) -> dict:
    if isinstance(model, TorchStack):
        per_layer = {n: [_linear_params(getattr(b, n)) for b in model.layers] for n in ("fc1", "fc2")}
        layers = {n: {k: jnp.stack([p[k] for p in ps]) for k in ("kernel", "bias")} for n, ps in per_layer.items()}
        return {"layers": layers, "head": _linear_params(model.head)}
    return {n: _linear_params(getattr(model, n)) for n in ("fc1", "fc2", "head")}


KASA_CASES = {"mlp": (_mlp, FlaxMLP, (4, IN), False), "stack-rslora": (_stack, FlaxStack, (2, 5, D), True)}


@pytest.mark.parametrize("case", list(KASA_CASES))
def test_kasa_export_loads_in_peft(case, tmp_path):
    model_fn, flax_model, x_shape, rslora = KASA_CASES[case]
    twin = functools.partial(_spectral_twin, model_fn, 4)
    params = _params_of(twin())
    cfg = jgoat.KasaConfig(rank=4, alpha=8.0, beta=2e-4, gamma=3e-3, use_rslora=rslora, targets=["fc1", "fc2"])
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 12)
    export_peft(wrapped, cfg, tmp_path)
    conf = _config(tmp_path)
    assert conf["peft_type"] == "LORA" and conf["kasa_config"] == {"beta": 2e-4, "gamma": 3e-3}
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["use_rslora"] is rslora and conf["use_dora"] is False
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert {k.rsplit(".", 1)[-1] for k in keys if "lora_diag" in k} == {"lora_diag"}
    assert len(keys) == 3 * len(conf["target_modules"])  # lora_A, lora_B, lora_diag per layer

    x = _x(x_shape)
    want = _jgoat_logits(flax_model(), wrapped, x)
    got, loaded = _peft_logits(twin(), tmp_path, x)  # peft truncates the torch base itself when loading
    first = loaded.base_model.model.fc1 if case == "mlp" else loaded.base_model.model.layers[0].fc1
    assert type(first.lora_variant["default"]).__name__ == "KasaLinearVariant"
    assert first.scaling["default"] == pytest.approx(cfg.scale, rel=1e-12)
    _close(f"export kasa {case}: peft logits", got, want)
    assert not np.allclose(want, _jgoat_logits(flax_model(), params, x), atol=1e-3)
    # the import re-derives the truncated part from the kernels with wrap's own code: bit-exact round trip
    chex.assert_trees_all_equal(import_peft(params, tmp_path), wrapped)


def test_kasa_export_refuses_a_truncation_peft_cannot_reproduce(tmp_path):
    _, params = _mlp()
    cfg = jgoat.KasaConfig(rank=4, truncation="reference", targets=["fc1", "fc2"])  # fc2 40 → 16 keeps all 16
    wrapped = jgoat.wrap(params, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at 'fc2' drops 0 singular triplets.*peft's KaSA always drops r = 4"):
        export_peft(wrapped, cfg, tmp_path)
    with pytest.raises(ValueError, match="beta, gamma"):
        export_peft(wrapped, jgoat.KasaConfig(rank=4, beta=0.5, targets=["fc1"]), tmp_path)
    with pytest.raises(ValueError, match="cfg is a LoraConfig but the tree holds other adapters at fc1 \\(KasaAdapter"):
        export_peft(wrapped, jgoat.LoraConfig(rank=4, targets=["fc1", "fc2"]), tmp_path)


GORA_RANKS = {"layers/fc1": np.array([1, 3, 2]), "layers/fc2": np.array([2, 2, 2]), "head": np.array(3)}
GORA_CFGS = {
    "dynamic-rslora": jgoat.GoraConfig(targets=["fc1", "fc2", "head"], r_ref=2, alpha=4.0),
    "fixed-scaling": jgoat.GoraConfig(targets=["fc1", "fc2", "head"], r_ref=2, alpha=4.0, dynamic_scaling=False,
                                      use_rslora=False),
}


def _gora_tree(params, cfg, seed):
    """A GoRA tree with the ranks above and 'trained' A, B: padded columns / rows kept 0 (as training keeps them)."""
    tree = _perturb(jgoat.gora_wrap(params, cfg, key=jax.random.key(0), ranks=GORA_RANKS), seed)

    def mask(node):
        live = np.arange(node.A.shape[-1]) < np.asarray(node.rank)[..., None]  # [*stack, r_pad]
        return node.replace(A=jnp.where(live[..., None, :], node.A, 0.0), B=jnp.where(live[..., :, None], node.B, 0.0))

    return jax.tree.map(lambda n: mask(n) if isinstance(n, jgoat.GoraAdapter) else n, tree,
                        is_leaf=lambda n: isinstance(n, jgoat.GoraAdapter))


@pytest.mark.parametrize("tag", list(GORA_CFGS))
def test_gora_export_loads_in_peft(tag, tmp_path):
    cfg = GORA_CFGS[tag]
    _, params = _stack()
    tree = _gora_tree(params, cfg, 13)
    assert tree["layers"]["fc1"]["jgoat"].A.shape == (L, D, 3)  # padded to the stack's largest rank
    export_peft(tree, cfg, tmp_path)
    conf = _config(tmp_path)
    assert conf["r"] == 2 and conf["use_rslora"] is cfg.use_rslora
    assert conf["rank_pattern"] == {"^head": 3, "^layers\\.0\\.fc1": 1, "^layers\\.1\\.fc1": 3}
    if cfg.dynamic_scaling:  # s_l = alpha / √r_l is peft's own formula: one alpha for every layer
        assert conf["lora_alpha"] == 4 and conf["alpha_pattern"] == {}
    else:  # s_l = alpha / r_ref for every rank: peft needs alpha_l = alpha · r_l / r_ref
        assert conf["lora_alpha"] == 4 and conf["alpha_pattern"] == {"^head": 6, "^layers\\.0\\.fc1": 2,
                                                                     "^layers\\.1\\.fc1": 6}
    keys = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert keys["base_model.model.layers.0.fc1.lora_A.weight"].shape == (1, D)  # unpadded slices
    assert keys["base_model.model.layers.1.fc1.lora_B.weight"].shape == (F, 3)

    x = _x((2, 5, D))
    want = _jgoat_logits(FlaxStack(), tree, x)
    assert not np.allclose(want, _jgoat_logits(FlaxStack(), params, x), atol=1e-3)
    got, loaded = _peft_logits(_fresh(_stack), tmp_path, x)
    for i in range(L):  # peft's per-layer scaling reproduces GoRA's s_l (stored in fp32)
        layer = loaded.base_model.model.layers[i].fc1
        assert np.float32(layer.scaling["default"]) == tree["layers"]["fc1"]["jgoat"].scale[i]
        assert layer.r["default"] == GORA_RANKS["layers/fc1"][i]
    _close(f"export gora {tag}: peft logits", got, want)

    template = jgoat.gora_wrap(params, cfg, key=jax.random.key(5), ranks=jgoat.gora_ranks(tree))
    chex.assert_trees_all_equal(import_peft(template, tmp_path), tree)  # GoRA layers back, exactly
    plain = import_peft(params, tmp_path)  # plain params: uneven stacks become GoRA layers, even ones LoRA
    assert isinstance(plain["layers"]["fc1"]["jgoat"], jgoat.GoraAdapter)
    chex.assert_trees_all_equal(plain["layers"]["fc1"], tree["layers"]["fc1"])
    if cfg.dynamic_scaling:  # equal ranks and scalings: an ordinary LoRA stack
        assert isinstance(plain["layers"]["fc2"]["jgoat"], jgoat.LoraAdapter)
    _close(f"export gora {tag}: re-imported logits", _jgoat_logits(FlaxStack(), plain, x), want)


def test_gora_export_refuses_another_config(tmp_path):
    _, params = _stack()
    cfg = GORA_CFGS["dynamic-rslora"]
    tree = jgoat.gora_wrap(params, cfg, key=jax.random.key(0), ranks=GORA_RANKS)
    with pytest.raises(ValueError, match="GoRA scalings at 'head'.*not those of cfg"):
        export_peft(tree, dataclasses.replace(cfg, alpha=8.0), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# GOAT format


def test_goat_round_trip_exact(tmp_path):
    base, params = _mlp()
    wrapped = _perturb(jgoat.wrap(params, GOAT_CFG, key=jax.random.key(0)), 8)
    export_goat(wrapped, GOAT_CFG, tmp_path)
    with open(os.path.join(tmp_path, "goat_config.json")) as f:
        meta = json.load(f)
    assert meta["format_version"] == 1 and meta["base_fingerprint"] == jgoat.fingerprint(wrapped)
    assert meta["jgoat_version"] == jgoat.__version__ and meta["config_class"] == "GoatConfig"
    assert set(meta["config"]) >= {"rank", "experts", "top_k", "init", "scaling", "alpha", "eta", "rho",
                                   "init_cof", "aux_form", "dropout_mode", "targets", "dropout"}
    assert [(m["path"], m["stack"]) for m in meta["modules"]] == [("fc1", []), ("fc2", [])]
    keys = set(load_file(os.path.join(tmp_path, "goat_adapter.safetensors")))
    assert {"fc1/jgoat/router", "fc1/jgoat/res_A", "fc2/jgoat/res_B", "head/kernel", "head/bias"} <= keys

    for onto in (params, jgoat.wrap(params, GOAT_CFG, key=jax.random.key(9))):
        tree, cfg = import_goat(onto, tmp_path)
        assert cfg == GOAT_CFG
        chex.assert_trees_all_equal(tree, wrapped)
    x = _x((4, IN))
    np.testing.assert_array_equal(_jgoat_logits(FlaxMLP(), tree, x), _jgoat_logits(FlaxMLP(), wrapped, x))


def test_goat_fingerprint_mismatch(tmp_path):
    base, params = _mlp()
    wrapped = jgoat.wrap(params, GOAT_CFG, key=jax.random.key(0))
    export_goat(wrapped, GOAT_CFG, tmp_path)
    other = {**params, "fc2": {**params["fc2"], "kernel": params["fc2"]["kernel"] * 2}}
    want, got = jgoat.fingerprint(wrapped), jgoat.fingerprint(jgoat.wrap(other, GOAT_CFG, key=jax.random.key(0)))
    with pytest.raises(ValueError, match=f"fingerprint mismatch.*'{want}'.*'{got}'"):
        import_goat(other, tmp_path)


def test_goat_stacked_and_molora(tmp_path):
    base, params = _stack()
    cfg = jgoat.MoLoraConfig(rank=8, experts=4, top_k=1, targets=["fc1", "fc2"], dropout=0.05)
    wrapped = _perturb(jgoat.wrap(params, cfg, key=jax.random.key(0)), 10)
    export_goat(wrapped, cfg, tmp_path)
    with open(os.path.join(tmp_path, "goat_config.json")) as f:
        meta = json.load(f)
    assert [m["stack"] for m in meta["modules"]] == [[L], [L]]
    tree, cfg2 = import_goat(params, tmp_path)
    assert type(cfg2) is jgoat.MoLoraConfig and cfg2 == cfg
    chex.assert_trees_all_equal(tree, wrapped)  # no residual for init="zero": absent in the file, None here
    assert tree["layers"]["fc1"]["jgoat"].res_A is None


def test_goat_errors(tmp_path):
    base, params = _mlp()
    lora = jgoat.wrap(params, jgoat.LoraConfig(rank=4, alpha=8.0, targets=["fc1", "fc2"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="non-GOAT"):
        export_goat(lora, GOAT_CFG, tmp_path)
    with pytest.raises(ValueError, match="no GOAT adapter"):
        export_goat(params, GOAT_CFG, tmp_path)
    wrapped = jgoat.wrap(params, GOAT_CFG, key=jax.random.key(0))
    with pytest.raises(ValueError, match="does not match cfg"):
        export_goat(wrapped, jgoat.GoatConfig(rank=8, experts=4, top_k=1, targets=["fc1"]), tmp_path)
    export_goat(wrapped, GOAT_CFG, tmp_path)
    other = {**params, "fc1": {"kernel": jnp.zeros((IN, HID + 1)), "bias": jnp.zeros((HID + 1,))}}
    with pytest.raises(ValueError, match="fingerprint mismatch"):  # another base: refused before its layout
        import_goat(other, tmp_path)
    meta_path = os.path.join(tmp_path, "goat_config.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["modules"][0]["in_features"] += 1  # a file that lies about its layout, on the right base
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="'fc1': kernel"):
        import_goat(params, tmp_path)
    meta["modules"][0]["in_features"] -= 1
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    path = os.path.join(tmp_path, "goat_adapter.safetensors")
    save_file({**load_file(path), "fc9/jgoat/A": np.zeros((1,), np.float32)}, path)
    with pytest.raises(ValueError, match=r"unknown tensors \['fc9/jgoat/A'\]"):
        import_goat(params, tmp_path)

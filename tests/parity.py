"""Shared by the HF PEFT parity tests: the tiny MLP twin (Flax and torch), a deviation log, a gapped spectrum.

The twin: fc1 24→40, erf-GELU, fc2 40→16, tanh, head 16→3, all with biases; Flax kernels are torch weights
transposed. ATOL = RTOL = 2e-5 is derived in test_peft_parity's docstring (fp32 rounding bound of these shapes).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

IN, HID, OUT, N_CLS = 24, 40, 16, 3
ATOL = RTOL = 2e-5


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(HID, name="fc1")(x), approximate=False)  # torch's gelu is the erf form
        return nn.Dense(N_CLS, name="head")(jnp.tanh(nn.Dense(OUT, name="fc2")(h)))


def torch_mlp():
    """The torch twin of :class:`FlaxMLP` (torch imported here: modules that use it skip without torch)."""
    import torch

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = (torch.nn.Linear(IN, HID), torch.nn.Linear(HID, OUT),
                                             torch.nn.Linear(OUT, N_CLS))

        def forward(self, x):
            return self.head(torch.tanh(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))

    return TorchMLP()


class Deviations:
    """Checks jgoat against a reference and keeps the largest |difference| per quantity for the report."""

    def __init__(self):
        self.max: dict[str, float] = {}

    def close(self, label: str, got, want, atol: float = ATOL, rtol: float = RTOL) -> None:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape, (label, got.shape, want.shape)
        dev = float(np.max(np.abs(got - want))) if got.size else 0.0
        self.max[label] = max(self.max.get(label, 0.0), dev)
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=label)

    def report(self, title: str) -> None:
        print(f"\nmax |jgoat - {title}| per quantity:")
        for name, dev in sorted(self.max.items()):
            print(f"  {name:<44} {dev:.3e}")


def gapped_spectrum(out_f: int, in_f: int, r: int, seed: int) -> np.ndarray:
    """[out, in] with singular values linspace(2, 0.8), then a gap, then the r smallest linspace(0.3, 0.05)."""
    rng = np.random.default_rng(seed)
    h = min(out_f, in_f)
    u, _ = np.linalg.qr(rng.standard_normal((out_f, h)))
    v, _ = np.linalg.qr(rng.standard_normal((in_f, h)))
    s = np.concatenate([np.linspace(2.0, 0.8, h - r), np.linspace(0.3, 0.05, r)])
    return ((u * s) @ v.T).astype(np.float32)

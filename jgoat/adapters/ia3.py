"""(IA)³ (Liu et al., 2022), as HF PEFT ``IA3Config``: one learned vector per adapted linear, initialised to 1.

  * out-side (keys, values — every target not listed in ``feedforward``): y = (x W + b) ⊙ l, l ∈ R^out;
  * in-side (feed-forward targets): y = (x ⊙ l) W + b, l ∈ R^in.

Merge is exact: out-side scales the kernel's output columns AND the bias by l (peft does the same); in-side scales the
kernel's input rows (the bias is untouched). Unmerge divides by l + 1e-8 (as peft) and is therefore approximate.

Under jgoat's interceptor the base output is computed first, so the in-side form is evaluated as
y + (x ⊙ (l − 1)) W: one extra [T, in] × [in, out] product while unmerged (peft instead rescales the input before the
base matmul); merge removes it. Which side a target gets depends on its module path, so `wrap` asks the config for
a per-layer config (`IA3Config.for_layer`) before calling `init`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp
from flax import struct

from jgoat.adapters.base import AdapterConfig, Array, Context, compute_dtype, matmul
from jgoat.core import check_compute_dtype, check_rule_form, rule_matches

# peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING for Llama and Mistral:
# the attention keys and values are scaled on their output, the MLP down projection on its input. (peft's Qwen2
# default is q_proj, v_proj, down_proj: pass those targets explicitly to reproduce it.)
IA3_LLAMA_TARGETS: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
IA3_LLAMA_FEEDFORWARD: tuple[str, ...] = ("down_proj",)
# peft's unmerge adds this to l before dividing (avoids a division by zero; makes unmerge approximate).
UNMERGE_EPS = 1e-8


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    """(IA)³ (HF PEFT ``IA3Config``). The defaults are peft's Llama / Mistral defaults.

    Attributes:
      targets: modules that get a vector (same forms as every jgoat config; default: k_proj, v_proj, down_proj).
      feedforward: which of the targets are feed-forward layers, scaled on their INPUT (peft's
        ``feedforward_modules``; same forms as ``targets``; default: down_proj). When both are lists of names,
        every feed-forward name must also be a target.
      exclude, modules_to_save: as for every method.
      dropout: must be 0 — (IA)³ has no adapter dropout (peft's IA3Config has none).

    Example:
      >>> cfg = jgoat.IA3Config()  # Llama: k_proj, v_proj out-side; down_proj in-side
      >>> cfg = jgoat.IA3Config(targets=["key", "value", "output/dense"], feedforward=["output/dense"])  # BERT
    """

    targets: str | Sequence[str] = IA3_LLAMA_TARGETS
    feedforward: str | Sequence[str] = IA3_LLAMA_FEEDFORWARD

    method: ClassVar[str] = "ia3"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.feedforward, list):
            object.__setattr__(self, "feedforward", tuple(self.feedforward))
        ff = self.feedforward
        check_rule_form(ff, "feedforward")
        if self.dropout != 0.0:
            raise ValueError(f"IA3 has no adapter dropout (peft's IA3Config has none); got dropout={self.dropout}")
        if not isinstance(ff, str) and not isinstance(self.targets, str):
            missing = [name for name in ff if name not in self.targets]
            if missing:
                raise ValueError(f"feedforward modules {missing} are not in targets {list(self.targets)}: "
                                 "feedforward must be a subset of targets (as peft's feedforward_modules)")

    def is_feedforward(self, path: str) -> bool:
        """Whether the module at '/'-joined `path` is scaled on its input."""
        return rule_matches(self.feedforward, tuple(path.split("/")))

    def for_layer(self, path: str) -> IA3LayerConfig:
        """The hashable per-layer config `init` receives (wrap calls this with each target's path)."""
        return IA3LayerConfig(feedforward=self.is_feedforward(path), compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class IA3LayerConfig:
    """What `init` needs to know about one layer: whether it is a feed-forward (in-side) target, and the
    ``compute_dtype`` policy of its `IA3Config`."""

    feedforward: bool
    compute_dtype: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", check_compute_dtype(self.compute_dtype, type(self).__name__))


@struct.dataclass
class IA3Adapter:
    """One (IA)³ layer: l [out] (out-side) or l [in] (feed-forward, in-side)."""

    l: Array  # noqa: E741 (peft's name: ia3_l)
    feedforward: bool = struct.field(pytree_node=False, default=False)
    n_in: int = struct.field(pytree_node=False, default=0)
    compute_dtype: str = struct.field(pytree_node=False, default="auto")

    trainable: ClassVar[tuple[str, ...]] = ("l",)
    ref_field: ClassVar[str] = "l"  # the field whose ndim is layer_ndim for one unstacked layer
    layer_ndim: ClassVar[int] = 1
    dropout: ClassVar[float] = 0.0  # (IA)³ has no adapter dropout

    @property
    def in_features(self) -> int:
        return self.n_in

    def forward(self, x_TxI: Array, y_TxO: Array, ctx: Context) -> tuple[Array, None]:
        l_N = self.l.astype(jnp.float32)
        if self.feedforward:  # (x ⊙ l) W + b = y + (x ⊙ (l − 1)) W: the scaling in float32, the matmul in the policy
            x_scaled = x_TxI.astype(jnp.float32) * (l_N - 1.0)[None, :]
            delta = matmul(x_scaled, ctx.kernel_IxO, compute_dtype(self, x_TxI))
            return y_TxO + delta.astype(y_TxO.dtype), None
        # out-side: element-wise, always float32 (XLA fuses it; a bf16 l ≈ 1 would round away updates below 2^-8)
        return (y_TxO.astype(jnp.float32) * l_N[None, :]).astype(y_TxO.dtype), None

    def _factor(self, value: Array) -> Array:
        return value[:, None] if self.feedforward else value[None, :]

    def merge(self, kernel_IxO: Array) -> Array:
        scaled = kernel_IxO.astype(jnp.float32) * self._factor(self.l.astype(jnp.float32))
        return scaled.astype(kernel_IxO.dtype)

    def unmerge(self, kernel_IxO: Array) -> Array:
        l_eps = self.l.astype(jnp.float32) + UNMERGE_EPS
        return (kernel_IxO.astype(jnp.float32) / self._factor(l_eps)).astype(kernel_IxO.dtype)

    def merge_bias(self, bias_O: Array) -> Array:
        """The merged bias: b ⊙ l out-side, b unchanged in-side."""
        if self.feedforward:
            return bias_O
        return (bias_O.astype(jnp.float32) * self.l.astype(jnp.float32)).astype(bias_O.dtype)

    def unmerge_bias(self, bias_O: Array) -> Array:
        if self.feedforward:
            return bias_O
        return (bias_O.astype(jnp.float32) / (self.l.astype(jnp.float32) + UNMERGE_EPS)).astype(bias_O.dtype)


def init(cfg: IA3LayerConfig, kernel_IxO: Array, key: Array) -> IA3Adapter:
    """l = 1 (the identity) on the input side for feed-forward targets, on the output side otherwise."""
    del key  # deterministic init
    n_in, n_out = kernel_IxO.shape
    n = n_in if cfg.feedforward else n_out
    return IA3Adapter(l=jnp.ones((n,), jnp.float32), feedforward=cfg.feedforward, n_in=n_in,
                      compute_dtype=cfg.compute_dtype)

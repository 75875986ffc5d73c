"""The toy model the training tests share: scanned residual MLP blocks (kernels [layers, in, out]) and a head."""

import flax.linen as nn
import jax
import numpy as np


class Block(nn.Module):
    width: int
    hidden: int

    @nn.compact
    def __call__(self, x, _):
        h = jax.nn.gelu(nn.Dense(self.hidden, name="up")(x))
        return x + nn.Dense(self.width, name="down")(h), None


class ScannedMLP(nn.Module):
    """`layers` scanned blocks ('jgoat_aux' listed so GOAT's aux leaves the scan) and an unstacked `head`."""

    width: int
    hidden: int
    layers: int
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        scan = nn.scan(block, variable_axes={"params": 0, "jgoat_aux": 0},
                       split_rngs={"params": True, "dropout": True}, length=self.layers)
        x, _ = scan(self.width, self.hidden, name="layers")(x, None)
        return nn.Dense(self.width, name="head")(x)


def low_rank_teacher(base, keys, rank: int, strength):
    """A teacher for the toy regressions: every block's up/down kernel [layers, in, out] plus strength · (u @ v), a
    rank-`rank` change per layer drawn from `keys` (one key per kernel, up then down); `strength` broadcasts."""
    teacher = jax.tree.map(lambda v: v, base)
    for name, key in zip(("up", "down"), keys, strict=True):
        kernel = base["layers"][name]["kernel"]
        u = jax.random.normal(key, (*kernel.shape[:2], rank)) / np.sqrt(kernel.shape[1])
        v = jax.random.normal(jax.random.fold_in(key, 1), (kernel.shape[0], rank, kernel.shape[2]))
        teacher["layers"][name] = {**base["layers"][name], "kernel": kernel + strength * (u @ v)}
    return teacher

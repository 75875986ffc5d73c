"""The toy model the training tests share: scanned residual MLP blocks (kernels [layers, in, out]) and a head."""

import flax.linen as nn
import jax


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

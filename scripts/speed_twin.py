"""The PyTorch twin of scripts/bench_speed.py's Flax decoder (numpy + torch only, so that the official GOAT code's
own Python can build it too: scripts/official_goat_worker.py)."""

import math

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rope_tables(seq: int, head_dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [seq, head_dim] (HF Llama layout: the two halves repeat the frequencies)."""
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def torch_twin(params, layers: int, width: int, heads: int, intermediate: int, seq: int, rope: bool = True):
    """The same decoder in PyTorch (names as HF Llama), weights copied from the Flax params (or the same nested dict
    of numpy arrays: ``params["layers"][group][name]["kernel"]`` stacked over layers, ``params["norm"]["weight"]``)."""
    import torch

    class TRMSNorm(torch.nn.Module):
        def __init__(self, w, eps=1e-6):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(w))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def t_rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    class TAttention(torch.nn.Module):
        def __init__(self, w, heads, seq, rope):
            super().__init__()
            self.heads, self.rope = heads, rope
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, name, torch.nn.Linear(w, w, bias=False))
            cos, sin = rope_tables(seq, w // heads)
            self.register_buffer("cos", torch.from_numpy(cos)[None, None], persistent=False)
            self.register_buffer("sin", torch.from_numpy(sin)[None, None], persistent=False)
            self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).tril(), persistent=False)

        def forward(self, x):
            b, s, w = x.shape
            hd = w // self.heads
            q, k, v = (p(x).view(b, s, self.heads, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                  self.v_proj))
            if self.rope:
                q = q * self.cos + t_rotate_half(q) * self.sin
                k = k * self.cos + t_rotate_half(k) * self.sin
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            scores = scores.masked_fill(~self.causal, torch.finfo(scores.dtype).min)
            out = torch.softmax(scores, dim=-1) @ v
            return self.o_proj(out.transpose(1, 2).reshape(b, s, w))

    class TMLP(torch.nn.Module):
        def __init__(self, w, inter):
            super().__init__()
            self.gate_proj = torch.nn.Linear(w, inter, bias=False)
            self.up_proj = torch.nn.Linear(w, inter, bias=False)
            self.down_proj = torch.nn.Linear(inter, w, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class TLayer(torch.nn.Module):
        def __init__(self, w, heads, inter, seq, rope):
            super().__init__()
            self.input_layernorm = TRMSNorm(w)
            self.self_attn = TAttention(w, heads, seq, rope)
            self.post_attention_layernorm = TRMSNorm(w)
            self.mlp = TMLP(w, inter)

        def forward(self, x):
            h = x + self.self_attn(self.input_layernorm(x))
            return h + self.mlp(self.post_attention_layernorm(h))

    class TDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(TLayer(width, heads, intermediate, seq, rope) for _ in range(layers))
            self.norm = TRMSNorm(width)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.norm(x)

    model = TDecoder()
    stacked = params["layers"]
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for group, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])):
                for name in names:
                    kernel = np.asarray(stacked[group][name]["kernel"][i])
                    getattr(getattr(layer, group), name).weight.copy_(torch.from_numpy(kernel.T.copy()))
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).weight.copy_(torch.from_numpy(np.array(stacked[name]["weight"][i])))
        model.norm.weight.copy_(torch.from_numpy(np.array(params["norm"]["weight"])))
    return model

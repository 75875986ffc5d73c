"""The official GOAT implementation's training step, for scripts/bench_speed.py --official (not in CI).

Runs in the official code's own Python (``--official-python``: a venv with its pins, e.g. torch 2.4.0, peft 0.14.0,
transformers 4.44.0 from its requirements.txt) on bench_speed's PyTorch twin (scripts/speed_twin.py) with the same
weights and batch (an .npz the bench writes), wrapped the way the official ``goat/train_nlg.py`` wraps a model:
``peft.get_peft_model(model, peta.src.GOATConfig(...))`` with ``"GOAT": peta.src.GOATModel`` added to peft's model
mapping. Only ``peta.src`` (the adapter) is imported; the ``peta`` package's ``__init__`` (its data and task modules,
with datasets / torchvision / hydra) is bypassed. One step is the official trainer's: loss + aux_coeff ·
``model.get_aux_loss()``, backward, global-norm clip 1.0, AdamW, zero_grad, ``loss.item()``.

Protocol (one JSON line each way): after setup the worker prints ``{"ready": true, "wrap_s": ..., ...}``; then each
input line ``step`` runs one step and answers ``{"s": seconds}``; ``quit`` (or end of input) ends it.
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_twin import TARGETS, torch_twin  # noqa: E402


def load_official(root: pathlib.Path):
    """``peta.src`` of an official GOAT-PEFT checkout at `root`, without running ``peta/__init__.py``."""
    package = root / "goat" / "peta"
    if not (package / "src" / "goat" / "layer.py").is_file():
        raise SystemExit(f"--official {root}: no goat/peta/src/goat/layer.py (a clone of github.com/Facico/GOAT-PEFT)")
    peta = types.ModuleType("peta")
    peta.__path__ = [str(package)]
    sys.modules["peta"] = peta
    import peft.peft_model
    import peta.src

    peft.peft_model.PEFT_TYPE_TO_MODEL_MAPPING.update({"GOAT": peta.src.GOATModel})
    return peta.src


def nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--official", required=True, type=pathlib.Path)
    p.add_argument("--inputs", required=True, help="the bench's .npz: params/..., x, y")
    p.add_argument("--config", required=True, help="JSON: layers width heads intermediate seq rope rank experts "
                                                   "top_k threads aux_coeff")
    args = p.parse_args()
    cfg = json.loads(args.config)
    import peft
    import torch

    src = load_official(args.official)
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    data = np.load(args.inputs)
    params = nested({k.removeprefix("params/"): data[k] for k in data.files if k.startswith("params/")})
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    twin = torch_twin(params, cfg["layers"], cfg["width"], cfg["heads"], cfg["intermediate"], cfg["seq"], cfg["rope"])
    twin.device = torch.device("cpu")  # the official get_aux_loss reads model.device, as an HF model has it
    goat_cfg = src.GOATConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], lora_dropout=0.0, target_modules=TARGETS,
                              bias="none", num_experts=cfg["experts"], top_k=cfg["top_k"], init_type="goat",
                              init_cof=1.0 / cfg["experts"])
    t0 = time.perf_counter()
    model = peft.get_peft_model(twin, goat_cfg)
    wrap_s = time.perf_counter() - t0
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    versions = {"torch": torch.__version__, "peft": peft.__version__, "python": sys.version.split()[0],
                "threads": torch.get_num_threads()}
    try:
        import transformers
        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(json.dumps({"ready": True, "wrap_s": wrap_s, "trainable_params": sum(q.numel() for q in trainable),
                      "versions": versions, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y) + cfg["aux_coeff"] * model.get_aux_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        print(json.dumps({"s": time.perf_counter() - t0, "finite": math.isfinite(value)}), flush=True)


if __name__ == "__main__":
    main()

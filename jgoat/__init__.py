"""jgoat: GOAT (LoRA mixture-of-experts) and the LoRA family for JAX/Flax parameter trees.

    wrapped = jgoat.wrap(params, jgoat.GoatConfig(rank=32, targets="all-linear"), key=key)
    out, aux = jgoat.apply(model.apply)({"params": wrapped}, batch)
"""

from jgoat import nnx
from jgoat.adapters import (
    DoraAdapter,
    GoatAdapter,
    GoatConfig,
    IA3Adapter,
    IA3Config,
    KasaAdapter,
    KasaConfig,
    LoraAdapter,
    LoraConfig,
    LoriAdapter,
    LoriConfig,
    MoLoraConfig,
    lori_concat,
    lori_masks,
    lori_sparse,
    regularizer,
)
from jgoat.adapters.bottleneck import BottleneckConfig, add_bottleneck
from jgoat.adapters.gora import GoraAdapter, GoraConfig
from jgoat.adapters.prompt import PrefixTuningConfig, PromptTuningConfig, add_prefix, add_prompt
from jgoat.apply import apply, probe, register_linear
from jgoat.checkpoint import adapter_leaves, fingerprint, latest_step, restore, save
from jgoat.core import Layout, __version__
from jgoat.errors import JgoatError, NonFiniteError
from jgoat.grad_init import gora_allocate, gora_gradients, gora_importance, gora_ranks, gora_wrap
from jgoat.interop import default_torch_name, export_goat, export_peft, import_goat, import_peft
from jgoat.quant import NF4Kernel, dequantize, dequantize_tree, quantize_nf4
from jgoat.train import TrainState, accumulate_step, adamw_cosine, cosine_schedule, freeze_base, train_step
from jgoat.trainer import Callback, Checkpoint, Evaluate, FitResult, JsonlLogger, TensorBoardLogger, fit
from jgoat.wrap import (
    adapter_names,
    adapters,
    add_adapter,
    combine,
    delete_adapter,
    mark_trainable,
    merge,
    select_adapter,
    split,
    summary,
    trainable_mask,
    unmerge,
    wrap,
)

__all__ = [
    "__version__",
    "BottleneckConfig",
    "DoraAdapter",
    "GoatAdapter",
    "GoatConfig",
    "GoraAdapter",
    "GoraConfig",
    "IA3Adapter",
    "IA3Config",
    "KasaAdapter",
    "KasaConfig",
    "Layout",
    "LoraAdapter",
    "LoraConfig",
    "LoriAdapter",
    "LoriConfig",
    "MoLoraConfig",
    "NF4Kernel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TrainState",
    "Callback",
    "Checkpoint",
    "Evaluate",
    "FitResult",
    "JgoatError",
    "JsonlLogger",
    "NonFiniteError",
    "TensorBoardLogger",
    "fit",
    "adamw_cosine",
    "add_bottleneck",
    "add_prefix",
    "add_prompt",
    "adapter_leaves",
    "adapter_names",
    "accumulate_step",
    "adapters",
    "add_adapter",
    "apply",
    "combine",
    "cosine_schedule",
    "default_torch_name",
    "delete_adapter",
    "dequantize",
    "dequantize_tree",
    "export_goat",
    "export_peft",
    "fingerprint",
    "freeze_base",
    "gora_allocate",
    "gora_gradients",
    "gora_importance",
    "gora_ranks",
    "gora_wrap",
    "import_goat",
    "import_peft",
    "latest_step",
    "lori_concat",
    "lori_masks",
    "lori_sparse",
    "mark_trainable",
    "merge",
    "nnx",
    "probe",
    "quantize_nf4",
    "register_linear",
    "regularizer",
    "restore",
    "save",
    "select_adapter",
    "split",
    "summary",
    "train_step",
    "trainable_mask",
    "unmerge",
    "wrap",
]

"""Adapter files: HF PEFT's formats (:mod:`.peft`: export/import, read by ``peft.PeftModel.from_pretrained``) and
GOAT's own format (:mod:`.goat`). Every public name of those is importable from here."""

from jgoat.interop.goat import (
    GOAT_CONFIG_FILE,
    GOAT_FORMAT,
    GOAT_FORMAT_VERSION,
    GOAT_WEIGHTS_FILE,
    export_goat,
    import_goat,
)
from jgoat.interop.peft import (
    PEFT_CONFIG_FILE,
    PEFT_NAMES_FILE,
    PEFT_WEIGHTS_FILE,
    default_torch_name,
    export_peft,
    import_peft,
)

__all__ = [
    "GOAT_CONFIG_FILE",
    "GOAT_FORMAT",
    "GOAT_FORMAT_VERSION",
    "GOAT_WEIGHTS_FILE",
    "PEFT_CONFIG_FILE",
    "PEFT_NAMES_FILE",
    "PEFT_WEIGHTS_FILE",
    "default_torch_name",
    "export_goat",
    "export_peft",
    "import_goat",
    "import_peft",
]

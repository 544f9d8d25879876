"""PEFT methods, one file each; importing this package registers all of them."""

from peftbench.methods import (  # noqa: F401  (each module registers its method)
    adapter,
    bitfit,
    delta_lora,
    dora,
    full,
    ia3,
    ln_tuning,
    lora,
    lora_fa,
    lora_plus,
    partial,
    pissa,
    prefix_tuning,
    prompt_tuning,
    qlora,
    vera,
)
from peftbench.methods.base import AdapterLayer, PeftMethod, check_groups_cover
from peftbench.methods.registry import METHODS, build_method

__all__ = ["METHODS", "AdapterLayer", "PeftMethod", "build_method", "check_groups_cover"]

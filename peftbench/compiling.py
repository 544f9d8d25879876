"""`trainer.compile=true`: `torch.compile` of the model, in place, so nothing else changes.

The repeated blocks (the decoder layers: the classes a transformers model lists in `_no_split_modules`) are
compiled one by one with `nn.Module.compile()` ("regional compilation": every block runs the same code, so
one compiled graph serves them all and compile time does not grow with depth). A model without such a list
has its decoder (or, without one, itself) compiled whole. Compiling in place never wraps a module, so
parameter names, `state_dict` keys, checkpoints and saved adapters are the same as without compiling (no
`_orig_mod.` prefix), and the method's adapter layers, already attached, are compiled with their block.

Compile time falls in the first steps of each kind of pass (training, evaluation without grad) and again
once when a sequence length changes (then the length is treated as dynamic).
"""

from __future__ import annotations

from torch import nn


def compile_in_place(model: nn.Module) -> list[str]:
    """Compile `model`'s repeated blocks in place (see the module doc); the names of what was compiled."""
    block_types = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [
        (name, module) for name, module in model.named_modules() if type(module).__name__ in block_types
    ]
    if not blocks:
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        target = decoder if isinstance(decoder, nn.Module) else model
        name = next((n for n, m in model.named_modules() if m is target), "")
        blocks = [(name, target)]
    for _, module in blocks:
        module.compile()
    return [name for name, _ in blocks]

"""Merge: a run's adapter folded into its base, saved as a plain transformers model with its tokenizer.

    python -m peftbench.merge <run dir | adapter dir> --out DIR [--model KEY=VALUE ...]

The base is rebuilt from the run's own `model` config (`peftbench.saved_run`; ``--model name_or_path=...``
points at a moved base), the adapter loaded, and every adapter layer folded into a plain layer
(`PeftMethod.merge`: LoRA's ``W0 + s B A``, VeRA's ``W0 + diag(b) B diag(d) A``, ...). The baselines that
train the base's own weights (full, partial, BitFit, LN tuning) have nothing to fold: their adapter file
carries the trained weights, loaded in place; Delta-LoRA's carries its modified W0 as well. A 4-bit base
(QLoRA) comes out dequantized. The result is saved in the run's model dtype with `save_pretrained` (model and
tokenizer, the directory written all at once), so that
``AutoModelForCausalLM.from_pretrained(DIR)`` (``AutoModelForSequenceClassification`` for a classifier)
computes what the adapted model computed. Methods that add computation no weight can hold (prompt or
prefix tuning, bottleneck adapters) are refused in one line naming the mergeable ones; exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import PeftMethod, adapter_layers

#: written beside the model: which run and method the weights came from
PROVENANCE = "peftbench_merge.json"
#: what marks an earlier merge output (an --out that may be replaced)
MODEL_MARKER = "config.json"


def can_merge(cls: type[PeftMethod]) -> bool:
    """A method whose trained model is a plain model once folded: its layers merge (`mergeable`), or it
    inserts none and trains the base's own weights (`inserts_layers` false: full, partial, BitFit, LN
    tuning)."""
    return bool(cls.mergeable) or not cls.inserts_layers


def mergeable_methods() -> list[str]:
    from peftbench.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if can_merge(cls))


def cannot_merge(method: PeftMethod) -> ConfigError:
    return ConfigError(
        f"method={method.name!r} cannot be merged into the base weights; accepted: "
        f"{', '.join(mergeable_methods())}"
    )


def dequantize_remaining(model: nn.Module) -> None:
    """Replace every 4-bit linear layer still in the model (one no adapter wrapped) by a plain nn.Linear
    holding its dequantized weight: a saved plain model holds no quantized tensors."""
    from peftbench.methods.dense import base_weight, plain_linear
    from peftbench.methods.walker import replace_module

    for name, module in list(model.named_modules()):
        if getattr(getattr(module, "weight", None), "quant_state", None) is None:
            continue
        replace_module(model, name, plain_linear(base_weight(module), module.bias))


def merge_in_place(model: nn.Module, method: PeftMethod, dtype: Any = None) -> nn.Module:
    """Fold `method`'s adapter into `model` (loaded with it) and return the plain model, cast to `dtype`
    (the run's model dtype) when given. ConfigError for a method that cannot merge."""
    if not can_merge(type(method)):
        raise cannot_merge(method)
    if method.mergeable:
        method.merge(model)
    left = [name for name, _ in adapter_layers(model)]
    if left:
        raise RuntimeError(f"method={method.name!r} left adapter layers after merging: {left[:3]}")
    dequantize_remaining(model)
    if dtype is not None:
        model.to(dtype)
    return model.requires_grad_(False).eval()


def save_merged(model: nn.Module, tokenizer: Any, out: str | Path, provenance: dict[str, Any]) -> Path:
    """`save_pretrained` of model and tokenizer into `out`, replaced whole and all at once."""
    from peftbench.files import atomic_directory

    with atomic_directory(out, marker=MODEL_MARKER) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return Path(out)


def parse_args(argv: list[str] | None = None) -> Any:
    from peftbench.commands import run_dir_parser

    parser = run_dir_parser("python -m peftbench.merge", __doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from peftbench.commands import fail
    from peftbench.files import check_out
    from peftbench.methods.io import read_method
    from peftbench.models import ModelSpec
    from peftbench.saved_run import load_adapted, locate

    args = parse_args(argv)
    try:
        saved = locate(args.path, args.model_overrides)
        method = read_method(saved.adapter)
        if not can_merge(type(method)):  # before the model is loaded
            raise cannot_merge(method)
        check_out(args.out, MODEL_MARKER)
        dtype = ModelSpec.from_config(saved.model_config).torch_dtype
        model, tokenizer, method = load_adapted(saved)
        merge_in_place(model, method, dtype)
        provenance = {
            "adapter": str(saved.adapter.resolve()),
            "method": method.hyperparameters(),
            "model_config": saved.model_config,
        }
        save_merged(model, tokenizer, args.out, provenance)
    except ConfigError as err:
        return fail(err)
    print(f"wrote {args.out} (method={method.name} merged into {saved.model_config.get('name_or_path')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

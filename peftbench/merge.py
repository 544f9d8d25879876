"""Merge: a run's adapter folded into its base, saved as a plain transformers model with its tokenizer.

    python -m peftbench.merge <run dir | adapter dir> --out DIR [--model KEY=VALUE ...]
    python -m peftbench.merge RUN_A RUN_B [...] --how task_arithmetic|ties|dare_linear|dare_ties|cat
        [--weights W ...] [--density D] [--scale S] [--rank R] [--seed N] --out DIR

Several runs (or ``--how`` with one): `peftbench.merge_several` (task vectors combined, then a plain model,
a rank-R LoRA or a concatenated LoRA). One run without ``--how``: folded into its base as below.

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

import sys
from pathlib import Path
from typing import Any

from torch import nn

from peftbench.errors import ConfigError
from peftbench.merged_output import MODEL_MARKER, PROVENANCE, save_merged
from peftbench.methods.base import PeftMethod, adapter_layers


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


def parse_args(argv: list[str] | None = None) -> Any:
    from peftbench.commands import OneLineParser, add_model_overrides

    parser = OneLineParser(prog="python -m peftbench.merge", description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="run directories (or adapter directories)")
    add_model_overrides(parser)
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged model")
    parser.add_argument(
        "--how", default=None, help="several runs: task_arithmetic, ties, dare_linear, dare_ties or cat"
    )
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one per run (default 1)")
    parser.add_argument("--density", type=float, default=None, help="ties / dare_*: fraction kept")
    parser.add_argument("--scale", type=float, default=1.0, help="lambda: W = W0 + lambda * merged")
    parser.add_argument("--rank", type=int, default=None, help="write a rank-R LoRA (truncated SVD)")
    parser.add_argument("--seed", type=int, default=0, help="DARE's drop seed")
    args = parser.parse_args(argv)
    args.path = args.paths[0]
    return args


def main_several(args: Any) -> int:
    from peftbench.commands import fail
    from peftbench.files import check_out
    from peftbench.merge_several import check_plan, merge_several

    try:
        if args.how is None:
            raise ConfigError(
                f"{len(args.paths)} runs need --how; accepted: task_arithmetic, ties, dare_linear, "
                "dare_ties, cat"
            )
        plan = check_plan(
            [str(p) for p in args.paths],
            args.how,
            args.weights,
            args.density,
            args.scale,
            args.seed,
            args.rank,
            args.model_overrides,
        )
        check_out(args.out, PROVENANCE)
        merge_several(plan, args.out)
    except ConfigError as err:
        return fail(err)
    return 0


def main(argv: list[str] | None = None) -> int:
    from peftbench.commands import fail
    from peftbench.files import check_out
    from peftbench.methods.io import read_method
    from peftbench.models import ModelSpec
    from peftbench.saved_run import load_adapted, locate

    args = parse_args(argv)
    several = ("how", "weights", "density", "rank")
    if len(args.paths) > 1 or any(getattr(args, k) is not None for k in several) or args.scale != 1.0:
        return main_several(args)
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

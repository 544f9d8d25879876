"""HF PEFT export: a trained adapter as PEFT writes one, for `peft.PeftModel.from_pretrained(base, dir)`.

    python -m peftbench.export <run dir | adapter dir> [--out DIR] [--model KEY=VALUE ...]

The directory holds ``adapter_config.json`` (a PEFT config: LORA, VERA, ...) and ``adapter_model.safetensors``
(PEFT's key names), both from the method's `peft_export` (peftbench/methods/base.py). A run writes it itself
into ``<run dir>/adapter/peft/`` when its method has a PEFT form; this command does it for runs that already
exist (default --out: ``<adapter dir>/peft``), rebuilding the run's base and loading its adapter first
(`peftbench.saved_run`). Loading it back:

    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base>), "<dir>")

A head trained beside the adapter (a classifier's ``score``) goes in as PEFT's ``modules_to_save``. An image
model's adapter is its language model's (the part the method adapted: load it onto that language model),
and the image-side tensors that trained (the projector) go beside it in ``projector.safetensors``.
Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import PeftMethod, adapter_layers
from peftbench.methods.peft_format import peft_key

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: where a run writes its export, inside its adapter directory
PEFT_SUBDIR = "peft"


def exports_to_peft(cls: type[PeftMethod]) -> bool:
    """Whether a method class has a PEFT form: its `peft_form` capability (a class attribute)."""
    return bool(cls.peft_form)


def exportable_methods() -> list[str]:
    """Names of the registered methods with a PEFT form."""
    from peftbench.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if exports_to_peft(cls))


def no_peft_form(method: PeftMethod) -> ConfigError:
    return ConfigError(
        f"method={method.name!r} has no HF PEFT equivalent; accepted: {', '.join(exportable_methods())}"
    )


def head_parameters(model: nn.Module, trained: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The modules outside every adapter layer that own a `trained` parameter (a task head), each with all
    of its parameters: PEFT saves such a module whole (``modules_to_save``)."""
    adapters = tuple(f"{name}." for name, _ in adapter_layers(model))
    params = dict(model.named_parameters())
    owners = sorted(
        {n.rpartition(".")[0] for n in trained if n in params and not n.startswith(adapters)} - {""}
    )
    return {o: dict(model.get_submodule(o).named_parameters()) for o in owners}


def split_adapted(
    model: nn.Module, trained: Iterable[str]
) -> tuple[nn.Module, list[str], dict[str, torch.Tensor]]:
    """`(adapted part, its trained names, the other trained tensors)`: for an image model, its language
    model (`walker.adapted_part`), the names inside it, and the image side's trained tensors (the
    projector); for a plain model, itself, `trained` and nothing."""
    from peftbench.methods.walker import adapted_part

    part = adapted_part(model)
    trained = list(trained)
    if part is model:
        return model, trained, {}
    prefix = next(name for name, module in model.named_modules() if module is part) + "."
    params = dict(model.named_parameters())
    inside = [n.removeprefix(prefix) for n in trained if n.startswith(prefix)]
    side = {n: params[n] for n in trained if not n.startswith(prefix) and n in params}
    return part, inside, side


def peft_payload(
    model: nn.Module, method: PeftMethod, trained: Iterable[str] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(adapter_config, tensors)` of the PEFT export, with the trained head as ``modules_to_save``.

    `trained`: names of the parameters that trained (default: those that require grad, as after training;
    give the adapter file's keys for a model rebuilt with `load_adapter`)."""
    if trained is None:
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
    model, trained, _ = split_adapted(model, trained)
    exported = method.peft_export(model)
    if exported is None:
        raise no_peft_form(method)
    config, tensors = dict(exported[0]), dict(exported[1])
    heads = head_parameters(model, trained)
    if heads:
        config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []) | set(heads))
        for owner, params in heads.items():
            for local, param in params.items():
                key = peft_key(owner, local)
                if key in tensors:
                    raise RuntimeError(f"{method.name}.peft_export already wrote {key}, a head tensor")
                tensors[key] = param
    return config, tensors


def export_peft(
    model: nn.Module, method: PeftMethod, directory: str | Path, trained: Iterable[str] | None = None
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into `directory` (replaced whole, all
    at once); returns it. ConfigError for a method without a PEFT form, naming the ones with one."""
    from safetensors.torch import save_file

    from peftbench.files import atomic_directory
    from peftbench.models.multimodal import PROJECTOR_FILE, PROJECTOR_PREFIX

    if trained is None:
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
    trained = list(trained)
    config, tensors = peft_payload(model, method, trained)
    side = split_adapted(model, trained)[2]
    # own copies: safetensors refuses tensors that share memory (tied weights, views of one buffer)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic_directory(directory, marker=PEFT_CONFIG) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        if side:  # an image model's projector, beside its language model's adapter
            own = {k.removeprefix(PROJECTOR_PREFIX): v.detach().to("cpu", copy=True) for k, v in side.items()}
            save_file(own, str(tmp / PROJECTOR_FILE), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def export_after_training(model: nn.Module, method: PeftMethod, adapter_dir: Path) -> str | None:
    """`run.py`'s hook: the PEFT export into ``<adapter dir>/peft`` when the method has a PEFT form; the path
    written, or None. A failure is logged, not raised: the run's own adapter is saved already, and
    `python -m peftbench.export <run dir>` can try again."""
    if not exports_to_peft(type(method)):
        return None
    try:
        return str(export_peft(model, method, Path(adapter_dir) / PEFT_SUBDIR))
    except Exception as err:  # the training result must not be lost to an export problem
        log.warning("PEFT export of the adapter failed (%s: %s)", type(err).__name__, err)
        return None


def parse_args(argv: list[str] | None = None) -> Any:
    from peftbench.commands import run_dir_parser

    parser = run_dir_parser("python -m peftbench.export", __doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default: <adapter dir>/{PEFT_SUBDIR})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from peftbench.commands import fail
    from peftbench.files import check_out
    from peftbench.methods.io import read_method
    from peftbench.saved_run import adapter_keys, load_adapted, locate

    args = parse_args(argv)
    try:
        saved = locate(args.path, args.model_overrides)
        method = read_method(saved.adapter)
        if not exports_to_peft(type(method)):  # before the model is loaded
            raise no_peft_form(method)
        out = check_out(args.out or saved.adapter / PEFT_SUBDIR, PEFT_CONFIG)
        model, _, method = load_adapted(saved)
        export_peft(model, method, out, trained=adapter_keys(saved))
    except ConfigError as err:
        return fail(err)
    config = json.loads((out / PEFT_CONFIG).read_text())
    print(f"wrote {out} (HF PEFT {config['peft_type']} adapter of method={method.name})")
    print(f'load it: PeftModel.from_pretrained(<base model>, "{out}")')
    return 0


if __name__ == "__main__":
    sys.exit(main())

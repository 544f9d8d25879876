"""Partial fine-tuning: freeze everything, then train the last k blocks, the final norm and the output head.

docs/METHODS.md, "Baselines" (GPT-2's "FTTop2" baseline: k = 2). Everything is found structurally:
- the blocks are the model's largest ``nn.ModuleList`` of same-class modules (``model.layers`` in Llama,
  ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT);
- the final norm is any normalisation layer registered after the blocks, outside them and the head;
- the head is the output layer (``get_output_embeddings()``, or a classifier / score layer).
A head tied to the input embeddings is the *same tensor* as the embeddings: training it trains them too.
`train_tied_head` chooses explicitly (default: leave a tied head frozen, and say so).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.full import BaseWeightsMethod, unique_parameters
from peftbench.methods.ln_tuning import is_norm
from peftbench.methods.registry import register
from peftbench.methods.walker import _output_layer_names

log = logging.getLogger(__name__)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: its largest (by parameters) ModuleList of same-class modules."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
        and _numel(module) > 0
    ]
    if not candidates:
        raise ConfigError(
            f"method='partial' found no stack of repeated blocks in {type(model).__name__} "
            "(no nn.ModuleList of same-class modules with parameters)"
        )
    return max(candidates, key=lambda item: (_numel(item[1]), len(item[1])))


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclasses.dataclass
class _Selection:
    blocks: list[tuple[str, nn.Parameter]]
    final_norm: list[tuple[str, nn.Parameter]]
    head: list[tuple[str, nn.Parameter]]
    tied_head: list[tuple[str, nn.Parameter]]  # head parameters shared with a module outside the head


@register
@dataclasses.dataclass
class Partial(BaseWeightsMethod):
    """The last `k` blocks, the final norm and the output head train; the rest stays frozen."""

    name: ClassVar[str] = "partial"
    size_knob: ClassVar[str | None] = "k"  # whole blocks: a coarse knob

    k: int = 2
    #: a head tied to the input embeddings trains only when true (and then the embeddings train with it)
    train_tied_head: bool = False

    def validate(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise bad_value("method.k", self.k, "an integer >= 1 (the number of last blocks to train)")
        if not isinstance(self.train_tied_head, bool):
            raise bad_value("method.train_tied_head", self.train_tied_head, "true or false")

    def select(self, model: nn.Module) -> _Selection:
        blocks_name, blocks = find_blocks(model)
        if self.k > len(blocks):
            accepted = f"an integer in [1, {len(blocks)}] ({blocks_name!r} has {len(blocks)} blocks)"
            raise bad_value("method.k", self.k, accepted)
        block_params = [
            (f"{blocks_name}.{i}.{n}", p)
            for i in range(len(blocks) - self.k, len(blocks))
            for n, p in blocks[i].named_parameters()
        ]

        heads = _output_layer_names(model)
        order = [name for name, _ in model.named_modules()]
        after_blocks = set(order[order.index(blocks_name) + 1 :])
        norm_params = [
            (f"{name}.{n}", p)
            for name, module in model.named_modules()
            if name in after_blocks
            and is_norm(module)
            and not _under(name, {blocks_name})
            and not _under(name, heads)
            for n, p in module.named_parameters(recurse=False)
        ]

        head_params = unique_parameters(
            (f"{h}.{n}", p) for h in sorted(heads) for n, p in model.get_submodule(h).named_parameters()
        )
        # every name a tensor is reachable by: a tied head weight is also reachable outside the head
        all_names = model.named_parameters(remove_duplicate=False)
        outside_head = {id(p) for n, p in all_names if not _under(n.rpartition(".")[0], heads)}
        tied = [(n, p) for n, p in head_params if id(p) in outside_head]
        return _Selection(block_params, norm_params, head_params, tied)

    def attach(self, model: nn.Module) -> None:
        selection = self.select(model)
        if selection.tied_head and not self.train_tied_head:
            log.warning(
                "method=partial: the output head %s is tied to the input embeddings; it stays FROZEN "
                "(training it would train the embeddings too). Set method.train_tied_head=true to train "
                "both (counted once).",
                [n for n, _ in selection.tied_head],
            )
        elif selection.tied_head:
            log.warning(
                "method=partial: training the tied output head %s also trains the input embeddings "
                "(one tensor, counted once).",
                [n for n, _ in selection.tied_head],
            )

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        selection = self.select(model)
        head = selection.head
        if not self.train_tied_head:
            tied = {id(p) for _, p in selection.tied_head}
            head = [(n, p) for n, p in head if id(p) not in tied]
        return unique_parameters(selection.blocks + selection.final_norm + head)

"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691).

Sec. 2: p trainable embeddings P (p, d) are prepended to the embedded input, ``[P; E(x)]``, and only P trains;
Sec. 3.2 ("sampled vocab"): P starts as the embeddings of p tokens drawn from the vocabulary. Here the draw is
uniform over the whole vocabulary (as HF PEFT's SAMPLE_VOCAB) from the global torch generator, i.e. the run's
`seed`; P is kept in float32 whatever the base dtype (and so its gradient and optimizer state: METHODS.md,
"Adapter dtype") and cast to the model's dtype where it is prepended.

The virtual positions are invisible to callers (`virtual_tokens.py`): the attention mask gets p ones in front,
the real tokens sit at positions p, p+1, ..., and their hidden states come back alone, so the loss covers the
caller's labelled tokens only (the first real token is not predicted from the prompt, as for the base model).
In an encoder (BERT), the pooler reads the first position, which is the first virtual token (as in HF PEFT).
Not mergeable: the prompt is an input, not a weight change.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import PeftMethod
from peftbench.methods.registry import register
from peftbench.methods.virtual_tokens import VirtualTokens, backbone_of, peft_common_config, positive_int


class PromptEmbedding(VirtualTokens):
    """The soft prompt: `embedding` (p, d), float32, prepended to the input embeddings of every sequence."""

    in_hidden_states = True

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__(init.shape[0])
        self.embedding = nn.Parameter(init.detach().clone().float())

    def start(self, backbone: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        """Replace `input_ids` by `[P; E(input_ids)]`; virtual positions 0..p-1 and token type 0."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = backbone.get_input_embeddings()(kwargs.pop("input_ids"))
        kwargs["input_ids"] = None
        prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        p = self.num_virtual_tokens
        positions = kwargs.get("position_ids")  # already moved by p: the prompt takes 0..p-1
        if positions is not None:
            virtual = torch.arange(p, device=positions.device, dtype=positions.dtype)
            kwargs["position_ids"] = torch.cat([virtual.expand(*positions.shape[:-1], p), positions], dim=-1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(*types.shape[:-1], p), types], dim=-1)


def _input_embeddings(backbone: nn.Module, method: str) -> nn.Module:
    get = getattr(backbone, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(
            f"method={method!r} needs a backbone with a token-embedding table; "
            f"{type(backbone).__name__} has none"
        )
    return embeddings  # type: ignore[return-value]


@register
@dataclasses.dataclass
class PromptTuning(PeftMethod):
    """p soft-prompt embeddings, initialised from sampled vocabulary embeddings (see the module doc)."""

    name: ClassVar[str] = "prompt_tuning"
    peft_form: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = False  # the initial prompt already changes the function

    num_virtual_tokens: int = 20

    def validate(self) -> None:
        positive_int(self.name, "num_virtual_tokens", self.num_virtual_tokens)

    def attach(self, model: nn.Module) -> None:
        backbone = backbone_of(model, self.name)
        if "inputs_embeds" not in inspect.signature(backbone.forward).parameters:
            raise ConfigError(
                f"method={self.name!r} needs a backbone whose forward takes inputs_embeds; "
                f"{type(backbone).__name__} does not"
            )
        embeddings = _input_embeddings(backbone, self.name)
        weight = embeddings.weight
        token_ids = torch.randint(0, weight.shape[0], (self.num_virtual_tokens,), dtype=torch.long)
        with torch.no_grad():
            init = embeddings(token_ids.to(weight.device))
        PromptEmbedding(init).to(weight.device).install(backbone, self.name)

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's PROMPT_TUNING adapter: the config and ``prompt_embeddings`` (p, d)."""
        layer = _layer(model, self.name)
        config = peft_common_config(model, "PROMPT_TUNING", self.num_virtual_tokens)
        config |= {
            "token_dim": int(layer.embedding.shape[1]),
            "prompt_tuning_init": "RANDOM",  # the values come from the file; RANDOM needs no tokenizer
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }
        return config, {"prompt_embeddings": layer.embedding.detach().float().cpu().contiguous()}


def _layer(model: nn.Module, name: str) -> PromptEmbedding:
    layer = next((m for m in model.modules() if isinstance(m, PromptEmbedding)), None)
    if layer is None:
        raise ConfigError(f"method={name!r} was not applied to this model")
    return layer

"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190).

Sec. 4.1-4.2: the attention of every layer sees p extra key/value pairs in front of the sequence, the
prefix P; only P trains. Sec. 4.3: optimising P directly is unstable, so during training ``P = MLP(P')`` with
P' (p, d_kv) and ``MLP = Linear(d_kv, 512) -> tanh -> Linear(512, 2 L d_kv)`` (METHODS.md). d_kv =
n_kv_heads x head_dim: the paper's d (the hidden size) on a model with as many key/value heads as query heads,
smaller under grouped-query attention (Llama, SmolLM2), where P', the MLP's input and the prefixes all take
that width, as HF PEFT does (its `token_dim`), so the trainable count is PEFT's.
After training only P (p, 2 L d_kv) is needed: `final_state_dict` (the adapter file) holds P alone and loading
it turns the layer into plain prefixes; checkpoints (`adapter_state_dict`) keep P' and the MLP, to train on.
P', the MLP and P are float32 whatever the base dtype (METHODS.md, "Adapter dtype"); P is cast to the model's
dtype when it goes into the cache.

A prefix row is laid out as HF PEFT lays it out: for layer 0 the keys (n_kv, head_dim) then the values, then
layer 1, ... The prefixes go into the attention cache (`virtual_tokens.py`): keys are stored as given (no
rotary embedding), the real tokens sit at positions p, p+1, ... Where the cache cannot hold them the method
refuses at `apply`: encoder-decoder models, backbones whose forward takes no cache, sliding-window or
linear-attention layers (the prefix would slide out of the cache), gradient checkpointing (transformers drops
the cache inside checkpointed layers). Init (as PEFT's): P' ~ N(0, 1), the MLP's Linears at their default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import PeftMethod
from peftbench.methods.registry import register
from peftbench.methods.virtual_tokens import (
    VirtualTokens,
    backbone_of,
    cache_argument,
    peft_common_config,
    positive_int,
)


def _checkpointing(backbone: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules())


def _no_checkpointing(backbone: nn.Module, method: str) -> None:
    if _checkpointing(backbone):
        raise ConfigError(
            f"method={method!r} cannot train with gradient checkpointing: transformers drops the attention "
            "cache, which holds the prefixes, in checkpointed layers; accepted: gradient checkpointing off"
        )


class PrefixEncoder(VirtualTokens):
    """Keys and values for every layer: `transform(embedding)` while reparameterised, then `prefix` alone.

    Every tensor is float32 (Sec. 4.3's P' and MLP, then P); `start` casts P to the model's dtype."""

    def __init__(self, p: int, encoder_hidden: int, layers: int, kv_heads: int, head_dim: int) -> None:
        super().__init__(p)
        self.kv_shape = (layers, kv_heads, head_dim)
        width = kv_heads * head_dim  # d_kv: P' and the MLP's input are as wide as one layer's keys
        fp32 = torch.float32
        # P' (nn.Embedding's N(0, 1) init, as PEFT)
        self.embedding = nn.Parameter(torch.randn(p, width, dtype=fp32))
        self.transform = nn.Sequential(
            nn.Linear(width, encoder_hidden, dtype=fp32),
            nn.Tanh(),
            nn.Linear(encoder_hidden, 2 * layers * width, dtype=fp32),
        )

    @property
    def reparameterised(self) -> bool:
        return "transform" in self._modules

    def prefixes(self) -> torch.Tensor:
        """P, (p, 2 L d_kv): the MLP's output while training, the stored prefixes after `fix`."""
        return self.transform(self.embedding) if self.reparameterised else self.prefix

    def fix(self, prefixes: torch.Tensor) -> None:
        """Drop P' and the MLP; keep `prefixes` as the (trainable) parameter `prefix`."""
        del self.embedding, self.transform
        self.prefix = nn.Parameter(prefixes.detach().clone().float())

    def start(self, backbone: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        """Put the prefixes into the cache (the caller's empty one, or a new DynamicCache)."""
        from transformers import DynamicCache

        if backbone.training and torch.is_grad_enabled():
            _no_checkpointing(backbone, "prefix_tuning")
        key = self.cache_key
        assert key is not None  # checked at attach
        cache = kwargs.get(key)
        if cache is None:
            cache = kwargs[key] = DynamicCache(config=backbone.config)
            use_cache = kwargs.get("use_cache")
            if not (getattr(backbone.config, "use_cache", False) if use_cache is None else use_cache):
                self._drop = key  # the caller asked for no cache: do not hand one back
        layers, heads, head_dim = self.kv_shape
        dtype = backbone.get_input_embeddings().weight.dtype
        values = self.prefixes().to(dtype).view(self.num_virtual_tokens, layers, 2, heads, head_dim)
        values = values.permute(1, 2, 3, 0, 4)  # (L, 2, n_kv, p, head_dim)
        for layer in range(layers):
            k, v = (values[layer, i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
            cache.update(k, v, layer)


def kv_shape(config: Any, method: str) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) from a transformers config; d_kv = kv_heads x head_dim."""
    try:
        layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    except AttributeError as missing:
        raise ConfigError(
            f"method={method!r} cannot size the prefixes: the model config lacks {missing.name}"
        ) from None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return int(layers), int(kv_heads), int(head_dim)


def _check_cache(backbone: nn.Module, method: str) -> str:
    """The backbone's cache argument; ConfigError when its cache cannot hold a prefix for good."""
    from transformers import DynamicCache

    key = cache_argument(backbone)
    if key is None:
        raise ConfigError(
            f"method={method!r} needs a backbone whose forward takes an attention cache (cache or "
            f"past_key_values); {type(backbone).__name__} does not"
        )
    cache = DynamicCache(config=backbone.config)
    if any(cache.is_sliding) or any(getattr(cache, "is_linear", ())):
        raise ConfigError(
            f"method={method!r} cannot prefill {type(backbone).__name__}'s cache: it has sliding-window or "
            "linear-attention layers, out of which the prefix would slide; accepted: full-attention models"
        )
    _no_checkpointing(backbone, method)
    return key


def _layer(model: nn.Module, name: str) -> tuple[str, PrefixEncoder]:
    for qualified, module in model.named_modules():
        if isinstance(module, PrefixEncoder):
            return qualified, module
    raise ConfigError(f"method={name!r} was not applied to this model")


@register
@dataclasses.dataclass
class PrefixTuning(PeftMethod):
    """Key/value prefixes for every layer, reparameterised through an MLP while training (module doc)."""

    name: ClassVar[str] = "prefix_tuning"
    peft_form: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = False  # the initial prefixes already change the function

    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 512  # the MLP's hidden width (Sec. 4.3; METHODS.md)

    def validate(self) -> None:
        positive_int(self.name, "num_virtual_tokens", self.num_virtual_tokens)
        positive_int(self.name, "encoder_hidden_size", self.encoder_hidden_size)

    def attach(self, model: nn.Module) -> None:
        backbone = backbone_of(model, self.name)
        _check_cache(backbone, self.name)
        layers, kv_heads, head_dim = kv_shape(backbone.config, self.name)
        device = backbone.get_input_embeddings().weight.device
        layer = PrefixEncoder(self.num_virtual_tokens, self.encoder_hidden_size, layers, kv_heads, head_dim)
        layer.to(device).install(backbone, self.name)

    # ----- saving: the prefixes only ------------------------------------------------------------------
    def final_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter file: P (p, 2 L d_kv) as `<layer>.prefix`, without P' and the MLP (plus any head)."""
        name, layer = _layer(model, self.name)
        state = {k: v for k, v in self.adapter_state_dict(model).items() if not k.startswith(f"{name}.")}
        with torch.no_grad():
            state[f"{name}.prefix"] = layer.prefixes().detach().float().cpu().contiguous()
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint (P' and the MLP) or a final adapter file (P alone: the layer drops its MLP)."""
        name, layer = _layer(model, self.name)
        prefix = state.get(f"{name}.prefix")
        if prefix is not None and layer.reparameterised:
            device = layer.embedding.device
            layer.fix(torch.zeros(prefix.shape, dtype=torch.float32, device=device))
        super().load_adapter_state_dict(model, state)

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's PREFIX_TUNING adapter as PEFT saves one trained with the MLP: `prefix_projection: true` and
        ``prompt_embeddings`` = P (p, 2 L d_kv), the MLP's output (`get_peft_model_state_dict`); PEFT loads it
        in inference mode, where it uses P directly."""
        _, layer = _layer(model, self.name)
        _, kv_heads, head_dim = layer.kv_shape
        config = peft_common_config(model, "PREFIX_TUNING", self.num_virtual_tokens)
        config |= {
            "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads,
            "encoder_hidden_size": self.encoder_hidden_size,
            "prefix_projection": True,
            "init_weights": None,
        }
        with torch.no_grad():
            prefixes = layer.prefixes().detach().float().cpu().contiguous()
        return config, {"prompt_embeddings": prefixes}

"""Virtual tokens: the mechanism prompt tuning and prefix tuning share (hooks, not wrapped layers).

Both methods put p *virtual* positions in front of every sequence, which callers never see:
- prompt tuning (Lester et al. 2021, arXiv 2104.08691, Sec. 2) fills them with trainable input embeddings;
- prefix tuning (Li & Liang 2021, arXiv 2101.00190, Sec. 4.2) fills them with trainable keys and values in
  every layer, i.e. it prefills the attention cache.

The method's layer (a `VirtualTokens`, an `AdapterLayer`) becomes a child of the transformer backbone: the
module `model.get_decoder()` returns, which the task model calls inside `forward` and `generate` and which the
tasks call directly for hidden states. A forward pre-hook and a forward hook on that backbone do the rest:
- before: arguments become keyword arguments; a 2-D attention mask gets p ones in front; explicit
  `position_ids` move by p (the virtual tokens hold positions 0..p-1, the caller's tokens p, p+1, ...); on a
  call that starts a sequence (no cache, or an empty one) the layer fills the virtual positions (`start`);
- after: the hidden states of the virtual positions are cut off (prompt tuning) and a cache the caller did not
  ask for is dropped, so every output lines up with the caller's `input_ids` and labels (the loss is over the
  same labelled tokens as for the base model).
A call that continues from a non-empty cache (generation after its first step) finds the virtual tokens in the
cache already: only the mask and the positions move. `PeftMethod.disabled()` turns both hooks into no-ops
through `adapter_enabled`. The hooks are bound methods of the layer, so `copy.deepcopy(model)` rebinds them
to the copy's layer.

The layer's trainable tensors (the soft prompt; prefix tuning's P', MLP and prefixes) are float32 whatever the
base dtype, and so are their gradients and optimizer state (METHODS.md, LoRA, "Adapter dtype": bf16 master
weights lose small updates); `start` casts them to the model's dtype where they meet the model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods.base import AdapterLayer

#: the names a backbone's forward may give its attention cache (transformers >= 5 says `cache`)
CACHE_ARGUMENTS = ("cache", "past_key_values")


def positive_int(method: str, key: str, value: Any) -> int:
    """`value` if it is an int >= 1, else a one-line ConfigError naming `method.<key>`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"method.{key}={value!r} is not valid for {method}; accepted: an integer >= 1")
    return value


def backbone_of(model: nn.Module, method: str) -> nn.Module:
    """The transformer the virtual tokens go into: `model.get_decoder()` (the model itself if a backbone).

    ConfigError for encoder-decoder models (the decoder alone would get them, unlike the papers' setting).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            f"method={method!r} needs a transformers model (with a config); got {type(model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"method={method!r} does not support encoder-decoder models ({type(model).__name__}); accepted: "
            "a decoder-only causal LM or an encoder"
        )
    get_decoder = getattr(model, "get_decoder", None)
    backbone = get_decoder() if callable(get_decoder) else None
    return backbone if isinstance(backbone, nn.Module) else model


def forward_parameters(backbone: nn.Module) -> list[str]:
    """Names of the backbone's forward parameters, in order (without *args / **kwargs)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(backbone.forward).parameters.values() if p.kind in kinds]


def cache_argument(backbone: nn.Module) -> str | None:
    """The name under which the backbone's forward takes an attention cache, or None."""
    names = inspect.signature(backbone.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in names), None)


class VirtualTokens(AdapterLayer):
    """Base of the layers that add `num_virtual_tokens` virtual positions in front of every sequence.

    Subclasses implement `start` (fill the virtual positions on a call that starts a sequence) and set
    `in_hidden_states` (whether those positions appear in the hidden states, which are then cut off).
    """

    #: the virtual positions are part of the input sequence (prompt tuning), not only of the cache
    in_hidden_states: bool = False

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.argument_names: list[str] = []
        self.cache_key: str | None = None
        self._strip = False  # set by `before_forward` for `after_forward`: cut the virtual hidden states
        self._drop: str | None = None  # ... and the output field of a cache the caller did not ask for

    def install(self, backbone: nn.Module, name: str) -> None:
        """Become `backbone.<name>` (its tensors float32: module doc) and hook the backbone's forward."""
        self.float()
        self.argument_names = forward_parameters(backbone)
        self.cache_key = cache_argument(backbone)
        backbone.add_module(name, self)
        backbone.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        backbone.register_forward_hook(self.after_forward, with_kwargs=True)

    def start(self, backbone: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        """Fill the virtual positions for a call that starts a sequence (edits `kwargs` in place), in the
        model's dtype (the layer's own tensors are float32)."""
        raise NotImplementedError

    # ----- the hooks ------------------------------------------------------------------------------------
    def before_forward(
        self, backbone: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook: shift the mask and positions by the virtual tokens, fill them when starting."""
        self._strip, self._drop = False, None
        if not self.adapter_enabled:
            return None
        kwargs = {**dict(zip(self.argument_names, args, strict=False)), **kwargs}
        if self.cache_key is not None and self.cache_key != "past_key_values" and "past_key_values" in kwargs:
            kwargs[self.cache_key] = kwargs.pop("past_key_values")
        cache = kwargs.get(self.cache_key) if self.cache_key else None
        inputs = kwargs.get("inputs_embeds")
        inputs = kwargs.get("input_ids") if inputs is None else inputs
        if inputs is None:
            raise ValueError(f"{type(self).__name__}: the backbone got neither input_ids nor inputs_embeds")
        batch, p = inputs.shape[0], self.num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ConfigError(
                    f"{type(self).__name__} needs a 2-D attention mask (batch, length) or none; got "
                    f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}"
                )
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + p
        if cache is None or cache.get_seq_length() == 0:
            self.start(backbone, kwargs, batch)
            self._strip = self.in_hidden_states
        return (), kwargs

    def after_forward(
        self, backbone: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        """Forward hook: cut the virtual positions out of the hidden states; drop an unrequested cache."""
        strip, drop = self._strip, self._drop
        self._strip, self._drop = False, None
        if not (strip or drop):
            return None
        if not hasattr(output, "items"):
            raise ConfigError(
                f"{type(self).__name__} needs the backbone to return a ModelOutput (return_dict=True); got "
                f"{type(output).__name__}"
            )
        fields = dict(output.items())
        if strip:
            p = self.num_virtual_tokens
            fields["last_hidden_state"] = fields["last_hidden_state"][:, p:]
            if fields.get("hidden_states") is not None:
                fields["hidden_states"] = tuple(h[:, p:] for h in fields["hidden_states"])
            if fields.get("attentions") is not None:  # the real queries' rows; they keep the virtual keys
                fields["attentions"] = tuple(a[:, :, p:] for a in fields["attentions"])
        if drop:
            fields.pop(drop, None)
        return type(output)(**fields)


# ----- HF PEFT export ---------------------------------------------------------------------------------------
def peft_task_type(model: nn.Module) -> str:
    """PEFT's task type for the model: CAUSAL_LM (an LM head), SEQ_CLS (a head on a backbone) or
    FEATURE_EXTRACTION (a bare backbone)."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out) and get_out() is not None:
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION" if getattr(model, "base_model", model) is model else "SEQ_CLS"


def peft_common_config(model: nn.Module, peft_type: str, num_virtual_tokens: int) -> dict[str, Any]:
    """The `adapter_config.json` keys every PEFT prompt-learning method writes (method keys come on top).

    `inference_mode` is true: the file holds the finished values, which PEFT then loads without rebuilding
    any training-time parameterisation."""
    config = model.config
    return {
        "peft_type": peft_type,
        "task_type": peft_task_type(model),
        "auto_mapping": None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_virtual_tokens": num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_attention_heads": int(config.num_attention_heads),
        "num_layers": int(config.num_hidden_layers),
    }

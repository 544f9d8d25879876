"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2023, arXiv 2310.11454).

Sec. 3: ``h = W0 x + Λ_b B Λ_d A x`` with one pair of frozen random matrices A (r, in_max) and
B (out_max, r) SHARED by every adapted layer, and two trainable vectors per layer: b (out), init 0, and
d (r), init ``d_initial``. A and B use kaiming-uniform init from a seeded generator, so only the
seed need be stored. A layer of shape (out, in) uses the slices ``A[:, :in]`` and ``B[:out, :]`` (as the
reference implementation and HF PEFT do when shapes differ).

The shared pair lives once per model in a `VeRAProjections` module attached to the model as
``vera_projections``; the layers only refer to it (they do not register it), so ``state_dict`` holds it
once. The adapter file stores the seed and the shapes, not the matrices, and reloading regenerates them.

Export (`peft_export`): HF PEFT's VERA adapter. PEFT draws the same pair from ``projection_prng_key`` (A then
B, kaiming-uniform, on CPU) and slices it the same way; the export sets ``save_projection: true`` and writes
the matrices (``base_model.vera_A`` / ``vera_B``) beside each layer's ``vera_lambda_b`` (b) and
``vera_lambda_d`` (d), so PEFT loads exactly ours rather than trusting its own generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import ConfigError, bad_value
from peftbench.methods.base import AdapterLayer, PeftMethod, adapter_layers
from peftbench.methods.dense import merged_with_delta
from peftbench.methods.lora import adapter_dtype, check_lora_hyperparameters, compute_copy
from peftbench.methods.peft_format import exported, peft_key, peft_layer_config
from peftbench.methods.registry import register
from peftbench.methods.walker import ALL_LINEAR, adapted_part, find_targets, wrap_targets

#: attribute under which the shared projections hang off the model
PROJECTIONS = "vera_projections"
#: adapter-file keys: [seed, r, out_max, in_max] and a float64 checksum of the regenerated matrices
SPEC_KEY = f"{PROJECTIONS}.spec"
CHECKSUM_KEY = f"{PROJECTIONS}.checksum"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`` (kaiming_uniform, a=0) drawn from `generator` on CPU."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen pair shared by every VeRA layer of a model: A (r, in_max) and B (out_max, r), buffers.

    Drawn on CPU from ``torch.Generator().manual_seed(seed)``, A first then B (as HF PEFT does), so the
    same seed gives the same matrices on every platform.
    """

    def __init__(
        self, r: int, in_max: int, out_max: int, seed: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.seed, self.r, self.in_max, self.out_max = seed, r, in_max, out_max
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vera_a = kaiming_uniform((r, in_max), generator)
        vera_b = kaiming_uniform((out_max, r), generator)
        self.register_buffer("vera_A", vera_a.to(device=device, dtype=dtype))
        self.register_buffer("vera_B", vera_b.to(device=device, dtype=dtype))

    def spec(self) -> torch.Tensor:
        return torch.tensor([self.seed, self.r, self.out_max, self.in_max], dtype=torch.int64)

    def checksum(self) -> torch.Tensor:
        return (
            self.vera_A.detach().cpu().double().sum() + self.vera_B.detach().cpu().double().sum()
        ).reshape(1)


class VeRALinear(AdapterLayer):
    """``y = base(x) + b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x))))`` (Sec. 3)."""

    def __init__(
        self, base: nn.Module, projections: VeRAProjections, d_initial: float, dropout: float
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        # a plain reference, not a submodule: the model owns the projections once
        object.__setattr__(self, "projections", projections)
        dtype = adapter_dtype(base)
        device = base.weight.device
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        self.vera_d = nn.Parameter(torch.full((projections.r,), float(d_initial), dtype=dtype, device=device))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:, :in]`` and ``B[:out, :]``."""
        proj: VeRAProjections = self.projections  # type: ignore[assignment]
        return proj.vera_A[:, : self.in_features], proj.vera_B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        """``diag(b) B diag(d) A``, the update this adapter adds to the base weight."""
        vera_a, vera_b = self.sliced()
        return (self.vera_b[:, None] * vera_b) @ (self.vera_d[:, None] * vera_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        vera_a, vera_b = self.sliced()
        h = compute_copy(self.vera_d, x) * F.linear(self.dropout(x), compute_copy(vera_a, x))
        return y + (compute_copy(self.vera_b, x) * F.linear(h, compute_copy(vera_b, x))).to(y.dtype)

    def merged(self) -> nn.Linear:
        """``W = W0 + diag(b) B diag(d) A`` as a plain nn.Linear (dequantized if the base was 4-bit)."""
        return merged_with_delta(self.base, self.delta_weight())


@register
@dataclasses.dataclass
class VeRA(PeftMethod):
    """VeRA on the selected linear layers; per layer only the vectors b and d train."""

    name: ClassVar[str] = "vera"
    mergeable: ClassVar[bool] = True
    peft_form: ClassVar[bool] = True
    size_knob: ClassVar[str | None] = "r"  # trainable d has r entries per layer

    r: int = 256
    d_initial: float = 0.1
    projection_seed: int = 0
    dropout: float = 0.0
    target_modules: str | list[str] = ALL_LINEAR

    def validate(self) -> None:
        check_lora_hyperparameters(self.r, None, self.dropout)  # r > 0, dropout in [0, 1); VeRA has no alpha
        if (
            isinstance(self.d_initial, bool)
            or not isinstance(self.d_initial, int | float)
            or not math.isfinite(self.d_initial)
            or self.d_initial == 0
        ):
            # d = 0 and b = 0 make every gradient zero: the adapter could never leave the base
            raise bad_value("method.d_initial", self.d_initial, "a finite number != 0 (paper: 0.1)")
        seed = self.projection_seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise bad_value("method.projection_seed", seed, "an integer in [0, 2**63)")

    def attach(self, model: nn.Module) -> None:
        if hasattr(model, PROJECTIONS):
            raise ConfigError(f"this model already carries VeRA projections ({PROJECTIONS}); apply VeRA once")
        names = find_targets(model, self.target_modules)
        layers = [model.get_submodule(n) for n in names]
        first = layers[0]
        projections = VeRAProjections(
            self.r,
            in_max=max(m.in_features for m in layers),
            out_max=max(m.out_features for m in layers),
            seed=self.projection_seed,
            dtype=adapter_dtype(first),
            device=first.weight.device,
        )
        model.add_module(PROJECTIONS, projections)
        wrap_targets(
            model, names, lambda _n, layer: VeRALinear(layer, projections, self.d_initial, self.dropout)
        )

    def merge(self, model: nn.Module) -> nn.Module:
        super().merge(model)
        delattr(adapted_part(model), PROJECTIONS)
        return model

    def peft_export(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's VERA adapter: the shared pair once (``base_model.vera_A`` (r, in_max), ``base_model.vera_B``
        (out_max, r)) and per layer ``vera_lambda_b`` (b, out) and ``vera_lambda_d`` (d, r)."""
        layers = {name: layer for name, layer in adapter_layers(model) if isinstance(layer, VeRALinear)}
        projections: VeRAProjections = getattr(model, PROJECTIONS)
        config = peft_layer_config(model, "VERA", layers) | {
            "r": self.r,
            "projection_prng_key": self.projection_seed,
            "save_projection": True,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "bias": "none",
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        # PEFT keeps the pair on its tuner model (`base_model`), not inside the wrapped transformers model
        tensors = {
            "base_model.vera_A": exported(projections.vera_A),
            "base_model.vera_B": exported(projections.vera_B),
        }
        for name, layer in layers.items():
            tensors[peft_key(name, "vera_lambda_b")] = exported(layer.vera_b)
            tensors[peft_key(name, "vera_lambda_d")] = exported(layer.vera_d)
        return config, tensors

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The seed and shapes of the shared projections (not the matrices), plus a checksum."""
        projections: VeRAProjections = getattr(adapted_part(model), PROJECTIONS)
        return {SPEC_KEY: projections.spec(), CHECKSUM_KEY: projections.checksum()}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Check the regenerated projections match the saved seed, shapes and checksum; load b and d."""
        state = dict(state)
        spec, checksum = state.pop(SPEC_KEY, None), state.pop(CHECKSUM_KEY, None)
        projections: VeRAProjections = getattr(adapted_part(model), PROJECTIONS)
        if spec is None or not torch.equal(spec, projections.spec()):
            raise ConfigError(
                f"adapter VeRA projections (seed, r, out_max, in_max) = "
                f"{None if spec is None else spec.tolist()} do not match this model's "
                f"{projections.spec().tolist()}; wrong base model?"
            )
        if checksum is not None and not torch.allclose(checksum, projections.checksum(), rtol=1e-6, atol=0):
            raise ConfigError(
                f"VeRA projections regenerated from projection_seed={projections.seed} differ from the saved "
                "ones (checksum mismatch): a different dtype, or a torch that draws different random numbers"
            )
        super().load_adapter_state_dict(model, state)

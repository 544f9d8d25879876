"""One row per registered method: the promises every method makes, checked on a tiny random Llama.

Adding a method = its file + its conf/method/<name>.yaml + one row in ROWS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from peftbench.methods import METHODS, build_method, check_groups_cover
from peftbench.methods.io import load_adapter, save_adapter
from peftbench.methods.registry import method_config_file
from peftbench.methods.walker import linear_layer_names
from tests.helpers import clone_model, tiny_llama, token_batch

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [model.get_submodule(n) for n in linear_layer_names(model)]


def lora_count(r: int) -> Callable[[nn.Module], int]:
    return lambda model: sum(r * (m.in_features + m.out_features) for m in _linears(model))


def prefix_count(model: nn.Module, p: int, hidden: int) -> int:
    """P' (p x d_kv) + MLP d_kv -> hidden -> 2 L d_kv; d_kv = key/value heads x head size (as PEFT)."""
    d_kv = kv_width(model)
    return p * d_kv + (d_kv + 1) * hidden + (hidden + 1) * 2 * model.config.num_hidden_layers * d_kv


def kv_width(model: nn.Module) -> int:
    """Output width of k_proj / v_proj (grouped-query attention: fewer key/value heads)."""
    c = model.config
    return c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclasses.dataclass
class Row:
    expected_trainable: Callable[[nn.Module], int]
    overrides: dict = dataclasses.field(default_factory=dict)
    #: keyword arguments of tests.helpers.tiny_llama for this row (e.g. BitFit needs biases)
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    #: logits tolerance of the identity at init: 0 (exact) unless the init only cancels up to rounding (PiSSA)
    identity_atol: float = 0.0


ROWS: dict[str, Row] = {
    "lora": Row(lora_count(4), {"r": 4}),
    # fp32 compute: merged == unmerged at the matrix's 1e-5 (bf16 is the yaml default); blocksize 32:
    # bitsandbytes' CPU kernel dequantizes wrongly at 64 for tiny_llama's in_features=32 (see test_qlora)
    "qlora": Row(lora_count(4), {"r": 4, "compute_dtype": "float32", "blocksize": 32}),
    "full": Row(lambda model: sum(p.numel() for p in model.parameters())),  # tied embeddings once
    # tiny_llama ties lm_head to the embeddings: the head stays frozen (train_tied_head: false)
    "partial": Row(lambda model: _numel(model.model.layers[-1]) + _numel(model.model.norm), {"k": 1}),
    "bitfit": Row(lambda model: sum(m.out_features for m in _linears(model)), model_kwargs={"bias": True}),
    "ln_tuning": Row(lambda model: 5 * model.config.hidden_size),  # 2 norms per block x 2 + final norm
    "lora_fa": Row(lambda model: sum(4 * m.out_features for m in _linears(model)), {"r": 4}),
    "vera": Row(lambda model: sum(m.out_features + 8 for m in _linears(model)), {"r": 8}),
    "delta_lora": Row(lora_count(4), {"r": 4, "warmup_steps": 0}),
    "lora_plus": Row(lora_count(4), {"r": 4}),
    # soft prompt: p x d input embeddings; prefix: P' (p x d_kv) and the MLP d_kv -> h -> 2 L d_kv
    "prompt_tuning": Row(lambda model: 4 * model.config.hidden_size, {"num_virtual_tokens": 4}),
    "prefix_tuning": Row(
        lambda model: prefix_count(model, p=4, hidden=16),
        {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    ),
    "dora": Row(lambda model: lora_count(4)(model) + sum(m.out_features for m in _linears(model)), {"r": 4}),
    # the residual W0 - sBA plus sBA gives W0 back only up to fp32 rounding
    "pissa": Row(lora_count(4), {"r": 4}, identity_atol=1e-6),
    # per block: l_k and l_v (k/v_proj outputs) and l_ff (down_proj's input)
    "ia3": Row(
        lambda model: model.config.num_hidden_layers * (2 * kv_width(model) + model.config.intermediate_size)
    ),
    # one adapter after attention and one after the MLP per block: 2 m d + m + d each (Houlsby Sec. 2.1)
    "adapter": Row(
        lambda model: 2 * model.config.num_hidden_layers * ((2 * 8 + 1) * model.config.hidden_size + 8),
        {"bottleneck_size": 8},
    ),
}


def method_config(name: str) -> dict:
    cfg = method_config_file(CONF / f"{name}.yaml")
    return {**cfg, **ROWS[name].overrides}


def test_every_registered_method_has_a_row_and_a_config() -> None:
    assert set(METHODS) == set(ROWS)
    assert {p.stem for p in CONF.glob("*.yaml")} == set(METHODS)


@pytest.fixture(params=sorted(ROWS))
def applied(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module, object]:
    name = request.param
    base = tiny_llama(**ROWS[name].model_kwargs)
    model = clone_model(base)
    torch.manual_seed(0)
    method = build_method(method_config(name))
    method.apply(model)
    return name, base, model, method


def test_trainable_count(applied) -> None:
    name, _, model, method = applied
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    structural = {id(p) for _, p in method.trainable_parameters(model)}
    assert trainable == structural
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ROWS[name].expected_trainable(
        model
    )


def test_groups_cover_every_trainable_parameter_once(applied) -> None:
    _, _, model, method = applied
    check_groups_cover(method.param_groups(model, lr=1e-3, weight_decay=0.01), model)


def test_identity_at_init(applied) -> None:
    name, base, model, method = applied
    if not method.identity_at_init:
        pytest.skip(f"{method.name} does not start from the base function")
    x = token_batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=ROWS[name].identity_atol, rtol=0)


def _train_a_little(model: nn.Module, method) -> None:
    model.train()
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2, weight_decay=0.0))
    for step in range(3):
        loss = model(token_batch(seed=step), labels=token_batch(seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(model, step + 1)
    model.eval()


def test_save_load_round_trip(applied, tmp_path: Path) -> None:
    _, base, model, method = applied
    _train_a_little(model, method)
    path = save_adapter(model, method, tmp_path / "adapter")
    fresh = clone_model(base)
    torch.manual_seed(123)  # a different init: everything must come from the file
    reloaded_method = load_adapter(fresh, path)
    assert reloaded_method.hyperparameters() == method.hyperparameters()
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=1e-6, rtol=0)


def test_merge_equals_unmerged(applied) -> None:
    _, _, model, method = applied
    if not method.mergeable:
        pytest.skip(f"{method.name} cannot merge")
    _train_a_little(model, method)
    x = token_batch()
    with torch.no_grad():
        before = model(x).logits
        method.merge(model)
        after = model(x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert not any(isinstance(m, method_layer_types()) for m in model.modules())


def method_layer_types() -> tuple[type, ...]:
    from peftbench.methods.base import AdapterLayer

    return (AdapterLayer,)

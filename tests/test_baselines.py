"""The baselines (docs/METHODS.md, "Baselines"): full, partial, BitFit and LN tuning train exactly the
structurally selected base parameters: checked by tensor identity, never by name."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.methods import build_method, check_groups_cover
from peftbench.methods.io import load_adapter, save_adapter
from peftbench.methods.ln_tuning import is_norm
from peftbench.methods.partial import find_blocks
from peftbench.methods.registry import method_config_file
from tests.helpers import clone_model, tiny_llama, token_batch

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def method(name: str, **overrides):
    return build_method({**method_config_file(CONF / f"{name}.yaml"), **overrides})


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def ids(*tensors: torch.Tensor) -> set[int]:
    return {id(t) for t in tensors}


def params_of(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def applied(name: str, model: nn.Module | None = None, **overrides) -> tuple[nn.Module, object]:
    model = tiny_llama() if model is None else model
    m = method(name, **overrides)
    m.apply(model)
    structural = {id(p) for _, p in m.trainable_parameters(model)}
    assert structural == trainable_ids(model)  # requires_grad is exactly the structural selection
    check_groups_cover(m.param_groups(model, lr=1e-3, weight_decay=0.0), model)
    return model, m


def gradients_reach_only_trainable(model: nn.Module) -> None:
    x = token_batch()
    model.train()
    model(x, labels=x).loss.backward()
    for param in model.parameters():
        assert (param.grad is not None) == param.requires_grad


# ----- full ----------------------------------------------------------------------------------------


def test_full_trains_everything_and_tied_weights_once() -> None:
    model, m = applied("full")
    assert trainable_ids(model) == params_of(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for _, p in m.trainable_parameters(model)) == sum(
        p.numel() for p in model.parameters()
    )
    assert (m.modifies_base, m.identity_at_init, m.mergeable) == (True, True, False)
    assert m.hyperparameters() == {"name": "full"}


def test_full_state_dict_is_the_whole_model_once() -> None:
    model, m = applied("full")
    state = m.adapter_state_dict(model)
    assert set(state) == {n for n, _ in model.named_parameters()}  # tied head saved once (no buffers here)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters())


def test_full_refuses_a_quantized_model() -> None:
    model = tiny_llama()
    build_method({"name": "qlora", "blocksize": 32}).apply(model)
    with pytest.raises(ConfigError, match="quantized"):
        method("full").apply(model)


# ----- partial -------------------------------------------------------------------------------------


def test_blocks_are_found_structurally() -> None:
    model = tiny_llama()
    name, blocks = find_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers
    with pytest.raises(ConfigError, match="no stack of repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))


@pytest.mark.parametrize("k", [1, 2])
def test_partial_trains_last_k_blocks_final_norm_and_leaves_a_tied_head_frozen(k: int, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="peftbench.methods.partial"):
        model, m = applied("partial", k=k)
    inner = model.model
    expected = params_of(*inner.layers[len(inner.layers) - k :], inner.norm)
    assert trainable_ids(model) == expected
    assert not model.lm_head.weight.requires_grad and not inner.embed_tokens.weight.requires_grad
    assert "tied to the input embeddings" in caplog.text and "FROZEN" in caplog.text
    assert m.hyperparameters() == {"name": "partial", "k": k, "train_tied_head": False}
    gradients_reach_only_trainable(model)


def test_partial_train_tied_head_trains_the_shared_tensor_once(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="peftbench.methods.partial"):
        model, m = applied("partial", k=1, train_tied_head=True)
    inner = model.model
    assert trainable_ids(model) == params_of(inner.layers[-1], inner.norm) | ids(model.lm_head.weight)
    assert inner.embed_tokens.weight.requires_grad  # the same tensor: the embeddings train too
    named = m.trainable_parameters(model)
    assert len(named) == len({id(p) for _, p in named})  # counted once
    assert sum(p.numel() for _, p in named) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "also trains the input embeddings" in caplog.text


def test_partial_untied_head_trains_and_embeddings_stay_frozen() -> None:
    model, _ = applied("partial", model=tiny_llama(tie=False), k=1)
    inner = model.model
    assert trainable_ids(model) == params_of(inner.layers[-1], inner.norm, model.lm_head)
    assert not inner.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("k", [0, -1])
def test_partial_k_below_one_is_a_config_error(k: int) -> None:
    with pytest.raises(ConfigError, match=r"method\.k"):
        method("partial", k=k)


def test_partial_k_above_the_block_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"method.k=3 .*\[1, 2\]"):
        method("partial", k=3).apply(tiny_llama())


# ----- BitFit --------------------------------------------------------------------------------------


def test_bitfit_trains_exactly_the_biases() -> None:
    model, m = applied("bitfit", model=tiny_llama(bias=True))
    biases = [mod.bias for mod in model.modules() if isinstance(mod, nn.Linear) and mod.bias is not None]
    assert len(biases) == 14  # q, k, v, o, gate, up, down x 2 blocks (lm_head has none)
    assert trainable_ids(model) == ids(*biases)
    assert m.hyperparameters() == {"name": "bitfit"}
    gradients_reach_only_trainable(model)


def test_bitfit_includes_layernorm_biases() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    m = method("bitfit")
    m.apply(model)
    assert trainable_ids(model) == ids(model[0].bias, model[1].bias)


def test_bitfit_on_a_model_without_biases_says_so() -> None:
    with pytest.raises(ConfigError, match="model has no bias parameters; BitFit has nothing to train"):
        method("bitfit").apply(tiny_llama())


# ----- LN tuning -----------------------------------------------------------------------------------


def test_ln_tuning_trains_exactly_the_norms() -> None:
    model, m = applied("ln_tuning")
    inner = model.model
    norms = [inner.norm] + [
        n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    assert trainable_ids(model) == params_of(*norms)
    assert m.hyperparameters() == {"name": "ln_tuning"}
    gradients_reach_only_trainable(model)


def test_norms_are_detected_by_class() -> None:
    assert is_norm(nn.LayerNorm(4)) and is_norm(nn.RMSNorm(4)) and is_norm(tiny_llama().model.norm)
    assert not is_norm(nn.Linear(4, 4)) and not is_norm(nn.Embedding(4, 4))
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    method("ln_tuning").apply(model)
    assert trainable_ids(model) == ids(model[1].weight, model[1].bias)
    with pytest.raises(ConfigError, match="no normalisation layer"):
        method("ln_tuning").apply(nn.Sequential(nn.Linear(4, 4)))


# ----- common to the baselines ----------------------------------------------------------------------

BASELINES = [
    ("full", {}, {}),
    ("partial", {"k": 1}, {}),
    ("partial", {"k": 1, "train_tied_head": True}, {}),
    ("bitfit", {}, {"bias": True}),
    ("ln_tuning", {}, {}),
]


@pytest.mark.parametrize(("name", "overrides", "model_kwargs"), BASELINES)
def test_save_load_restores_the_trained_tensors(
    name: str, overrides: dict, model_kwargs: dict, tmp_path
) -> None:
    base = tiny_llama(**model_kwargs)
    model, m = applied(name, model=clone_model(base), **overrides)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    path = save_adapter(model, m, tmp_path / name)
    fresh = clone_model(base)
    reloaded = load_adapter(fresh, path)
    assert reloaded.hyperparameters() == m.hyperparameters()
    trained = dict(model.named_parameters())
    for key, param in fresh.named_parameters():
        torch.testing.assert_close(param, trained[key], atol=0, rtol=0)
    x = token_batch()
    with torch.no_grad():
        assert not torch.equal(fresh(x).logits, base(x).logits)
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["full", "partial", "bitfit", "ln_tuning"])
def test_baselines_have_no_adapter_to_disable_or_merge(name: str) -> None:
    model, m = applied(name, model=tiny_llama(bias=True))
    assert m.modifies_base and m.identity_at_init and not m.mergeable
    with pytest.raises(ConfigError, match="changes the base weights in place"), m.disabled(model):
        pass
    with pytest.raises(ConfigError, match="cannot be merged"):
        m.merge(model)

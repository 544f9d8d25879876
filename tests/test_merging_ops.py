"""Merging several adapters (peftbench.merging): task vectors, their combinations, and back to a LoRA.

HF PEFT's ``peft.utils.merge_utils`` is the oracle for the tensor operations (docs/METHODS.md, "Merging
several adapters"); the hand-made cases check TIES' trim, sign election and disjoint mean and DARE's rescale.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.utils import merge_utils
from torch import nn

from peftbench.errors import ConfigError
from peftbench.merging import combine as C
from peftbench.merging.low_rank import (
    CAT_METHODS,
    LowRank,
    cat,
    factorise,
    linear_weight_names,
    lora_factors,
    to_lora,
    truncated_svd,
)
from peftbench.merging.task_vectors import (
    TaskVector,
    add_to_base,
    base_fingerprint,
    check_same_base,
    methods_with_task_vectors,
    task_vector,
    task_vector_from_adapter,
)
from peftbench.methods import METHODS, build_method
from peftbench.methods.base import adapter_layers
from peftbench.methods.io import save_adapter
from peftbench.methods.lora import LoRA
from tests.helpers import tiny_llama, token_batch


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ----- hand-made task vectors ---------------------------------------------------------------------------
def test_task_arithmetic_by_hand() -> None:
    a = {"w": vec(1, 2, 3), "b": vec(1)}
    b = {"w": vec(-1, 0, 4)}  # no "b": zeros
    merged = C.task_arithmetic([a, b], [0.5, 2.0], scale=0.1)
    torch.testing.assert_close(merged["w"], 0.1 * vec(0.5 - 2, 1, 1.5 + 8))
    torch.testing.assert_close(merged["b"], vec(0.05))


TIES_VECTORS = [
    {"w": vec(3, -1, 0.5, 2, -4)},
    {"w": vec(-2, 1.5, -0.5, 1, 3)},
    {"w": vec(1, -3, 0.2, -0.1, 5)},
]


def test_ties_trim_elect_and_disjoint_mean_by_hand() -> None:
    # density 0.6 of 5 entries: each keeps its 3 largest magnitudes
    trimmed = [C.trim(v["w"], 0.6) for v in TIES_VECTORS]
    assert [t.tolist() for t in trimmed] == [[3, 0, 0, 2, -4], [-2, 1.5, 0, 0, 3], [1, -3, 0, 0, 5]]
    # summed mass [2, -1.5, 0, 2, 4]: elected + - + (0 elects +) + +; zeros never agree
    agree = C.elect_sign(torch.stack(trimmed))
    assert agree.tolist() == [
        [True, False, False, True, False],
        [False, False, False, False, True],
        [True, True, False, False, True],
    ]
    # disjoint mean: (3 + 1) / 2, -3 / 1, nothing -> 0, 2 / 1, (3 + 5) / 2
    torch.testing.assert_close(C.ties(TIES_VECTORS, density=0.6)["w"], vec(2, -3, 0, 2, 4))
    torch.testing.assert_close(C.ties(TIES_VECTORS, density=0.6, scale=0.5)["w"], vec(1, -1.5, 0, 1, 2))
    # weights multiply the agreeing values after the election (PEFT's order): (2 * 3 + 5) / 2 at the end
    weighted = C.ties(TIES_VECTORS, [1.0, 2.0, 1.0], density=0.6)["w"]
    torch.testing.assert_close(weighted, vec(2, -3, 0, 2, 5.5))


def test_dare_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    task = {"w": torch.randn(40, 25)}
    for density in (0.3, 0.7):
        draws = torch.stack([C.dare_linear([task], density=density, seed=s)["w"] for s in range(400)])
        kept = draws != 0
        assert abs(kept.float().mean().item() - density) < 0.01
        # a kept entry is the original divided by the density
        torch.testing.assert_close(draws[kept], (task["w"].expand_as(draws) / density)[kept])
        sigma = task["w"].abs() * math.sqrt((1 / density - 1) / len(draws))
        assert ((draws.mean(dim=0) - task["w"]).abs() <= 5 * sigma + 1e-6).all()


def test_dare_is_seeded_and_density_one_changes_nothing() -> None:
    torch.manual_seed(1)
    tasks = [{"w": torch.randn(6, 5)}, {"w": torch.randn(6, 5)}]
    first = C.dare_ties(tasks, density=0.5, seed=3)["w"]
    torch.testing.assert_close(C.dare_ties(tasks, density=0.5, seed=3)["w"], first, rtol=0, atol=0)
    assert not torch.equal(C.dare_ties(tasks, density=0.5, seed=4)["w"], first)
    torch.testing.assert_close(C.dare_linear(tasks, density=1.0, seed=0), C.task_arithmetic(tasks))
    torch.testing.assert_close(C.dare_ties(tasks, density=1.0, seed=0), C.ties(tasks, density=1.0))


def test_sign_conflict_rate_and_cosine_by_hand() -> None:
    vectors = [{"w": vec(1, -1.5, 0, 2)}, {"w": vec(1.2, 1, 3, 0)}, {"w": vec(0, 2, -1, 0)}]
    # entries with two non-zero values: 0 (agree), 1 (conflict), 2 (conflict); entry 3 has one
    assert C.sign_conflict_rate(vectors) == pytest.approx(2 / 3)
    # trimmed to the top half ([0, -1.5, 0, 2], [1.2, 0, 3, 0], [0, 2, -1, 0]): entry 0 has one value left,
    # entries 1 and 2 still conflict
    assert C.sign_conflict_rate(vectors, density=0.5) == pytest.approx(2 / 2)
    a, b = {"x": vec(1, 0), "y": vec(2)}, {"x": vec(0, 3)}
    assert C.cosine_similarity(a, b) == 0.0
    assert C.cosine_similarity(a, {"x": vec(1, 0), "y": vec(2)}) == pytest.approx(1.0)
    assert C.cosine_similarity({"x": vec(1, 1)}, {"x": vec(1, 0)}) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(C.cosine_similarity(a, {"x": vec(0, 0)}))
    matrix = C.cosine_matrix([a, b, {"x": vec(-1, 0), "y": vec(-2)}])
    assert torch.allclose(matrix, matrix.T) and torch.allclose(
        matrix.diagonal(), torch.ones(3, dtype=torch.float64)
    )
    assert matrix[0, 2] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: C.ties(TIES_VECTORS, density=0), "density=0"),
        (lambda: C.dare_linear(TIES_VECTORS, density=1.5, seed=0), "density=1.5"),
        (lambda: C.task_arithmetic(TIES_VECTORS, [1.0, 2.0]), "weights="),
        (lambda: C.combine("mean", TIES_VECTORS), "how='mean'"),
        (lambda: C.task_arithmetic([{"w": vec(1, 2)}, {"w": vec(1, 2, 3)}]), "shape of 'w'"),
        (lambda: C.task_arithmetic([]), "no task vectors"),
    ],
)
def test_bad_combination_inputs_are_one_line_config_errors(call: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        call()
    one_line(err)


# ----- agreement with peft.utils.merge_utils ------------------------------------------------------------
def random_vectors(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (12, 7), "b.bias": (13,), "c.weight": (5, 9)}
    return [{n: torch.randn(s, generator=generator) for n, s in shapes.items()} for _ in range(3)]


WEIGHTS = [0.7, 1.3, -0.4]


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
def test_combinations_agree_with_peft(density: float) -> None:
    vectors = random_vectors()
    w = torch.tensor(WEIGHTS)
    ours = {
        "task_arithmetic": C.task_arithmetic(vectors, WEIGHTS),
        "ties": C.ties(vectors, WEIGHTS, density=density),
        "dare_linear": C.dare_linear(vectors, WEIGHTS, density=density, seed=11),
        "dare_ties": C.dare_ties(vectors, WEIGHTS, density=density, seed=11),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        theirs: dict[str, dict[str, torch.Tensor]] = {
            "task_arithmetic": {
                n: merge_utils.task_arithmetic([v[n] for v in vectors], w) for n in vectors[0]
            },
            "ties": {n: merge_utils.ties([v[n] for v in vectors], w, density) for n in vectors[0]},
        }
        for how, function in (("dare_linear", merge_utils.dare_linear), ("dare_ties", merge_utils.dare_ties)):
            torch.manual_seed(11)  # PEFT draws from the global generator: the same stream, name by name
            theirs[how] = {n: function([v[n] for v in vectors], w, density) for n in sorted(vectors[0])}
    for how in ours:
        for name in vectors[0]:
            torch.testing.assert_close(ours[how][name], theirs[how][name], rtol=1e-6, atol=1e-6)
    # the scale multiplies the result
    scaled = C.combine("ties", vectors, WEIGHTS, density=density, scale=0.3)
    for name in vectors[0]:
        torch.testing.assert_close(scaled[name], 0.3 * theirs["ties"][name])


def test_the_steps_agree_with_peft() -> None:
    vectors = random_vectors(1)
    stack = torch.stack([v["a.weight"] for v in vectors])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for density in (0.1, 0.5, 1.0):
            for t in stack:
                assert torch.equal(C.trim(t, density), merge_utils.prune(t, density, method="magnitude"))
            pruned = torch.stack([C.trim(t, density) for t in stack])
            mask = merge_utils.calculate_majority_sign_mask(pruned, method="total")
            assert torch.equal(C.elect_sign(pruned), mask)
            assert torch.equal(C.disjoint_mean(pruned, mask), merge_utils.disjoint_merge(pruned, mask))
            # magnitude_prune is PEFT's trim then task arithmetic
            ours = C.task_arithmetic([{"x": C.trim(t, density)} for t in stack], WEIGHTS)["x"]
            theirs = merge_utils.magnitude_prune(list(stack), torch.tensor(WEIGHTS), density)
            torch.testing.assert_close(ours, theirs)
    torch.manual_seed(5)
    theirs = merge_utils.prune(stack[0], 0.4, method="random", rescale=True)
    ours = C.dare_drop(stack[0], 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(ours, theirs)


def test_trim_keeps_floor_of_density_times_n_where_peft_loses_one_to_rounding() -> None:
    t = torch.arange(1, 101, dtype=torch.float32)
    assert int((C.trim(t, 0.29) != 0).sum()) == 29  # 0.29 * 100 = 28.999999999999996
    assert int((merge_utils.prune(t, 0.29, method="magnitude") != 0).sum()) == 28
    assert int((C.trim(t, 0.3) != 0).sum()) == 30


# ----- task vectors of trained methods ------------------------------------------------------------------
METHOD_CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "rslora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "rslora": True},
    "lora_plus": {"name": "lora_plus", "r": 4, "alpha": 8, "dropout": 0.0},
    "lora_fa": {"name": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0},
    "vera": {"name": "vera", "r": 8},
    "ia3": {"name": "ia3"},
    "dora": {"name": "dora", "r": 4, "alpha": 8, "dropout": 0.0},
    "pissa": {"name": "pissa", "r": 4, "alpha": 4},
    "delta_lora": {"name": "delta_lora", "r": 4, "alpha": 8, "warmup_steps": 0},
    "full": {"name": "full"},
    "partial": {"name": "partial", "k": 1},
    "bitfit": {"name": "bitfit"},
    "ln_tuning": {"name": "ln_tuning"},
}


@torch.no_grad()
def trained(base: nn.Module, config: dict[str, Any], seed: int = 0) -> tuple[nn.Module, Any]:
    """A copy of `base` with the method applied and every trainable tensor moved as if trained (Delta-LoRA
    also moves W0 through its own update, PiSSA starts from its residual)."""
    model = copy.deepcopy(base)
    method = build_method(config)
    method.apply(model)
    generator = torch.Generator().manual_seed(seed)

    def move() -> None:
        for _, param in method.trainable_parameters(model):
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))

    move()
    if config["name"] == "delta_lora":
        method.after_optimizer_step(model, 1)  # W0 += 2 s (B A - B_prev A_prev)
        move()
    return model.eval(), method


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama(bias=True)  # biases: IA3's output scale changes them, BitFit trains them


def test_every_method_with_a_task_vector_is_covered() -> None:
    assert {c["name"] for c in METHOD_CONFIGS.values()} | {"qlora"} == set(methods_with_task_vectors())


@pytest.mark.parametrize("how", C.COMBINATIONS)
@pytest.mark.parametrize("label", sorted(METHOD_CONFIGS))
def test_one_adapter_with_weight_one_is_the_single_adapter_merge(
    base: nn.Module, label: str, how: str
) -> None:
    before = base_fingerprint(base)
    model, method = trained(base, METHOD_CONFIGS[label])
    vector = task_vector(model, method, base)
    assert vector.method == method.name and vector.base == before
    assert vector.deltas and all(d.dtype == torch.float32 for d in vector.deltas.values())
    assert any(bool(d.any()) for d in vector.deltas.values())
    merged = add_to_base(copy.deepcopy(base), C.combine(how, [vector.deltas], [1.0], density=1.0, seed=0))
    reference = method.merge(model) if method.mergeable else model  # PeftMethod.merge: W0 + the adapter
    ours, theirs = parameters(merged), parameters(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=2e-6, msg=name)
    x = token_batch()
    torch.testing.assert_close(merged(x).logits, reference(x).logits, rtol=1e-4, atol=1e-4)
    assert base_fingerprint(base) == before  # the base was not touched


def test_task_vectors_are_relative_to_the_original_base(base: nn.Module) -> None:
    model, method = trained(base, METHOD_CONFIGS["pissa"])
    vector = task_vector(model, method, base)
    for name, layer in adapter_layers(model):
        expected = layer.scaling * (layer.lora_B @ layer.lora_A - layer.init_B @ layer.init_A)
        torch.testing.assert_close(vector.deltas[f"{name}.weight"], expected, rtol=1e-4, atol=1e-6)
    model, method = trained(base, METHOD_CONFIGS["lora"])
    vector = task_vector(model, method, base)
    layers = dict(adapter_layers(model))
    assert vector.deltas.keys() == {f"{n}.weight" for n in layers}  # unchanged biases left out
    for name, layer in layers.items():
        assert torch.equal(vector.deltas[f"{name}.weight"], layer.delta_weight())


@pytest.mark.parametrize("label", ["pissa", "delta_lora", "full", "vera"])
def test_from_the_adapter_file_on_the_original_base(base: nn.Module, label: str, tmp_path: Path) -> None:
    model, method = trained(base, METHOD_CONFIGS[label])
    save_adapter(model, method, tmp_path)
    before = base_fingerprint(base)
    loaded = task_vector_from_adapter(base, tmp_path)
    direct = task_vector(model, method, base)
    assert base_fingerprint(base) == before and loaded.base == before
    assert loaded.deltas.keys() == direct.deltas.keys()
    for name in direct.deltas:
        torch.testing.assert_close(loaded.deltas[name], direct.deltas[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("label", ["lora", "dora", "ia3", "delta_lora"])
def test_a_bf16_base_gives_the_fp32_task_vector(label: str) -> None:
    base16 = tiny_llama(bias=True).to(torch.bfloat16)
    model16, method = trained(base16, METHOD_CONFIGS[label])
    vector16 = task_vector(model16, method, base16)
    assert all(layer.base.weight.dtype == torch.bfloat16 for _, layer in adapter_layers(model16))
    model32, base32 = copy.deepcopy(model16).float(), copy.deepcopy(base16).float()
    if label == "delta_lora":  # the fp32 twin's W0 is the bf16 model's fp32 master
        for _, layer in adapter_layers(model32):
            layer.base.weight.copy_(layer.w0_master)
    vector32 = task_vector(model32, method, base32)
    assert vector16.base == vector32.base  # the same values: one base
    assert vector16.deltas.keys() == vector32.deltas.keys()
    for name in vector32.deltas:
        torch.testing.assert_close(vector16.deltas[name], vector32.deltas[name], rtol=1e-5, atol=1e-6)


def test_qlora_task_vector_is_its_lora_update() -> None:
    pytest.importorskip("bitsandbytes")
    base = tiny_llama(hidden=64, intermediate=128)  # bitsandbytes' CPU kernel needs a blocksize of width
    config = {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "compute_dtype": "float32"}
    try:
        model, method = trained(base, config)
    except ConfigError as err:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(str(err))
    vector = task_vector(model, method, base)
    layers = dict(adapter_layers(model))
    assert vector.deltas.keys() == {f"{n}.weight" for n in layers}
    for name, layer in layers.items():
        assert torch.equal(vector.deltas[f"{name}.weight"], layer.delta_weight())
    factors = lora_factors(model, method)
    assert factors.keys() == vector.deltas.keys()


# ----- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{"name": "prompt_tuning", "num_virtual_tokens": 4}, {"name": "adapter"}])
def test_methods_without_task_vectors_are_refused_in_one_line(
    base: nn.Module, config: dict[str, Any], tmp_path: Path
) -> None:
    model = copy.deepcopy(base)
    method = build_method(config)
    method.apply(model)
    with pytest.raises(ConfigError, match=f"method={config['name']!r} has no task vector") as err:
        task_vector(model, method, base)
    assert "accepted: " in one_line(err) and "lora" in str(err.value) and "full" in str(err.value)
    save_adapter(model, method, tmp_path)
    with pytest.raises(ConfigError, match="has no task vector") as err:
        task_vector_from_adapter(base, tmp_path)
    one_line(err)


def test_runs_on_different_bases_are_refused_in_one_line(base: nn.Module) -> None:
    other = tiny_llama(seed=1, bias=True)
    assert base_fingerprint(other) != base_fingerprint(base)
    a = task_vector(*trained(base, METHOD_CONFIGS["lora"]), base)
    b = task_vector(*trained(other, METHOD_CONFIGS["lora"]), other)
    assert check_same_base([a, a], ["A", "B"]) == a.base
    with pytest.raises(ConfigError, match="'B' was trained on a different base model than 'A'") as err:
        check_same_base([a, b], ["A", "B"])
    one_line(err)
    # the fingerprint is over values: a bf16 copy is another base; its fp32 twin holds the same values
    as16 = copy.deepcopy(base).to(torch.bfloat16)
    assert base_fingerprint(as16) != base_fingerprint(base)
    assert base_fingerprint(copy.deepcopy(as16).float()) == base_fingerprint(as16)
    # one changed entry is enough
    patched = copy.deepcopy(base)
    with torch.no_grad():
        patched.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert base_fingerprint(patched) != base_fingerprint(base)


def test_an_adapter_on_another_base_is_refused(base: nn.Module) -> None:
    model, method = trained(base, METHOD_CONFIGS["lora"])
    with pytest.raises(ConfigError, match="differs from the base model's") as err:
        task_vector(model, method, tiny_llama(seed=1, bias=True))
    one_line(err)
    with pytest.raises(ConfigError, match="not a parameter of this model") as err:
        add_to_base(copy.deepcopy(base), {"nowhere.weight": torch.zeros(1)})
    one_line(err)


# ----- back to a LoRA -----------------------------------------------------------------------------------
def test_svd_at_full_rank_is_exact() -> None:
    delta = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    for scaling in (1.0, 2.5):
        factors, error = truncated_svd(delta, 6, scaling)
        assert factors.B.shape == (9, 6) and factors.A.shape == (6, 6) and factors.scaling == scaling
        torch.testing.assert_close(factors.dense(), delta, rtol=0, atol=1e-5)
        assert error < 1e-6
    padded, error = truncated_svd(delta, 8)  # more than the matrix holds: zero-padded, still exact
    assert padded.rank == 8 and error < 1e-6
    torch.testing.assert_close(padded.dense(), delta, rtol=0, atol=1e-5)
    assert truncated_svd(torch.zeros(3, 4), 2)[1] == 0.0


def test_svd_at_lower_rank_reports_the_truncation_error() -> None:
    generator = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(7, 3, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(5, 3, generator=generator))
    delta = u @ torch.diag(vec(3, 2, 1)) @ v.T
    for rank, expected in ((1, math.sqrt(5 / 14)), (2, math.sqrt(1 / 14))):
        factors, error = truncated_svd(delta, rank, scaling=0.5)
        assert error == pytest.approx(expected, rel=1e-5)
        measured = torch.linalg.norm(delta - factors.dense()) / torch.linalg.norm(delta)
        assert float(measured) == pytest.approx(expected, rel=1e-4)
    deltas = {"a.weight": delta, "b.weight": 2 * delta, "a.bias": vec(1, 2)}
    result = factorise(deltas, 1, linear={"a.weight", "b.weight"})
    assert result.remainder.keys() == {"a.bias"} and result.factors.keys() == {"a.weight", "b.weight"}
    assert result.error == pytest.approx(math.sqrt(5 / 14), rel=1e-5)
    with pytest.raises(ConfigError, match="rank=0") as err:
        truncated_svd(delta, 0)
    one_line(err)


def test_merged_lora_runs_factorise_into_a_lora_that_computes_the_merge() -> None:
    plain = tiny_llama(bias=True)
    vectors = [task_vector(*trained(plain, METHOD_CONFIGS["lora"], seed=s), plain).deltas for s in (0, 1)]
    merged = C.task_arithmetic(vectors, [0.6, 0.8])
    result = factorise(merged, 8, linear_weight_names(plain), scaling=2.0)  # two rank-4 updates: rank <= 8
    assert not result.remainder and result.error < 1e-5
    config, state = to_lora(result.factors)
    assert config["r"] == 8 and config["alpha"] == 16.0
    lora_model = copy.deepcopy(plain)
    method = build_method(config)
    method.apply(lora_model)
    method.load_adapter_state_dict(lora_model, state)
    dense_model = add_to_base(copy.deepcopy(plain), merged)
    x = token_batch()
    torch.testing.assert_close(lora_model.eval()(x).logits, dense_model(x).logits, rtol=1e-4, atol=1e-4)


def test_cat_equals_the_weighted_sum_of_the_dense_updates(base: nn.Module) -> None:
    runs = [
        trained(base, METHOD_CONFIGS["lora"], seed=0),
        trained(base, {**METHOD_CONFIGS["rslora"], "r": 2, "target_modules": ["q_proj", "v_proj"]}, seed=1),
        trained(base, METHOD_CONFIGS["lora_fa"], seed=2),
    ]
    weights = [0.7, -1.2, 0.5]
    merged = cat([lora_factors(m, method) for m, method in runs], weights, scaling=0.5)
    dense = C.task_arithmetic([task_vector(m, method, base).deltas for m, method in runs], weights)
    assert merged.keys() == dense.keys()
    for name, factors in merged.items():
        assert factors.rank == 4 + 2 + 4 and factors.scaling == 0.5
        torch.testing.assert_close(factors.dense(), dense[name], rtol=0, atol=1e-6)
    single = cat([lora_factors(*runs[0])])
    for name, factors in lora_factors(*runs[0]).items():
        torch.testing.assert_close(single[name].dense(), factors.dense(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("label", ["dora", "pissa", "delta_lora", "vera", "ia3"])
def test_cat_refuses_what_is_not_plain_lora(base: nn.Module, label: str) -> None:
    with pytest.raises(ConfigError, match="how=cat needs plain LoRA-form runs") as err:
        lora_factors(*trained(base, METHOD_CONFIGS[label]))
    assert "accepted: lora, lora_fa, lora_plus, qlora" in one_line(err)


def test_cat_methods_are_exactly_the_plain_lora_subclasses(base: nn.Module) -> None:
    """Guards CAT_METHODS against a new LoRA variant: the structural check decides, the list names it."""
    for name, cls in METHODS.items():
        if not issubclass(cls, LoRA) or name == "qlora":  # qlora: covered with a 4-bit-sized model above
            continue
        model, method = trained(base, {"name": name})
        try:
            lora_factors(model, method)
            plain = True
        except ConfigError:
            plain = False
        assert plain == (name in CAT_METHODS), name


def test_low_rank_helpers_refuse_mixed_shapes() -> None:
    a = {"x.weight": LowRank(torch.ones(3, 1), torch.ones(1, 2))}
    b = {"x.weight": LowRank(torch.ones(4, 1), torch.ones(1, 2))}
    with pytest.raises(ConfigError, match="disagree on the shape") as err:
        cat([a, b])
    one_line(err)
    with pytest.raises(ConfigError, match="one rank") as err:
        to_lora({**a, "y.weight": LowRank(torch.ones(3, 2), torch.ones(2, 2))})
    one_line(err)


def test_task_vector_record() -> None:
    vector = TaskVector("lora", "sha256:0", {"a": torch.zeros(2, 3), "b": torch.zeros(4)})
    assert vector.numel() == 10

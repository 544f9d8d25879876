"""The run path's performance options (issue #8, "ways there"): `task.group_by_length` (length-grouped
batches and the padding fraction in the record), `model.gradient_checkpointing` and `trainer.compile`.

Each option must leave the computation alone: grouping changes which examples share a batch but keeps every
example exactly once per epoch (and DDP's sharding), checkpointing gives the same gradients, compiling the
same losses. Speed and memory are measured by the benchmark (`python -m peftbench.bench`), never here.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftbench.tasks.sampler as sampler_module
from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.padding import PaddingStats, mask_counts
from peftbench.tasks.collate import CausalLMCollator, Encoded
from peftbench.tasks.loaders import make_loader
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.sampler import ResumableSampler, group_by_length, grouped_order, resumable_train_loader
from tests.conftest import tiny_model_cfg
from tests.test_resume import run_cli


def varied_examples(n: int, seed: int = 0, low: int = 3, high: int = 60) -> list[Encoded]:
    """`n` examples of lengths uniform in [low, high] (prompt + target); the first token is the index."""
    rng = random.Random(seed)
    return [Encoded([i] + [1] * (rng.randint(low, high) - 3), [7, 2], str(i)) for i in range(n)]


def padding_fraction(loader: Any) -> float:
    tokens = positions = 0
    for batch in loader:
        t, p = mask_counts(batch)
        tokens, positions = tokens + t, positions + p
    return 1 - tokens / positions


def train_loader(data: list[Encoded], batch_size: int, seed: int = 0, grouped: bool = True) -> Any:
    loader = resumable_train_loader(make_loader(data, batch_size, CausalLMCollator(0), True, seed), seed)
    return group_by_length(loader) if grouped else loader


# ----- task.group_by_length ------------------------------------------------------------------------------
def test_group_by_length_lowers_padding_and_keeps_every_example_once_per_epoch() -> None:
    data = varied_examples(203)
    plain, grouped = train_loader(data, 4, grouped=False), train_loader(data, 4)
    for epoch in (0, 1):
        for loader in (plain, grouped):
            loader.sampler.set_epoch(epoch)
        seen = [int(i) for batch in grouped for i in batch["input_ids"][:, 0]]
        assert sorted(seen) == list(range(len(data)))  # every example exactly once
        ungrouped, less = padding_fraction(plain), padding_fraction(grouped)
        assert ungrouped > 0.25 and less < 0.1 * ungrouped, (ungrouped, less)
    # the batches hold similar lengths, and their order is still shuffled (not sorted by length)
    widths = [batch["input_ids"].shape[1] for batch in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_grouped_order_is_deterministic_per_seed_and_epoch() -> None:
    lengths = [random.Random(1).randint(1, 100) for _ in range(57)]

    def order(seed: int, epoch: int) -> list[int]:
        sampler = ResumableSampler(57, seed=seed)
        sampler.group_by_length(lengths, batch_size=4)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0) and order(0, 1) == order(0, 1)
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)
    # within a group of 4 the lengths are sorted (one mega-batch here): a group spans few lengths
    first = order(0, 0)
    spans = [
        max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in zip(*[iter(first)] * 4, strict=False)
    ]
    assert max(spans) < 20
    # a permutation with the partial group last, and no sorting without a generator other than by length
    assert sorted(grouped_order(list(range(10)), [3] * 10, 4, None)) == list(range(10))


def test_group_by_length_shards_like_one_process_with_a_bigger_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r's k-th batch of size B is its share of the single-process k-th batch of size 2B: DDP with 2 x B
    trains on exactly the examples one process with 2B does, grouped alike."""
    lengths = [random.Random(2).randint(1, 80) for _ in range(23)]
    one = ResumableSampler(23, seed=5)
    one.group_by_length(lengths, batch_size=4)
    whole = list(one)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(sampler_module, "replicas", lambda rank=rank: (2, rank))
        shard = ResumableSampler(23, seed=5)
        shard.group_by_length(lengths, batch_size=2)
        assert len(shard) == 12
        shards.append(list(shard))
    padded = whole + whole[:1]  # 23 -> 24: the start repeats, as DistributedSampler pads
    for k in range(6):
        assert sorted(shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2]) == sorted(
            padded[4 * k : 4 * k + 4]
        )
    assert set(shards[0]) | set(shards[1]) == set(range(23))


def test_group_by_length_resumes_mid_epoch() -> None:
    lengths = list(range(1, 31))
    full = ResumableSampler(30, seed=3)
    full.group_by_length(lengths, 3)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(30, seed=3)
    resumed.group_by_length(lengths, 3)
    resumed.resume_at(epoch=2, skip=9)
    resumed.set_epoch(2)
    assert list(resumed) == order[9:]


def test_group_by_length_needs_the_plain_loader_and_a_bool() -> None:
    from torch.utils.data import DataLoader

    from peftbench.validation import load_config, validate_config

    with pytest.raises(ConfigError, match=r"task\.group_by_length=true"):
        group_by_length(DataLoader(list(range(4)), batch_size=2))
    with pytest.raises(ConfigError, match=r"task.group_by_length='yes' is not valid; accepted: true, false"):
        validate_config(load_config(["experiment=smoke", "+task.group_by_length=yes"]))
    with pytest.raises(ConfigError, match=r"trainer\.compile=1 is not valid"):
        validate_config(load_config(["experiment=smoke", "trainer.compile=1"]))
    _, task = validate_config(load_config(["experiment=smoke", "+task.group_by_length=true"]))
    assert task.name == "summarization"


def test_padding_stats_count_padded_positions() -> None:
    stats = PaddingStats()
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    stats.on_train_batch_start(None, None, batch, 0)  # type: ignore[arg-type]
    stats.on_train_batch_start(None, None, {"attention_mask": torch.ones(1, 4, dtype=torch.long)}, 1)  # type: ignore[arg-type]
    assert stats.summary() == {"fraction": 3 / 12, "padded_tokens": 3, "positions": 12}
    restored = PaddingStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.summary() == stats.summary()
    assert PaddingStats().summary()["fraction"] is None


@pytest.mark.slow
def test_run_records_the_padding_fraction(tmp_path: Path) -> None:
    """One short CLI run with grouping and gradient checkpointing: the record states the padding (the
    padded positions plus the trained tokens are all positions). Slow: a CLI run, about 30 s here."""
    proc = run_cli(
        [
            "experiment=smoke",
            "logger=none",
            "task.split.max_train=16",
            "batch_size=4",
            "trainer.max_steps=4",
            "+task.group_by_length=true",
            "+model.gradient_checkpointing=true",
        ],
        tmp_path / "run",
        tmp_path / "results",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    padding = record["padding"]
    assert padding["group_by_length"] is True and padding["positions"] > 0
    assert padding["positions"] - padding["padded_tokens"] == record["train_tokens"]
    assert 0 <= padding["fraction"] < 1


# ----- model.gradient_checkpointing ----------------------------------------------------------------------
def _lora_grads(checkpointing: bool, dropout: float) -> tuple[dict[str, torch.Tensor], float, int]:
    """LoRA gradients of one training step on the tiny model; also the loss and how often q_proj ran."""
    from peftbench.models import load_model

    model, _ = load_model(tiny_model_cfg(gradient_checkpointing=checkpointing))
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": dropout})
    torch.manual_seed(0)
    method.apply(model)
    with torch.no_grad():  # B = 0 at init would give A no gradient: make both non-zero
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.02)
    model.train()
    calls = []
    q_proj = model.get_decoder().layers[0].self_attn.q_proj
    q_proj.register_forward_hook(lambda *args: calls.append(1))
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(7)  # the same dropout masks in both runs
    loss, _ = target_token_loss(model, ids, mask, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, float(loss), len(calls)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_gradients(dropout: float) -> None:
    plain, loss_plain, calls_plain = _lora_grads(False, dropout)
    checkpointed, loss_ckpt, calls_ckpt = _lora_grads(True, dropout)
    assert (calls_plain, calls_ckpt) == (1, 2)  # the layer really is recomputed in the backward pass
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_bad_value_is_one_line() -> None:
    from peftbench.models import load_model

    with pytest.raises(ConfigError, match=r"model.gradient_checkpointing='on' is not valid; accepted: true"):
        load_model(tiny_model_cfg(gradient_checkpointing="on"))


# ----- trainer.compile -----------------------------------------------------------------------------------
def _train_losses(model: torch.nn.Module, method: Any, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
    generator = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (2, 16), generator=generator)
        loss, _ = target_token_loss(model, ids, torch.ones_like(ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_compile_gives_the_same_losses_and_names(tiny_model: torch.nn.Module) -> None:
    """`trainer.compile=true` (the module's configure_model hook): same losses over a few steps, and the
    adapter's names (checkpoints, adapter files) without `_orig_mod.`. Slow: a cold inductor cache compiles
    for about a minute on a 2-core CPU."""
    from peftbench.module import PeftModule

    method = build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    method.apply(tiny_model)
    eager = copy.deepcopy(tiny_model)
    module = PeftModule(tiny_model, method, task=None, optim=None, compile=True)
    module.configure_model()
    module.configure_model()  # Lightning calls it before every fit/test: compiled once
    assert module.compiled == ["model.layers.0", "model.layers.1"]
    names = list(method.adapter_state_dict(tiny_model))
    assert names == list(method.adapter_state_dict(eager)) and not any("_orig_mod" in n for n in names)
    assert not any("_orig_mod" in n for n in tiny_model.state_dict())
    tiny_model.train()
    eager.train()
    compiled_losses = _train_losses(tiny_model, method, 3)
    eager_losses = _train_losses(eager, method, 3)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_losses[-1] < compiled_losses[0]
    for name, tensor in method.adapter_state_dict(eager).items():
        torch.testing.assert_close(method.adapter_state_dict(tiny_model)[name], tensor, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_run_with_compile_saves_plain_adapter_names(tmp_path: Path) -> None:
    """`trainer.compile=true` through the CLI: the adapter file and the checkpoint keep the plain names.
    Slow: training, validation and test each compile (minutes on a 2-core CPU with a cold cache)."""
    proc = run_cli(
        [
            "experiment=smoke",
            "logger=none",
            "trainer.compile=true",
            "checkpoint.every_n_steps=1",
            "checkpoint.keep_on_success=true",
        ],
        tmp_path / "run",
        tmp_path / "results",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert adapter and not any("_orig_mod" in name for name in adapter)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("model.model.layers.") for k in last["state_dict"]), list(last["state_dict"])[:3]


# ----- the benchmark shows the padding fraction ----------------------------------------------------------
def test_bench_batches_with_varied_lengths_report_padding() -> None:
    from peftbench.bench import batch_info, make_batches, parse_settings
    from tests.test_bench import compose_bench

    overrides = ["bench.batch_size=4", "bench.seq_len=64", "bench.min_seq_len=8", "bench.timed_steps=6"]
    plain = parse_settings(compose_bench(overrides))
    grouped = parse_settings(compose_bench([*overrides, "bench.group_by_length=true"]))
    infos = {}
    for settings in (plain, grouped):
        batches = make_batches(1000, settings)
        assert len(batches) == 6 and all(b["input_ids"].shape[0] == 4 for b in batches)
        infos[settings.group_by_length] = batch_info(batches, settings)
    assert infos[False]["tokens"] == infos[True]["tokens"]  # the same rows, batched differently
    assert infos[True]["padding_fraction"] < 0.5 * infos[False]["padding_fraction"]
    assert infos[True]["group_by_length"] is True and infos[False]["lengths"] == "uniform in [8, 64]"
    default = batch_info(make_batches(1000, parse_settings(compose_bench([]))))
    assert default["padding_fraction"] == 0 and default["batches"] == 1
    with pytest.raises(ConfigError, match=r"bench\.min_seq_len=64 is not valid"):
        parse_settings(compose_bench(["bench.seq_len=32", "bench.min_seq_len=64"]))

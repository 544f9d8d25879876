"""The speed / memory benchmark (`python -m peftbench.bench`) on the tiny random Llama: it runs end to end
against HF PEFT, writes every JSON field, splits memory sensibly and fails bad input in one line.

Timings are never asserted (a shared 2-core machine): only that they exist and are positive.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from peftbench.bench import parse_settings, ratios, resolve_methods
from peftbench.bench.__main__ import translate_argv
from peftbench.bench.memory_split import SavedTensorBytes, grad_bytes, optimizer_state_bytes
from peftbench.bench.timing import time_steps
from peftbench.errors import ConfigError
from tests.helpers import run_module

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# tiny and quick: 2 x 32 tokens, one step per repeat, two repeats
TINY = [
    "model=tiny_llama",
    "bench.batch_size=2",
    "bench.seq_len=32",
    "bench.warmup_steps=1",
    "bench.timed_steps=1",
    "bench.repeats=2",
]
ROW_FIELDS = {
    "impl",
    "status",
    "step_s",
    "tokens_per_s",
    "tokens_per_step",
    "memory",
    "params",
    "loss_first",
    "loss_path",
    "model_flops_per_step",
    "mfu",
    "build_s",
    "notes",
}
MEMORY_FIELDS = {
    "peak_bytes",
    "process_peak_bytes",
    "baseline_bytes",
    "after_build_bytes",
    "weights_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "activation_bytes",
    "activation_tensors",
    "split_sum_bytes",
}
STEP_FIELDS = {"median", "min", "max", "spread", "stdev", "samples", "steps_per_repeat", "warmup_steps"}
TOP_FIELDS = {
    "schema_version",
    "command",
    "created",
    "machine",
    "model",
    "settings",
    "batch",
    "loss_path",
    "memory_method",
    "flops_method",
    "results",
    "sweeps",
    "wall_s",
}
MACHINE_FIELDS = {
    "cpu_model",
    "cpu_cores",
    "torch_threads",
    "git_commit",
    "git_dirty",
    "versions",
    "load_average_start",
    "load_average_end",
}


def compose_bench(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="bench/default", overrides=overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return run_module("peftbench.bench", args, env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI run: lora, lora_fa (dropout 0.05) and delta_lora against PEFT, plus a small sweep."""
    tmp = tmp_path_factory.mktemp("bench")
    proc = run_cli(
        [
            *TINY,
            "methods=[lora,lora_fa,delta_lora]",
            "bench.sweep.enabled=true",
            "bench.sweep.methods=[lora]",
            "bench.sweep.seq_len=[16,32]",
            "bench.sweep.r=[2,4]",
            "bench.sweep.models=[tiny_llama]",
            f"hydra.run.dir={tmp}/run",
            "--out",
            "out/tiny.json",
        ],
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp / "run" / "bench.json").read_text())
    return {"tmp": tmp, "payload": payload, "stdout": proc.stdout, "stderr": proc.stderr}


def _entry(payload: dict[str, Any], method: str) -> dict[str, Any]:
    return next(e for e in payload["results"] if e["method"] == method)


# ----- end to end -----------------------------------------------------------------------------------------
def test_writes_json_with_every_field_and_plots(bench_run: dict[str, Any]) -> None:
    payload, tmp = bench_run["payload"], bench_run["tmp"]
    assert set(payload) >= TOP_FIELDS
    assert set(payload["machine"]) >= MACHINE_FIELDS
    assert {"torch", "peft", "transformers"} <= set(payload["machine"]["versions"])
    assert payload["machine"]["versions"]["peft"]
    assert payload["settings"]["precision"] == "fp32" and payload["settings"]["device"] == "cpu"
    assert payload["batch"]["shape"] == [2, 32] and payload["batch"]["padding_fraction"] == 0.0
    assert payload["batch"]["labelled_tokens"] == 2 * 8  # label_fraction 0.25 of 32
    assert "target_token_loss" in payload["loss_path"]["peftbench"]
    assert "labels=labels" in payload["loss_path"]["peft"]
    assert [e["method"] for e in payload["results"]] == ["lora", "lora_fa", "delta_lora"]
    for method in ("lora", "lora_fa"):
        entry = _entry(payload, method)
        for impl in ("peftbench", "peft"):
            row = entry[impl]
            assert row["status"] == "ok", row.get("error")
            assert set(row) >= ROW_FIELDS
            assert set(row["memory"]) >= MEMORY_FIELDS
            assert set(row["step_s"]) >= STEP_FIELDS
            assert len(row["step_s"]["samples"]) == 2 and row["step_s"]["median"] > 0
            assert row["tokens_per_s"] == pytest.approx(64 / row["step_s"]["median"])
            assert row["mfu"] is None  # CPU: no known peak FLOPs
            assert row["model_flops_per_step"] > 0
        # same weights, same batch, B = 0 at init: both implementations compute the same loss
        assert entry["ratios"]["loss_first_rel_diff"] < 1e-4
    # copies at --out (relative to the launch directory), with the plots
    out = tmp / "out" / "tiny.json"
    assert json.loads(out.read_text())["results"] == payload["results"]
    for path in (tmp / "out" / "tiny.png", tmp / "out" / "tiny_sweeps.png", tmp / "run" / "bench.png"):
        assert path.stat().st_size > 1000
    # the terminal report names both loss paths and the ratio table
    assert "ratios peftbench / HF PEFT" in bench_run["stdout"]
    assert "target_token_loss" in bench_run["stdout"]


def test_memory_split_sums_sensibly(bench_run: dict[str, Any]) -> None:
    payload = bench_run["payload"]
    for method in ("lora", "lora_fa"):
        for impl in ("peftbench", "peft"):
            row = _entry(payload, method)[impl]
            m, trainable = row["memory"], row["params"]["trainable"]
            for part in (
                "weights_bytes",
                "grad_bytes",
                "optimizer_state_bytes",
                "activation_bytes",
                "peak_bytes",
            ):
                assert m[part] > 0, (method, impl, part)
            assert m["split_sum_bytes"] == (
                m["weights_bytes"] + m["grad_bytes"] + m["optimizer_state_bytes"] + m["activation_bytes"]
            )
            assert m["grad_bytes"] == 4 * trainable  # fp32 gradients of exactly the trainable parameters
            # AdamW: two fp32 moments per trainable parameter (plus tiny step counters)
            assert 8 * trainable <= m["optimizer_state_bytes"] <= 8 * trainable + 4096
            assert m["weights_bytes"] > 10 * m["grad_bytes"]  # adapters are small next to the base
            assert m["process_peak_bytes"] >= m["peak_bytes"]
    ours = {method: _entry(payload, method)["peftbench"] for method in ("lora", "lora_fa")}
    assert ours["lora_fa"]["params"]["trainable"] < ours["lora"]["params"]["trainable"]  # A is frozen


def test_lora_fa_saves_fewer_activations_than_lora(bench_run: dict[str, Any]) -> None:
    payload = bench_run["payload"]
    assert _entry(payload, "lora_fa")["hyperparameters"]["dropout"] > 0
    lora = _entry(payload, "lora")["peftbench"]["memory"]["activation_bytes"]
    lora_fa = _entry(payload, "lora_fa")["peftbench"]["memory"]["activation_bytes"]
    assert lora_fa < lora


def test_ratio_fields_are_ours_over_theirs(bench_run: dict[str, Any]) -> None:
    for method in ("lora", "lora_fa"):
        entry = _entry(bench_run["payload"], method)
        ours, theirs, r = entry["peftbench"], entry["peft"], entry["ratios"]
        assert r["step_s"] == pytest.approx(ours["step_s"]["median"] / theirs["step_s"]["median"])
        pairs = zip(ours["step_s"]["samples"], theirs["step_s"]["samples"], strict=True)
        assert r["step_s_paired"] == pytest.approx(statistics.median(a / b for a, b in pairs))
        assert r["tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
        for key in ("peak_bytes", "weights_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes"):
            assert r[key] == pytest.approx(ours["memory"][key] / theirs["memory"][key]), key


def test_method_without_peft_peer_reports_no_ratio(bench_run: dict[str, Any]) -> None:
    entry = _entry(bench_run["payload"], "delta_lora")
    assert entry["peftbench"]["status"] == "ok"
    assert entry["peft"] is None and entry["ratios"] is None
    assert "Delta-LoRA" in entry["peft_missing"]


def test_sweeps_cover_each_axis(bench_run: dict[str, Any]) -> None:
    sweeps = bench_run["payload"]["sweeps"]
    assert [p["value"] for p in sweeps["seq_len"]] == [16, 32]
    assert [p["value"] for p in sweeps["r"]] == [2, 4]
    assert [p["value"] for p in sweeps["models"]] == ["tiny_llama"]
    for points in sweeps.values():
        for point in points:
            assert point["method"] == "lora" and not point["errors"]
            assert point["peftbench"]["step_s"] > 0 and point["peft"]["peak_bytes"] > 0
            assert point["ratios"]["step_s"] == pytest.approx(
                point["peftbench"]["step_s"] / point["peft"]["step_s"]
            )
    # a larger sequence holds more activations
    by_len = {p["value"]: p["peftbench"]["activation_bytes"] for p in sweeps["seq_len"]}
    assert by_len[32] > by_len[16]


# ----- the other methods, in process ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["qlora", "full", "vera", "lora_plus"])
def test_other_methods_run_against_peft(method: str) -> None:
    from peftbench.bench import ModelShape, PretrainedDir, bench_method, make_batch
    from peftbench.models import load_model

    cfg = compose_bench([*TINY, f"methods=[{method}]", "bench.repeats=1", "bench.warmup_steps=0"])
    settings = parse_settings(cfg)
    (resolved,) = resolve_methods(cfg, r=settings.r)
    base, _ = load_model(cfg.model)
    pretrained = PretrainedDir(base, cfg.model)
    try:
        entry = bench_method(
            resolved,
            base,
            make_batch(base.config.vocab_size, settings),
            settings,
            ModelShape.of(base),
            pretrained,
        )
    finally:
        pretrained.cleanup()
    assert entry["peftbench"]["status"] == "ok", entry["peftbench"].get("error")
    assert entry["peft"]["status"] == "ok", entry["peft"].get("error")
    assert entry["ratios"]["loss_first_rel_diff"] < 1e-3  # the same computation on both sides
    ours, theirs = entry["peftbench"]["params"], entry["peft"]["params"]
    assert ours["trainable"] == theirs["trainable"]
    if method == "full":
        assert ours["trainable"] == ours["total"]
        assert entry["peftbench"]["model_flops_per_step"] > entry["peftbench"]["tokens_per_step"] * 4 * 1e5


@pytest.mark.slow
def test_compile_option_runs(tmp_path: Path) -> None:
    """`bench.compile=true` wraps both sides' loss forward in torch.compile (minutes on a 2-core CPU)."""
    proc = run_cli(
        [*TINY, "methods=[lora]", "bench.compile=true", "bench.threads=1", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert payload["settings"]["compile"] is True and payload["settings"]["threads"] == 1
    entry = _entry(payload, "lora")
    assert entry["peftbench"]["status"] == "ok" and entry["peft"]["status"] == "ok"
    assert entry["ratios"]["loss_first_rel_diff"] < 1e-4


# ----- configuration and bad input ------------------------------------------------------------------------
def test_default_config_composes_and_builds_every_method() -> None:
    cfg = compose_bench([])
    settings = parse_settings(cfg)
    assert (settings.batch_size, settings.seq_len, settings.warmup_steps, settings.timed_steps) == (
        4,
        256,
        2,
        5,
    )
    assert settings.precision in ("fp32", "bf16") and settings.compile is False
    assert cfg.model.name == "smollm2-135m-instruct"
    names = [m.name for m in resolve_methods(cfg)]
    assert names == ["lora", "lora_fa", "lora_plus", "vera", "qlora", "full"]
    lora_fa = resolve_methods(cfg, ["lora_fa"])[0]
    assert lora_fa.precondition is True  # method_overrides: as PEFT's LoRA-FA optimizer
    assert [m.r for m in resolve_methods(cfg, ["lora", "vera"], r=8)] == [8, 8]


def test_llama_1b_shape_config_composes() -> None:
    cfg = compose_bench(["model=llama_1b_shape"])
    assert cfg.model.random_config.hidden_size == 2048 and cfg.model.random_config.vocab_size == 128256


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("methods=[lora,nosuch]", "methods[1]='nosuch'"),
        ("bench.precision=fp8", "bench.precision='fp8'"),
        ("bench.seq_len=0", "bench.seq_len=0"),
        ("bench.label_fraction=0", "bench.label_fraction=0"),
        ("+method_overrides.lora_fa.r=0", "method.r=0"),
        ("+method_overrides.nosuch.r=1", "method_overrides key='nosuch'"),
    ],
)
def test_bad_config_is_a_config_error(override: str, needle: str) -> None:
    cfg = compose_bench([override])
    with pytest.raises(ConfigError) as err:
        parse_settings(cfg)
        resolve_methods(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args", [["methods=[nosuch]"], ["model=nosuch"]])
def test_cli_bad_input_is_one_line(args: list[str], tmp_path: Path) -> None:
    proc = run_cli([*args, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "kernels" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nosuch" in lines[0], proc.stderr


def test_out_flag_becomes_an_override() -> None:
    assert translate_argv(["--out", "a.json", "x=1"]) == ["bench.out=a.json", "x=1"]
    assert translate_argv(["--out=b.json"]) == ["bench.out=b.json"]
    with pytest.raises(ConfigError):
        translate_argv(["--out"])


# ----- the measuring parts --------------------------------------------------------------------------------
def test_saved_tensor_bytes_counts_each_storage_once_and_skips_weights() -> None:
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    saved = SavedTensorBytes(exclude={weight.untyped_storage().data_ptr()})
    with saved.recording():
        y = x * x  # saves x twice: one storage
        z = y[:2] @ weight  # saves a view of y and the (excluded) weight
    assert saved.total == 2 * x.numel() * 4
    assert saved.weight_hits == 1
    z.sum().backward()


def test_grad_and_optimizer_state_bytes() -> None:
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(2, 4)).sum().backward()
    assert grad_bytes(layer.parameters()) == (12 + 3) * 4
    optimizer.step()
    assert optimizer_state_bytes(optimizer) >= 2 * (12 + 3) * 4


def test_time_steps_excludes_warmup() -> None:
    calls = []
    times = time_steps(lambda: calls.append(1), torch.device("cpu"), warmup=2, timed=3, repeats=4)
    assert len(calls) == 2 + 3 * 4
    assert len(times.samples) == 4 and times.median >= 0 and times.to_dict()["steps_per_repeat"] == 3


def test_ratios_need_both_rows_ok(bench_run: dict[str, Any]) -> None:
    ours = _entry(bench_run["payload"], "lora")["peftbench"]
    assert ratios(ours, None) is None
    assert ratios(ours, {"impl": "peft", "status": "failed", "error": "x"}) is None
    assert ratios(ours, ours)["peak_bytes"] == 1.0

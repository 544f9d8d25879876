"""Merging several runs from the command line (peftbench/merge_several.py) and scoring the result
(peftbench/evaluate.py), on saved tiny runs over a tiny random Llama saved as a local base directory.

The tensor operations themselves are checked against peft.utils.merge_utils in tests/test_merging_ops.py;
here: the CLI computes exactly ``W0 + combine(task vectors)`` for every combination and mixed methods, one run
at weight 1 is the single-run merge, ``--rank`` at full rank is exact (and its LoRA directory reloads and
scores as the dense merge), ``cat`` is the weighted sum, evaluate reproduces a run's recorded test metrics,
and every refusal is one line before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftbench.evaluate import evaluate, load_any
from peftbench.evaluate import main as evaluate_main
from peftbench.merge import PROVENANCE, main
from peftbench.merging import combine as C
from peftbench.merging.task_vectors import add_to_base, task_vector
from peftbench.models import load_model
from tests.helpers import token_batch
from tests.takehome import save_base, trained, write_run

ATOL = 1e-5
#: evaluate on the tiny base: a few examples, no forgetting probe
SMALL = ["split={val: 4, test: 6, max_train: 8}", "probe=null"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved runs (perturbed adapters) of several methods on one local base; one run on another base."""
    root = tmp_path_factory.mktemp("merge_cli")
    base_dir = save_base(root / "base")
    shutil.copytree(base_dir, root / "base_copy")  # the same weights under another name
    other_dir = save_base(root / "other", seed=1)  # the same name pattern, other weights
    paths = {"base": base_dir, "base_copy": root / "base_copy", "other": other_dir}
    config = {"name_or_path": str(base_dir), "dtype": "float32"}
    base, _ = load_model(config)
    for name, overrides in (
        ("lora", {}),
        ("lora_fa", {}),
        ("dora", {}),
        ("ia3", {}),
        ("full", {}),
        ("prompt_tuning", {}),
    ):
        model, method = trained(name, base, **overrides)
        paths[name] = write_run(root / name, model, method, config)
    torch.manual_seed(3)
    model, method = trained("lora", base)
    with torch.no_grad():  # a second LoRA run, other values
        for _, param in method.trainable_parameters(model):
            param.add_(0.05 * torch.randn_like(param))
    paths["lora2"] = write_run(root / "lora2", model, method, config)
    copy_config = {"name_or_path": str(root / "base_copy"), "dtype": "float32"}
    paths["lora_copy"] = write_run(root / "lora_copy", model, method, copy_config)
    other_base, _ = load_model({"name_or_path": str(other_dir), "dtype": "float32"})
    model, method = trained("lora", other_base)
    paths["lora_other"] = write_run(
        root / "lora_other", model, method, {**config, "name_or_path": str(other_dir)}
    )
    return paths


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def reload(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()


def vectors(setup: dict[str, Path], names: list[str]) -> tuple[torch.nn.Module, list[dict]]:
    """The base and the runs' task vectors, taken in-process (not through the CLI)."""
    from peftbench.methods.io import load_adapter

    base, _ = load_model({"name_or_path": str(setup["base"]), "dtype": "float32"})
    found = []
    for name in names:
        adapted, _ = load_model({"name_or_path": str(setup["base"]), "dtype": "float32"})
        method = load_adapter(adapted, setup[name] / "adapter")
        found.append(task_vector(adapted.eval(), method, base).deltas)
    return base, found


@pytest.mark.parametrize(
    ("how", "extra"),
    [
        ("task_arithmetic", []),
        ("ties", ["--density", "0.4"]),
        ("dare_linear", ["--density", "0.6", "--seed", "3"]),
        ("dare_ties", ["--density", "0.6", "--seed", "3"]),
    ],
)
def test_each_combination_is_the_base_plus_the_combined_task_vectors(
    how: str, extra: list[str], setup: dict[str, Path], tmp_path: Path
) -> None:
    """Mixed methods (LoRA, DoRA, IA3, full fine-tuning): the saved model is W0 + combine(tau_i)."""
    runs = ["lora", "dora", "ia3", "full"]
    weights, scale = [0.5, 1.0, 0.7, 0.3], 0.9
    out = tmp_path / "merged"
    argv = [*(str(setup[r]) for r in runs), "--how", how, "--weights", *map(str, weights), "--scale", "0.9"]
    assert main([*argv, *extra, "--out", str(out)]) == 0
    base, taus = vectors(setup, runs)
    density = float(extra[1]) if extra else 1.0
    merged = C.combine(how, taus, weights, density=density, scale=scale, seed=3)
    expected = add_to_base(base, merged)
    x = token_batch(vocab=1000)
    assert (
        logits(expected, x) - logits(load_model({"name_or_path": str(setup["base"])})[0], x)
    ).abs().max() > 1e-3
    torch.testing.assert_close(logits(reload(out), x), logits(expected, x), atol=ATOL, rtol=0)
    info = json.loads((out / PROVENANCE).read_text())
    assert info["how"] == how and info["weights"] == weights and info["scale"] == scale
    assert info["base_fingerprint"].startswith("sha256:") and len(info["runs"]) == 4
    assert [m["name"] for m in info["methods"]] == runs


def test_dare_is_seeded(setup: dict[str, Path], tmp_path: Path) -> None:
    runs = [str(setup["lora"]), str(setup["lora2"])]
    outs = {}
    for seed in (1, 1, 2):
        out = tmp_path / f"dare{len(outs)}"
        assert (
            main([*runs, "--how", "dare_linear", "--density", "0.5", "--seed", str(seed), "--out", str(out)])
            == 0
        )
        outs[len(outs)] = logits(reload(out), token_batch(vocab=1000))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert (outs[0] - outs[2]).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["lora", "ia3", "full"])
def test_one_run_at_weight_one_is_the_single_run_merge(
    name: str, setup: dict[str, Path], tmp_path: Path
) -> None:
    assert main([str(setup[name]), "--out", str(tmp_path / "single")]) == 0
    assert (
        main([str(setup[name]), "--how", "task_arithmetic", "--weights", "1", "--out", str(tmp_path / "ta")])
        == 0
    )
    x = token_batch(vocab=1000)
    torch.testing.assert_close(
        logits(reload(tmp_path / "ta"), x), logits(reload(tmp_path / "single"), x), atol=ATOL, rtol=0
    )


def test_rank_at_full_rank_is_exact_and_its_lora_scores_as_the_dense_merge(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [str(setup["lora"]), str(setup["dora"]), str(setup["ia3"])]
    common = [*runs, "--how", "ties", "--density", "0.5", "--weights", "1", "0.5", "0.8"]
    assert main([*common, "--out", str(tmp_path / "dense")]) == 0
    capsys.readouterr()
    assert main([*common, "--rank", "64", "--out", str(tmp_path / "lora64")]) == 0  # tiny_llama: min dim 32
    printed = capsys.readouterr().out
    info = json.loads((tmp_path / "lora64" / PROVENANCE).read_text())
    assert info["kind"] == "lora" and info["truncation_error"] < 1e-6 and info["dropped_tensors"] == []
    assert f"{info['truncation_error']:.6f}" in printed
    model, _, method = load_any(tmp_path / "lora64")
    assert method.name == "lora"
    x = token_batch(vocab=1000)
    torch.testing.assert_close(logits(model, x), logits(reload(tmp_path / "dense"), x), atol=1e-4, rtol=0)
    scores = [
        evaluate(tmp_path / d, "classification", task_overrides=SMALL)["metrics"] for d in ("dense", "lora64")
    ]
    assert scores[0].keys() == scores[1].keys() and "test/accuracy" in scores[0]
    for key in scores[0]:
        assert scores[0][key] == pytest.approx(scores[1][key], abs=1e-3), key
    assert main([*common, "--rank", "2", "--out", str(tmp_path / "lora2")]) == 0
    low = json.loads((tmp_path / "lora2" / PROVENANCE).read_text())["truncation_error"]
    assert 0.01 < low < 1


def test_rank_states_the_changes_a_lora_cannot_hold(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                str(setup["full"]),
                str(setup["lora"]),
                "--how",
                "task_arithmetic",
                "--rank",
                "64",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "r" / PROVENANCE).read_text())
    assert info["dropped_tensors"] and 0 < info["dropped_share"] < 1
    assert "dropped" in capsys.readouterr().out


def test_cat_is_the_weighted_sum_of_the_loras(setup: dict[str, Path], tmp_path: Path) -> None:
    runs = ["lora", "lora_fa", "lora2"]
    weights = [0.6, -0.4, 1.1]
    argv = [*(str(setup[r]) for r in runs), "--how", "cat", "--weights", *map(str, weights), "--scale", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "cat")]) == 0
    info = json.loads((tmp_path / "cat" / PROVENANCE).read_text())
    assert info["kind"] == "lora" and info["lora_rank"] == 12
    model, _, _ = load_any(tmp_path / "cat")
    base, taus = vectors(setup, runs)
    expected = add_to_base(base, C.task_arithmetic(taus, weights, scale=0.5))
    x = token_batch(vocab=1000)
    torch.testing.assert_close(logits(model, x), logits(expected, x), atol=1e-4, rtol=0)


def test_the_same_weights_under_another_name_merge(setup: dict[str, Path], tmp_path: Path) -> None:
    assert (
        main(
            [
                str(setup["lora"]),
                str(setup["lora_copy"]),
                "--how",
                "task_arithmetic",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    ("runs", "options", "needle"),
    [
        (["lora", "lora_other"], ["--how", "task_arithmetic"], "was trained on a different base model"),
        (
            ["lora", "prompt_tuning"],
            ["--how", "ties", "--density", "0.5"],
            "method='prompt_tuning' has no task vector",
        ),
        (["lora", "dora"], ["--how", "cat"], "how=cat needs plain LoRA-form runs"),
        (["lora", "ia3"], ["--how", "cat"], "method='ia3' is not one"),
        (["lora", "lora2"], ["--how", "average"], "--how='average' is not valid; accepted: task_arithmetic"),
        (["lora", "lora2"], ["--how", "ties"], "--how ties needs --density"),
        (["lora", "lora2"], ["--how", "ties", "--density", "1.5"], "density=1.5 is not valid"),
        (["lora", "lora2"], ["--how", "task_arithmetic", "--density", "0.5"], "--density applies to"),
        (
            ["lora", "lora2"],
            ["--how", "task_arithmetic", "--weights", "1"],
            "--weights=[1.0] is not valid; accepted: 2",
        ),
        (["lora", "lora2"], ["--how", "cat", "--rank", "4"], "--rank applies to the dense combinations"),
        (["lora", "lora2"], ["--how", "ties", "--density", "0.5", "--rank", "0"], "--rank=0 is not valid"),
        (["lora", "lora2"], [], "2 runs need --how"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    runs: list[str], options: list[str], needle: str, setup: dict[str, Path], tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    assert main([*(str(setup[r]) for r in runs), *options, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "m").exists()


def test_evaluate_on_a_run_gives_its_recorded_test_metrics(tmp_path: Path, capsys) -> None:
    from tests.test_run import run_cli

    result = run_cli(
        [
            "model=tiny_llama",
            "task=classification",
            "method=lora",
            "trainer.max_steps=2",
            "batch_size=2",
            "logger=none",
            "evaluate_before=false",
            "seed=1",
            "task.split={val: 4, test: 6, max_train: 8}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((tmp_path / "run" / "record.json").read_text())["metrics"]
    capsys.readouterr()
    out = tmp_path / "scored.json"
    assert evaluate_main([str(tmp_path / "run"), "task=classification", "--out", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["seed"] == 1 and scored["examples"] == 6 and scored["primary_metric"] == "test/accuracy"
    for key in ("test/accuracy", "test/macro_f1", "test/loss", "test/probe_loss"):
        assert scored["metrics"][key] == pytest.approx(recorded[key], abs=1e-5), key
    assert evaluate_main([str(tmp_path / "run"), "task=classification", "split=val", "--out", str(out)]) == 0
    val = json.loads(out.read_text())["metrics"]
    assert val["val/accuracy"] == pytest.approx(recorded["val/accuracy"], abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["task=nosuch"], "nosuch"),
        (["split=train", "task=classification"], "split='train' is not valid; accepted: test, val"),
        ([], "task=<name> is missing"),
        (["task=classification", "colour=red"], "colour=red"),
    ],
)
def test_evaluate_bad_input_is_one_line(argv: list[str], needle: str, setup: dict[str, Path], capsys) -> None:
    capsys.readouterr()
    assert evaluate_main([str(setup["lora"]), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err

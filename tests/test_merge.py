"""Merge (peftbench/merge.py): for every registered method that can merge, the merged model saved and reloaded
with `AutoModelForCausalLM.from_pretrained` gives the unmerged adapter model's logits (fp32, atol 1e-5); the
others are refused in one line naming the mergeable ones. The "base" is a tiny random Llama saved to a
local directory (`model.name_or_path=<dir>`), so nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftbench.merge import PROVENANCE, can_merge, main, mergeable_methods
from peftbench.methods import METHODS
from peftbench.models import load_model
from tests.helpers import token_batch
from tests.takehome import ROWS, save_base, trained, write_run

ATOL = 1e-5


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local base model directories by the method matrix's model arguments (BitFit's has biases)."""
    root = tmp_path_factory.mktemp("bases")
    return {
        "plain": save_base(root / "plain"),
        "bias": save_base(root / "bias", bias=True),
    }


def base_dir(bases: dict[str, Path], name: str) -> Path:
    return bases["bias" if ROWS[name].model_kwargs.get("bias") else "plain"]


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merged_model_reloads_with_the_adapter_models_logits(
    name: str, bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = base_dir(bases, name)
    model_config = {"name_or_path": str(directory), "dtype": "float32"}
    base, _ = load_model(model_config)
    model, method = trained(name, base)
    run = write_run(tmp_path / "run", model, method, model_config)
    out = tmp_path / "merged"
    capsys.readouterr()  # the loading above writes progress bars
    code = main([str(run), "--out", str(out)])
    err = capsys.readouterr().err
    if not can_merge(type(method)):
        assert code == 2 and err.count("\n") == 1, err
        assert f"method='{name}' cannot be merged into the base weights; accepted: " in err
        assert "lora" in err and not out.exists()
        return
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    x = token_batch(vocab=1000)
    expected = logits(model, x)
    assert (expected - logits(base, x)).abs().max() > 1e-3, "the perturbed adapter changes nothing"
    torch.testing.assert_close(logits(merged, x), expected, atol=ATOL, rtol=0)
    assert json.loads((out / PROVENANCE).read_text())["method"]["name"] == name
    assert (out / "tokenizer_config.json").exists()


def test_the_adapter_methods_and_the_weight_baselines_merge() -> None:
    expected = {"lora", "lora_plus", "lora_fa", "qlora", "vera", "delta_lora", "full", "partial"}
    assert expected <= set(mergeable_methods())
    assert "prompt_tuning" not in mergeable_methods()


def test_adapter_directory_with_the_base_named_on_the_command_line(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    """No record beside the adapter: ``--model name_or_path=<dir>`` names the base; a second merge into the
    same --out replaces the first."""
    base, _ = load_model({"name_or_path": str(bases["plain"])})
    model, method = trained("lora", base)
    run = write_run(tmp_path / "run", model, method, model_config=None)
    out = tmp_path / "merged"
    for _ in range(2):
        assert (
            main([str(run / "adapter"), "--out", str(out), "--model", f"name_or_path={bases['plain']}"]) == 0
        )
    merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    x = token_batch(vocab=1000)
    torch.testing.assert_close(logits(merged, x), logits(model, x), atol=ATOL, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]


def test_merged_in_the_run_dtype(bases: dict[str, Path], tmp_path: Path) -> None:
    """A bf16 run comes out in bf16 (QLoRA's fp32 compute layers are cast back with the rest)."""
    model_config = {"name_or_path": str(bases["plain"]), "dtype": "bfloat16"}
    base, _ = load_model(model_config)
    model, method = trained("qlora", base)
    run = write_run(tmp_path / "run", model, method, model_config)
    assert main([str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_bad_input_is_one_line(bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, _ = load_model({"name_or_path": str(bases["plain"])})
    model, method = trained("lora", base)
    run = write_run(tmp_path / "run", model, method, model_config=None)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    for argv, needle in (
        ([str(tmp_path / "nosuch"), "--out", str(tmp_path / "m")], "does not exist"),
        ([str(run), "--out", str(tmp_path / "m")], "--model name_or_path=<the base model>"),
        (
            [str(run), "--out", str(tmp_path / "taken"), "--model", f"name_or_path={bases['plain']}"],
            "other things",
        ),
        ([str(run), "--out", str(tmp_path / "m"), "--model", "name_or_path=/no/such/base"], "/no/such/base"),
        (
            [str(run), "--out", str(tmp_path / "m"), "--model", "colour=red", "--model", "name_or_path=x"],
            "colour",
        ),
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_info:
        main([str(run)])  # --out is required
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me" and not (tmp_path / "m").exists()

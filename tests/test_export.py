"""HF PEFT export (peftbench/export.py): every registered method with a PEFT form is exported, loaded by
`peft.PeftModel.from_pretrained` on a fresh copy of the base, and must give peftbench's logits (fp32, atol
1e-5); every method without one is refused in one line naming those with one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftbench.errors import ConfigError
from peftbench.export import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    export_peft,
    exportable_methods,
    exports_to_peft,
    main,
)
from peftbench.methods import METHODS, build_method
from tests.helpers import clone_model, load_nf4, tiny_llama, token_batch
from tests.takehome import matrix_base, perturb, trained, write_run

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def peft_logits(base: torch.nn.Module, directory: Path, x: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(clone_model(base), str(directory)).eval()
    with torch.no_grad():
        # PEFT's prompt tuning returns the virtual positions' logits in front too: the caller's are the last
        return loaded(input_ids=x).logits[:, -x.shape[1] :]


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_loads_in_peft_with_the_same_logits(name: str, tmp_path: Path) -> None:
    base = matrix_base(name)
    model, method = trained(name, base)
    exported = method.peft_export(model)
    assert (exported is not None) == exports_to_peft(type(method)), "export_peft's accepted list would lie"
    if exported is None:
        with pytest.raises(
            ConfigError, match=rf"^method='{name}' has no HF PEFT equivalent; accepted: .*lora"
        ):
            export_peft(model, method, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    if any(not p.is_floating_point() for p in model.parameters()):  # QLoRA: see test_qlora_* below
        pytest.skip(f"{name} trains on a quantized base, not on a fresh copy of the base")
    out = export_peft(model, method, tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == [PEFT_CONFIG, PEFT_WEIGHTS]
    x = token_batch()
    expected = logits(model, x)
    assert (expected - logits(base, x)).abs().max() > 1e-3, "the perturbed adapter changes nothing"
    torch.testing.assert_close(peft_logits(base, out, x), expected, atol=ATOL, rtol=0)


def test_the_lora_family_and_vera_export() -> None:
    assert {"lora", "lora_plus", "lora_fa", "qlora", "vera"} <= set(exportable_methods())
    assert "delta_lora" not in exportable_methods()  # its modified W0 is no adapter on the original base
    assert "full" not in exportable_methods()


def test_rslora_and_a_layer_subset(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method = trained("lora", base, rslora=True, alpha=8.0, target_modules=["q_proj", "v_proj"])
    out = export_peft(model, method, tmp_path / "peft")
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True and config["r"] == 4
    assert config["target_modules"] == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    x = token_batch()
    torch.testing.assert_close(peft_logits(base, out, x), logits(model, x), atol=ATOL, rtol=0)


def test_vera_writes_the_shared_projections(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method = trained("vera", base, projection_seed=5)
    out = export_peft(model, method, tmp_path / "peft")
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True
    assert config["projection_prng_key"] == 5
    tensors = load_file(str(out / PEFT_WEIGHTS))
    torch.testing.assert_close(tensors["base_model.vera_A"], model.vera_projections.vera_A, atol=0, rtol=0)
    torch.testing.assert_close(tensors["base_model.vera_B"], model.vera_projections.vera_B, atol=0, rtol=0)


def test_qlora_adapter_loads_on_the_plain_base(tmp_path: Path) -> None:
    """On the full-precision base the QLoRA adapter is a plain LoRA: PEFT's model equals peftbench's LoRA
    holding the same A and B on that base."""
    base = tiny_llama()
    qmodel, qlora = trained("qlora", base)
    out = export_peft(qmodel, qlora, tmp_path / "peft")
    assert json.loads((out / PEFT_CONFIG).read_text())["peft_type"] == "LORA"
    lora_model = clone_model(base)
    lora = build_method(
        {"name": "lora", "r": qlora.r, "alpha": qlora.alpha, "dropout": qlora.dropout, "rslora": qlora.rslora}
    )
    lora.apply(lora_model)
    lora.load_adapter_state_dict(lora_model, qlora.adapter_state_dict(qmodel))
    x = token_batch()
    torch.testing.assert_close(peft_logits(base, out, x), logits(lora_model.eval(), x), atol=ATOL, rtol=0)


def test_qlora_adapter_loads_on_the_4bit_base(tmp_path: Path) -> None:
    """On a base loaded in 4 bits (transformers' BitsAndBytesConfig, as PEFT's QLoRA recipe does) the
    exported adapter gives peftbench's QLoRA logits. in_features are multiples of 64, the blocksize
    transformers uses (bitsandbytes' CPU kernel needs that)."""
    # tiny_llama's widths (32) are below the blocksize: a 64-wide Llama
    tiny_llama(tie=False, hidden=64, intermediate=128).save_pretrained(str(tmp_path / "base"))

    def load_4bit() -> torch.nn.Module:
        return load_nf4(tmp_path / "base")  # the same kernel path on both sides (CPU repack off)

    qmodel = load_4bit()
    torch.manual_seed(0)
    qlora = build_method({"name": "qlora", "r": 4, "compute_dtype": "float32", "blocksize": 64})
    qlora.apply(qmodel)
    perturb(qmodel, qlora)
    out = export_peft(qmodel.eval(), qlora, tmp_path / "peft")

    from peft import PeftModel

    x = token_batch()
    assert (logits(qmodel, x) - logits(load_4bit(), x)).abs().max() > 1e-3, "the adapter changes nothing"
    loaded = PeftModel.from_pretrained(load_4bit(), str(out)).eval()
    torch.testing.assert_close(logits(loaded, x), logits(qmodel, x), atol=ATOL, rtol=0)


def test_a_trained_classifier_head_goes_in_as_modules_to_save(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_labels=3,
        pad_token_id=0,
    )
    base = LlamaForSequenceClassification(config).eval()
    model = clone_model(base)
    method = build_method({"name": "lora", "r": 4})
    method.apply(model, head=model.score)
    perturb(model, method)
    with torch.no_grad():
        model.score.weight.add_(0.5)
    out = export_peft(model.eval(), method, tmp_path / "peft")
    config_json = json.loads((out / PEFT_CONFIG).read_text())
    assert config_json["modules_to_save"] == ["score"] and config_json["task_type"] == "SEQ_CLS"
    x = token_batch()
    torch.testing.assert_close(peft_logits(base, out, x), logits(model, x), atol=ATOL, rtol=0)


def test_a_second_export_replaces_the_first_and_other_directories_are_refused(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method = trained("lora", base)
    out = export_peft(model, method, tmp_path / "peft")
    first = load_file(str(out / PEFT_WEIGHTS))
    perturb(model, method, seed=8)
    export_peft(model, method, out)
    assert not torch.equal(load_file(str(out / PEFT_WEIGHTS))[next(iter(first))], next(iter(first.values())))
    assert [p.name for p in tmp_path.iterdir()] == ["peft"], "temporary directories were left behind"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"exists and holds other things"):
        export_peft(model, method, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ----- the command line -------------------------------------------------------------------------------------
RANDOM_MODEL = {
    "name_or_path": "random:tiny-llama",
    "random_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
    "seed": 3,
}


def test_cli_exports_an_existing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run's base is rebuilt from its record (a seeded random model), its adapter loaded and exported."""
    from peftbench.models import load_model

    base, _ = load_model(RANDOM_MODEL)
    model, method = trained("vera", base)
    run = write_run(tmp_path / "run", model, method, RANDOM_MODEL)
    assert main([str(run)]) == 0
    out = run / "adapter" / "peft"
    assert str(out) in capsys.readouterr().out
    x = token_batch(vocab=1000)
    torch.testing.assert_close(peft_logits(base, out, x), logits(model, x), atol=ATOL, rtol=0)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_llama()
    model, method = trained("delta_lora", base)
    run = write_run(tmp_path / "run", model, method, RANDOM_MODEL)
    for argv, needle in (
        ([str(run)], "method='delta_lora' has no HF PEFT equivalent; accepted: "),
        ([str(tmp_path / "nosuch")], "does not exist; accepted: a run directory"),
        ([str(tmp_path)], "holds no saved adapter"),
        ([str(run / "adapter"), "--model", "nokey"], "KEY=VALUE"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peftbench.export", str(tmp_path / "nosuch")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_run_writes_its_peft_export_and_the_commands_take_it_home(tmp_path: Path) -> None:
    """End to end: `peftbench.run` writes ``adapter/peft`` and records it; export, merge and generate work
    on the run directory as commands."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftbench.methods.io import load_adapter
    from tests.conftest import tiny_model_cfg
    from tests.test_generate import NEW_TOKENS, reference
    from tests.test_run import TINY, run_cli

    result = run_cli([*TINY, "study=home", "method=vera"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    record = json.loads((run / "record.json").read_text())
    assert record["params"]["peft_adapter"] == str(run / "adapter" / "peft")

    from peftbench.models import load_model

    model, tokenizer = load_model(tiny_model_cfg())
    load_adapter(model, run / "adapter")
    x = token_batch(vocab=1000)
    base, _ = load_model(tiny_model_cfg())
    loaded = PeftModel.from_pretrained(base, str(run / "adapter" / "peft")).eval()
    torch.testing.assert_close(logits(loaded, x), logits(model.eval(), x), atol=ATOL, rtol=0)

    def command(module: str, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    command("peftbench.export", str(run), "--out", str(tmp_path / "peft"))
    assert (
        load_file(str(tmp_path / "peft" / PEFT_WEIGHTS)).keys()
        == load_file(str(run / "adapter" / "peft" / PEFT_WEIGHTS)).keys()
    )
    command("peftbench.merge", str(run), "--out", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    torch.testing.assert_close(logits(merged, x), logits(model, x), atol=ATOL, rtol=0)
    answer = command("peftbench.generate", str(run), "--prompt", "Hello", "--max-new-tokens", str(NEW_TOKENS))
    assert answer.stdout == reference(model, tokenizer, "Hello", chat=True) + "\n"

"""Generate (peftbench/generate.py): what the command streams is what `model.generate` of the same adapted
model gives (greedy), through the chat template or not; a file of prompts gives one answer per prompt; a
merged model answers as its adapter model did. Tiny random Llama saved locally with the SmolLM2 tokenizer
(it has a chat template): no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from peftbench.generate import main
from peftbench.models import load_model
from tests.takehome import save_base, trained, write_run

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A local base, LoRA (perturbed) on it saved as a run directory, and the in-memory adapted model."""
    root = tmp_path_factory.mktemp("generate")
    model_config = {"name_or_path": str(save_base(root / "base")), "dtype": "float32"}
    base, tokenizer = load_model(model_config)
    model, method = trained("lora", base)
    run = write_run(root / "run", model, method, model_config)
    return {"root": root, "run": run, "model": model, "tokenizer": tokenizer, "model_config": model_config}


def reference(model: torch.nn.Module, tokenizer: Any, prompt: str, chat: bool) -> str:
    """`model.generate` (greedy) on the prompt, as a user turn of the chat template or raw, decoded."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv, "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_streamed_answer_is_the_adapter_models_generate(adapted, capsys) -> None:
    prompt = "Summarise: the cat sat on the mat."
    expected = reference(adapted["model"], adapted["tokenizer"], prompt, chat=True)
    code, out, err = run([str(adapted["run"]), "--prompt", prompt], capsys)
    assert code == 0, err
    assert out == expected + "\n"
    assert expected.strip(), "the model generated nothing: the check would be empty"
    assert expected != reference(adapted["model"], adapted["tokenizer"], prompt, chat=False)


def test_a_file_of_prompts_gives_one_answer_each(adapted, capsys, tmp_path: Path) -> None:
    prompts = ["first prompt", "a second one", "and the third"]
    (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    code, out, err = run(
        ["--adapter", str(adapted["run"] / "adapter"), "--file", str(tmp_path / "prompts.txt"), "--no-chat"],
        capsys,
    )
    assert code == 0, err
    expected = "".join(
        f">>> [{i + 1}/3] {p}\n{reference(adapted['model'], adapted['tokenizer'], p, chat=False)}\n"
        for i, p in enumerate(prompts)
    )
    assert out == expected


def test_a_merged_model_answers_as_its_adapter_model(adapted, capsys) -> None:
    from peftbench.merge import main as merge

    merged = adapted["root"] / "merged"
    assert merge([str(adapted["run"]), "--out", str(merged)]) == 0
    prompt = "Hello"
    code, out, err = run(["--model", str(merged), "--prompt", prompt], capsys)
    assert code == 0, err
    assert out == reference(adapted["model"], adapted["tokenizer"], prompt, chat=True) + "\n"


def test_sampling_is_seeded(adapted, capsys) -> None:
    argv = [str(adapted["run"]), "--prompt", "Hi", "--temperature", "0.8", "--top-p", "0.9"]
    first = run([*argv, "--seed", "1"], capsys)
    assert first[0] == 0 and run([*argv, "--seed", "1"], capsys)[1] == first[1]


def test_bad_input_is_one_line(adapted, capsys, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    r = str(adapted["run"])
    for argv, needle in (
        (["--prompt", "x"], "exactly one of"),
        ([r, "--model", r, "--prompt", "x"], "exactly one of"),
        ([r], "one of the arguments --prompt --file is required"),
        ([str(tmp_path / "nosuch"), "--prompt", "x"], "does not exist"),
        (["--model", str(tmp_path), "--prompt", "x"], "config.json"),
        ([r, "--file", str(tmp_path / "nosuch.txt")], "not readable"),
        ([r, "--file", str(tmp_path / "empty.txt")], "holds no prompt"),
        ([r, "--prompt", "x", "--top-p", "1.5"], "--top-p=1.5"),
        ([r, "--prompt", "x", "--temperature", "-1"], "--temperature=-1.0"),
        ([r, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0"),
        ([r, "--prompt", "x", "--base", "nokey"], "--base 'nokey' is not valid"),
    ):
        capsys.readouterr()
        try:
            code = main([*argv, "--device", "cpu"])
        except SystemExit as exit_info:  # argparse's own errors
            code = exit_info.code
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1, (argv, err)

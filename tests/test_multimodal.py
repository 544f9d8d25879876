"""Image + text models (peftbench/models/multimodal.py, llava.py) and task=scenes (peftbench/tasks/scenes.py):
image positions carry no loss, the projector trains and the encoder does not, every linear-layer method
adapts the language model only and survives save / reload / merge, a run takes its projector home (export,
merge, generate --image), bad input is refused in one line, and a tiny LLaVA goes the same way."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.merge import can_merge, merge_in_place
from peftbench.methods import build_method
from peftbench.methods.io import load_adapter, save_adapter
from peftbench.models.multimodal import IGNORE_INDEX, VisionLanguageModel, splice
from tests.conftest import CONF_DIR
from tests.test_method_matrix import method_config

ROOT = Path(__file__).resolve().parents[1]
#: every method that adapts linear layers (issue 16); each must work on the language model
LINEAR_METHODS = ("lora", "lora_fa", "vera", "delta_lora", "lora_plus", "qlora", "dora", "pissa", "ia3")
BASE_WEIGHT_METHODS = ("full", "partial")


def vision_tiny_cfg(**vision: Any) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "vision_tiny.yaml"))
    cfg["vision"].update(vision)
    return cfg


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peftbench.tasks.scenes_data import write_scenes

    return write_scenes(tmp_path_factory.mktemp("scenes"), 0, {"train": 6, "val": 2, "test": 3})


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[VisionLanguageModel, Any]:
    from peftbench.models import load_model

    os.environ.setdefault("PEFTBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    return load_model(vision_tiny_cfg(feature_cache=False))  # type: ignore[return-value]


def batch(tokenizer: Any, paths: dict[str, Path], n: int = 3, left: bool = False) -> dict[str, Any]:
    from peftbench.tasks.scenes_data import read_image_jsonl

    rows = read_image_jsonl(paths["train"])[:n]
    tokenizer.padding_side = "left" if left else "right"
    enc = tokenizer([f"{r.prompt} {r.answer}" for r in rows], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
    return {**enc, "labels": labels, "images": [str(r.image) for r in rows]}


def test_image_positions_carry_no_loss(loaded: tuple[Any, Any], scenes: dict[str, Path]) -> None:
    model, tokenizer = loaded
    b = batch(tokenizer, scenes)
    n = model.encoder.num_tokens
    image = model.image_embeds(images=b["images"])
    assert image.shape[1] == n == 9
    text = model.get_input_embeddings()(b["input_ids"])
    embeds, mask, labels = splice(image, text, b["attention_mask"], b["labels"])
    assert (labels[:, :n] == IGNORE_INDEX).all() and torch.equal(labels[:, n:], b["labels"])
    assert (mask[:, :n] == 1).all() and torch.equal(embeds[:, n:], text)
    out = model(**b)
    logits = out.logits[:, :-1].float()
    manual = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(out.loss, manual, atol=1e-5)
    # the loss only sees text targets: changing an image changes the loss through the context, but a
    # label placed on an image position would have counted; none is
    assert int((labels != IGNORE_INDEX).sum()) == int((b["labels"] != IGNORE_INDEX).sum())


def test_left_padded_batch_generates_as_one_at_a_time(
    loaded: tuple[Any, Any], scenes: dict[str, Path]
) -> None:
    model, tokenizer = loaded
    b = batch(tokenizer, scenes, left=True)
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    together = model.generate(b["input_ids"], b["attention_mask"], images=b["images"], **kw)
    assert torch.equal(together[:, : b["input_ids"].shape[1]], b["input_ids"])
    for i in range(len(b["images"])):
        keep = b["attention_mask"][i] == 1
        ids = b["input_ids"][i][keep][None]
        alone = model.generate(ids, torch.ones_like(ids), images=[b["images"][i]], **kw)
        assert torch.equal(alone[0, -3:], together[i, -3:])


def test_projector_gets_gradients_and_the_encoder_none(
    loaded: tuple[Any, Any], scenes: dict[str, Path]
) -> None:
    model, tokenizer = copy.deepcopy(loaded[0]), loaded[1]
    method = build_method(method_config("lora"))
    method.apply(model)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    b = batch(tokenizer, scenes)
    with torch.no_grad():  # LoRA's B starts at 0: move it so that A gets a gradient too
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    model(**b).loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert model.projector_parameters() == sum(p.numel() for p in model.projector.parameters())


@pytest.mark.parametrize("name", LINEAR_METHODS + BASE_WEIGHT_METHODS)
def test_every_linear_method_adapts_the_language_model_only_and_goes_home(
    name: str, loaded: tuple[Any, Any], scenes: dict[str, Path], tmp_path: Path
) -> None:
    """Apply, one optimizer step, save, reload onto a fresh model (same logits), merge (same logits)."""
    from peftbench.methods.base import adapter_layers

    fresh = copy.deepcopy(loaded[0])
    model, tokenizer = copy.deepcopy(loaded[0]), loaded[1]
    torch.manual_seed(0)
    method = build_method(method_config(name))
    method.apply(model)
    layers = [n for n, _ in adapter_layers(model)]
    assert all(n.startswith("language_model.") for n in layers), layers[:3]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.") for n in trainable)
    assert {n for n in trainable if n.startswith("projector.")} == {
        f"projector.{n}" for n, _ in model.projector.named_parameters()
    }
    assert any(n.startswith("language_model.") for n in trainable)
    b = batch(tokenizer, scenes)
    model.train()
    groups = method.param_groups(model, lr=1e-2, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    method.on_optimizer_built(model, optimizer)
    method.plan_training(2)
    model(**b).loss.backward()
    optimizer.step()
    method.after_optimizer_step(model, 1)
    model.eval()
    with torch.no_grad():
        want = model(**b).logits
    path = save_adapter(model, method, tmp_path / "adapter")
    back = load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.allclose(fresh(**b).logits, want, atol=1e-4)
    if can_merge(type(back)):
        merge_in_place(fresh, back)
        with torch.no_grad():
            assert torch.allclose(fresh(**b).logits, want, atol=2e-3 if name == "qlora" else 1e-4)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_work_behind_image_tokens(
    name: str, loaded: tuple[Any, Any], scenes: dict[str, Path]
) -> None:
    model, tokenizer = copy.deepcopy(loaded[0]), loaded[1]
    method = build_method(method_config(name))
    method.apply(model)
    b = batch(tokenizer, scenes)
    out = model(**b)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trained = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
    assert trained and all(p.grad is not None for p in trained)
    left = batch(tokenizer, scenes, left=True)
    new = model.eval().generate(
        left["input_ids"], left["attention_mask"], images=left["images"], max_new_tokens=2
    )
    assert new.shape[1] == left["input_ids"].shape[1] + 2


def test_freeze_switches_and_stage_switching(loaded: tuple[Any, Any]) -> None:
    from peftbench.methods.walker import adapted_part

    model = copy.deepcopy(loaded[0])
    model.set_freeze_switches({"freeze_language_model": True})
    method = build_method(method_config("lora"))
    method.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)  # stage 1: projector only
    model.set_freeze_switches({"freeze_language_model": False, "freeze_multi_modal_projector": True})
    method.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # stage 2: the method only
    assert adapted_part(model) is model.language_model
    with pytest.raises(ConfigError, match="freeze_vision_tower"):
        model.set_freeze_switches({"freeze_vision_tower": False})


def test_stages_accept_freeze_switches_for_an_image_model_only() -> None:
    from peftbench.stages import parse_stages, stage_config

    plan = [
        {"task": "scenes", "name": "align", "freeze": {"freeze_language_model": True}},
        {"task": "scenes"},
    ]
    stages = parse_stages(plan)
    cfg = OmegaConf.create({"model": vision_tiny_cfg(), "trainer": {"max_steps": 2}, "optim": {"lr": 1e-3}})
    assert stage_config(cfg, stages[0]).model.vision.freeze_language_model is True
    with pytest.raises(ConfigError, match=r"stages\[0\].freeze"):
        parse_stages([{"task": "scenes", "freeze": {"freeze_everything": True}}])
    text = OmegaConf.create({"model": {"name_or_path": "random:tiny-llama"}, "trainer": {}, "optim": {}})
    with pytest.raises(ConfigError, match="needs an image model"):
        stage_config(text, stages[0])


def test_refusals_name_the_file(tmp_path: Path, scenes: dict[str, Path], loaded: tuple[Any, Any]) -> None:
    from peftbench.build import check_modalities
    from peftbench.tasks import build_task

    rows = [json.loads(line) for line in scenes["train"].read_text().splitlines()]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({**rows[0], "image": str(tmp_path / "gone.png")}) + "\n")
    task = build_task({"name": "scenes", "data": str(missing)})
    with pytest.raises(ConfigError, match=r"gone.png: no such file") as err:
        task.setup(loaded[1], 0)
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_text(json.dumps({**rows[0], "image": str(broken)}) + "\n")
    with pytest.raises(ConfigError, match=r"broken.png cannot be read"):
        build_task({"name": "scenes", "data": str(unreadable)}).setup(loaded[1], 0)
    no_image = tmp_path / "no_image.jsonl"
    no_image.write_text(json.dumps({"prompt": "Describe the image.", "answer": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"no_image.jsonl:1: the row has no image"):
        build_task({"name": "scenes", "data": str(no_image)}).setup(loaded[1], 0)
    summarization = build_task({"name": "summarization"})
    with pytest.raises(ConfigError, match=r"task='summarization' has no images"):
        check_modalities(loaded[0], summarization)
    with pytest.raises(ConfigError, match=r"task='scenes' needs an image model"):
        check_modalities(loaded[0].language_model, task)


def run_cli(args: list[str], tmp_path: Path, module: str = "peftbench.run") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PEFTBENCH_RESULTS": str(tmp_path / "results"),
        "PEFTBENCH_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


TINY_RUN = [
    "model=vision_tiny",
    "task=scenes",
    "logger=none",
    "batch_size=2",
    "trainer.max_steps=2",
    "task.scenes={train: 4, val: 1, test: 2}",
    "task.caption_new_tokens=4",
]


def test_a_run_saves_reloads_merges_and_exports_with_its_projector(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from peftbench.generate import main as generate_main
    from peftbench.merge import main as merge_main

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    from peftbench.saved_run import load_adapted, locate

    run = tmp_path / "run"
    result = run_cli([*TINY_RUN, "method=lora", f"hydra.run.dir={run}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "record.json").read_text())
    params = record["params"]
    assert params["projector_trainable"] > 0 and params["trainable"] > params["projector_trainable"]
    for key in ("test/score", "test_before/score", "test/rouge_l/caption", "test/exact_match/count"):
        assert key in record["metrics"]
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert any(k.startswith("projector.") for k in adapter) and not any(
        k.startswith("encoder.") for k in adapter
    )
    assert (run / "adapter" / "peft" / "projector.safetensors").is_file()
    peft_keys = load_file(str(run / "adapter" / "peft" / "adapter_model.safetensors"))
    assert peft_keys and all(k.startswith("base_model.model.model.layers.") for k in peft_keys)

    model, tokenizer, _ = load_adapted(locate(run))
    image = sorted((tmp_path / "cache" / "scenes").glob("*/images/test-00000.png"))[0]
    ids = tokenizer(["Where is the circle?"], return_tensors="pt")
    with torch.no_grad():
        want = model(**ids, images=[str(image)]).logits
    merged = tmp_path / "merged"
    assert merge_main([str(run), "--out", str(merged)]) == 0
    assert (merged / "projector.safetensors").is_file() and (merged / "peftbench_vision.json").is_file()
    from peftbench.models import load_model

    back, _ = load_model({"name_or_path": str(merged)})
    with torch.no_grad():
        assert torch.allclose(back(**ids, images=[str(image)]).logits, want, atol=1e-4)

    prompt = ["--prompt", "How many circles are there?", "--max-new-tokens", "3", "--no-chat"]
    capsys.readouterr()
    assert generate_main([str(run), "--image", str(image), *prompt]) == 0
    printed = capsys.readouterr().out
    answered = model.generate(
        **tokenizer(["How many circles are there?"], return_tensors="pt"),
        images=[str(image)],
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(answered[0, -3:], skip_special_tokens=True)
    assert printed.strip() == text.strip()
    assert generate_main([str(run), "--image", str(tmp_path / "nope.png"), *prompt]) == 2
    assert "nope.png: no such file" in capsys.readouterr().err


def test_an_image_model_with_a_text_task_is_refused_before_training(tmp_path: Path) -> None:
    result = run_cli(
        ["model=vision_tiny", "task=summarization", "logger=none", f"hydra.run.dir={tmp_path}/r"], tmp_path
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "has no images" in errors[0] and "Epoch 0" not in result.stderr


# ----- LLaVA ---------------------------------------------------------------------------------------------
def save_tiny_llava(directory: Path) -> Path:
    """A random tiny LlavaForConditionalGeneration (CLIP vision tower, Llama text model with the SmolLM2
    tokenizer's vocabulary + an image token), its tokenizer and a CLIP image processor: all local."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    from tests.takehome import tokenizer as smol_tokenizer

    tok = smol_tokenizer()
    vocab = len(tok) + 1
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        },
        image_token_index=vocab - 1,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(directory)
    )
    return directory


def test_llava_directory_method_on_its_language_model_only(tmp_path: Path, scenes: dict[str, Path]) -> None:
    from peftbench.methods.base import adapter_layers
    from peftbench.models import load_model

    directory = save_tiny_llava(tmp_path / "llava")
    model, tokenizer = load_model({"name_or_path": str(directory)})
    assert type(model).__name__ == "HfLlavaModel" and model.num_image_tokens == 4
    fresh = copy.deepcopy(model)
    method = build_method(method_config("lora"))
    method.apply(model)
    layers = [n for n, _ in adapter_layers(model)]
    assert layers and all(n.startswith("hf.model.language_model.") for n in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("hf.model.multi_modal_projector.") for n in trainable)
    assert not any(n.startswith("hf.model.vision_tower.") for n in trainable)
    b = batch(tokenizer, scenes)
    out = model(**b)
    assert out.logits.shape[1] == b["input_ids"].shape[1] + 4 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.multi_modal_projector.parameters())
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    model.eval()
    with torch.no_grad():
        want = model(**b).logits
    load_adapter(fresh, save_adapter(model, method, tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(fresh(**b).logits, want, atol=1e-5)
    left = batch(tokenizer, scenes, left=True)
    new = model.generate(left["input_ids"], left["attention_mask"], images=left["images"], max_new_tokens=2)
    assert new.shape[1] == left["input_ids"].shape[1] + 2
    frozen, _ = load_model({"name_or_path": str(directory), "vision": {"freeze_multi_modal_projector": True}})
    build_method(method_config("lora")).apply(frozen)
    assert not any(p.requires_grad for p in frozen.multi_modal_projector.parameters())

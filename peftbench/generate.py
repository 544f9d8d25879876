"""Generate: a run's adapted model (or a merged one) answers prompts, streaming tokens to the terminal.

    python -m peftbench.generate <run dir> --prompt "Summarise: ..."
    python -m peftbench.generate --adapter <adapter dir> --file prompts.txt --max-new-tokens 64
    python -m peftbench.generate --model <merged model dir> --prompt "..." --temperature 0.7 --top-p 0.9
    python -m peftbench.generate <image-model run dir> --image scene.png --prompt "Where is the circle?"

A run or adapter directory: the base is rebuilt from the run's `model` config and the adapter loaded
(`peftbench.saved_run`; ``--base KEY=VALUE`` overrides that config). ``--model DIR``: a plain transformers
model, e.g. the output of `peftbench.merge`. Each prompt (``--prompt``, or ``--file``: one prompt per
non-empty line) goes through the tokenizer's chat template as a user turn when it has one (``--no-chat``:
the raw text; ``--chat`` insists on a template). Decoding is greedy unless ``--temperature`` (> 0) or
``--top-p`` ask for sampling (seeded by ``--seed``). With ``--file`` each answer is headed by its prompt.
``--image FILE``: an image model (model=vision_smollm2, a LLaVA directory) answers each prompt about it.
Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftbench.errors import ConfigError, bad_value, check_int


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen: greedy, or sampled at `temperature` with nucleus `top_p`."""

    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None

    def validate(self) -> None:
        check_int("--max-new-tokens", self.max_new_tokens)
        if self.temperature is not None and not self.temperature >= 0:
            raise bad_value("--temperature", self.temperature, "a number >= 0 (0: greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad_value("--top-p", self.top_p, "a number in (0, 1]")

    @property
    def sampling(self) -> bool:
        return bool(self.temperature) or self.top_p is not None

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.sampling:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature or 1.0,
            "top_p": 1.0 if self.top_p is None else self.top_p,
        }


def encode(tokenizer: Any, prompt: str, chat: bool | None) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of one prompt: a user turn of the chat template (`chat` None: when
    the tokenizer has one), or the raw text."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ConfigError("--chat: this tokenizer has no chat template; accepted: --no-chat (the raw prompt)")
    if chat is None:
        chat = has_template
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        # the template writes the special tokens itself
        return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))
    return dict(tokenizer(prompt, return_tensors="pt"))


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    decoding: Decoding,
    chat: bool | None = None,
    stream: bool = True,
    seed: int = 0,
    image: str | Path | None = None,
) -> list[str]:
    """The model's answer to each prompt (one at a time, so tokens stream as they come), decoded without
    the prompt and special tokens; streamed to stdout with `stream` (each answer under its prompt when
    there are several)."""
    from transformers import TextStreamer

    decoding.validate()
    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise ConfigError(
            f"this model ({type(model).__name__}) cannot generate text; accepted: a causal language model "
            "(model.architecture=causal_lm)"
        )
    extra = image_inputs(model, image)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for index, prompt in enumerate(prompts):
        inputs = {k: v.to(device) for k, v in encode(tokenizer, prompt, chat).items()}
        streamer = None
        if stream:
            if len(prompts) > 1:
                print(f">>> [{index + 1}/{len(prompts)}] {prompt}", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                **inputs, **extra, **decoding.generate_kwargs(), pad_token_id=pad, streamer=streamer
            )
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def image_inputs(model: Any, image: str | Path | None) -> dict[str, Any]:
    """`{"images": [path]}` for an image model given `--image` (the file checked: one line naming it when
    missing or unreadable); nothing without an image; a ConfigError for an image given to a text model."""
    from peftbench.models.multimodal import takes_images
    from peftbench.tasks.scenes_data import check_image

    if image is None:
        return {}
    if not takes_images(model):
        raise ConfigError(
            f"--image {image}: this model ({type(model).__name__}) takes no images; accepted: the run of an "
            "image model (model=vision_smollm2, a LLaVA directory), or no --image"
        )
    check_image(Path(image).expanduser(), "--image")
    return {"images": [str(Path(image).expanduser())]}


def read_prompts(prompt: str | None, file: Path | None) -> list[str]:
    """The prompts: `prompt`, or the non-empty lines of `file`."""
    if prompt is not None:
        if not prompt.strip():
            raise bad_value("--prompt", prompt, "a non-empty text")
        return [prompt]
    assert file is not None
    try:
        lines = Path(file).expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"--file={str(file)!r} is not readable ({err}); accepted: a UTF-8 text file"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--file={str(file)!r} holds no prompt; accepted: one prompt per non-empty line")
    return prompts


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """`(model, tokenizer)` from a run / adapter directory or a plain model directory."""
    from peftbench.models import load_model
    from peftbench.saved_run import apply_overrides, load_adapted, locate

    if args.model is not None:
        path = Path(args.model).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model={str(args.model)!r} is not valid; accepted: a model directory with a config.json "
                "(as peftbench.merge or save_pretrained write it)"
            )
        return load_model(
            apply_overrides({"name_or_path": str(path.resolve())}, args.model_overrides, "--base")
        )
    model, tokenizer, _ = load_adapted(locate(args.run or args.adapter, args.model_overrides, "--base"))
    return model, tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from peftbench.commands import OneLineParser, add_model_overrides

    parser = OneLineParser(prog="python -m peftbench.generate", description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=None, help="a run directory")
    source = parser.add_argument_group("or instead of a run directory")
    source.add_argument("--adapter", type=Path, default=None, help="an adapter directory")
    source.add_argument("--model", type=Path, default=None, help="a plain (e.g. merged) model directory")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", default=None, help="one prompt")
    prompts.add_argument("--file", type=Path, default=None, help="a text file, one prompt per line")
    parser.add_argument("--image", type=Path, default=None, help="an image the prompts are about")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (256)")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap each prompt in the tokenizer's chat template (default: when it has one)",
    )
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    parser.add_argument("--top-p", type=float, default=None, help="sample from this nucleus (0 < p <= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (0)")
    parser.add_argument(
        "--device", default=None, help="where the model runs (default: cuda when available, else cpu)"
    )
    add_model_overrides(parser, flag="--base")
    args = parser.parse_args(argv)
    given = [name for name in ("run", "adapter", "model") if getattr(args, name) is not None]
    if len(given) != 1:
        parser.error(
            f"give exactly one of a run directory, --adapter DIR or --model DIR (got {len(given) or 'none'})"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    from peftbench.commands import fail

    args = parse_args(argv)
    try:
        decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p)
        decoding.validate()
        prompts = read_prompts(args.prompt, args.file)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device)
        except RuntimeError:
            raise bad_value("--device", args.device, "cpu, cuda, cuda:<index>, mps") from None
        model, tokenizer = load(args)
        generate(
            model.to(device), tokenizer, prompts, decoding, chat=args.chat, seed=args.seed, image=args.image
        )
    except ConfigError as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Small pieces the tasks share: argument checks, model-kind checks, loaders, the eval-pass marker,
greedy answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from peftbench.errors import ConfigError
from peftbench.tasks.collate import pad_token_id

#: batch key set on the first batch of every evaluation pass (see `MarkPassStart`)
PASS_START = "eval_pass_start"


def positive_int(name: str, value: Any) -> int:
    """`value` if it is an int >= 1, else a one-line ConfigError naming `task.<name>`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"task.{name}={value!r} is not valid; accepted: an integer >= 1")
    return value


def check_enough_training_data(task_name: str, train_examples: int, batch_size: int, processes: int) -> None:
    """A one-line ConfigError when the training split cannot fill one global batch (before training)."""
    need = batch_size * processes
    if train_examples < need:
        per = f" ({batch_size} per process x {processes} processes)" if processes > 1 else ""
        raise ConfigError(
            f"task {task_name!r} has {train_examples} training examples, fewer than one batch of "
            f"batch_size={batch_size}{per}; accepted: at least {need} training examples (lower batch_size, "
            "shrink task.split.val/test or raise task.split.max_train, or add data)"
        )


def positive_float(name: str, value: Any) -> float:
    """`value` as a float if it is a number > 0, else a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"task.{name}={value!r} is not valid; accepted: a number > 0")
    return float(value)


def check_template(prompt: Any, required: str, fields: Sequence[str]) -> str:
    """`prompt` if it is a format string holding `{required}` whose fields are among `fields`, else a
    one-line ConfigError naming `task.prompt`."""
    if not isinstance(prompt, str) or f"{{{required}}}" not in prompt:
        raise ConfigError(
            f"task.prompt={prompt!r} is not valid; accepted: a template containing {{{required}}}"
        )
    try:
        prompt.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError) as error:
        named = " and ".join(f"{{{f}}}" for f in fields)
        raise ConfigError(
            f"task.prompt={prompt!r} is not valid ({error!r}); accepted: a template whose fields are {named} "
            "(write literal braces as {{ }})"
        ) from None
    return prompt


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether the model has a language-model output head (`get_output_embeddings()` is a module)."""
    get_out = getattr(model, "get_output_embeddings", None)
    return callable(get_out) and get_out() is not None


def require_causal_lm(model: torch.nn.Module, task: str) -> None:
    """ConfigError unless `model` is a causal LM (an encoder or sequence-classification model is not)."""
    if not is_causal_lm(model):
        raise ConfigError(
            f"task={task!r} needs a causal language model (model.architecture=causal_lm); "
            f"{type(model).__name__} has no language-model head"
        )


def require_eos(tokenizer: Any, task: str) -> None:
    """ConfigError unless the tokenizer has an EOS token (causal-LM tokenizers do; encoder ones do not)."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError(
            f"task={task!r} needs a causal language model (model.architecture=causal_lm) whose tokenizer "
            f"has an EOS token; {type(tokenizer).__name__} has none (an encoder's tokenizer?)"
        )


def classifier_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """A sequence-classification model's own head, found structurally; None for other models.

    The head is what the model holds besides its backbone (the child named by `base_model_prefix`):
    the children with parameters (`classifier` in BERT/RoBERTa, `score` in Llama). Several such children
    are returned together in a `ModuleList` (not attached to the model). A model with an LM head is not a
    classifier.
    """
    if is_causal_lm(model):
        return None
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        return None
    heads = [
        child for child in model.children() if child is not backbone and any(True for _ in child.parameters())
    ]
    if not heads:
        return None
    return heads[0] if len(heads) == 1 else torch.nn.ModuleList(heads)


class MarkPassStart:
    """Wraps a collate function for a fixed-order eval loader: sets `batch[PASS_START]` to whether the batch
    holds the split's first example (the first batch of every evaluation pass), so a task can reset running
    corpus-level metrics and run once-per-pass probes."""

    def __init__(self, collate: Callable[[Sequence[Any]], dict[str, Any]], data: Sequence[Any]) -> None:
        self.collate = collate
        self.first = data[0] if len(data) else None

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        batch = self.collate(examples)
        batch[PASS_START] = bool(examples) and examples[0] is self.first
        return batch


def make_loader(
    data: Sequence[Any],
    batch_size: int,
    collate: Callable[[Sequence[Any]], dict[str, Any]],
    shuffle: bool,
    seed: int,
) -> DataLoader:
    """A DataLoader over `data`: shuffled by a generator seeded with `seed`, or in a fixed order with the
    first batch of each pass marked (`MarkPassStart`)."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)  # type: ignore[arg-type]
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=MarkPassStart(collate, data))  # type: ignore[arg-type]


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, batch: dict[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy continuations of the batch's left-padded prompts (`gen_input_ids`, `gen_attention_mask`):
    the new tokens only, decoded without special tokens, stripped."""
    prompt_ids = batch["gen_input_ids"]
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=batch["gen_attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(output[:, prompt_ids.shape[1] :], skip_special_tokens=True)
    return [text.strip() for text in texts]

"""The instruction task's data: the default mixture's instruction types (which corpus, which columns, which
prompt, how each is scored) and the chat-format parsing of instruction files (peftbench/tasks/instruction.py
builds and scores the task from them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peftbench.tasks.sources import ACLSUM, BBC_NEWS, ROTTEN_TOMATOES

MIXTURE = "mixture"
FORMATS = ("auto", "alpaca", "messages")
SECTIONS = "business, entertainment, politics, sports or tech"  # the BBC corpus's category names
DEFAULT_HELD_OUT = ("section",)  # the mixture's type held out when `held_out_types` is null


@dataclass(frozen=True)
class MixtureType:
    """One instruction type of the default mixture: its corpus, columns, prompt and scoring."""

    corpus: str
    source: str  # column holding the text the instruction is about
    target: str  # column holding the answer (after `answers` mapping)
    prompt: str  # the user message, `{source}` = the (truncated) text
    label_like: bool  # scored by exact match (else ROUGE-L)
    answers: tuple[tuple[str, str], ...] = ()  # value -> answer word mapping (e.g. fresh -> positive)


MIXTURE_TYPES: dict[str, MixtureType] = {
    "headline": MixtureType(
        BBC_NEWS, "text", "title", "Write a headline for this news article.\n\n{source}", False
    ),
    "sentiment": MixtureType(
        ROTTEN_TOMATOES,
        "text",
        "category",
        "Is this movie review positive or negative? Answer with one word.\n\n{source}",
        True,
        (("fresh", "positive"), ("rotten", "negative")),
    ),
    "section": MixtureType(
        BBC_NEWS,
        "text",
        "category",
        f"Which section of the newspaper does this article belong to: {SECTIONS}? "
        "Answer with one word.\n\n{source}",
        True,
    ),
    "approach": MixtureType(
        ACLSUM,
        "abstract",
        "approach",
        "Summarise the approach of this paper in one sentence.\n\n{source}",
        False,
    ),
}
"""The default mixture's instruction types."""


def parse_messages(value: Any) -> list[dict[str, str]] | None:
    """A chat as a list of `{role, content}` ending with a non-empty assistant message, else None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list) or len(value) < 2:
        return None
    messages = []
    for m in value:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or m.get("content") is None:
            return None
        messages.append({"role": m["role"], "content": str(m["content"])})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None
    return messages

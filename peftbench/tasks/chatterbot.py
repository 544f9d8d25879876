"""The multilingual dialogue corpus shipped in the PyPI package `chatterbot-corpus` (BSD licence).

The package holds `chatterbot_corpus/data/<language>/<topic>.yml`, 28 languages (English and 27 others),
each file a YAML mapping whose `conversations` key lists dialogues, a dialogue being a list of turns
(strings; consecutive turns answer each other). It is installed with `--no-deps` (its files are all that is
needed) and located without importing it; the files are read with PyYAML (a dependency of omegaconf).

A dialogue is kept when it is a list of at least two non-empty strings. A few entries of the corpus are one
string instead of a list (a YAML indentation slip that folds a whole dialogue into one line: 1 English and
7 Ukrainian ones in 1.3.3), or a single turn: they are dropped and counted (`malformed`, `single_turn`).

Dialogues per language in `chatterbot-corpus==1.3.3` (kept ones):
bengali 113, chinese 467, dutch 314, english 2025, french 89, german 113, hebrew 49, hindi 52, hinglish 31,
indonesian 163, italian 562, japanese 568, korean 454, marathi 33, oriya 44, persian 773, portuguese 321,
russian 43, spanish 280, swedish 43, tamil 31, telugu 9, thai 6, traditionalchinese 456, turkish 93,
ukrainian 456, urdu 15, yoruba 31.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from peftbench.errors import ConfigError
from peftbench.tasks.sources import _package_dir

CHATTERBOT = "chatterbot"
PACKAGE = "chatterbot_corpus"
ENGLISH = "english"
MIN_DIALOGUES = 100
"""A language is in the default selection when it has at least this many dialogues (English excepted)."""


@dataclass(frozen=True)
class DialogueCorpus:
    """The corpus as read: dialogues per language, in file and entry order.

    Attributes:
        dialogues: `{language: [[turn, turn, ...], ...]}`, every dialogue at least two non-empty turns.
        origin: the data directory, for logs and errors.
        stats: counts worth reporting: `files`, `malformed`, `single_turn`.
    """

    dialogues: dict[str, list[list[str]]]
    origin: str
    stats: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Dialogues per language."""
        return {language: len(rows) for language, rows in self.dialogues.items()}

    def default_languages(self, minimum: int = MIN_DIALOGUES) -> list[str]:
        """The languages besides English with at least `minimum` dialogues, sorted by name."""
        return sorted(k for k, n in self.counts().items() if n >= minimum and k != ENGLISH)


def data_dir(root: str | Path | None = None) -> Path:
    """`<chatterbot_corpus>/data`, or `root`; ConfigError when the package is missing."""
    if root is not None:
        return Path(root)
    return _package_dir(PACKAGE) / "data"


def available_languages(root: str | Path | None = None) -> list[str]:
    """The languages the corpus has (its directories holding `.yml` files), without parsing any file."""
    directory = data_dir(root)
    if not directory.is_dir():
        raise ConfigError(
            f"chatterbot data dir {str(directory)!r} does not exist; accepted: install chatterbot-corpus "
            "(pip install --no-deps -r requirements-embedded.txt)"
        )
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and any(p.glob("*.yml")))


def _turns(entry: object) -> list[str] | None:
    """A dialogue's turns as stripped strings, or None when the entry is not a list of non-empty strings.
    Scalars YAML parsed as numbers or booleans (`- 22`) are turns too, written back as text."""
    if not isinstance(entry, list):
        return None
    turns = [str(t).strip() for t in entry if t is not None]
    if len(turns) != len(entry) or not all(turns):
        return None
    return turns


def read_corpus(root: str | Path | None = None, languages: tuple[str, ...] | None = None) -> DialogueCorpus:
    """Read the YAML files of `languages` (None: every language), files in name order.

    A file that is not valid YAML is a ConfigError naming it."""
    import yaml

    directory = data_dir(root)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML was built with it
    wanted = languages if languages is not None else tuple(available_languages(directory))
    dialogues: dict[str, list[list[str]]] = {}
    files = malformed = single = 0
    for language in wanted:
        rows: list[list[str]] = []
        for path in sorted((directory / language).glob("*.yml")):
            files += 1
            try:
                content = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ConfigError(f"chatterbot file {str(path)!r} is not valid YAML: {first}") from None
            entries = content.get("conversations") if isinstance(content, dict) else None
            for entry in entries or []:
                turns = _turns(entry)
                if turns is None:
                    malformed += 1
                elif len(turns) < 2:
                    single += 1
                else:
                    rows.append(turns)
        dialogues[language] = rows
    stats = {"files": files, "malformed": malformed, "single_turn": single}
    return DialogueCorpus(dialogues, f"chatterbot-corpus ({directory})", stats)


@lru_cache(maxsize=4)
def cached_corpus(root: str | None = None) -> DialogueCorpus:
    """`read_corpus` of every language, read once per process (a stages run builds the task twice)."""
    return read_corpus(root)

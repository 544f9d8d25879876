"""What every built-in task shares: the data source, the split, the loaders, the probe, the defaults.

Each built-in task reads records from one source (`dataset` / `data_files` / `subset` / `hf_split`), splits
them deterministically (`split`, `splits.py`), tokenizes each split into a list of examples and serves
loaders over them: training shuffled from the run's seed, val/test in a fixed order (`eval_batch_size`)
with the first batch of a pass marked (`common.make_loader`). It reports the forgetting probe (`probe`).

`DataTask` holds exactly that, as a dataclass whose fields are the config keys every task accepts; a task
is a dataclass subclass that adds its own keys as fields (with its own defaults for `name`, `dataset`,
`eval_batch_size` and `default_split`) and its data building (`setup`, filling `self._data`), collator,
objective (`loss`) and metrics (`evaluate`, optionally `aggregate`). The module and `run.py` still rely only
on the `Task` protocol (`base.py`). `build_task` reads the accepted keys from the dataclass signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from peftbench.tasks.base import mean_metrics
from peftbench.tasks.checks import positive_int, require_causal_lm
from peftbench.tasks.loaders import make_loader
from peftbench.tasks.probe import ForgettingProbe
from peftbench.tasks.sources import BBC_NEWS, RawData, load_any_source
from peftbench.tasks.splits import check_split_spec

Collate = Callable[[Sequence[Any]], dict[str, Any]]


@dataclass(kw_only=True, eq=False)
class DataTask:
    """The shared part of the built-in tasks (see the module doc).

    Args:
        name: the registry name (`task=<name>`), also used in logs and errors.
        dataset: an embedded corpus (`bbc_news`, `rotten_tomatoes`, `aclsum`), a Hugging Face dataset id or
            a local dataset directory.
        data_files: a local JSON/JSONL/CSV/TSV/Parquet file; when set it wins over `dataset`.
        subset, hf_split: HF config name and the one split to read (it is re-split here).
        split: `{val, test}` counts or fractions (the rest is train) and `max_train` (cap, or null);
            null: the task's `default_split`.
        eval_batch_size: batch size for val/test (overrides the caller's when set).
        probe: the forgetting probe (`probe.py`, reported as `probe_loss`); null disables it.
    """

    primary_metric: ClassVar[str]
    #: the split when `split` is null
    default_split: ClassVar[Mapping[str, Any]] = {"val": 64, "test": 128}
    #: `head(model)` refuses a model without a language-model head
    causal_lm_only: ClassVar[bool] = True

    name: str
    dataset: str = BBC_NEWS
    data_files: str | None = None
    subset: str | None = None
    hf_split: str = "train"
    split: Mapping[str, Any] | None = None
    eval_batch_size: int | None = 16
    probe: Mapping[str, Any] | bool | None = True

    def __post_init__(self) -> None:
        if self.eval_batch_size is not None:
            positive_int("eval_batch_size", self.eval_batch_size)
        self.split = check_split_spec(self.split if self.split is not None else self.default_split)
        self.forgetting = ForgettingProbe(self.probe)
        self.stats: dict[str, int] = {}
        self._data: dict[str, list[Any]] = {}
        self._tokenizer: Any = None
        self._seed = 0

    # ---- data -----------------------------------------------------------------------------------------
    def read_source(self) -> RawData:
        """The raw records of `dataset` / `data_files` (ConfigError when they cannot be read)."""
        return load_any_source(self.dataset, self.data_files, self.subset, self.hf_split)

    def collator(self, train: bool) -> Collate:
        """The collate function of the training (`train=True`) or evaluation loaders."""
        raise NotImplementedError(f"{type(self).__name__} defines no collator")

    def split_sizes(self) -> dict[str, int]:
        """Examples per split: `{"train": n, "val": n, "test": n}` (zeros before `setup`)."""
        return {part: len(self._data.get(part, [])) for part in ("train", "val", "test")}

    def examples(self, part: str) -> list[Any]:
        """The tokenized examples of `part`; RuntimeError before `setup`."""
        if part not in self._data:
            raise RuntimeError(
                f"{self.name}: call setup(tokenizer, seed) before asking for the {part} loader"
            )
        return self._data[part]

    def _loader(self, part: str, batch_size: int, train: bool) -> DataLoader:
        return make_loader(self.examples(part), batch_size, self.collator(train), train, self._seed)

    def train_dataloader(self, batch_size: int) -> DataLoader:
        """Training batches, shuffled by a generator seeded with `setup`'s seed."""
        return self._loader("train", batch_size, train=True)

    def val_dataloader(self, batch_size: int) -> DataLoader:
        """Validation batches in a fixed order (`eval_batch_size` when set)."""
        return self._loader("val", self.eval_batch_size or batch_size, train=False)

    def test_dataloader(self, batch_size: int) -> DataLoader:
        """Test batches in a fixed order (`eval_batch_size` when set)."""
        return self._loader("test", self.eval_batch_size or batch_size, train=False)

    # ---- model hooks and metrics ----------------------------------------------------------------------
    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """No head of its own (the LM head answers); checks the model is a causal LM where it must be."""
        if self.causal_lm_only:
            require_causal_lm(model, self.name)
        return None

    def use_reference(self, reference: Any) -> None:
        """Most objectives need no reference model (DPO does: `preference.py`)."""

    def save_with_adapter(self, directory: Path) -> None:
        """Write the task's own files beside the saved adapter (`train.py`, after `save_adapter`); most
        tasks have none (a reward model writes what loading it as a reward needs: `reward_model.py`)."""

    def aggregate(self, outputs: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """The pass's metrics: the mean of each per-example list (`base.mean_metrics`)."""
        return mean_metrics(outputs)

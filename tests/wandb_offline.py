"""Read what an offline W&B run logged from its `run-<id>.wandb` file: history, summary and config keys.

The file is W&B's transaction log: a 7-byte header (`:W&B`, magic 0xBEE1, version) and then LevelDB's
log format (32 KiB blocks of records: crc32c, length, type full/first/middle/last) holding
`wandb_internal_pb2.Record` protobufs. Used by the tests to check the dashboards against real runs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B":
        raise ValueError(f"not a W&B transaction log (header {ident!r})")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _flat(prefix: str, value: Any) -> set[str]:
    if isinstance(value, dict) and value:
        return set().union(*(_flat(f"{prefix}.{k}", v) for k, v in value.items()))
    return {prefix}


def logged_keys(path: Path) -> dict[str, set[str]]:
    """`{"history", "summary", "config"}` -> keys logged in the run file (config keys dotted)."""
    from wandb.proto import wandb_internal_pb2 as pb

    history: set[str] = set()
    summary: set[str] = set()
    config: set[str] = set()
    for raw in _chunks(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "summary":
            summary |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            for item in items:
                config |= _flat(item.key or ".".join(item.nested_key), json.loads(item.value_json))
    return {"history": history, "summary": summary | history, "config": config}

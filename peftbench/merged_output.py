"""Writing a merged model: the directory layout every merge command produces (`peftbench.merge` for one
run, `peftbench.merge_several` for several), and the provenance file that `peftbench.evaluate` and
`peftbench.generate` read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

#: written beside the model: which run(s), method(s) and settings the weights came from
PROVENANCE = "peftbench_merge.json"
#: what marks an earlier merge output (an --out that may be replaced)
MODEL_MARKER = "config.json"


def save_merged(model: nn.Module, tokenizer: Any, out: str | Path, provenance: dict[str, Any]) -> Path:
    """`save_pretrained` of model and tokenizer into `out`, replaced whole and all at once."""
    from peftbench.files import atomic_directory

    with atomic_directory(out, marker=MODEL_MARKER) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return Path(out)

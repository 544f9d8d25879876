"""`python -m tests.ddp_worker OUT OVERRIDE...`: one training run through `peftbench.run.run_single`
(the CLI's path, minus the results store) in the current directory, then every rank writes its model's
whole state (trainable tensors, buffers, the base weights) to `OUT/rank<r>.safetensors`, and rank 0 the
record to `OUT/record.json`. With `trainer=ddp trainer.devices=2` Lightning starts rank 1 by running this
same command again, so the tests can compare what each process ended with (tests/test_ddp.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path, overrides: list[str]) -> None:
    from safetensors.torch import save_file

    from peftbench.run import run_single
    from peftbench.validation import load_config

    record, objects = run_single(load_config(overrides))
    rank = objects["trainer"].global_rank
    state = {k: v.detach().cpu().contiguous().clone() for k, v in objects["model"].state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        (out / "record.json").write_text(json.dumps(record.to_dict(), default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

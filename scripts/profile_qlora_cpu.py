"""Where QLoRA's CPU step time goes, bf16 against fp32 compute (issue: QLoRA crawls on CPUs without bf16).

    python scripts/profile_qlora_cpu.py [--batch 2] [--seq 64] [--threads 1] [--out profile.json]

Loads the embedded SmolLM2-135M-Instruct, applies QLoRA (r 16, all linear layers) once with
`compute_dtype: bfloat16` and once with `float32`, and profiles one forward + backward of each with
torch.profiler (after one untimed warm-up step). Prints the top operators by CPU self time and writes the
step times, the CPU and its bf16 flags as JSON: on a CPU without native bf16 (no avx512_bf16 / amx_bf16)
the bf16 side spends its time in bitsandbytes' 4-bit GEMM, emulating bf16.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from omegaconf import OmegaConf

from peftbench import hardware
from peftbench.methods import build_method
from peftbench.models.loading import load_model


def profile(dtype: str, batch: int, seq: int) -> dict:
    cfg = OmegaConf.load("conf/model/smollm2_135m.yaml")
    model, _ = load_model(cfg)
    method = build_method({"name": "qlora", "compute_dtype": dtype, "dropout": 0.0})
    torch.manual_seed(0)
    method.apply(model)
    model.train()
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    seconds = time.perf_counter() - started
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    top = [
        {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / 1e6 / seconds}
        for e in events
    ]
    print(f"\n== compute_dtype={dtype}: one forward+backward {seconds:.2f} s (batch {batch} x {seq})")
    for row in top:
        print(f"  {row['self_s']:8.2f} s  {row['share']:6.1%}  {row['op']}")
    return {"compute_dtype": dtype, "step_s": seconds, "top_ops": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "cpu": hardware.cpu_model(),
        "cpu_flags": hardware.notable_cpu_flags(),
        "native_bf16": hardware.native_bf16_flags(),
        "auto_choice": hardware.auto_bf16_or_fp32(),
        "threads": args.threads,
        "torch": torch.__version__,
        "runs": [profile(dtype, args.batch, args.seq) for dtype in ("float32", "bfloat16")],
    }
    ratio = result["runs"][1]["step_s"] / result["runs"][0]["step_s"]
    native = result["native_bf16"]
    print(f"\nbf16 / fp32 compute step time: {ratio:.1f}x on {result['cpu']} (native bf16: {native})")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
